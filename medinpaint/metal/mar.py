"""Classical metal-artifact reduction from reconstructed images only (no raw data needed).

Both methods re-project the image, treat the metal trace as missing data and re-fill it: LI
(Kalender et al. 1987) by linear interpolation along the detector, NMAR (Meyer et al. 2010)
by interpolating the sinogram normalised by a tissue-class prior, which keeps edges of bone and
body outline that LI smears into new streaks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medinpaint.metal.fanbeam import FanBeamGeometry, coarser, enclosing_circle, fbp, project, rays_near

COARSE_LI_FROM_PX = 256  # NMAR's prior is reconstructed at half resolution from slices this large
DARKER_THAN_AIR_HU = -1100.0  # mar_change raises voxels below this to air: no noise makes them, metal does
AIR_HU = -1000.0
MU_SCALE = 1.0 / 1000.0  # projections are of (HU + 1000) / 1000: water = 1, air = 0
PRIOR_FLOOR_MM = 5.0  # NMAR normalises only by prior rays through at least this much water-equivalent path (mm)
PRIOR_AGREES_WITHIN = 1.5  # mar_change normalises only where the scan and the prior agree within this factor beside the trace
BONE_CONFIRMED_BEYOND_PX = 12  # acquired bone joins NMAR's prior when LI shows the same structure this far from the metal
BONE_CAP_PERCENTILE = 99  # ... and is no brighter than this percentile of that far part (brighter: streaks)


def _mu(hu: torch.Tensor) -> torch.Tensor:
    """HU -> what the projector integrates (air 0, water 1)."""
    return (hu - AIR_HU) * MU_SCALE


def _fbp_hu(geometry: FanBeamGeometry, sinogram: torch.Tensor, filter: str, pixels=None) -> torch.Tensor:
    """FBP of a sinogram of ``_mu`` values, in HU."""
    return fbp(geometry, sinogram, filter=filter, pixels=pixels) / MU_SCALE + AIR_HU


def _as_mask(mask, img: torch.Tensor, name: str) -> torch.Tensor:
    mask = torch.as_tensor(mask, device=img.device).bool()
    mask = mask[None] if mask.dim() == 2 else mask
    if tuple(mask.shape) != tuple(img.shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match image_hu {tuple(img.shape)}")
    return mask


def _prepare(image_hu, metal_mask, geometry: FanBeamGeometry, trace_mask=None):
    img = torch.as_tensor(image_hu).float()
    squeeze = img.dim() == 2
    img = img[None] if squeeze else img
    if img.dim() != 3 or tuple(img.shape[-2:]) != tuple(geometry.image_shape):
        raise ValueError(f"image_hu must be (B, H, W) with (H, W) = {tuple(geometry.image_shape)}, got {tuple(img.shape)}")
    mask = _as_mask(metal_mask, img, "metal_mask")
    trace_mask = mask if trace_mask is None else _as_mask(trace_mask, img, "trace_mask") | mask
    return img, mask, trace_mask, squeeze


def metal_trace(geometry: FanBeamGeometry, metal_mask: torch.Tensor) -> torch.Tensor:
    """Detector bins whose ray touches the metal (bilinear projection > 0 widens it by ~1 bin).

    Only the rays that pass near the metal are traced (``rays_near``): the rest cannot touch it.
    """
    rays, around = rays_near(geometry, metal_mask), enclosing_circle(geometry, metal_mask)
    return project(geometry, metal_mask.float(), rays=rays, support=around) > 1e-3 * geometry.ray_step_mm


def interpolate_trace(sinogram: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """Replace trace bins by linear interpolation between the nearest clean bins of the same view."""
    n_c = sinogram.shape[-1]
    idx = torch.arange(n_c, device=sinogram.device).expand_as(sinogram)
    clean = ~trace
    left = torch.where(clean, idx, torch.full_like(idx, -1)).cummax(-1).values
    right = torch.where(clean, idx, torch.full_like(idx, n_c)).flip(-1).cummin(-1).values.flip(-1)
    has_l, has_r = left >= 0, right < n_c
    vl = torch.gather(sinogram, -1, left.clamp(0, n_c - 1))
    vr = torch.gather(sinogram, -1, right.clamp(0, n_c - 1))
    wgt = ((idx - left).float() / (right - left).clamp(min=1).float()).clamp(0, 1)
    filled = torch.where(has_l & has_r, vl + wgt * (vr - vl), torch.where(has_l, vl, torch.where(has_r, vr, torch.zeros_like(vl))))
    return torch.where(trace, filled, sinogram)


def _finish(corrected, img, mask, geometry, filter, squeeze):
    # The literature's LI/NMAR: a plain FBP of the corrected sinogram (every voxel re-made, and
    # blurred by the round trip). ``mar_change`` gives img + FBP(corrected - original) instead,
    # which the correction uses only where that change is significant (issue 17).
    out = _fbp_hu(geometry, corrected, filter)
    out = torch.where(mask, img, out)
    return out[0] if squeeze else out


def li_mar(image_hu, metal_mask, geometry: FanBeamGeometry, filter: str = "shepp-logan", trace_mask=None) -> torch.Tensor:
    """Linear-interpolation MAR; metal voxels are put back with their original values.

    ``trace_mask`` (default: the metal) is what is removed from the sinogram: the metal plus, for
    example, its halo (``masks.metal_halo``); only the metal itself is put back.
    """
    img, mask, _, sino, corrected, squeeze = _mar_sinograms(image_hu, metal_mask, geometry, "li", filter, trace_mask)
    return _finish(corrected, img, mask, geometry, filter, squeeze)


def gaussian_smooth(x: torch.Tensor, sigma_px: float, padding: str = "replicate") -> torch.Tensor:
    """Separable Gaussian low-pass of (B, H, W) or (B, 1, H, W) slices, truncated at 3 sigma, edges padded by ``padding``."""
    r = max(1, int(3 * sigma_px))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=torch.float32) / sigma_px) ** 2)
    k = k / k.sum()
    y = x[:, None] if x.ndim == 3 else x
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=padding), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=padding), k.view(1, 1, -1, 1))
    return y[:, 0] if x.ndim == 3 else y


def nmar_prior(li_image_hu: torch.Tensor, metal_mask: torch.Tensor, air_hu: float = -500.0, bone_hu: float = 350.0, sigma_px: float = 1.0) -> torch.Tensor:
    """Tissue-class prior (Meyer 2010): air -> -1000, soft tissue and metal -> 0 HU, bone kept.

    Thresholds act on a lightly smoothed LI image so that residual streaks do not flip classes.
    """
    smooth = gaussian_smooth(li_image_hu, sigma_px)
    prior = torch.where(smooth < air_hu, torch.full_like(smooth, AIR_HU), torch.zeros_like(smooth))
    prior = torch.where(smooth > bone_hu, li_image_hu, prior)
    return torch.where(metal_mask, torch.zeros_like(prior), prior)


def with_acquired_bone(
    prior_hu: torch.Tensor, li_image_hu: torch.Tensor, image_hu: torch.Tensor, trace_mask: torch.Tensor, bone_hu: float = 350.0,
    sigma_px: float = 1.0,
) -> torch.Tensor:
    """NMAR's prior with the acquired image's bone put back where LI lost it.

    LI interpolates away the chord of bone that the metal's trace covers (a screw in the skull:
    the skull along each tangent through the metal), so a prior classed from LI lacks bone where
    the fill leans on it most, and the fill draws a dark band along that tangent (a rod in a head
    CT's skull: -11 dB on our simulator's head cases). The acquired image still shows that bone,
    but its bright streaks would pass for bone too (taking all of it cost 1.1 dB on XCIST): only
    connected structures that LI also shows as bone farther than ``BONE_CONFIRMED_BEYOND_PX`` from
    the metal count, and in them only pixels no brighter than the 99th percentile of that far,
    confirmed part (streaks on a vertebra run far above its bone: without this cap a screw in one
    lost 4 dB), and only where they are brighter than the prior. Batched (B, H, W); labelled on
    the CPU.
    """
    acquired = ((gaussian_smooth(image_hu, sigma_px) > bone_hu) & ~trace_mask).cpu().numpy()
    li_bone = (gaussian_smooth(li_image_hu, sigma_px) > bone_hu).cpu().numpy()
    values, metal = image_hu.cpu().numpy(), trace_mask.cpu().numpy()
    extra = np.zeros_like(acquired)
    for i in range(acquired.shape[0]):
        if not metal[i].any():
            continue
        labels, _ = ndimage.label(acquired[i])
        confirmed = li_bone[i] & (ndimage.distance_transform_edt(~metal[i]) > BONE_CONFIRMED_BEYOND_PX) & (labels > 0)
        for label in np.unique(labels[confirmed]):
            structure = labels == label
            extra[i] |= structure & (values[i] <= np.percentile(values[i][structure & confirmed], BONE_CAP_PERCENTILE))
    extra = torch.from_numpy(extra).to(prior_hu.device)
    return torch.where(extra & (image_hu > prior_hu), image_hu, prior_hu)


def nmar(
    image_hu, metal_mask, geometry: FanBeamGeometry, filter: str = "shepp-logan", air_hu: float = -500.0, bone_hu: float = 350.0,
    trace_mask=None,
) -> torch.Tensor:
    """Normalised MAR (Meyer et al., Med. Phys. 37(10), 2010); metal voxels put back.

    ``trace_mask`` as in ``li_mar``: with the metal's halo in it, the halo's rays are re-filled
    too and the halo is classed as soft tissue in the prior instead of being kept as bone.
    """
    img, mask, _, sino, corrected, squeeze = _mar_sinograms(image_hu, metal_mask, geometry, "nmar", filter, trace_mask, air_hu, bone_hu)
    return _finish(corrected, img, mask, geometry, filter, squeeze)


def mar_change(
    image_hu, metal_mask, geometry: FanBeamGeometry, method: str = "nmar", filter: str = "shepp-logan", trace_mask=None,
    pixels=None,
) -> torch.Tensor:
    """What LI or NMAR would change, in HU: FBP(corrected sinogram - sinogram of the image).

    The sinogram difference is zero outside the metal trace, so adding this to the image
    ("reconstruct only the change") keeps the image's own sharpness and noise wherever the
    change is small, instead of the blur of a full project/FBP round trip. Zero on the metal,
    which is always kept as acquired, and outside ``pixels`` (bool (H, W), default all: the
    patient), where the image is taken as air. Inside ``pixels`` it also raises voxels below
    ``DARKER_THAN_AIR_HU`` to air (-1000 HU), as the sinograms see them.

    NMAR's prior also takes back the acquired image's bone that LI lost (``with_acquired_bone``),
    and where the prior disagrees with the scan beside the trace the fill is offset by the prior
    instead of scaled by it (``_offset_fill``); the literature's ``nmar`` does neither. Only the
    rays through the trace and its two neighbours are projected at full resolution, and NMAR's
    prior comes from an LI reconstruction at half resolution: the cost is that of the trace and of
    back-projecting ``pixels``, not of two full round trips.
    """
    _check_method(method)
    img, mask, trace_mask, squeeze = _prepare(image_hu, metal_mask, geometry, trace_mask)
    pixels = torch.ones(img.shape[-2:], dtype=torch.bool, device=img.device) if pixels is None else torch.as_tensor(pixels, device=img.device).bool()
    around = enclosing_circle(geometry, pixels)  # the patient: air (zero) around it
    trace = metal_trace(geometry, trace_mask)
    needed = trace.any(0)
    needed = needed | F.pad(needed[:, 1:], (0, 1)) | F.pad(needed[:, :-1], (1, 0))  # the clean bins the interpolation reads
    mu = torch.where(pixels, _mu(img.clamp(min=AIR_HU)), torch.zeros_like(img))
    sino = project(geometry, mu, rays=needed, support=around)
    corrected = interpolate_trace(sino, trace)
    if method == "nmar":
        li = _coarse_li(geometry, mu, trace_mask, trace, filter, pixels)
        prior = with_acquired_bone(nmar_prior(li, trace_mask), li, img, trace_mask)
        prior_sino = project(geometry, torch.where(pixels, _mu(prior), torch.zeros_like(prior)), rays=needed, support=around)
        corrected = _normalised_fill(geometry, sino, prior_sino, trace, fallback=_offset_fill(sino, prior_sino, trace),
                                     untrusted=_prior_disagrees(sino, prior_sino, trace))
    change = fbp(geometry, corrected - sino, filter=filter, pixels=pixels) / MU_SCALE
    # The sinograms are of the image raised to air (AIR_HU). Voxels far darker than air (photon
    # starvation beside dense metal: -2700 HU on XCIST's silver) are artifact by definition, and the
    # change raises them to air too; air's own noise (and -1024 HU air) is left as acquired.
    dark = pixels & (img < DARKER_THAN_AIR_HU)
    change = change + torch.where(dark, AIR_HU - img, torch.zeros_like(img))
    change = torch.where(mask, torch.zeros_like(change), change)
    return change[0] if squeeze else change


def _coarse_li(
    geometry: FanBeamGeometry, mu: torch.Tensor, trace_mask: torch.Tensor, trace: torch.Tensor, filter: str, pixels: torch.Tensor,
) -> torch.Tensor:
    """The literature's LI image (HU) for NMAR's prior, made on a scanner with half the pixels, views
    and channels (an eighth of the cost) and brought back to the image grid: the prior only
    classes air, tissue and bone on a smoothed image. A full LI reconstruction, not image + LI
    change: the change cannot cancel the streaks' sharp edges, which the prior then takes for air
    or bone (-3.7 dB on XCIST's steel ball when tried)."""
    if min(geometry.image_shape) < COARSE_LI_FROM_PX:  # small grids: full resolution costs little
        return _fbp_hu(geometry, interpolate_trace(project(geometry, mu), trace), filter)
    half = coarser(geometry)
    half = dataclasses.replace(half, n_views=4 * round(geometry.n_views / 8), n_channels=geometry.n_channels // 2)
    small = F.adaptive_avg_pool2d(mu[:, None], half.image_shape)[:, 0]
    small_mask = F.adaptive_max_pool2d(trace_mask[:, None].float(), half.image_shape)[:, 0] > 0
    inside = F.adaptive_max_pool2d(pixels[None, None].float(), half.image_shape)[0, 0] > 0
    li = interpolate_trace(project(half, small, support=enclosing_circle(half, inside)), metal_trace(half, small_mask))
    image = _fbp_hu(half, li, filter, pixels=inside)
    return F.interpolate(image[:, None], size=geometry.image_shape, mode="bilinear", align_corners=False)[:, 0]


def _check_method(method: str) -> None:
    if method not in ("li", "nmar"):
        raise ValueError(f"unknown MAR method {method!r}; choose li or nmar")


def _normalised_fill(
    geometry: FanBeamGeometry, sino: torch.Tensor, prior_sino: torch.Tensor, trace: torch.Tensor, fallback: torch.Tensor,
    untrusted: torch.Tensor | None = None,
) -> torch.Tensor:
    """NMAR's fill: interpolate the sinogram normalised by the prior's, then undo the normalisation.

    The ratio is meaningless where the prior sees (almost) no patient on a ray next to the trace:
    a ray grazing the skin, which the prior classed as air, gave ratios in the thousands, carried
    across the trace onto rays through the whole patient (metal near the body's edge in a 3 mm
    scan: a change of 800 000 HU). Trace bins that read such a ray, or that ``untrusted`` marks,
    take ``fallback`` (the literature's ``nmar``: its LI fill) instead.
    """
    eps = 1e-3 * geometry.ray_step_mm  # rays through air only: keep the ratio finite
    filled = interpolate_trace(sino / (prior_sino + eps), trace) * (prior_sino + eps)
    refused = interpolate_trace((prior_sino < PRIOR_FLOOR_MM).float(), trace) > 0
    if untrusted is not None:
        refused = refused | untrusted
    return torch.where(refused & trace, fallback, filled)


def _offset_fill(sino: torch.Tensor, prior_sino: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """The prior's sinogram plus the scan's difference from it, interpolated across the trace.

    Where the prior is wrong by a structure beside the metal (the skin next to a rod at the body's
    edge, which the prior classed as air: 5 mm of path where the scan has 35), NMAR's ratio
    multiplies that error into every ray through the metal (a fill of 500 mm for 100); an offset
    only carries it, and fades it linearly across the trace.
    """
    return prior_sino + interpolate_trace(sino - prior_sino, trace)


def _prior_disagrees(sino: torch.Tensor, prior_sino: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """Trace bins whose interpolation reads a ray where the scan and the prior differ by more than
    ``PRIOR_AGREES_WITHIN`` (1 mm added to both, so that rays through air alone agree)."""
    ratio = (sino + 1.0) / (prior_sino + 1.0)
    off = (ratio > PRIOR_AGREES_WITHIN) | (ratio < 1.0 / PRIOR_AGREES_WITHIN)
    return (interpolate_trace(off.float(), trace) > 0) & trace


def _mar_sinograms(image_hu, metal_mask, geometry, method, filter, trace_mask, air_hu=-500.0, bone_hu=350.0):
    """(image, metal, trace mask, sinogram of the image, its LI/NMAR-corrected copy, squeeze)."""
    _check_method(method)
    img, mask, trace_mask, squeeze = _prepare(image_hu, metal_mask, geometry, trace_mask)
    sino = project(geometry, _mu(img.clamp(min=AIR_HU)))
    trace = metal_trace(geometry, trace_mask)
    li_sino = interpolate_trace(sino, trace)
    if method == "li":
        return img, mask, trace_mask, sino, li_sino, squeeze
    li_img = _fbp_hu(geometry, li_sino, filter)
    prior = nmar_prior(li_img, trace_mask, air_hu, bone_hu)
    prior_sino = project(geometry, _mu(prior))
    corrected = _normalised_fill(geometry, sino, prior_sino, trace, li_sino)
    return img, mask, trace_mask, sino, corrected, squeeze
