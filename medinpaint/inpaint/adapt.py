"""Per-scan self-supervised adaptation: fine-tune a copy of the slice model on the scan itself.

The shipped model saw two real scans; it cannot know the texture, noise and resolution of the
one in front of it.  Before filling, a copy learns to restore acquired slices of this scan,
hidden in runs like its real gaps (``training.damage.slice_damage``), with the training loss
(``training.train``).  The gate's left-out picks and the real gaps are never a training
target: in the training patches they are holes, pre-filled and masked as at inference, and
the content of the picks is replaced by linear interpolation (what in-plane patches read), so
the copy never reads them either.  The copy stays in memory unless ``--save-adapted`` asks for it.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import SSIMLoss

from medinpaint.body import body_threshold
from medinpaint.config import AdaptSettings, TrainSettings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.classical import choose_slice_order, left_out, network_prefill
from medinpaint.inpaint.inference import _pad_to
from medinpaint.inpaint.models import ModelInfo, save_model
from medinpaint.inpaint.network import InpaintingUNet
from medinpaint.inpaint.normalize import Normalizer
from medinpaint.inpaint.registered import with_registered_slices
from medinpaint.training.damage import slice_damage
from medinpaint.training.in_plane import in_plane_patch
from medinpaint.training.train import masked_l1

ADAPTED_LAYERS = ("head", "all")  # head: the network's last convolution only (fast, few parameters); all: every weight


def adaptation_steps(setting: str | int, device: torch.device, train_slices: int, settings: AdaptSettings) -> tuple[int, str]:
    """Steps to run for ``setting`` (off, auto or a number) and why."""
    if setting in ("off", None, False, 0, "0"):
        return 0, "adaptation off"
    if setting == "auto":
        if train_slices < settings.min_slices:
            return 0, f"auto: only {train_slices} acquired slices left to train on (adapt.min_slices {settings.min_slices})"
        steps = settings.auto_steps_cuda if device.type == "cuda" else settings.auto_steps_cpu
        return steps, f"auto on {device.type}: {steps} steps, at most {settings.seconds:g} s"
    try:
        steps = int(setting)
    except (TypeError, ValueError):
        steps = -1
    if isinstance(setting, bool) or steps < 0 or str(setting).strip() != str(steps):
        raise MedinpaintError(f"adapt {setting!r}: choose off, auto or a number of steps")
    if train_slices < 3:
        raise MedinpaintError(f"adapt: only {train_slices} acquired slices left to train on; use --adapt off")
    return steps, f"{steps} steps asked for, at most {settings.seconds:g} s"


def adapt_model(
    net: InpaintingUNet,
    info: ModelInfo,
    base: np.ndarray,
    modality: str,
    bad_slices: list[int],
    validation: list[int],
    lengths: list[int],
    settings: AdaptSettings,
    steps: int,
    device: torch.device,
    progress: bool = False,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[InpaintingUNet, dict]:
    """A copy of ``net`` fine-tuned on ``base`` (the scan, its real gaps pre-filled) for at most
    ``steps`` steps and ``settings.seconds`` seconds; acquired slices other than ``bad_slices`` and
    ``validation`` are hidden in runs of up to ``max(lengths)`` and restored.  With ``spacing`` (mm)
    and ``settings.in_plane``, that share of the patches on a thick-sliced scan is cut along an
    in-plane axis (``in_plane_patch``)."""
    started = time.perf_counter()
    forbidden = sorted(set(bad_slices) | set(validation))
    n_i, n_j, n_k = base.shape
    trainable = [k for k in range(n_k) if k not in set(forbidden)]
    allowed = set(trainable)
    # The validation picks' content is replaced by their linear interpolation: never read, never learnt.
    hidden_planes = {}
    if validation:
        _, predicted = left_out(base, [k for k in range(n_k) if k not in set(bad_slices)], sorted(validation), ("linear",))
        hidden_planes = {k: predicted["linear"][:, :, n].astype(np.float32) for n, k in enumerate(sorted(validation))}
    normalizer = Normalizer.for_volume(base, modality)
    order = info.slice_prefill
    if order == "auto":
        order = choose_slice_order(base, trainable, read=lambda ks: normalizer.forward(base[:, :, ks]))
    patch = tuple(min(p, n) for p, n in zip(settings.patch_size, base.shape))
    roi = tuple(int(np.ceil(p / 16) * 16) for p in patch)
    rng = np.random.RandomState(settings.seed)
    body = _body_centres(base, modality)
    ratio = _thickness_ratio(spacing, settings)
    made_in_plane = 0
    model = copy.deepcopy(net).to(device).train()
    if settings.layers not in ADAPTED_LAYERS:
        raise MedinpaintError(f"adapt.layers {settings.layers!r}: choose {' or '.join(ADAPTED_LAYERS)}")
    if settings.layers == "head":  # only the last 1x1x1 convolution learns: no backward pass through the UNet
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("unet.final_conv."))
    learnt = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(learnt, lr=settings.lr, weight_decay=TrainSettings().weight_decay)
    ssim = SSIMLoss(spatial_dims=3, data_range=2.0, win_size=7)  # as training.train
    weights = TrainSettings()
    pool: list[list[torch.Tensor]] = []  # target, inputs, loss mask per patch, made once (the registered fill is the slow part)
    attempts = 0
    while len(pool) < settings.patches and attempts < 20 * settings.patches and time.perf_counter() - started < settings.seconds / 2:
        attempts += 1
        centre = body[rng.randint(len(body))]
        if ratio and rng.rand() < settings.in_plane:
            crop = in_plane_patch(base, hidden_planes, centre, patch, ratio, int(rng.randint(2)), rng)
            hidden = slice_damage(patch[2], rng, max(lengths), margin=1) if crop is not None else []
            gaps: list[int] = []
            made_in_plane += bool(hidden)
        else:
            i0, j0 = (int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre[:2], patch[:2], (n_i, n_j)))
            k0 = rng.randint(0, n_k - patch[2] + 1)
            hidden = [k for k in slice_damage(patch[2], rng, max(lengths), margin=1) if k0 + k in allowed]
            # The real gaps and the gate's picks are missing here as at inference (holes, pre-filled), never
            # context that looks acquired: measured on a 6.5 mm MR with a quarter of its slices missing,
            # learning from their interpolations as if acquired cost 2-3 dB on the left-out picks.
            gaps = [k - k0 for k in range(k0, k0 + patch[2]) if k not in allowed]
            crop = base[i0 : i0 + patch[0], j0 : j0 + patch[1], k0 : k0 + patch[2]].astype(np.float32)
            for k in range(k0, k0 + patch[2]):
                if k in hidden_planes:
                    crop[:, :, k - k0] = hidden_planes[k][i0 : i0 + patch[0], j0 : j0 + patch[1]]
        if not hidden:
            continue
        channels = training_channels(normalizer.forward(crop), hidden, gaps, order, model.registered_input)
        pool.append([torch.from_numpy(_pad_to(c, roi)[0].copy())[None, None].to(device) for c in channels])
    if not pool:
        raise MedinpaintError("adapt: could not cut any training patch from the scan's acquired slices")
    features = _last_features(model, pool) if settings.layers == "head" else None
    pool_seconds = time.perf_counter() - started
    losses: list[float] = []
    done = 0
    while done < steps and time.perf_counter() - started < settings.seconds:
        # head: every patch each step (on cached features, cheap); all: one patch per step
        batch = range(len(pool)) if features is not None else [rng.randint(len(pool))]
        loss = 0.0
        for n in batch:
            target, *inputs, learnt_from = pool[n]
            out = model(*inputs) if features is None else _from_features(model, features[n], inputs)
            loss = loss + weights.l1_weight * masked_l1(out, target, learnt_from)
            if features is None:  # SSIM costs ten times the head itself: only when the whole network learns
                loss = loss + weights.ssim_weight * ssim(out, target)
        loss = loss / len(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(learnt, 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
        done += 1
    model.eval().requires_grad_(False)
    seconds = time.perf_counter() - started
    record = {
        "steps": done, "steps_asked": steps, "seconds": round(seconds, 2), "seconds_making_patches": round(pool_seconds, 2), "seconds_limit": settings.seconds,
        "lr": settings.lr, "layers": settings.layers, "patch_size": list(patch), "slice_prefill": order, "max_run": max(lengths),
        "training_slices": len(trainable), "training_patches": len(pool), "in_plane_patches": made_in_plane if ratio else
        f"none ({'off' if not settings.in_plane else 'spacing unknown' if spacing is None else 'slices not thick enough'})",
        "loss": "masked L1 (training.train)" if features is not None else "masked L1 + 0.1 SSIM (training.train)",
        "loss_first_steps": round(float(np.mean(losses[:5])), 5) if losses else None,
        "loss_last_steps": round(float(np.mean(losses[-5:])), 5) if losses else None,
        "device": str(device),
    }
    if done < steps:
        record["stopped"] = f"time limit of {settings.seconds:g} s reached"
    return model, record


def training_channels(image: np.ndarray, hidden: list[int], gaps: list[int], order: str, registered_input: bool) -> list[np.ndarray]:
    """Target, the network's inputs and the loss mask of one patch: ``hidden`` slices are learnt, ``gaps``
    (real gaps, the gate's picks) are missing from the input as well but never learnt."""
    missing = sorted(set(hidden) | set(gaps))
    prefilled = network_prefill(image, missing, np.zeros(image.shape, bool), order)
    mask = np.zeros(image.shape, np.float32)
    mask[:, :, missing] = 1.0
    learnt_from = np.zeros(image.shape, np.float32)
    learnt_from[:, :, hidden] = 1.0
    channels = [image, prefilled, mask]
    if registered_input:
        channels.append(with_registered_slices(prefilled, image, missing))
    return channels + [learnt_from]


def _thickness_ratio(spacing: tuple[float, float, float] | None, settings: AdaptSettings) -> float:
    """Slice spacing over pixel spacing where in-plane patches are asked for and the slices are thick enough, else 0."""
    if not settings.in_plane or spacing is None:
        return 0.0
    ratio = float(spacing[2]) / float(max(spacing[0], spacing[1]))
    return ratio if ratio >= settings.in_plane_min_ratio else 0.0


@torch.no_grad()
def _last_features(model: InpaintingUNet, pool: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """What the UNet feeds its last convolution, per pooled patch: the frozen body runs once per patch."""
    seen: list[torch.Tensor] = []
    hook = model.unet.final_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        for _, *inputs, _ in pool:
            model(*inputs)
    finally:
        hook.remove()
    return seen


def _from_features(model: InpaintingUNet, features: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The model's output with its frozen body replaced by cached ``features`` (only the head runs)."""
    body = model.unet
    body.forward = lambda x: body.final_conv(features)  # instance attribute: shadows BasicUNet.forward for this call
    try:
        return model(*inputs)
    finally:
        del body.forward


def _body_centres(base: np.ndarray, modality: str, most: int = 4096) -> np.ndarray:
    """In-plane positions inside the patient (crop centres), on a coarse grid; the whole plane when none."""
    step = max(1, int(np.sqrt(base.shape[0] * base.shape[1] / most)))
    plane = np.nan_to_num(base[::step, ::step, :]).max(axis=2)
    found = np.argwhere(plane > body_threshold(plane, modality)) * step
    return found if len(found) else np.argwhere(np.ones(plane.shape, bool)) * step


def save_adapted(model: InpaintingUNet, info: ModelInfo, path: str | Path, overwrite: bool, record: dict) -> None:
    """Write the adapted weights as a .safetensors file that ``--model`` reads back (atomically)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MedinpaintError(f"--save-adapted {path}: the file name must end in .safetensors")
    if path.exists() and not overwrite:
        raise MedinpaintError(f"{path}: already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise MedinpaintError(f"{path.parent}: output folder does not exist")
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.safetensors")
    try:
        save_model(model, tmp, name=path.stem, task=info.task, slice_prefill=info.slice_prefill,
                   adapted_from={"name": info.name, "sha256": info.sha256}, adaptation=record)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MedinpaintError(f"{path}: cannot write the adapted model ({exc.strerror})") from None
