"""``correct``: fill what ``find_artifacts`` found, keeping every acquired voxel untouched."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from medinpaint.artifacts.find import ArtifactMask, find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.artifacts.metal_correction import metal_corrections
from medinpaint.config import Settings
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.classical import classical_fill
from medinpaint.inpaint.gate import gated_fill
from medinpaint.inpaint.inference import network_fill, pick_device, set_cpu_threads
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, load_model, read_info, resolve
from medinpaint.metal.mar import DARKER_THAN_AIR_HU

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
    models: dict | None = None  # every model that ran, by task ("slices", "metal"); ``model`` is the first of them
    run: dict | None = None  # the run's effective settings (provenance.run_settings), set by the caller that knows them

    @property
    def synthesized(self) -> np.ndarray:
        """uint8 labels of the synthesized voxels (ArtifactKind values, 0 = acquired)."""
        return np.where(self.artifacts.synthesized, self.artifacts.labels, 0).astype(np.uint8)


def detect(volume: Volume, settings: Settings, **kwargs) -> ArtifactMask:
    """``find_artifacts`` with a run's slice and metal settings, under its ``inference.threads`` cap: the metal
    correction runs in detection, before any fill. ``kwargs``: find_artifacts' artifacts, user_mask, progress."""
    set_cpu_threads(settings.inference.threads)
    return find_artifacts(volume, slice_settings=settings.slices, metal_settings=settings.metal, **kwargs)


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
    networks: dict | None = None,
    gate: bool | None = None,
    adapt: str | int | None = None,
    save_adapted: str | None = None,
    overwrite: bool = False,
) -> Correction:
    """Fill the synthesized region of ``artifacts`` (found with defaults when not given).

    ``model`` fills missing slices and holes, ``metal_model`` refines metal streaks; each is a
    shipped name or a .safetensors file (a fine-tuned model), the shipped default when None.
    ``networks`` maps a task ("slices", "metal") to a pre-built (network, ModelInfo) used
    instead of loading that model: the MONAI bundle runs its own ``network_def`` this way.
    ``gate`` (default: settings.gate.enabled) writes the network's slices only where the scan's own
    left-out slices say it beats the best classical fill; ``adapt`` (off, auto or steps; default
    settings.adapt.steps) fine-tunes a copy of the slice model on the scan first, kept in memory
    unless ``save_adapted`` names a .safetensors file (replaced only with ``overwrite``).
    """
    if method not in METHODS:
        raise MedinpaintError(f"unknown method {method!r}; choose network or classical")
    if uncertainty and method != "network":
        raise MedinpaintError("--uncertainty needs --method network")
    settings = settings or Settings()
    started = time.perf_counter()
    set_cpu_threads(settings.inference.threads)  # the fills below run under the cap as well as detection
    artifacts = artifacts if artifacts is not None else detect(volume, settings, progress=progress)
    if artifacts.labels.shape != volume.shape:
        raise MedinpaintError("artifact mask does not match the volume's shape")
    holes = artifacts.to_fill  # resampled slices keep the loader's interpolation; the mask still flags them
    if holes.all():
        raise MedinpaintError("every voxel is flagged as broken; there is nothing left to repair from")
    whole_slices = sorted(artifacts.bad_slices)
    streaks = artifacts.labels == ArtifactKind.METAL_STREAK
    if not streaks.any():
        streaks = None  # no mask of nothing held through the fill
    others = holes & ~streaks if streaks is not None else holes
    spread = None
    model_info = slices_info = None
    parameters: dict = {"artifacts_found_by": artifacts.sources}
    if method == "classical":
        filled = classical_fill(volume.array, whole_slices, others, order="linear")
        parameters |= {"slices": "linear interpolation along k", "other": "harmonic (diffusion) fill"}
    else:
        inference = settings.inference
        torch_device = pick_device(device or inference.device)
        if not others.any():
            filled = volume.array.astype(np.float32, copy=True)
        else:
            net, info = _network("slices", model, torch_device, networks)
            model_info = slices_info = {"Name": info.name, "SHA256": info.sha256, "File": info.path.name}
            used: dict = {}
            adapt = settings.adapt.steps if adapt is None else adapt
            if gate is not None:
                settings = replace(settings, gate=replace(settings.gate, enabled=gate))
            if whole_slices and (settings.gate.enabled or adapt not in ("off", 0, None) or save_adapted):
                filled, spread, parameters["slice_gate"] = gated_fill(
                    volume.array, whole_slices, others, volume.modality, net, info, settings, torch_device, adapt=adapt,
                    save_adapted_to=save_adapted, overwrite=overwrite, progress=progress,
                    flip_axes=(0, 1) if uncertainty else (), run_info=used, spacing=tuple(volume.spacing),
                )
                choice = parameters["slice_gate"]["choice"]
                if choice not in ("network", "adapted network"):  # the model ran for the gate's scores; say what it wrote
                    slices_info["WrittenFor"] = ("other holes only; missing slices: " + choice if "other_holes" in parameters["slice_gate"]
                                                 else f"nothing: scored by the slice gate, which wrote {choice}")
            else:
                if save_adapted:
                    raise MedinpaintError("--save-adapted: no adaptation runs without whole missing slices")
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
    if streaks is not None:
        parameters["metal"], metal_spread = _fill_streaks(
            filled, volume, artifacts, streaks, method, settings, device, progress, uncertainty, metal_model, networks
        )
        if metal_spread is not None:
            spread = metal_spread if spread is None else np.where(streaks, metal_spread, spread)
        model_info = model_info or parameters["metal"].get("refined_by")
    models_ran = {task: info for task, info in (("slices", slices_info), ("metal", parameters.get("metal", {}).get("refined_by"))) if info}
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
        models=models_ran,
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
    networks: dict | None = None,
) -> tuple[dict, np.ndarray | None]:
    """Write the metal-streak fill into ``filled``: the image plus the change NMAR makes (classical),
    refined by the metal model only when asked (``metal.refine: network``, ``--metal-model``, or a
    given metal network) with ``--method network``.

    Only the slices with streaks, i.e. those the metal gate let through (plus the network's
    context, whose other voxels stay as acquired), are touched; the metal itself is never replaced.
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
    parameters: dict = {"streaks": "image + FBP of the change NMAR (Meyer et al. 2010) makes in the metal trace of the re-projected slice; "
                                   f"voxels below {DARKER_THAN_AIR_HU:g} HU (photon starvation) raised to air; the change weighted by how much of it "
                                   "cancels the image's own gradients (trust_window_mm; each slice's share kept: ArtifactsFound.metal_gate)",
                        "slices_with_streaks": ks, "halo_hu": settings.metal.halo_hu, "halo_px": settings.metal.halo_px,
                        "halo_streak_hu": settings.metal.halo_streak_hu,
                        "keep_high_frequencies_px": settings.metal.keep_high_frequencies_px, "gate": settings.metal.gate,
                        "gate_threshold": settings.metal.gate_threshold, "gate_full": settings.metal.gate_full,
                        "trust_window_mm": settings.metal.trust_window_mm}
    if settings.metal.trust_model is not None:  # the weight refined by a network: which one, by its hash
        info = read_info(resolve(settings.metal.trust_model))
        parameters["trust_model"] = {"name": info.name, "sha256": info.sha256}
        parameters["streaks"] += "; that weight refined pixel by pixel by a network (trust_model)"
    refine = settings.metal.refine == "network" or metal_model is not None or bool(networks and "metal" in networks)
    if method == "classical" or not refine:
        return parameters, None
    inference = settings.inference
    torch_device = pick_device(device or inference.device)
    net, info = _network("metal", metal_model or DEFAULT_METAL_MODEL, torch_device, networks)
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


def _network(task: str, name: str | None, device: torch.device, networks: dict | None):
    """The pre-built network for ``task`` when the caller gave one (checked to be trained for it), else the named model loaded."""
    if not networks or task not in networks:
        return load_model(name, device, task=task)
    net, info = networks[task]
    if info.task != task:
        raise MedinpaintError(f"the network given for {task} is {info.name}, a {info.task} model")
    return net.to(device).eval(), info
