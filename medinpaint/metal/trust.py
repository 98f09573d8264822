"""How much of the metal correction's change to keep, pixel by pixel, judged from the scan itself.

The gate decides per slice whether the change is large enough to be worth making; it cannot
tell a change that cancels the acquired streaks from one that draws new structure (NMAR's prior
misclassing thin bone, the skin beside the metal). Streaks are structure the acquired image shows
and the truth lacks, so a right change cancels the image's own gradients, a wrong one adds
gradients the image does not have. Weighting the change by ``w`` in a neighbourhood to minimise
the gradient energy of ``image + w * change`` is the least-squares weight when the true image's
gradients are uncorrelated with the change (the pixel noise averages out over the window):

    w = clip(-<grad image, grad change> / <|grad change|^2>, 0, 1)

so the change keeps its full weight where it removes what the scan shows, and fades towards the
acquired voxels where the scan shows nothing it would remove.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def change_weight(
    image: np.ndarray, change: np.ndarray, keep_out: np.ndarray, spacing_mm: tuple[float, float], window_mm: float,
    smooth_px: float = 1.0,
) -> np.ndarray:
    """Weight in [0, 1] (H, W) for ``change`` on ``image``; ``keep_out`` (the metal and its edge) does not vote.

    Both images are smoothed by ``smooth_px`` first (the pixel noise would otherwise dominate the
    gradients) and the products are averaged by a Gaussian of ``window_mm``. Where the change
    has no gradient at all the weight is 1 (nothing to judge, nothing changed).
    """
    if window_mm <= 0:
        raise ValueError(f"window_mm must be > 0, got {window_mm}")
    a = ndimage.gaussian_filter(image.astype(np.float64), smooth_px)
    c = ndimage.gaussian_filter(change.astype(np.float64), smooth_px)
    votes = (~keep_out).astype(np.float64)
    ga, gc = np.gradient(a, *spacing_mm), np.gradient(c, *spacing_mm)
    sigma = [window_mm / s for s in spacing_mm]
    along = ndimage.gaussian_filter((ga[0] * gc[0] + ga[1] * gc[1]) * votes, sigma)
    energy = ndimage.gaussian_filter((gc[0] ** 2 + gc[1] ** 2) * votes, sigma)
    weight = np.ones(change.shape, dtype=np.float64)
    some = energy > 1e-12 * max(float(energy.max()), 1e-30)
    weight[some] = np.clip(-along[some] / energy[some], 0.0, 1.0)
    return weight.astype(np.float32)


def trust_keep_out(metal: np.ndarray) -> np.ndarray:
    """The metal and two pixels around it: its blooming edge, where the image's gradient is the metal's own."""
    return ndimage.binary_dilation(metal, np.ones((5, 5), bool))


def trusted_change(image: np.ndarray, change: np.ndarray, metal: np.ndarray, spacing_mm: tuple[float, float],
                   window_mm: float | None) -> tuple[np.ndarray, float]:
    """The change weighted by ``change_weight`` (``window_mm`` None: unweighted) and the share of it kept.

    The share is the weight averaged over the change's magnitude: 1.0 when all of it is kept.
    The metal and two pixels around it (its blooming edge, where the image's gradient is the
    metal's own) do not vote.
    """
    if window_mm is None or not np.any(change):
        return change, 1.0
    return weighted_change(change, change_weight(image, change, trust_keep_out(metal), spacing_mm, window_mm))


def weighted_change(change: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """``weight`` x ``change`` and the share of the change's magnitude kept (1.0 for a zero change)."""
    size = np.abs(change)
    total = float(size.sum())
    share = float((weight * size).sum() / total) if total > 0 else 1.0
    return (weight * change).astype(np.float32), share
