"""The ``medinpaint`` command: a thin layer over the Python API."""
