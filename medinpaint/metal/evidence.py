"""How strong a slice's metal streaks are against its own noise, and where a correction matters.

Image-domain metal correction can add new errors (the metal trace also carries the anatomy
behind it), so it is only worth doing where the change it would make stands clearly above the
scan's noise. Both measures come from the slice itself: no metal-free twin is needed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medinpaint.body import body_mask
from medinpaint.metal.masks import drop_small_components

MAD_TO_SD = 1.4826  # median absolute deviation of a Gaussian -> its standard deviation


def noise_hu(image: np.ndarray, body: np.ndarray, exclude: np.ndarray, sigma_px: float = 1.0) -> float:
    """Robust noise of one slice: 1.4826 x MAD of a high-pass (image - Gaussian), in the body outside ``exclude``.

    The high-pass keeps the pixel noise and drops the anatomy; the median ignores the edges and
    the streaks that remain in the sample. Falls back to the whole slice outside ``exclude``
    when the body is too small to measure.
    """
    high = image - ndimage.gaussian_filter(image, sigma_px)
    sample = high[body & ~exclude]
    if sample.size < 100:
        sample = high[~exclude]
    return float(MAD_TO_SD * np.median(np.abs(sample - np.median(sample))))


def slice_noise(image: np.ndarray, metal: np.ndarray, ring_px: float, body: np.ndarray | None = None) -> float:
    """``noise_hu`` of one slice in its body (default ``body_mask`` with the metal), farther than ``ring_px`` from the metal."""
    body = body_mask(image) | metal if body is None else body
    near = ndimage.distance_transform_edt(~metal) <= ring_px
    return noise_hu(image, body, near)


def streak_evidence(change: np.ndarray, metal: np.ndarray, body: np.ndarray, noise: float, ring_px: float, sigma_px: float = 1.5) -> float:
    """Root-mean-square of the smoothed change in a ring around the metal, in units of ``noise``.

    Smoothing keeps the streaks (coherent over many pixels) and averages out the noise that the
    change carries, so a mild artifact scores near zero and strong streaks far above one.
    """
    distance = ndimage.distance_transform_edt(~metal)
    ring = (distance > 2) & (distance <= ring_px) & body
    if not ring.any() or noise <= 0:
        return 0.0
    smooth = ndimage.gaussian_filter(np.where(metal, 0.0, change), sigma_px)
    return float(np.sqrt(np.mean(smooth[ring] ** 2)) / noise)


def significant_change(change: np.ndarray, metal: np.ndarray, threshold_hu: float, sigma_px: float = 1.5, grow_px: int = 1, min_pixels: int = 10) -> np.ndarray:
    """Bool region where |smoothed change| exceeds ``threshold_hu``: closed, grown, without the metal.

    The change is smoothed *before* its magnitude is taken: a streak is coherent over many pixels
    and survives, while noise and the fine moire that the re-projection leaves far from the metal
    average out (on XCIST cases 20-45 % fewer voxels far from the metal are changed,
    at no loss of streak removal). Outside the region the acquired voxels are kept bit for bit.
    """
    if threshold_hu <= 0:
        raise ValueError(f"threshold_hu must be > 0, got {threshold_hu}")
    smooth = np.abs(ndimage.gaussian_filter(np.where(metal, 0.0, change), sigma_px))
    region = drop_small_components(ndimage.binary_closing(smooth > threshold_hu, iterations=2), min_pixels)
    if grow_px:
        region = ndimage.binary_dilation(region, iterations=grow_px)
    return region & ~metal
