"""medinpaint: repair damaged CT and MR volumes and say exactly which voxels were synthesized.

The four verbs follow the data's path::

    volume = medinpaint.load("scan.nii.gz")
    artifacts = medinpaint.find_artifacts(volume)
    result = medinpaint.correct(volume, artifacts)
    medinpaint.save(result, "scan_corrected.nii.gz")
"""

__version__ = "0.1.0"

from medinpaint.artifacts.find import ArtifactMask, find_artifacts  # noqa: E402
from medinpaint.correct import Correction, correct  # noqa: E402
from medinpaint.data.load import load  # noqa: E402
from medinpaint.data.volume import Volume  # noqa: E402
from medinpaint.errors import MedinpaintError  # noqa: E402
from medinpaint.output import save, save_mask  # noqa: E402

__all__ = [
    "ArtifactMask", "Correction", "MedinpaintError", "Volume",
    "correct", "find_artifacts", "load", "save", "save_mask", "__version__",
]
