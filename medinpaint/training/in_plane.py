"""In-plane anatomy as examples of the slice axis (SMORE, Zhao et al. 2019).

A scan's pixels are finer than its slices: an in-plane axis averaged over a few pixels looks like a
slice axis sampled that thickly, with the scan's own texture and noise and sharp truth in between.
``in_plane_patch`` cuts one such patch; self-supervised adaptation (``inpaint.adapt``) and training
(``RandInPlaneCropd`` in ``training.train``'s pipeline) both use it.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage


def in_plane_patch(base: np.ndarray, hidden_planes: dict[int, np.ndarray], centre: np.ndarray, patch: tuple[int, int, int],
                   ratio: float, axis: int, rng: np.random.RandomState, thickness: int | None = None) -> np.ndarray | None:
    """A training patch whose slice axis is the in-plane ``axis``, averaged over ``thickness`` pixels (default
    ``round(ratio)``: a slice as thick as the scan's), and whose second axis is the slice axis, cubic-resampled by
    ``ratio`` (slice over pixel spacing) to the pixel spacing.  Laid out as the network's (i, j, k); ``None``
    where the scan is too small.  Left-out planes read as ``hidden_planes``."""
    step = max(2, int(round(ratio))) if thickness is None else int(thickness)
    other = 1 - axis
    n_along, n_other, n_k = base.shape[axis], base.shape[other], base.shape[2]
    along, across = patch[2] * step, patch[0]
    depth = int(np.ceil(patch[1] / ratio)) + 4  # slices read, with two on each side for the cubic spline
    if n_along < along or n_other < across or n_k < min(depth, 4):
        return None
    depth = min(depth, n_k)
    a0 = int(np.clip(centre[axis] - along // 2, 0, n_along - along))
    o0 = int(np.clip(centre[other] - across // 2, 0, n_other - across))
    k0 = rng.randint(0, n_k - depth + 1)
    index = [slice(None)] * 2
    index[axis], index[other] = slice(a0, a0 + along), slice(o0, o0 + across)
    block = base[index[0], index[1], k0 : k0 + depth].astype(np.float32)
    for k in range(k0, k0 + depth):
        if k in hidden_planes:
            block[:, :, k - k0] = hidden_planes[k][index[0], index[1]]
    block = np.moveaxis(block, (other, axis), (0, 1))  # (across, along, k)
    thick = block.reshape(across, patch[2], step, depth).mean(axis=2)  # (across, k', depth)
    fine = ndimage.zoom(thick, (1, 1, ratio), order=3, mode="nearest")
    first = max(0, (fine.shape[2] - patch[1]) // 2)
    fine = fine[:, :, first : first + patch[1]]
    if fine.shape[2] < patch[1]:
        fine = np.pad(fine, ((0, 0), (0, 0), (0, patch[1] - fine.shape[2])), mode="edge")
    return np.ascontiguousarray(np.moveaxis(fine, 2, 1))  # (across, slice axis resampled, in-plane axis thickened)


class RandInPlaneCropd(MapTransform, Randomizable):
    """With probability ``prob``, replace "image" (1, i, j, k) of a scan whose slices are at least ``min_ratio``
    times thicker than its pixels ("spacing", mm) by an ``in_plane_patch`` of ``roi_size``: an in-plane axis
    becomes the slice axis, averaged over 2 to ``round(ratio)`` pixels (thin to as thick as the scan's slices, as
    far as the scan is wide enough).
    A scan with fewer than half the crop's slices, which a plain crop would fill mostly with padding, always gives in-plane
    patches (while ``prob`` > 0).  The crop centre is drawn in the patient (above the image's mean).  Drops
    "spacing" (the batch does not carry it)."""

    def __init__(self, roi_size: tuple[int, int, int], prob: float, min_ratio: float = 2.0) -> None:
        MapTransform.__init__(self, keys="image")
        self.roi_size = tuple(int(r) for r in roi_size)
        self.prob = float(prob)
        self.min_ratio = float(min_ratio)

    def randomize(self, data=None) -> None:  # draws happen in __call__
        pass

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        spacing = d.pop("spacing", None)
        image = np.asarray(d["image"])[0]
        too_short = 2 * image.shape[2] < self.roi_size[2]  # a plain crop would be mostly padding: always cut in-plane
        if spacing is None or self.prob <= 0 or (self.R.rand() >= self.prob and not too_short):
            return d
        ratio = float(spacing[2]) / float(max(spacing[0], spacing[1]))
        if ratio < self.min_ratio:
            return d
        plane = image.max(axis=2)
        inside = np.argwhere(plane > plane.mean())
        if not len(inside):
            return d
        centre = inside[self.R.randint(len(inside))]
        axis = int(self.R.randint(2))
        thickest = min(int(round(ratio)), image.shape[axis] // self.roi_size[2])  # the thickened axis must fit the scan
        if thickest < 2:
            return d
        patch = in_plane_patch(image, {}, centre, self.roi_size, ratio, axis, self.R, int(self.R.randint(2, thickest + 1)))
        if patch is not None:
            d["image"] = patch[None]
        return d
