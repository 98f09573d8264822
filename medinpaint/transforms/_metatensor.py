"""Convert between what ``LoadImaged`` returns (MetaTensor, RAS affine, optional channel) and a Volume."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError


def to_volume(image, modality: str | None) -> tuple[Volume, bool]:
    """(Volume, had_channel): accepts (X, Y, Z) or (1, X, Y, Z) arrays or MetaTensors."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    channel = array.ndim == 4
    if channel:
        if array.shape[0] != 1:
            raise MedinpaintError(f"expected one channel, got {array.shape[0]}")
        array = array[0]
    if array.ndim != 3:
        raise MedinpaintError(f"expected a 3D image (optionally channel-first), got shape {array.shape}")
    affine = np.eye(4)
    if isinstance(image, MetaTensor):
        affine = np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
    volume = Volume(array=array.astype(np.float32), affine=affine, modality=(modality or "OT").upper())
    if modality is None:
        from medinpaint.data.load import guess_modality

        volume.modality = guess_modality(volume.array)
    return volume, channel


def like(image, array: np.ndarray, channel: bool):
    """Wrap ``array`` like ``image``: same type, channel layout and metadata."""
    data = array[None] if channel else array
    tensor = torch.as_tensor(np.ascontiguousarray(data))
    if isinstance(image, MetaTensor):
        wrapped = MetaTensor(tensor)
        wrapped.copy_meta_from(image)  # affine and the rest of the metadata, unchanged
        return wrapped
    if isinstance(image, torch.Tensor):
        return tensor
    return data
