"""Run the MONAI bundle's cases (configs/bundle): for each scan, the files ``medinpaint correct`` writes.

The bundle's own ``network_def`` objects (with the shipped weights, loaded strictly) and its
``SlidingWindowInferer`` settings are what run, so the bundle declares what it does rather
than describing a model that is loaded elsewhere.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from monai.inferers import SlidingWindowInferer
from monai.utils import ensure_tuple
from safetensors.torch import load_file

from medinpaint.batch import list_cases
from medinpaint.config import Settings, load_settings
from medinpaint.correct import correct, detect
from medinpaint.data.load import load
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.inference import pick_device, sw_batch_size
from medinpaint.inpaint.models import ModelInfo, read_info, resolve
from medinpaint.inpaint.network import InpaintingUNet
from medinpaint.data.output_names import check_outputs, output_format
from medinpaint.output import save
from medinpaint.provenance import run_settings

# What network_fill sets itself on the SlidingWindowInferer it builds per crop (device, stitching,
# progress); everything else must be as the bundle declares it, or the run would not be what it says.
_SET_BY_MEDINPAINT = ("sw_device", "device", "progress", "roi_weight_map")


def load_weights(network: InpaintingUNet, model: str | Path, task: str) -> tuple[InpaintingUNet, ModelInfo]:
    """``network`` (a network_def) with the weights of ``model`` loaded strictly, and their card facts.

    ``model`` is a shipped name, resolved to the package's own safetensors file (the bundle holds no
    copy of the weights), or a .safetensors path.
    """
    if not isinstance(network, InpaintingUNet):
        raise MedinpaintError(f"a network_def must be a medinpaint.inpaint.network.InpaintingUNet, not {type(network).__name__}")
    path = resolve(str(model))
    info = read_info(path)
    if info.task != task:
        raise MedinpaintError(f"{info.name} is a {info.task} model, not a {task} model")
    declared = (tuple(network.features), network.original_input, network.registered_input)
    stored = (info.features, info.original_input, info.registered_input)
    if declared != stored:
        raise MedinpaintError(f"network_def (features, original_input, registered_input) = {declared} "
                              f"is not the architecture of {info.name} {stored}")
    try:
        network.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except RuntimeError as exc:
        raise MedinpaintError(f"{path}: weights do not fit network_def ({str(exc).splitlines()[0]})") from None
    return network.eval(), info


def windows_per_pass(config: str | Path | None, device: str, roi_size) -> int:
    """The windows per pass that ``medinpaint correct --config config`` runs with on ``device`` (its
    ``inference.sw_batch_size``, ``auto`` resolved), for the inferer to declare."""
    try:
        return sw_batch_size(load_settings(config).inference.sw_batch_size, pick_device(device),
                             tuple(int(r) for r in ensure_tuple(roi_size)))
    except MedinpaintError:
        return 1  # a bad config or device is reported, as one line, when the run starts


def settings_with(inferer: SlidingWindowInferer, settings: Settings, device: str = "auto") -> Settings:
    """``settings`` with the inferer's patch, overlap, blending and batch; refuses inferer options medinpaint does not apply.

    The batch stays recorded as configured (e.g. ``auto``) when that is what it resolves to on ``device``.
    """
    if not isinstance(inferer, SlidingWindowInferer):
        raise MedinpaintError(f"the bundle's inferer must be a SlidingWindowInferer, not {type(inferer).__name__}")
    roi = tuple(int(r) for r in ensure_tuple(inferer.roi_size))
    overlap = inferer.overlap
    if isinstance(overlap, (tuple, list)):
        if len(set(overlap)) != 1:
            raise MedinpaintError(f"inferer overlap {overlap}: medinpaint takes one overlap for every axis")
        overlap = overlap[0]
    batch = inferer.sw_batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise MedinpaintError(f"inferer sw_batch_size must be a positive integer, not {batch!r}")
    configured = settings.inference.sw_batch_size
    if batch != sw_batch_size(configured, pick_device(device), roi):
        configured = batch  # the inferer's own choice, recorded as such
    inference = dataclasses.replace(settings.inference, roi_size=roi, overlap=float(overlap),
                                    blend_mode=str(inferer.mode.value), sw_batch_size=configured)
    # The inferer medinpaint will build from these settings must equal the declared one.
    built = vars(SlidingWindowInferer(roi_size=roi, sw_batch_size=batch, overlap=float(overlap), mode=inference.blend_mode))
    differ = sorted(k for k, v in vars(inferer).items()
                    if k not in _SET_BY_MEDINPAINT and k in built and not _same(v, built[k]))
    if differ:
        raise MedinpaintError(f"inferer option(s) {', '.join(differ)} differ from what medinpaint's inference applies; "
                              "remove them from the bundle config")
    return dataclasses.replace(settings, inference=inference)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return tuple(ensure_tuple(a)) == tuple(ensure_tuple(b))
    return a == b


def run_cases(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    networks: dict[str, tuple[InpaintingUNet, str | Path]],
    inferer: SlidingWindowInferer,
    method: str = "network",
    device: str = "auto",
    config: str | Path | None = None,
    suffix: str = ".nii.gz",
    overwrite: bool = False,
) -> list[Path]:
    """Correct every scan of ``input_dir`` into ``output_dir/<case><suffix>``; return the volumes written.

    As ``medinpaint correct INPUT OUTPUT`` does for each: detection ``auto``, the settings of
    ``config`` (defaults when None) with the inferer's, and ``networks`` (task -> network_def and
    its model), whose weights are loaded strictly before anything else.  The metal network
    refines streaks only where the settings ask for it (``metal.refine: network``), as in ``correct``.
    """
    if not isinstance(overwrite, bool):  # fire reads `--overwrite false` as the (true) string "false"
        raise MedinpaintError(f"overwrite must be True or False, not {overwrite!r} (on the command line: --overwrite True)")
    loaded = {task: load_weights(net, model, task) for task, (net, model) in networks.items()}
    names = {task: str(model) for task, (_, model) in networks.items()}
    settings = settings_with(inferer, load_settings(config), device)
    cases = list_cases(Path(input_dir))
    if not cases:
        raise MedinpaintError(f"{input_dir}: no scans found")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [out_dir / (case.case if suffix == "dicom" else case.case + suffix) for case in cases]
    for output in outputs:  # every output checked before any heavy work
        check_outputs(output, overwrite)
    refine_metal = settings.metal.refine == "network"
    used = {task: net for task, net in loaded.items() if task != "metal" or refine_metal}
    written = []
    for case, output in zip(cases, outputs):
        volume = load(case.input, series=case.series)
        found = detect(volume, settings)
        result = correct(volume, found, method=method, settings=settings, device=device, networks=used)
        result.run = run_settings(method=method, settings=settings, output_format=output_format(output),  # as correct records it
                                  model=names.get("slices"), metal_model=names.get("metal") if refine_metal else None,
                                  device=device)
        written.append(save(result, output, overwrite=overwrite)["volume"])
        print(f"{case.case}: wrote {written[-1]}", file=sys.stderr)
    return written


def run(*args, **kwargs) -> list[Path]:
    """``run_cases`` for the bundle's command line: bad input is one ``error:`` line and exit status 2."""
    try:
        return run_cases(*args, **kwargs)
    except MedinpaintError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
