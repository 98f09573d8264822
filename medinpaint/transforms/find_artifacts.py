"""``FindArtifactsd``: add the labelled artifact mask of an image to the data dictionary."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import MapTransform

from medinpaint.artifacts.find import find_artifacts
from medinpaint.artifacts.metal import MetalDetection
from medinpaint.artifacts.slices import SliceDetection
from medinpaint.transforms._metatensor import like, to_volume


class FindArtifactsd(MapTransform):
    """Writes ``d[mask_key]`` (uint8 labels, same layout and affine as the image).

    The k axis (last spatial axis) is taken as the slice axis, as ``LoadImaged`` returns it.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "artifact_mask",
        artifacts: str = "auto",
        modality: str | None = None,
        slice_settings: SliceDetection | None = None,
        metal_settings: MetalDetection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.artifacts, self.modality = mask_key, artifacts, modality
        self.slice_settings, self.metal_settings = slice_settings, metal_settings

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            volume, channel = to_volume(d[key], self.modality)
            found = find_artifacts(volume, artifacts=self.artifacts, slice_settings=self.slice_settings,
                                   metal_settings=self.metal_settings)
            name = self.mask_key if len(self.keys) == 1 else f"{key}_{self.mask_key}"
            d[name] = like(d[key], found.labels, channel)
            d[f"{name}_summary"] = found.summary()
        return d
