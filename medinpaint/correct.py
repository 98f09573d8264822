"""``correct``: fill what ``find_artifacts`` found, keeping every acquired voxel untouched."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medinpaint.artifacts.find import ArtifactMask, find_artifacts
from medinpaint.config import Settings
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.classical import classical_fill
from medinpaint.inpaint.inference import network_fill, pick_device
from medinpaint.inpaint.models import load_model

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
) -> Correction:
    """Fill the synthesized region of ``artifacts`` (found with defaults when not given)."""
    if method not in METHODS:
        raise MedinpaintError(f"unknown method {method!r}; choose network or classical")
    if uncertainty and method != "network":
        raise MedinpaintError("--uncertainty needs --method network")
    settings = settings or Settings()
    started = time.perf_counter()
    artifacts = artifacts if artifacts is not None else find_artifacts(volume, slice_settings=settings.slices)
    if artifacts.labels.shape != volume.shape:
        raise MedinpaintError("artifact mask does not match the volume's shape")
    holes = artifacts.synthesized
    if holes.all():
        raise MedinpaintError("every voxel is flagged as broken; there is nothing left to repair from")
    whole_slices = sorted(artifacts.bad_slices)
    spread = None
    model_info = None
    parameters: dict = {"artifacts_found_by": artifacts.sources}
    if method == "classical":
        filled = classical_fill(volume.array, whole_slices, holes, order="linear")
        parameters |= {"slices": "linear interpolation along k", "other": "harmonic (diffusion) fill"}
    else:
        inference = settings.inference
        torch_device = pick_device(device or inference.device)
        if inference.threads:
            torch.set_num_threads(inference.threads)
        net, info = load_model(model, torch_device)
        model_info = {"Name": info.name, "SHA256": info.sha256, "File": info.path.name}
        used: dict = {}
        out = network_fill(
            volume.array, holes, whole_slices, volume.modality, net, inference, torch_device,
            progress=progress, flip_axes=(0, 1) if uncertainty else (),
            slice_prefill=info.slice_prefill, run_info=used,
        )
        filled, spread = out if uncertainty else (out, None)
        parameters |= asdict(inference) | used | {
            "device": str(torch_device), "slice_prefill": info.slice_prefill,
            "uncertainty": "flip TTA (axes i, j)" if uncertainty else None,
        }
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
