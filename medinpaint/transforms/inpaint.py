"""``Inpaintd``: fill the voxels flagged in a mask key, and record what was synthesized."""

from __future__ import annotations

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medinpaint.artifacts.find import ArtifactMask
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.config import Settings
from medinpaint.correct import correct
from medinpaint.transforms._metatensor import like, to_volume


class Inpaintd(MapTransform):
    """Replaces ``d[key]`` with the corrected image; adds ``d["synthesized_mask"]`` and ``d["medinpaint"]``.

    ``mask_key`` holds labels from ``FindArtifactsd`` or any nonzero mask (treated as a
    user mask); kept metal (label 7) is never overwritten.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "artifact_mask",
        method: str = "network",
        model: str | None = None,
        device: str | None = None,
        modality: str | None = None,
        settings: Settings | None = None,
        synthesized_key: str = "synthesized_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.method, self.model, self.device = mask_key, method, model, device
        self.modality, self.settings, self.synthesized_key = modality, settings, synthesized_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            volume, channel = to_volume(d[key], self.modality)
            labels, _ = to_volume(d[self.mask_key], "OT")
            values = labels.array.astype(np.uint8)
            if f"{self.mask_key}_summary" not in d:  # not from FindArtifactsd: any nonzero voxel is a user mask
                values = np.where(values > 0, int(ArtifactKind.USER_MASK), 0).astype(np.uint8)
            artifacts = ArtifactMask.from_labels(values, volume.affine, sources=[f"data key {self.mask_key!r}"])
            result = correct(volume, artifacts, method=self.method, model=self.model, settings=self.settings, device=self.device)
            d[key] = like(d[key], result.volume.array, channel)
            d[self.synthesized_key] = like(d[key], result.synthesized, channel)
            d["medinpaint"] = {
                "method": result.method,
                "model": result.model,
                "synthesized_voxels": int((result.synthesized > 0).sum()),
                "artifacts": artifacts.summary(),
            }
        return d
