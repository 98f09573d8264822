"""Classical fills: the baseline the network must beat, and the network's starting point.

Whole bad slices are filled by interpolation along k between the nearest valid slices
(linear, or cubic through four valid slices).  Any other region gets a harmonic
(diffusion) fill: the smooth surface that matches the surrounding valid voxels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medinpaint.errors import MedinpaintError


SLICE_ORDERS = ("linear", "cubic", "auto")


def interpolate_slices(array: np.ndarray, bad_slices: list[int], order: str = "linear") -> np.ndarray:
    """Fill whole slices ``bad_slices`` along the last axis from the valid ones.

    ``cubic`` is local: the Lagrange cubic through the two nearest valid slices on each
    side (linear where a side has only one).  ``auto`` picks, per volume, whichever of the
    two predicts held-out acquired slices better (see ``choose_slice_order``).
    """
    if order not in SLICE_ORDERS:
        raise ValueError(f"unknown slice interpolation {order!r}")
    out = array.astype(np.float32, copy=True)
    n_k = array.shape[2]
    bad = set(bad_slices)
    valid = [k for k in range(n_k) if k not in bad]
    if not valid:
        raise MedinpaintError("every slice is bad; nothing to interpolate from")
    if not bad:
        return out
    if order == "auto":
        order = choose_slice_order(array, valid)
    for k in sorted(bad):
        points = interpolation_points(valid, k, order)
        out[:, :, k] = array[:, :, points[0]] if len(points) == 1 else _lagrange_at(points, k, lambda p: array[:, :, p])
    return out


def interpolation_points(valid: list[int], k: int, order: str) -> list[int]:
    """The acquired slices slice ``k`` is interpolated from: the nearest one on each side (linear), two
    on each side (cubic, when both sides have two), or the single nearest where one side has none."""
    below, above = valid_neighbours(valid, k, 2)
    if not below or not above:
        return [below[-1] if below else above[0]]
    return below + above if order == "cubic" and len(below) == 2 and len(above) == 2 else [below[-1], above[0]]


def consecutive_runs(slices: list[int]) -> list[list[int]]:
    """``slices`` (any order, repeats ignored) as runs of consecutive indices, in ascending order."""
    runs: list[list[int]] = []
    for k in sorted(set(slices)):
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def valid_neighbours(valid: list[int], k: int, count: int = 1) -> tuple[list[int], list[int]]:
    """Up to ``count`` slices of ``valid`` below ``k`` (nearest last) and above it (nearest first).

    The one search for a gap's acquired neighbours: interpolation, registration and the
    network's crop all read the same slices.
    """
    return [v for v in valid if v < k][-count:], [v for v in valid if v > k][:count]


def _lagrange_at(points: list[int], at: int, plane: Callable[[int], np.ndarray]) -> np.ndarray:
    """The polynomial through the slices at ``points``, evaluated at slice ``at``."""
    return sum(w * plane(p) for w, p in zip(_lagrange_weights(points, at), points))


def _lagrange_weights(points: list[int], at: int) -> list[float]:
    weights = []
    for i, p in enumerate(points):
        w = 1.0
        for j, q in enumerate(points):
            if j != i:
                w *= (at - q) / (p - q)
        weights.append(w)
    return weights


def choose_slice_order(
    array: np.ndarray,
    valid: list[int],
    samples: int = 16,
    read: Callable[[slice], np.ndarray] | None = None,
) -> str:
    """'cubic' if it predicts acquired slices (each left out in turn) better than 'linear'.

    Thin, smooth slices (e.g. 1-2 mm CT) favour cubic; thick slices with structures that
    change between them (e.g. 6 mm MR) favour linear, where cubic overshoots.  ``read``
    returns the slab of slices at a k-range as the caller wants them compared (for example
    normalised); by default the slab of ``array`` itself.
    """
    # Each pick is left out and predicted from its nearest acquired neighbours, exactly as
    # interpolate_slices would fill it, so sparse patterns (every 4th slice missing, runs of
    # 3 every 6) are judged on the gaps they really leave.
    positions = range(2, len(valid) - 2)
    if not positions:
        return "linear"
    picks = [positions[i] for i in np.linspace(0, len(positions) - 1, min(samples, len(positions))).astype(int)]
    errors = {"linear": 0.0, "cubic": 0.0}
    for i in picks:
        truth, predicted = left_out(array, valid, valid[i : i + 1], tuple(errors), read)
        for order in errors:
            errors[order] += float(np.mean((predicted[order] - truth) ** 2))
    return "cubic" if errors["cubic"] < errors["linear"] else "linear"


def left_out(
    array: np.ndarray,
    valid: list[int],
    hidden: list[int],
    orders: tuple[str, ...] = ("linear", "cubic"),
    read: Callable[[slice], np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Acquired slices ``hidden`` (a subset of ``valid``) left out and predicted from the acquired
    slices that remain, exactly as ``interpolate_slices`` would fill that gap.

    The one leave-out helper: it judges the network's pre-fill (``choose_slice_order``) and the
    classical fills of the gate (``gate.py``).  Returns the truth and each order's prediction as
    float64 (X, Y, len(hidden)) slabs; ``read`` returns the slab of slices at a k-range as the
    caller wants them compared (e.g. normalised).
    """
    read = read or (lambda ks: array[:, :, ks])
    remaining = [v for v in valid if v not in set(hidden)]
    if not remaining:
        raise MedinpaintError("every acquired slice is left out; nothing to predict from")
    needed = {order: [interpolation_points(remaining, k, order) for k in hidden] for order in orders}
    cache: dict[int, np.ndarray] = {}

    def plane(p: int) -> np.ndarray:
        if p not in cache:
            cache[p] = np.nan_to_num(read(slice(p, p + 1))[:, :, 0].astype(np.float64))
        return cache[p]

    truth = np.stack([plane(k) for k in hidden], axis=-1)
    predicted = {
        order: np.stack([plane(pts[0]) if len(pts) == 1 else _lagrange_at(pts, k, plane) for k, pts in zip(hidden, needed[order])], axis=-1)
        for order in orders
    }
    return truth, predicted


