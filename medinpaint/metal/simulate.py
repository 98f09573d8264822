"""CT metal-artifact simulation in the style of the AAPM CT-MAR challenge / Zhang & Yu (2018).

A clean slice is split into water and bone, metal is inserted, and a polychromatic 120 kVp
acquisition with Poisson noise, water beam-hardening correction and FBP is simulated. The same
pipeline without metal (same noise draws) gives the reference, so the two images differ only by
what the metal does: beam hardening, photon starvation and their streaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from medinpaint.metal import materials
from medinpaint.metal.fanbeam import FanBeamGeometry, fbp, project

METAL_KINDS = ("ball", "rod", "screw", "irregular")
SOFT_HU = 100.0  # below: all water-equivalent
BONE_HU = 1500.0  # above: all cortical bone; linear ramp between (Zhang & Yu 2018)


@dataclass
class MetalSimulation:
    damaged: torch.Tensor  # (B, H, W) HU, with metal artifacts
    reference: torch.Tensor  # (B, H, W) HU, same acquisition and noise without metal
    metal_mask: torch.Tensor  # (B, H, W) bool


# ----------------------------------------------------------------------------- metal shapes


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _spacing2(spacing_mm) -> tuple[float, float]:
    s = (float(spacing_mm),) * 2 if np.isscalar(spacing_mm) else tuple(float(v) for v in spacing_mm)
    if len(s) != 2 or min(s) <= 0:
        raise ValueError(f"spacing_mm must be a positive number or (sy, sx), got {spacing_mm}")
    return s


def _pick_centre(body: np.ndarray, margin_px: np.ndarray, rng) -> np.ndarray:
    # Keep the object inside the body: erode by its half-extent so no part sticks out into air.
    dist = ndimage.distance_transform_edt(body, sampling=1.0 / margin_px)
    candidates = np.argwhere(dist > 1.0)
    if len(candidates) == 0:
        candidates = np.argwhere(dist >= dist.max() * 0.999) if dist.max() > 0 else np.empty((0, body.ndim))
    if len(candidates) == 0:
        raise ValueError("the body mask is empty: nowhere to place metal")
    return candidates[rng.integers(len(candidates))].astype(float)


def _irregular(shape, spacing, centre, size_mm, rng) -> np.ndarray:
    # Thresholded smooth noise inside an ellipsoidal envelope: blob-like, non-convex shapes such as
    # the CT-MAR challenge's random metal (fragments, cement, coils).
    noise = rng.standard_normal(shape)
    sigma = [max(size_mm / 6 / s, 0.5) for s in spacing]
    noise = ndimage.gaussian_filter(noise, sigma)
    noise /= noise.std() + 1e-12
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    r2 = sum((g / (size_mm / 2)) ** 2 for g in grids)
    field = noise + 2.5 * (1 - r2)
    mask = (field > 1.0) & (r2 < 1)
    lab, n = ndimage.label(mask)
    if n == 0:
        return r2 < 0.25
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def random_metal(shape_hw, spacing_mm, body_mask, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
    """One metal object inside the body of a slice: (bool mask (H, W), material name).

    Sizes are realistic implants seen in-plane: balls 4-30 mm, rods 4-16 mm thick (cross-section
    of a nail or rod crossing the slice), screws as 3-8 x 10-40 mm rectangles (a screw lying in the
    slice), irregular blobs 8-30 mm.
    """
    _check_rng(rng)
    sy, sx = _spacing2(spacing_mm)
    shape = tuple(int(v) for v in shape_hw)
    body = np.asarray(body_mask, dtype=bool)
    if body.shape != shape:
        raise ValueError(f"body_mask shape {body.shape} does not match shape_hw {shape}")
    kind = kind or METAL_KINDS[rng.integers(len(METAL_KINDS))]
    if kind not in METAL_KINDS:
        raise ValueError(f"unknown metal kind {kind!r}; choose from {', '.join(METAL_KINDS)}")
    material = materials.METALS[rng.integers(len(materials.METALS))]
    yy, xx = np.meshgrid(np.arange(shape[0]) * sy, np.arange(shape[1]) * sx, indexing="ij")
    if kind == "ball":
        r = rng.uniform(2, 15)
        c = _pick_centre(body, np.array([r / sy, r / sx]), rng) * (sy, sx)
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r**2
    elif kind == "rod":
        a, b = rng.uniform(2, 8), rng.uniform(2, 8)  # elliptical: a rod crossing the slice obliquely
        r = max(a, b)
        c = _pick_centre(body, np.array([r / sy, r / sx]), rng) * (sy, sx)
        th = rng.uniform(0, np.pi)
        u = (xx - c[1]) * np.cos(th) + (yy - c[0]) * np.sin(th)
        v = -(xx - c[1]) * np.sin(th) + (yy - c[0]) * np.cos(th)
        mask = (u / a) ** 2 + (v / b) ** 2 <= 1
    elif kind == "screw":
        half_w, half_l = rng.uniform(1.5, 4), rng.uniform(5, 20)
        c = _pick_centre(body, np.array([half_l / sy, half_l / sx]), rng) * (sy, sx)
        th = rng.uniform(0, np.pi)
        u = (xx - c[1]) * np.cos(th) + (yy - c[0]) * np.sin(th)
        v = -(xx - c[1]) * np.sin(th) + (yy - c[0]) * np.cos(th)
        mask = (np.abs(u) <= half_l) & (np.abs(v) <= half_w)
    else:
        size = rng.uniform(8, 30)
        c = _pick_centre(body, np.array([size / 2 / sy, size / 2 / sx]), rng)
        mask = _irregular(shape, (sy, sx), c, size, rng)
    mask &= body
    if not mask.any():  # an object smaller than a pixel still needs one voxel to exist
        ci = np.round(c / (sy, sx)).astype(int) if kind != "irregular" else np.round(c).astype(int)
        mask[tuple(np.clip(ci, 0, np.array(shape) - 1))] = True
    return mask, material


def random_metal_volume(shape_dhw, spacing_mm, body_mask, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
    """Metal coherent across slices: (bool mask (D, H, W), material).

    A ball is a sphere, a rod a cylinder running roughly along z (tilted up to 30 degrees), a screw
    a box lying in-plane spanning a few slices, an irregular object a 3D blob. ``spacing_mm`` is
    (dz, dy, dx).
    """
    _check_rng(rng)
    spacing = tuple(float(v) for v in np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)))
    if min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    shape = tuple(int(v) for v in shape_dhw)
    body = np.asarray(body_mask, dtype=bool)
    if body.shape != shape or len(shape) != 3:
        raise ValueError(f"body_mask must be 3D with shape_dhw {shape}, got {body.shape}")
    kind = kind or METAL_KINDS[rng.integers(len(METAL_KINDS))]
    if kind not in METAL_KINDS:
        raise ValueError(f"unknown metal kind {kind!r}; choose from {', '.join(METAL_KINDS)}")
    material = materials.METALS[rng.integers(len(materials.METALS))]
    sp = np.array(spacing)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    if kind == "ball":
        r = rng.uniform(2, 15)
        c = _pick_centre(body, r / sp, rng) * sp
        mask = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r**2
    elif kind == "rod":
        r = rng.uniform(2, 8)
        c = _pick_centre(body, np.array([1.0, r / sp[1], r / sp[2]]), rng) * sp
        tilt, az = np.deg2rad(rng.uniform(0, 30)), rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(tilt), np.sin(tilt) * np.sin(az), np.sin(tilt) * np.cos(az)])
        rel = np.stack((zz - c[0], yy - c[1], xx - c[2]), -1)
        along = rel @ d
        half_len = rng.uniform(20, 80)
        mask = (np.sum(rel**2, -1) - along**2 <= r**2) & (np.abs(along) <= half_len)
    elif kind == "screw":
        half_w, half_l = rng.uniform(1.5, 4), rng.uniform(5, 20)
        c = _pick_centre(body, np.array([half_w / sp[0], half_l / sp[1], half_l / sp[2]]), rng) * sp
        th = rng.uniform(0, np.pi)
        u = (xx - c[2]) * np.cos(th) + (yy - c[1]) * np.sin(th)
        v = -(xx - c[2]) * np.sin(th) + (yy - c[1]) * np.cos(th)
        mask = (np.abs(u) <= half_l) & (v**2 + (zz - c[0]) ** 2 <= half_w**2)
    else:
        size = rng.uniform(8, 30)
        c = _pick_centre(body, size / 2 / sp, rng)
        mask = _irregular(shape, spacing, c, size, rng)
    mask &= body
    if not mask.any():
        mask[tuple(np.clip(np.round(c / sp if kind != "irregular" else c).astype(int), 0, np.array(shape) - 1))] = True
    return mask, material


# ----------------------------------------------------------------------------- acquisition


def _poisson_common(lam: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Poisson draws by inverse CDF of shared uniforms.

    Using the same uniforms for the metal and metal-free scans makes rays that miss the metal get
    identical counts, so noise cancels in (damaged - reference). Large means use the normal
    quantile (with continuity correction); small means (photon starvation) the exact inverse CDF.
    """
    z = torch.special.ndtri(uniform.clamp(1e-7, 1 - 1e-7))
    counts = torch.clamp(torch.floor(lam + torch.sqrt(lam) * z + 0.5), min=0)
    small = lam < 30
    if small.any():
        ls, us = lam[small], uniform[small]
        pmf = torch.exp(-ls)
        cdf = pmf.clone()
        k = torch.zeros_like(ls)
        for i in range(1, 120):
            below = cdf < us
            if not below.any():
                break
            k = k + below.to(k.dtype)
            pmf = pmf * ls / i
            cdf = cdf + pmf
        counts[small] = k
    return counts


