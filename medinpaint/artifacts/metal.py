"""Metal and its streaks in a reconstructed CT, from the image alone (labels 7 and 6).

Real scans come without raw data or a metal-free twin. The metal is found by threshold
(``medinpaint.metal.masks.find_metal``); for each slice holding it, the change that NMAR would
make is computed (``metal_correction``), and a "do no harm" gate measures whether that change
stands above the slice's own noise. Only where it does is the streak region the voxels whose
change is significant; elsewhere the slice is kept as acquired and the provenance says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medinpaint.artifacts.metal_correction import METHODS, change_batches, check_ct, corrected_slice, kept_change, trust_model
from medinpaint.body import body_mask
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.metal.evidence import significant_change, slice_noise, streak_evidence
from medinpaint.metal.masks import find_metal

KEPT = "kept as acquired, streak evidence below threshold"
CORRECTED = "corrected, streak evidence at or above threshold"
PARTLY = "corrected in part, streak evidence between threshold and gate_full: the change scaled down"
FORCED = "corrected, gate off"


@dataclass(frozen=True)
class MetalDetection:
    """Settings for metal detection, the gate and the image-domain correction (see configs/inference.yaml)."""

    threshold_hu: float | None = None  # None: 2500 HU, or 2800 HU when the scan is clipped at 3071
    min_voxels: int = 3  # smaller bright specks are noise, not metal
    streak_threshold_hu: float = 10.0  # streak region: smoothed |change| above this many HU ...
    streak_threshold_noise: float = 0.5  # ... and above this many times the slice's noise
    halo_hu: float | None = 600.0  # the rim around metal above this HU is re-filled with it (None: the metal alone, literature LI/NMAR)
    halo_px: int = 12  # how far from the metal that rim may reach
    halo_streak_hu: float = 300.0  # ... ring by ring, while each ring around the metal is bright or torn by streaks (beyond +-this HU)
    gate: str = "auto"  # auto: correct a slice only when its streak evidence reaches gate_threshold; off: always correct
    gate_threshold: float = 0.6  # streak evidence (RMS of the smoothed change around the metal / the noise) needed to correct
    gate_full: float | None = 1.0  # evidence from which the whole change is written; from gate_threshold up to it, a rising share
    ring_mm: float = 40.0  # the evidence is measured within this distance of the metal; the noise farther away
    trust_window_mm: float | None = 20.0  # the change weighted by how much of it cancels what the image shows, over this window; None = all of it
    trust_model: str | None = None  # a learned refinement of that weight (name or .safetensors); None = the gradient rule alone
    keep_high_frequencies_px: float | None = None  # FSMAR-like: Gaussian sigma (pixels) low-passing the change; None = the full change
    refine: str = "classical"  # classical: the change-only correction; network: refined by the metal model (--method network)
    views: int | str = "auto"  # re-projection views over 360 degrees; auto: as many as channels
    channels: int | str = "auto"  # detector channels; auto: ~1.44 per pixel across the patient (736 for a 500 mm field of 0.98 mm)
    slices_per_batch: int = 4  # slices re-projected together (memory vs speed)

    def __post_init__(self) -> None:
        if self.halo_hu is not None and (isinstance(self.halo_hu, bool) or not isinstance(self.halo_hu, (int, float))):
            raise MedinpaintError(f"metal halo_hu must be a number of HU or null, not {self.halo_hu!r}")
        if isinstance(self.halo_px, bool) or not isinstance(self.halo_px, int) or self.halo_px < 1:
            raise MedinpaintError(f"metal halo_px must be an integer of at least 1, not {self.halo_px!r}")
        if self.gate not in ("auto", "off"):
            raise MedinpaintError(f"metal gate must be auto or off, not {self.gate!r}")
        if self.refine not in ("classical", "network"):
            raise MedinpaintError(f"metal refine must be classical or network, not {self.refine!r}")
        for name in ("streak_threshold_hu", "streak_threshold_noise", "gate_threshold", "ring_mm", "halo_streak_hu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name != "gate_threshold" and value == 0):
                raise MedinpaintError(f"metal {name} must be a positive number, not {value!r}")
        if self.gate_full is not None and (isinstance(self.gate_full, bool) or not isinstance(self.gate_full, (int, float))
                                           or self.gate_full <= self.gate_threshold):
            raise MedinpaintError(f"metal gate_full must be a number above gate_threshold ({self.gate_threshold:g}) or null, not {self.gate_full!r}")
        if self.trust_model is not None and (not isinstance(self.trust_model, str) or self.trust_window_mm is None):
            raise MedinpaintError("metal trust_model must be a model name or .safetensors path, and needs trust_window_mm (its input) set")
        for name, unit in (("trust_window_mm", "mm"), ("keep_high_frequencies_px", "pixels")):  # optional sizes: null turns them off
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise MedinpaintError(f"metal {name} must be a positive number of {unit} or null, not {value!r}")


@dataclass
class MetalFinding:
    """Metal (kept) and streak region (filled) on the volume's grid, the corrected slices and the gate's decisions."""

    metal: np.ndarray  # bool (i, j, k)
    streaks: np.ndarray  # bool (i, j, k)
    corrected: dict[int, np.ndarray] = field(default_factory=dict)  # k -> change-only correction (HU), gated-in slices
    method: str = "nmar"
    gate: dict[int, dict] = field(default_factory=dict)  # k -> decision, streak evidence, threshold, noise


def find_metal_artifacts(
    volume: Volume,
    settings: MetalDetection | None = None,
    method: str = "nmar",
    skip_slices: set[int] | frozenset[int] = frozenset(),
    progress: bool = False,
    required: bool = False,
) -> MetalFinding:
    """Metal and streak masks, the change-only correction and the gate's decision for every slice holding metal.

    ``required`` (``--artifacts metal``): a scan without metal is an error, not a silent no-op.
    """
    settings = settings or MetalDetection()
    check_ct(volume)
    if method not in METHODS:
        raise MedinpaintError(f"unknown metal correction {method!r}; choose nmar or li")
    slices = np.moveaxis(volume.array, 2, 0)  # (k, i, j): the projector works slice by slice
    metal = find_metal(slices, settings.threshold_hu, settings.min_voxels)  # NaN is never above the threshold
    metal[sorted(skip_slices)] = False  # whole bad slices are filled as slices, not corrected
    streaks = np.zeros(slices.shape, dtype=bool)
    corrected: dict[int, np.ndarray] = {}
    gate: dict[int, dict] = {}
    with_metal = [int(k) for k in np.flatnonzero(metal.any(axis=(1, 2)))]
    if required and not with_metal:
        level = "2500 HU (2800 when clipped at 3071)" if settings.threshold_hu is None else f"{settings.threshold_hu:g} HU"
        raise MedinpaintError(f"--artifacts metal: no metal in this scan (no {settings.min_voxels} connected voxels above {level})")
    if with_metal:
        ring_px = settings.ring_mm / float(min(volume.spacing[:2]))
        spacing = tuple(float(s) for s in volume.spacing[:2])
        trust = trust_model(settings)
        for ks, image, mask, halo, change in change_batches(volume, slices, metal, with_metal, settings, method, progress):
            for k, img, m, h, c in zip(ks, image, mask, halo, change):
                decision = slice_gate(img, m, c, ring_px, settings)
                gate[k] = decision
                if decision["decision"] == KEPT:
                    continue
                c, kept = kept_change(img, c, m, h, spacing, settings, trust, decision["noise_hu"])
                c = c * decision["change_scale"]
                decision["change_kept"] = round(kept * decision["change_scale"], 3)  # the share of the change's magnitude written
                threshold = max(settings.streak_threshold_hu, settings.streak_threshold_noise * decision["noise_hu"])
                streaks[k] = significant_change(c, m, threshold) | h  # the halo is re-filled: always synthesized
                corrected[k] = corrected_slice(img, c, m)
    return MetalFinding(
        metal=np.moveaxis(metal, 0, 2), streaks=np.moveaxis(streaks, 0, 2), corrected=corrected, method=method, gate=gate
    )


def slice_gate(image: np.ndarray, metal: np.ndarray, change: np.ndarray, ring_px: float, settings: MetalDetection) -> dict:
    """The gate of one slice: its streak evidence against ``gate_threshold`` and ``gate_full`` (the whole change with ``gate: off``).

    Just above the threshold the evidence does not tell a right change from a wrong one (3 of 9 XCIST
    slices and 3 of 12 of our cases at evidence 0.6-1.0 lost with the whole change), so there only a
    share of it, rising linearly with the evidence, is written. A share s of a change that would
    leave an error E(1) against E(0) uncorrected leaves (1 - s) E(0) + s E(1) - s (1 - s) |change|^2:
    a change that loses a little with s = 1 gains with s < 1, and the slice moves smoothly from
    "kept" to "corrected".
    """
    body = body_mask(image) | metal
    noise = slice_noise(image, metal, ring_px, body)
    evidence = streak_evidence(change, metal, body, noise, ring_px)
    scale = 1.0
    if settings.gate == "off":
        decision = FORCED
    elif evidence < settings.gate_threshold:
        decision, scale = KEPT, 0.0
    elif settings.gate_full is not None and evidence < settings.gate_full:
        decision, scale = PARTLY, (evidence - settings.gate_threshold) / (settings.gate_full - settings.gate_threshold)
    else:
        decision = CORRECTED
    scale = round(scale, 3)  # the share written is the share recorded
    if scale == 0.0:
        decision = KEPT
    return {"decision": decision, "streak_evidence": round(evidence, 3), "threshold": settings.gate_threshold,
            "full": settings.gate_full, "change_scale": scale, "noise_hu": round(noise, 2)}
