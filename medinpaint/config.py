"""Every setting, typed, with its default; YAML files are read here and nowhere else.

``configs/inference.yaml`` and ``configs/train_*.yaml`` hold the same keys as these
dataclasses; unknown keys are an error so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medinpaint.artifacts.metal import MetalDetection
from medinpaint.artifacts.slices import SliceDetection
from medinpaint.errors import MedinpaintError


@dataclass(frozen=True)
class InferenceSettings:
    roi_size: tuple[int, int, int] = (128, 128, 16)
    overlap: float = 0.25
    sw_batch_size: int | str = "auto"  # windows per forward pass; auto: 1 on CPU, from free memory on CUDA
    blend_mode: str = "gaussian"
    context_voxels: int = 16  # valid context kept around the holes when cropping for inference
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads for torch and SimpleITK; 0 = their defaults (all cores)


@dataclass(frozen=True)
class GateSettings:
    """The "never below classical" gate of slice filling (medinpaint/inpaint/gate.py)."""

    enabled: bool = True  # measure network vs classical fills on left-out acquired slices of each scan
    margin_db: float = 0.1  # the network is written only when the lower confidence bound of its left-out gain over the classical choice exceeds this
    picks: int = 16  # left-out runs per gap length (runs as long as the scan's real gaps, away from them)
    rounds: int = 4  # at most this many passes (one network run each) to place the picks on a short scan
    classical: tuple[str, ...] = ("linear", "cubic", "registered")  # candidates; registered = motion-compensated
    default: str = "cubic"  # written unless another method wins clearly: reproduces cubic-resampled volumes, beats linear on smooth anatomy
    confidence: float = 0.95  # one-sided level of the lower bound (bootstrap over the picks) a winner's pooled gain must clear
    seed: int = 0  # placement of the left-out runs (same seed, same picks)


@dataclass(frozen=True)
class AdaptSettings:
    """Per-scan self-supervised fine-tuning of the slice model before filling (medinpaint/inpaint/adapt.py)."""

    steps: int | str = "off"  # off | auto | a number of steps
    seconds: float = 60.0  # stop adapting after this long, whatever the steps
    auto_steps_cpu: int = 200  # steps for auto on the CPU (layers head: each a pass over the cached patches, cheap)
    auto_steps_cuda: int = 300  # steps for auto on a GPU
    patches: int = 8  # damaged training patches cut from the scan (made once: the registered fill is slow on the CPU)
    min_slices: int = 12  # auto adapts only scans with at least this many acquired slices left for training
    layers: str = "head"  # head: only the last convolution learns (no backward through the UNet); all: every weight
    lr: float = 1e-2  # head: a few dozen steps must move a gate bias by whole units
    patch_size: tuple[int, int, int] = (48, 48, 16)  # training crop (clipped to the scan, padded to multiples of 16)
    in_plane: float = 0.0  # share of patches cut along the in-plane axes, thickened to the slice spacing (SMORE)
    in_plane_min_ratio: float = 2.0  # ... only where the slices are at least this many times the pixel spacing
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.in_plane, (int, float)) and not 0.0 <= self.in_plane <= 1.0:  # other types: _build says so
            raise MedinpaintError(f"adapt.in_plane {self.in_plane}: a share of the patches, from 0 to 1")


@dataclass(frozen=True)
class Settings:
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    slices: SliceDetection = field(default_factory=SliceDetection)
    metal: MetalDetection = field(default_factory=MetalDetection)


@dataclass(frozen=True)
class DataSettings:
    ct: tuple[str, ...] = ()
    mr: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()  # user scans (any readable format), e.g. for fine-tuning
    real_repeat: int = 1  # draw each real (ct/mr) scan this many times as often as a procedural one
    procedural_ct: int = 16
    procedural_mr: int = 8
    procedural_shape: tuple[int, int, int] = (112, 112, 72)
    metal_pairs: int = 0  # task metal: simulated metal scans made from data.ct (cached in output_dir/pairs)
    metal_views: int = 360  # task metal: views of those simulated scans (720 is a clinical scanner; slower)
    metal_pixel_mm: float = 1.5  # task metal: in-plane pixel the sources are resampled to before simulation
    metal_photons: float = 2e5  # task metal: unattenuated photons per ray of those scans (their noise level)
    metal_halo_hu: float | None = None  # task metal: detection's metal.halo_hu for the pairs (None: metal trace alone, as metal-v1..v3 saw)
    metal_pairs_dir: str | None = None  # task metal: where the pairs are kept (default output_dir/pairs); runs may share one

    def __post_init__(self) -> None:
        try:  # checked when the recipe is read, not hours later when the pairs are made
            MetalDetection(halo_hu=self.metal_halo_hu)
        except MedinpaintError as exc:
            raise MedinpaintError(f"data.metal_halo_hu: {exc}") from None


@dataclass(frozen=True)
class AdversarialSettings:
    enabled: bool = False
    weight: float = 0.005
    start_step: int = 0
    lr: float = 1e-4


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    task: str = "slices"  # slices: missing slices and holes, damaged on the fly; metal: streaks, from simulated pairs
    output_dir: str = "runs/default"
    steps: int = 2000
    batch_size: int = 4
    patches_per_volume: int = 4
    patch_size: tuple[int, int, int] = (64, 64, 32)
    crop_margin: float = 1.5  # crop this much larger than the patch before zooming
    zoom_min: tuple[float, float, float] = (1.0, 1.0, 0.8)
    zoom_max: tuple[float, float, float] = (2.5, 2.5, 1.3)
    lr: float = 3e-4
    weight_decay: float = 1e-5
    features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)
    l1_weight: float = 1.0
    ssim_weight: float = 0.1
    l2_weight: float = 0.0  # masked squared error: weighs the few large errors (next to metal) as PSNR does
    slice_probability: float = 0.6
    slice_prefill: str = "linear"  # linear | cubic | auto: the interpolation the network refines (kept in the model)
    max_run: int = 5
    in_plane_probability: float = 0.0  # task slices: share of crops of thick-sliced real scans whose slice axis is an in-plane axis (SMORE)
    in_plane_min_ratio: float = 2.0  # ... only where slices are at least this many times thicker than the pixels
    validation_every: int = 200
    validation_patches: int = 24
    checkpoint_every: int = 200
    threads: int = 0
    loader_workers: int = 1  # processes cropping and damaging patches; raise it on a GPU, where one cannot keep up
    device: str = "auto"
    init: str | None = None  # a shipped model name or a .safetensors file to start from
    original_input: bool = False  # task metal: the network also reads the damaged image (not only NMAR and the mask)
    registered_input: bool = False  # task slices: the network also reads motion-compensated interpolation of missing slices
    data: DataSettings = field(default_factory=DataSettings)
    adversarial: AdversarialSettings = field(default_factory=AdversarialSettings)


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise MedinpaintError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MedinpaintError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    built = cls(**kwargs)  # the settings' own checks first: their messages say the most
    for name, value in values.items():
        if not dataclasses.is_dataclass(getattr(built, name)) and not _fits(kwargs[name], hints[name]):
            raise MedinpaintError(f"{where}.{name}: expected {_type_name(hints[name])}, got {value!r}{_yaml_number_hint(value)}")
    return built


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value has the type a setting declares (an int is a float too; a bool is neither)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("NoneType", "null").replace("typing.", "")


def _yaml_number_hint(value: Any) -> str:
    """PyYAML reads 1e-3 (no dot) as text: say so rather than leave the user puzzled."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return ""
    return " (YAML reads a number like 1e-3 as text; write 1.0e-3)" if isinstance(value, str) else ""


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise MedinpaintError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise MedinpaintError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return data


def load_settings(path: str | Path | None = None) -> Settings:
    """Inference settings: defaults, overridden by a YAML file when given."""
    return Settings() if path is None else _build(Settings, read_yaml(path), str(path))


def load_train_settings(path: str | Path, **overrides: Any) -> TrainSettings:
    values = read_yaml(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _build(TrainSettings, values, str(path))


def as_dict(settings) -> dict:
    return dataclasses.asdict(settings)
