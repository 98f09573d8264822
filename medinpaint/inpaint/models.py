"""Shipped and user models: safetensors weights whose header carries the architecture.

Loading never unpickles anything; a model is identified in provenance by its SHA-256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medinpaint.errors import MedinpaintError
from medinpaint.hashing import sha256_file
from medinpaint.inpaint.network import InpaintingUNet

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "medinpaint-slices-v3"  # the best measured (benchmarks/quality.py)
DEFAULT_METAL_MODEL = "medinpaint-metal-v3"  # refines NMAR inside metal streak regions, reading the damaged scan too (benchmarks/metal.py)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    sha256: str
    features: tuple[int, ...]
    metadata: dict

    @property
    def task(self) -> str:
        """What the model fills: "slices" (missing slices and holes) or "metal" (streaks, from NMAR)."""
        return str(self.metadata.get("task", "slices"))

    @property
    def original_input(self) -> bool:
        """Whether the model also reads the image as acquired (metal-v2 on: the damaged scan)."""
        return bool(self.metadata.get("original_input", False))

    @property
    def registered_input(self) -> bool:
        """Whether the model also reads motion-compensated interpolation of missing slices (slices-v3 on)."""
        return bool(self.metadata.get("registered_input", False))

    @property
    def slice_prefill(self) -> str:
        """The interpolation the model was trained to refine (models before this key: linear)."""
        return str(self.metadata.get("slice_prefill", "linear"))

    def describe(self) -> dict:
        return {"name": self.name, "file": str(self.path), "sha256": self.sha256, **self.metadata}


def resolve(name_or_path: str | None) -> Path:
    name_or_path = name_or_path or DEFAULT_MODEL
    candidate = Path(name_or_path)
    if candidate.suffix == ".safetensors":
        if not candidate.is_file():
            raise MedinpaintError(f"{candidate}: model file not found")
        return candidate
    shipped = MODELS_DIR / f"{name_or_path}.safetensors"
    if not shipped.is_file():
        names = ", ".join(m.name for m in list_models()) or "none"
        raise MedinpaintError(f"unknown model {name_or_path!r}; shipped models: {names}")
    return shipped


def read_info(path: Path) -> ModelInfo:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise MedinpaintError(f"{path}: not a readable safetensors file ({exc})") from None
    if "features" not in meta:
        raise MedinpaintError(f"{path}: no medinpaint architecture in the safetensors metadata")
    features = tuple(json.loads(meta.pop("features")))
    extra = {k: _maybe_json(v) for k, v in meta.items()}
    return ModelInfo(name=path.stem, path=path, sha256=sha256_file(path), features=features, metadata=extra)


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def list_models() -> list[ModelInfo]:
    return [read_info(p) for p in sorted(MODELS_DIR.glob("*.safetensors"))]


_WRONG_TASK_HINT = {  # what to do with a model handed to the other job
    "slices": "{name} is a {task} model; pass it as the metal model (--metal-model)",
    "metal": "{name} is not a metal-streak model (its task is {task}); pass it as --model",
    "metal-trust": "{name} is not a metal trust-weight model (its task is {task}); set it as metal.trust_model only if it is one",
}


def load_model(name_or_path: str | None = None, device: torch.device | str = "cpu",
               task: str | None = None) -> tuple[InpaintingUNet, ModelInfo]:
    """The network and its card facts; with ``task``, a model trained for another job is refused before its weights load."""
    path = resolve(name_or_path)
    info = read_info(path)
    if task is not None and info.task != task:
        raise MedinpaintError(_WRONG_TASK_HINT[task].format(name=info.name, task=info.task))
    model = InpaintingUNet(info.features, original_input=info.original_input, registered_input=info.registered_input)
    state = load_file(str(path), device="cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MedinpaintError(f"{path}: weights do not fit the architecture ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), info


def load_trust_model(name_or_path: str):
    """The learned trust weight of the metal correction (``metal.learned_trust.TrustNet``) and its card facts."""
    from medinpaint.metal.learned_trust import TrustNet

    path = resolve(name_or_path)
    info = read_info(path)
    if info.task != "metal-trust":
        raise MedinpaintError(_WRONG_TASK_HINT["metal-trust"].format(name=info.name, task=info.task))
    model = TrustNet(info.features)
    try:
        model.load_state_dict(load_file(str(path), device="cpu"))
    except RuntimeError as exc:
        raise MedinpaintError(f"{path}: weights do not fit the architecture ({str(exc).splitlines()[0]})") from None
    return model.eval(), info


def save_model(model: InpaintingUNet, path: Path, **metadata) -> None:
    meta = {"features": json.dumps(list(model.features))}
    if model.original_input:
        meta["original_input"] = "true"
    if model.registered_input:
        meta["registered_input"] = "true"
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)
