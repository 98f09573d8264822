"""Masked image-quality metrics inside the body: what ``evaluate`` and the benchmarks report."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from medinpaint.errors import MedinpaintError


def body_mask(reference: np.ndarray, modality: str) -> np.ndarray:
    """Voxels inside the patient: CT above -500 HU, MR above 10% of its 99th percentile, holes filled."""
    finite = np.nan_to_num(reference, nan=float(np.nanmin(reference)))
    threshold = -500.0 if modality == "CT" else 0.1 * float(np.percentile(finite, 99))
    body = finite > threshold
    body = ndimage.binary_opening(body, iterations=1)
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    return body


def masked_metrics(reference: np.ndarray, corrected: np.ndarray, mask: np.ndarray, modality: str) -> dict:
    """PSNR, SSIM and MAE over ``mask`` ∩ body; data range = the reference's range inside the body."""
    if reference.shape != corrected.shape or reference.shape != mask.shape:
        raise MedinpaintError(f"shapes differ: reference {reference.shape}, corrected {corrected.shape}, mask {mask.shape}")
    body = body_mask(reference, modality)
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
