"""Masked image-quality metrics inside the body: what ``evaluate`` and the benchmarks report."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from medinpaint.body import body_mask, body_threshold
from medinpaint.errors import MedinpaintError


def masked_metrics(reference: np.ndarray, corrected: np.ndarray, mask: np.ndarray, modality: str) -> dict:
    """PSNR, SSIM and MAE over ``mask`` ∩ body; data range = the reference's range inside the body."""
    if reference.shape != corrected.shape or reference.shape != mask.shape:
        raise MedinpaintError(f"shapes differ: reference {reference.shape}, corrected {corrected.shape}, mask {mask.shape}")
    finite = np.nan_to_num(reference, nan=float(np.nanmin(reference)))
    # All tissue above the threshold (not only the largest blob), specks opened away, holes filled per slice.
    body = body_mask(finite, body_threshold(finite, modality), slice_axis=2, largest_only=False, opening=True)
    region = mask.astype(bool) & body
    if not region.any():
        raise MedinpaintError("the mask has no voxels inside the body; nothing to evaluate")
    ref = np.nan_to_num(reference.astype(np.float64))
    cor = np.nan_to_num(corrected.astype(np.float64))
    data_range = float(ref[body].max() - ref[body].min())
    error = cor[region] - ref[region]
    mse = float(np.mean(error**2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)
    win = min(7, *(s if s % 2 else s - 1 for s in ref.shape))
    if win < 3:
        raise MedinpaintError(f"volume {ref.shape} is too small for SSIM")
    _, ssim_map = structural_similarity(ref, cor, data_range=data_range, win_size=win, full=True)
    return {
        "psnr_db": round(psnr, 4),
        "ssim": round(float(ssim_map[region].mean()), 6),
        "mae": round(float(np.mean(np.abs(error))), 4),
        "rmse": round(float(np.sqrt(mse)), 4),
        "voxels": int(region.sum()),
        "data_range": data_range,
        "units": "HU" if modality == "CT" else "intensity",
    }


def metal_scored_region(reference: np.ndarray, metal: np.ndarray) -> np.ndarray:
    """Where a metal correction is scored: the reference's body (every blob, holes filled) without the metal
    grown by one pixel in-plane, which no correction replaces. A slice (H, W) or a volume (i, j, k)."""
    if reference.ndim == 2:
        return metal_scored_region(reference[:, :, None], metal[:, :, None])[:, :, 0]
    body = body_mask(reference, slice_axis=2, largest_only=False, opening=False)
    return body & ~ndimage.binary_dilation(metal, np.ones((3, 3, 1), bool))