def harmonic_fill(array: np.ndarray, mask: np.ndarray, iterations: int = 300) -> np.ndarray:
    """Fill ``mask`` with a smooth surface matching its surroundings (Jacobi on the Laplace equation).

    Starts from the nearest valid voxel, so a few hundred iterations converge even for
    large holes; work is restricted to the mask's bounding box.
    """
    out = array.astype(np.float32, copy=True)
    if not mask.any():
        return out
    if mask.all():
        raise MedinpaintError("the whole volume is masked; nothing to fill from")
    _, nearest = ndimage.distance_transform_edt(mask, return_indices=True)
    out[mask] = array[tuple(idx[mask] for idx in nearest)]
    box = bounding_box(mask, margin=1)
    sub, sub_mask = out[box], mask[box]
    kernel = np.zeros((3, 3, 3), dtype=np.float32)
    kernel[1, 1, [0, 2]] = kernel[1, [0, 2], 1] = kernel[[0, 2], 1, 1] = 1 / 6
    for _ in range(iterations):
        smoothed = ndimage.convolve(sub, kernel, mode="nearest")
        sub[sub_mask] = smoothed[sub_mask]
    out[box] = sub
    return out


def classical_fill(array: np.ndarray, whole_slices: list[int], other: np.ndarray | None, order: str = "linear") -> np.ndarray:
    """Slices by interpolation along k, then every other masked voxel (``other``, None for none) by harmonic fill."""
    filled = interpolate_slices(array, whole_slices, order=order)
    holes = np.isfinite(filled)
    np.logical_not(holes, out=holes)  # NaN voxels of valid slices spread into interpolated ones
    if other is not None:
        np.logical_or(holes, other, out=holes)
        for k in whole_slices:  # interpolated: only what is still not finite there
            holes[:, :, k] = ~np.isfinite(filled[:, :, k])
    return harmonic_fill(filled, holes) if holes.any() else filled


def pushpull_fill(image: torch.Tensor, mask: torch.Tensor, smooth_iterations: int = 10) -> torch.Tensor:
    """Fill ``mask`` (1 = hole) of a (B, 1, D, H, W) tensor from a pyramid of masked averages."""
    weight = 1.0 - mask
    filled = _pull(image * weight, weight)
    out = image * weight + filled * mask
    kernel = torch.zeros((1, 1, 3, 3, 3), dtype=image.dtype, device=image.device)
    kernel[0, 0, 1, 1, 0] = kernel[0, 0, 1, 1, 2] = kernel[0, 0, 1, 0, 1] = 1 / 6
    kernel[0, 0, 1, 2, 1] = kernel[0, 0, 0, 1, 1] = kernel[0, 0, 2, 1, 1] = 1 / 6
    for _ in range(smooth_iterations):
        smoothed = F.conv3d(F.pad(out, (1, 1, 1, 1, 1, 1), mode="replicate"), kernel)
        out = image * weight + smoothed * mask
    return out


def _pull(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    estimate = values / weight.clamp_min(1e-8)
    if bool((weight > 0).all()) or min(values.shape[2:]) < 2:
        return estimate
    coarse = _pull(
        F.avg_pool3d(values, 2, ceil_mode=True),
        F.avg_pool3d(weight, 2, ceil_mode=True),
    )
    upsampled = F.interpolate(coarse, size=values.shape[2:], mode="trilinear", align_corners=False)
    alpha = weight.clamp(0.0, 1.0)
    return alpha * estimate + (1 - alpha) * upsampled


def network_prefill(array: np.ndarray, whole_slices: list[int], other: np.ndarray, slice_order: str = "linear") -> np.ndarray:
    """The network's starting point: interpolation across slices, push-pull elsewhere.

    Used identically in training and inference (a model records its ``slice_order``) so the
    network always refines the same thing.
    """
    filled = interpolate_slices(array, whole_slices, order=slice_order)
    other = other.copy()
    other[:, :, whole_slices] = False
    other |= ~np.isfinite(filled)
    if not other.any():
        return filled
    box = bounding_box(other, margin=8)
    sub = torch.from_numpy(np.nan_to_num(filled[box]))[None, None]
    hole = torch.from_numpy(other[box].astype(np.float32))[None, None]
    filled[box] = pushpull_fill(sub, hole)[0, 0].numpy()
    return filled


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n)) for i, n in zip(idx, mask.shape)
    )
