"""MONAI dictionary transforms, for medinpaint inside ``monai.transforms.Compose`` pipelines."""

from medinpaint.transforms.find_artifacts import FindArtifactsd
from medinpaint.transforms.inpaint import Inpaintd

__all__ = ["FindArtifactsd", "Inpaintd"]
