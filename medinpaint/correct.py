"""``correct``: fill what ``find_artifacts`` found, keeping every acquired voxel untouched."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medinpaint.artifacts.find import ArtifactMask, find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.artifacts.metal import metal_corrections
from medinpaint.config import Settings
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.classical import classical_fill
from medinpaint.inpaint.inference import network_fill, pick_device
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, load_model

METHODS = ("network", "classical")


@dataclass
class Correction:
    """The corrected volume and everything needed to say which voxels are synthesized."""

    volume: Volume
    original: Volume
    artifacts: ArtifactMask
    method: str
    model: dict | None
    parameters: dict
    seconds: float
    uncertainty: np.ndarray | None = None

    @property
    def synthesized(self) -> np.ndarray:
        """uint8 labels of the synthesized voxels (ArtifactKind values, 0 = acquired)."""
        return np.where(self.artifacts.synthesized, self.artifacts.labels, 0).astype(np.uint8)


def correct(
    volume: Volume,
    artifacts: ArtifactMask | None = None,
    method: str = "network",
    model: str | None = None,
    settings: Settings | None = None,
    device: str | None = None,
    progress: bool = False,
    uncertainty: bool = False,
    metal_model: str | None = None,
) -> Correction:
    """Fill the synthesized region of ``artifacts`` (found with defaults when not given).

    ``model`` fills missing slices and holes, ``metal_model`` refines metal streaks; each is a
    shipped name or a .safetensors file (a fine-tuned model), the shipped default when None.
    """
    if method not in METHODS:
        raise MedinpaintError(f"unknown method {method!r}; choose network or classical")
    if uncertainty and method != "network":
        raise MedinpaintError("--uncertainty needs --method network")
    settings = settings or Settings()
    started = time.perf_counter()
    artifacts = artifacts if artifacts is not None else find_artifacts(volume, slice_settings=settings.slices, metal_settings=settings.metal, progress=progress)
    if artifacts.labels.shape != volume.shape:
        raise MedinpaintError("artifact mask does not match the volume's shape")
    holes = artifacts.synthesized
    if holes.all():
        raise MedinpaintError("every voxel is flagged as broken; there is nothing left to repair from")
    whole_slices = sorted(artifacts.bad_slices)
    streaks = artifacts.labels == ArtifactKind.METAL_STREAK
    others = holes & ~streaks if streaks.any() else holes
    spread = None
    model_info = None
    parameters: dict = {"artifacts_found_by": artifacts.sources}
    if method == "classical":
        filled = classical_fill(volume.array, whole_slices, others, order="linear")
        parameters |= {"slices": "linear interpolation along k", "other": "harmonic (diffusion) fill"}
    else:
        inference = settings.inference
        torch_device = pick_device(device or inference.device)
        if inference.threads:
            torch.set_num_threads(inference.threads)
        if not others.any():
            filled = volume.array.astype(np.float32, copy=True)
        else:
            net, info = load_model(model, torch_device, task="slices")
            model_info = {"Name": info.name, "SHA256": info.sha256, "File": info.path.name}
            used: dict = {}
            out = network_fill(
                volume.array, others, whole_slices, volume.modality, net, inference, torch_device,
                progress=progress, flip_axes=(0, 1) if uncertainty else (),
                slice_prefill=info.slice_prefill, run_info=used,
            )
            filled, spread = out if uncertainty else (out, None)
            parameters |= asdict(inference) | used | {
                "device": str(torch_device), "slice_prefill": info.slice_prefill,
                "registered_slices": info.registered_input,  # motion-compensated interpolation as a second view
                "uncertainty": "flip TTA (axes i, j)" if uncertainty else None,
            }
    if streaks.any():
        parameters["metal"], metal_spread = _fill_streaks(
            filled, volume, artifacts, streaks, method, settings, device, progress, uncertainty, metal_model
        )
        if metal_spread is not None:
            spread = metal_spread if spread is None else np.where(streaks, metal_spread, spread)
        model_info = model_info or parameters["metal"].get("refined_by")
    result = filled.astype(np.float32, copy=False)
    np.copyto(result, volume.array, where=~holes)  # acquired voxels stay exactly as read
    if not np.all(np.isfinite(result[holes])):
        raise MedinpaintError("the fill produced non-finite values; refusing to write them")
    return Correction(
        volume=volume.with_array(result),
        original=volume,
        artifacts=artifacts,
        method=method,
        model=model_info,
        parameters=parameters,
        seconds=time.perf_counter() - started,
        uncertainty=spread,
    )


def _fill_streaks(
    filled: np.ndarray,
    volume: Volume,
    artifacts: ArtifactMask,
    streaks: np.ndarray,
    method: str,
    settings: Settings,
    device: str | None,
    progress: bool,
    uncertainty: bool,
    metal_model: str | None = None,
) -> tuple[dict, np.ndarray | None]:
    """Write the metal-streak fill into ``filled``: NMAR (classical), refined by the metal model (network).

    Only the slices with streaks (plus the network's context) are touched; the metal itself is
    never replaced.
    """
    ks = [int(k) for k in np.flatnonzero(streaks.any(axis=(0, 1)))]
    corrected = dict(artifacts.metal_corrected)
    missing = [k for k in ks if k not in corrected]
    if missing:  # a mask read from a file: re-project with its metal label
        metal = artifacts.labels == ArtifactKind.METAL
        corrected |= metal_corrections(volume, metal, missing, settings.metal)
    for k in ks:
        inside = streaks[:, :, k]
        filled[:, :, k][inside] = corrected[k][inside]
    parameters: dict = {"streaks": "NMAR (normalised metal artifact reduction, Meyer et al. 2010) on re-projected slices",
                        "slices_with_streaks": ks, "halo_hu": settings.metal.halo_hu, "halo_px": settings.metal.halo_px}
    if method == "classical":
        return parameters, None
    inference = settings.inference
    torch_device = pick_device(device or inference.device)
    net, info = load_model(metal_model or DEFAULT_METAL_MODEL, torch_device, task="metal")
    margin = inference.context_voxels
    k0, k1 = max(ks[0] - margin, 0), min(ks[-1] + margin + 1, volume.shape[2])
    used: dict = {}
    out = network_fill(
        filled[:, :, k0:k1], streaks[:, :, k0:k1], [], "CT", net, inference, torch_device,
        progress=progress, flip_axes=(0, 1) if uncertainty else (), run_info=used, holes_prefilled=True,
        original=volume.array[:, :, k0:k1] if info.original_input else None,
    )
    part, part_spread = out if uncertainty else (out, None)
    filled[:, :, k0:k1] = part
    spread = None
    if part_spread is not None:
        spread = np.zeros(volume.shape, np.float32)
        spread[:, :, k0:k1] = part_spread
    parameters |= {"refined_by": {"Name": info.name, "SHA256": info.sha256, "File": info.path.name}} | used
    return parameters, spread
