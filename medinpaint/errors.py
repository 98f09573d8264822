"""The one exception type that the CLI turns into a one-line ``error:`` message."""


class MedinpaintError(Exception):
    """Bad input or an impossible request, explained in one line for the user."""
