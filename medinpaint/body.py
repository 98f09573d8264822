"""Where the patient is: the one body outline that metrics, metal placement and metal detection share."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CT_BODY_HU = -500.0  # between air (-1000) and fat (-100): robust to noise and to lung


def body_threshold(image: np.ndarray, modality: str) -> float:
    """CT: -500 HU; MR (no absolute scale): 10% of the 99th percentile."""
    if modality == "CT":
        return CT_BODY_HU
    return 0.1 * float(np.percentile(image, 99))


def body_mask(
    image,
    threshold: float = CT_BODY_HU,
    slice_axis: int = 0,
    largest_only: bool = True,
    opening: bool = False,
) -> np.ndarray:
    """Bool mask of the voxels above ``threshold``, holes filled slice by slice along ``slice_axis``.

    ``largest_only`` keeps one connected blob per slice (the patient, not the table or a
    bright speck in the air); ``opening`` first removes one-voxel specks in 3D.  A 2D image
    is one slice.  NaN is never above the threshold.
    """
    image = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)  # a torch tensor too
    if image.ndim not in (2, 3):
        raise ValueError(f"body_mask needs a 2D slice or a 3D volume, got shape {image.shape}")
    above = image > threshold
    if opening:
        above = ndimage.binary_opening(above, iterations=1)
    if image.ndim == 2:
        return _fill_slice(above, largest_only)
    out = np.zeros(above.shape, dtype=bool)
    source, target = np.moveaxis(above, slice_axis, 0), np.moveaxis(out, slice_axis, 0)  # views: target writes into out
    for i, plane in enumerate(source):
        target[i] = _fill_slice(plane, largest_only)
    return out


def _fill_slice(plane: np.ndarray, largest_only: bool) -> np.ndarray:
    if largest_only:
        lab, n = ndimage.label(plane)
        if not n:
            return np.zeros(plane.shape, dtype=bool)
        sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
        plane = lab == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(plane)