def water_bhc_coefficients(energies: torch.Tensor, weights: torch.Tensor, e_ref_kev: float, max_mm: float, degree: int = 4) -> np.ndarray:
    """Polynomial mapping a polychromatic -log(I/I0) to the monochromatic water value at e_ref.

    This is the scanner's water beam-hardening correction: it is exact for water and leaves bone
    and metal under-corrected, which is where the residual beam-hardening streaks come from.
    """
    mu_w = materials.mu("water", energies.cpu().numpy()).numpy()
    w = weights.cpu().numpy().astype(np.float64)
    t = np.linspace(0, max_mm, 400)
    p_poly = -np.log((w[None, :] * np.exp(-np.outer(t, mu_w))).sum(1))
    target = t * float(materials.mu("water", [e_ref_kev])[0])
    design = np.stack([p_poly**k for k in range(1, degree + 1)], 1)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return coef


def _apply_poly(p: torch.Tensor, coef: np.ndarray) -> torch.Tensor:
    out = torch.zeros_like(p)
    for c in coef[::-1]:
        out = (out + float(c)) * p
    return out


def hu_to_mu(hu: torch.Tensor, mu_water: float) -> torch.Tensor:
    return torch.clamp(mu_water * (1 + hu / 1000.0), min=0)


def mu_to_hu(mu: torch.Tensor, mu_water: float) -> torch.Tensor:
    return 1000.0 * (mu / mu_water - 1)


