"""Where the metal is and where its artifacts are, from the reconstructed image alone.

Real scans come without a metal-free twin, so inpainting needs both masks estimated: the metal
(to keep) and the streak region (to repair).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medinpaint.metal.fanbeam import FanBeamGeometry

CLIP_HU = 3071.0  # top of the 12-bit DICOM range many scanners write
DENSE_SPECK_FACTOR = 2.0  # a bright speck above this many times the metal threshold is metal however small


def drop_small_components(mask: np.ndarray, min_size: int, values: np.ndarray | None = None, keep_above: float | None = None) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_size`` voxels (noise specks),
    except those where ``values`` exceed ``keep_above`` somewhere (too dense to be noise)."""
    lab, n = ndimage.label(mask)
    if not n:
        return mask
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = ndimage.sum(mask, lab, range(1, n + 1)) >= min_size
    if values is not None and keep_above is not None:
        keep[1:] |= ndimage.maximum(values, lab, range(1, n + 1)) > keep_above
    return keep[lab]


def find_metal(hu_volume, threshold: float | None = None, min_voxels: int = 3, dilate: int = 1) -> np.ndarray:
    """Bool mask of metal in a (D, H, W) or (H, W) HU array.

    Default threshold 2500 HU, above dense cortical bone (<~2000 HU); 2800 HU when the data are
    clipped at 3071 (the clip level then marks the metal core and bright streaks stay below).
    Components smaller than ``min_voxels`` are dropped (noise spikes) unless they reach
    ``DENSE_SPECK_FACTOR`` times the threshold, which no tissue or noise does: a thin wire cut
    across is one or two voxels (12 000 HU in an XCIST skull-base case), and left out of the mask
    it would be neither kept as metal nor re-filled in the trace. The 1-voxel in-plane dilation
    covers the partial-volume rim that an inpainting method should not trust either.
    """
    hu = hu_volume.detach().cpu().numpy() if torch.is_tensor(hu_volume) else np.asarray(hu_volume)
    if hu.ndim not in (2, 3):
        raise ValueError(f"hu_volume must be 2D or 3D, got shape {hu.shape}")
    if min_voxels < 1 or dilate < 0:
        raise ValueError(f"need min_voxels >= 1 and dilate >= 0, got {min_voxels}, {dilate}")
    if threshold is None:
        top = float(np.nanmax(hu)) if hu.size else 0.0
        clipped = abs(top - CLIP_HU) < 1.0 and np.count_nonzero(hu >= CLIP_HU - 1) >= min_voxels
        threshold = 2800.0 if clipped else 2500.0
    full = hu > threshold
    if not full.any():
        return full
    # Work inside the bounding box of the bright voxels (plus the dilation): labels of a whole
    # 512 x 512 x 300 scan would take four bytes per voxel for a few implants.
    box = tuple(
        slice(max(int(i.min()) - dilate, 0), min(int(i.max()) + dilate + 1, n)) for i, n in zip(np.nonzero(full), full.shape)
    )
    mask = drop_small_components(full[box], min_voxels, hu[box], DENSE_SPECK_FACTOR * threshold)
    if dilate:
        structure = ndimage.generate_binary_structure(2, 1)
        if hu.ndim == 3:
            structure = structure[None]  # in-plane only: axial streaks do not cross slices
        mask = ndimage.binary_dilation(mask, structure, iterations=dilate)
    full[:] = False
    full[box] = mask
    return full


