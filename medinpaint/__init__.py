"""medinpaint: repair damaged CT and MR volumes, and say exactly which voxels were synthesized."""

__version__ = "0.1.0"