def simulate_metal(
    hu_slices,
    metal_mask,
    material,
    spacing_mm,
    rng: np.random.Generator,
    photons: float = 2e5,
    geometry: FanBeamGeometry | None = None,
    e_ref_kev: float = 70.0,
    clip_hu: tuple[float, float] | None = (-1024.0, 3071.0),
    filter: str = "shepp-logan",
    bhc_degree: int = 4,
) -> MetalSimulation:
    """Simulate a metal-corrupted scan and its metal-free twin from clean HU slices (B, H, W).

    ``material`` is one name from ``materials.METALS`` or one per slice; ``photons`` is the
    unattenuated count per detector bin (all energies); ``clip_hu`` mimics the 12-bit DICOM range
    (None keeps the full range). Tissue keeps its HU-derived density; voxels under the metal become
    metal. Both scans use the same uniforms for the Poisson draws.
    """
    _check_rng(rng)
    hu = torch.as_tensor(hu_slices).float()
    squeeze = hu.dim() == 2
    hu = hu[None] if squeeze else hu
    if hu.dim() != 3:
        raise ValueError(f"hu_slices must be (H, W) or (B, H, W), got shape {tuple(hu.shape)}")
    mask = torch.as_tensor(metal_mask, device=hu.device)
    mask = mask[None] if mask.dim() == 2 else mask
    if tuple(mask.shape) != tuple(hu.shape):
        raise ValueError(f"metal_mask shape {tuple(mask.shape)} does not match hu_slices {tuple(hu.shape)}")
    frac = mask.float().clamp(0, 1)
    n_b = hu.shape[0]
    mats = [material] * n_b if isinstance(material, str) else list(material)
    if len(mats) != n_b or any(m not in materials.METALS for m in mats):
        raise ValueError(f"material must be one of {', '.join(materials.METALS)} or one per slice, got {material!r}")
    if photons <= 0:
        raise ValueError(f"photons must be > 0, got {photons}")
    geometry = geometry or FanBeamGeometry(tuple(hu.shape[-2:]), _spacing2(spacing_mm))
    if tuple(geometry.image_shape) != tuple(hu.shape[-2:]) or geometry.spacing != _spacing2(spacing_mm):
        raise ValueError("geometry.image_shape/spacing do not match hu_slices and spacing_mm")
    dev = hu.device

    energies, weights = materials.spectrum_120kvp()
    keep = weights > 1e-7
    energies, weights = energies[keep], weights[keep]
    e_np = energies.numpy()
    mu_w_ref = float(materials.mu("water", [e_ref_kev])[0])
    mu_b_ref = float(materials.mu("bone", [e_ref_kev])[0])

    # tissue -> relative densities of water (1 g/cm3) and cortical bone (1.92 g/cm3) equivalents
    mu_ref = hu_to_mu(hu, mu_w_ref)
    bone = ((hu - SOFT_HU) / (BONE_HU - SOFT_HU)).clamp(0, 1)
    rho_w = (1 - bone) * mu_ref / mu_w_ref
    rho_b = bone * mu_ref / mu_b_ref
    maps = torch.cat((rho_w, rho_b, rho_w * frac, rho_b * frac, frac), 0)
    lines = project(geometry, maps).double().reshape(5, n_b, geometry.n_views, geometry.n_channels)
    l_w, l_b, l_wm, l_bm, l_m = lines

    mu_w_e = materials.mu("water", e_np).to(dev)
    mu_b_e = materials.mu("bone", e_np).to(dev)
    w_e = weights.to(dev)

    def expected(lw, lb, lm_by_slice):
        out = torch.zeros_like(lw)
        for i, we in enumerate(w_e):
            out += we * torch.exp(-(mu_w_e[i] * lw + mu_b_e[i] * lb + lm_by_slice[i]))
        return photons * out

    metal_att = torch.zeros(len(e_np), n_b, 1, 1, dtype=torch.float64, device=dev)
    for b, m in enumerate(mats):
        metal_att[:, b, 0, 0] = materials.mu(m, e_np).to(dev)
    lam_ref = expected(l_w, l_b, torch.zeros_like(metal_att))
    lam_met = expected(l_w - l_wm, l_b - l_bm, metal_att * l_m)

    seed = int(rng.integers(2**62))
    gen = torch.Generator(device=dev).manual_seed(seed)
    uniform = torch.rand(lam_ref.shape, generator=gen, dtype=torch.float64, device=dev)
    max_mm = 2 * geometry.image_radius_mm * 3  # water range the BHC polynomial must cover
    coef = water_bhc_coefficients(energies, weights, e_ref_kev, max_mm, bhc_degree)

    def reconstruct(lam):
        counts = _poisson_common(lam, uniform).clamp(min=1.0)  # a detector never reports zero: log needs > 0
        p = -torch.log(counts / photons)
        mu_img = fbp(geometry, _apply_poly(p, coef).float(), filter=filter)
        out = mu_to_hu(mu_img, mu_w_ref)
        return out.clamp(*clip_hu) if clip_hu is not None else out

    damaged, reference = reconstruct(lam_met), reconstruct(lam_ref)
    metal = frac > 0.5
    if squeeze:
        damaged, reference, metal = damaged[0], reference[0], metal[0]
    return MetalSimulation(damaged=damaged, reference=reference, metal_mask=metal)


def metal_hu(material: str, e_ref_kev: float = 70.0) -> float:
    """HU the metal would have at the reference energy (what an ideal, artifact-free scan shows)."""
    mu_w = float(materials.mu("water", [e_ref_kev])[0])
    return 1000.0 * (float(materials.mu(material, [e_ref_kev])[0]) / mu_w - 1)


__all__ = [
    "METAL_KINDS",
    "MetalSimulation",
    "random_metal",
    "random_metal_volume",
    "simulate_metal",
    "water_bhc_coefficients",
    "metal_hu",
    "hu_to_mu",
    "mu_to_hu",
]