def metal_halo(hu_slices, metal_mask, low_hu: float = 600.0, max_px: int = 12, streak_hu: float = 300.0) -> np.ndarray:
    """Bool mask of the bright rim around metal that stays below the metal threshold (metal excluded).

    Re-projection keeps this rim as if it were tissue, and NMAR's prior classes it as bone, so an
    image-domain correction leaves a bright halo unless the rim's rays are re-filled too (on the
    simulated screw at 2e6 photons: 26.5 dB with the metal's trace alone, 31.3 dB with the rim's as
    well). But bone that touches the metal is anatomy, and re-filled from the prior it is lost (a
    rod on the skull's inner table, XCIST: 9.6 dB below the uncorrected slice).

    The two differ all round the metal: blooming is a bright shell and streak roots are bright and
    dark spokes, while bone touches the metal on a side (or two, for a screw through the skull) and
    the rest of the ring is soft tissue. So each metal object's rim reaches as far as the one-pixel
    rings around it (other metal left out) stay bright (median above ``low_hu``) or torn by
    streaks (the brightest 30 % above ``streak_hu`` and the darkest 30 % below ``-streak_hu``:
    outside soft tissue's range on both sides), at most ``max_px``; the rim is the pixels above
    ``low_hu`` within that reach and connected to the metal through such pixels.
    """
    hu = np.asarray(hu_slices)
    metal = np.asarray(metal_mask, dtype=bool)
    if hu.shape != metal.shape or hu.ndim not in (2, 3):
        raise ValueError(f"hu_slices {hu.shape} and metal_mask {metal.shape} must be the same 2D or 3D shape")
    if max_px < 1:
        raise ValueError(f"max_px must be >= 1, got {max_px}")
    squeeze = hu.ndim == 2
    hu, metal = (hu[None], metal[None]) if squeeze else (hu, metal)
    out = np.zeros(hu.shape, dtype=bool)
    for i in range(hu.shape[0]):
        if not metal[i].any():
            continue
        near = np.zeros(hu.shape[1:], dtype=bool)
        objects, _ = ndimage.label(metal[i])
        for label, box in enumerate(ndimage.find_objects(objects), start=1):
            box = tuple(slice(max(b.start - max_px - 1, 0), b.stop + max_px + 1) for b in box)
            to_object = ndimage.distance_transform_edt(objects[box] != label)
            reach = _rim_reach(hu[i][box], to_object, metal[i][box], low_hu, max_px, streak_hu)
            near[box] |= (to_object > 0) & (to_object <= reach)
        rim = near & (hu[i] > low_hu) & ~metal[i]
        labels, _ = ndimage.label(rim | metal[i])
        touching = np.unique(labels[metal[i]])
        out[i] = np.isin(labels, touching[touching > 0]) & rim
    return out[0] if squeeze else out


def _rim_reach(hu, to_object, metal, low_hu: float, max_px: int, streak_hu: float) -> int:
    """How many one-pixel rings around a metal object stay bright or torn all round (see ``metal_halo``)."""
    reach = 0
    for r in range(1, max_px + 1):
        ring = hu[(to_object > r - 1) & (to_object <= r) & ~metal]
        if not ring.size:
            break
        dark, middle, bright = np.percentile(ring, [30, 50, 70])
        if middle <= low_hu and not (bright > streak_hu and dark < -streak_hu):
            break
        reach = r
    return reach


def streak_region(hu_slices, metal_mask, geometry: FanBeamGeometry, nmar_image=None, threshold_hu: float = 40.0, sigma_px: float = 1.5, grow_px: int = 1, min_pixels: int = 10) -> np.ndarray:
    """Bool (B, H, W) region of metal artifacts: where the image departs from its NMAR correction.

    NMAR removes most of the metal's streaks but little else, so |image - NMAR| (smoothed to
    suppress the noise difference) marks the artifacts; the result is closed, grown by ``grow_px``
    and excludes the metal itself. The NMAR image is computed when not given.
    """
    from medinpaint.metal.mar import nmar

    img = torch.as_tensor(hu_slices).float()
    squeeze = img.dim() == 2
    mask = torch.as_tensor(metal_mask).bool()
    if nmar_image is None:
        nmar_image = nmar(img, mask, geometry)
    ref = torch.as_tensor(nmar_image).float()
    if tuple(ref.shape) != tuple(img.shape) or tuple(mask.shape) != tuple(img.shape):
        raise ValueError(f"hu_slices {tuple(img.shape)}, metal_mask {tuple(mask.shape)} and nmar_image {tuple(ref.shape)} must match")
    if threshold_hu <= 0:
        raise ValueError(f"threshold_hu must be > 0, got {threshold_hu}")
    diff = (img - ref).abs().cpu().numpy()
    metal = mask.cpu().numpy()
    if squeeze:
        diff, metal = diff[None], metal[None]
    out = np.zeros(diff.shape, dtype=bool)
    for i in range(diff.shape[0]):
        d = ndimage.gaussian_filter(np.where(metal[i], 0.0, diff[i]), sigma_px)
        region = drop_small_components(ndimage.binary_closing(d > threshold_hu, iterations=2), min_pixels)
        if grow_px:
            region = ndimage.binary_dilation(region, iterations=grow_px)
        out[i] = region & ~metal[i]
    return out[0] if squeeze else out


def overlap(pred, truth) -> dict[str, float]:
    """Dice, recall and precision of a predicted mask against a true one."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    inter = float(np.count_nonzero(p & t))
    n_p, n_t = float(np.count_nonzero(p)), float(np.count_nonzero(t))
    return {
        "dice": 2 * inter / (n_p + n_t) if n_p + n_t else 1.0,
        "recall": inter / n_t if n_t else 1.0,
        "precision": inter / n_p if n_p else 1.0,
    }
