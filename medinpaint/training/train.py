"""Self-supervised training: clean volumes are damaged on the fly and the network learns to fill them.

Runs alone, or under ``torchrun`` with DistributedDataParallel (gloo on CPU, nccl on
GPU): each rank draws its own random patches from a differently seeded pipeline.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader
from monai.losses import SSIMLoss
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    RandZoomd,
    SpatialPadd,
)
from monai.utils import set_determinism
from tqdm import tqdm

from medinpaint import __version__
from medinpaint.config import TrainSettings
from medinpaint.data.find import find_cases
from medinpaint.data.load import load
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.classical import SLICE_ORDERS
from medinpaint.inpaint.inference import pick_device
from medinpaint.inpaint.models import load_model, save_model
from medinpaint.inpaint.network import InpaintingUNet
from medinpaint.inpaint.normalize import Normalizer
from medinpaint.training.damage import RandDamaged
from medinpaint.training.in_plane import RandInPlaneCropd
from medinpaint.training.procedural import procedural_volume


class LoadNormalized(MapTransform):
    """Read (or generate) a source volume and normalise it: the cached, deterministic step."""

    def __init__(self) -> None:
        super().__init__(keys="image")

    def __call__(self, item: dict) -> dict:
        if "procedural_seed" in item:
            array = procedural_volume(item["procedural_seed"], tuple(item["shape"]), item["modality"])
            modality, spacing = item["modality"], None
        else:  # slices the loader made (placeholders for missing ones, resampled between irregular ones) are no truth
            volume = load(item["path"], modality=item.get("modality")).acquired_run()
            array, modality, spacing = np.nan_to_num(volume.array), volume.modality, tuple(float(s) for s in volume.spacing)
        normalizer = Normalizer.for_volume(array, modality)
        return {"image": normalizer.forward(array)[None], "name": item.get("path", f"procedural-{item.get('procedural_seed')}"),
                "spacing": spacing}


def source_items(settings: TrainSettings) -> list[dict]:
    data = settings.data
    real = [{"path": p, "modality": "CT"} for p in data.ct] + [{"path": p, "modality": "MR"} for p in data.mr]
    items = real * data.real_repeat
    for folder in data.folders:
        found = find_cases(Path(folder))
        if not found:
            raise MedinpaintError(f"{folder}: no readable volumes found for training")
        items += [{"path": str(case)} for case in found]
    seed = settings.seed * 10_000
    items += [{"procedural_seed": seed + i, "modality": "CT", "shape": data.procedural_shape} for i in range(data.procedural_ct)]
    items += [
        {"procedural_seed": seed + 5_000 + i, "modality": "MR", "shape": data.procedural_shape}
        for i in range(data.procedural_mr)
    ]
    if not items:
        raise MedinpaintError("no training data: give data.ct, data.mr, data.folders or procedural volumes")
    return items


def metal_items(settings: TrainSettings, progress: bool) -> list[dict]:
    """Simulated metal pairs (made once, then read from data.metal_pairs_dir, by default output_dir/pairs).

    The folder keeps the recipe its pairs were made with; a run asking for other pairs is refused
    rather than trained on a mixture.
    """
    from medinpaint.training.metal_pairs import make_pairs, pair_sources

    data = settings.data
    if data.metal_pairs < 1 or not data.ct:
        raise MedinpaintError("task metal needs data.metal_pairs > 0 and clean CT in data.ct")
    out = Path(data.metal_pairs_dir) if data.metal_pairs_dir else Path(settings.output_dir) / "pairs"
    recipe = {"seed": settings.seed, "sources": [str(c) for c in data.ct], "views": data.metal_views,
              "pixel_mm": data.metal_pixel_mm, "photons": data.metal_photons}
    if data.metal_halo_hu is not None:  # recorded only when set: folders made before the setting stay valid
        recipe["halo_hu"] = data.metal_halo_hu
    recipe_file = out / "recipe.json"
    if recipe_file.exists():
        made_with = json.loads(recipe_file.read_text())
        if made_with != recipe:
            raise MedinpaintError(f"{out}: its pairs were made with {made_with}, this run asks for {recipe}; "
                                  "point data.metal_pairs_dir elsewhere")
    elif not any(out.glob("pair-*.npz")):  # a folder of pairs from before recipes were kept is used as it is
        out.mkdir(parents=True, exist_ok=True)
        tmp = recipe_file.with_suffix(f".{os.getpid()}.tmp")  # atomic: other ranks may read it at once
        tmp.write_text(json.dumps(recipe, indent=1))
        os.replace(tmp, recipe_file)
    wanted = [out / f"pair-{n:04d}.npz" for n in range(data.metal_pairs)]
    if not all(p.exists() for p in wanted):
        make_pairs(pair_sources(data.ct, data.metal_pixel_mm), data.metal_pairs, out, settings.seed, data.metal_views,
                   photons=data.metal_photons, halo_hu=data.metal_halo_hu, progress=progress)
    return [{"path": str(p)} for p in wanted]


def metal_pipeline(settings: TrainSettings) -> Compose:
    """Crops that mostly hold streaks, flipped and turned in-plane (streaks have no preferred direction)."""
    from monai.transforms import RandCropByPosNegLabeld

    from medinpaint.training.metal_pairs import LoadMetalPair

    keys = _input_keys(settings)
    patch = tuple(settings.patch_size)
    return Compose(
        [
            LoadMetalPair(original=settings.original_input),
            SpatialPadd(keys=keys, spatial_size=patch, mode="edge"),
            RandCropByPosNegLabeld(keys=keys, label_key="mask", spatial_size=patch, pos=3, neg=1,
                                   num_samples=settings.patches_per_volume),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandRotate90d(keys=keys, prob=0.5, spatial_axes=(0, 1)),
        ]
    )


def patch_pipeline(settings: TrainSettings) -> Compose:
    if settings.task == "metal":
        return metal_pipeline(settings)
    patch = tuple(settings.patch_size)
    crop = tuple(int(math.ceil(p * settings.crop_margin)) for p in patch)
    return Compose(
        [
            LoadNormalized(),
            RandInPlaneCropd(crop, settings.in_plane_probability, settings.in_plane_min_ratio),
            # symmetric, not reflect: torch's reflection fails on a scan with fewer than half the crop's slices
            SpatialPadd(keys="image", spatial_size=crop, mode="symmetric"),
            RandSpatialCropd(keys="image", roi_size=crop, random_size=False),
            RandZoomd(
                keys="image", prob=0.8, min_zoom=settings.zoom_min, max_zoom=settings.zoom_max,
                mode="trilinear", padding_mode="edge", keep_size=True,
            ),
            RandFlipd(keys="image", prob=0.5, spatial_axis=0),
            RandFlipd(keys="image", prob=0.5, spatial_axis=1),
            RandFlipd(keys="image", prob=0.5, spatial_axis=2),
            RandRotate90d(keys="image", prob=0.5, spatial_axes=(0, 1)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            RandSpatialCropSamplesd(keys="image", roi_size=patch, num_samples=settings.patches_per_volume, random_size=False),
            RandDamaged(keys="image", slice_probability=settings.slice_probability, max_run=settings.max_run,
                        slice_prefill=settings.slice_prefill, registered=settings.registered_input),
        ]
    )


def _input_keys(settings: TrainSettings) -> list[str]:
    """Target first, then what the network reads besides it."""
    extra = ["original"] if settings.original_input else ["registered"] if settings.registered_input else []
    return ["image", "prefilled", "mask"] + extra


def _tensor(batch: dict, key: str, device: torch.device) -> torch.Tensor:
    value = batch[key]
    value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return value.to(device=device, dtype=torch.float32)


def masked_l1(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (torch.abs(out - target) * mask).sum() / mask.sum().clamp_min(1.0)


def masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)


def train(settings: TrainSettings, resume: bool = False, log=print) -> Path:
    """Train; return the path of the best exported model (safetensors)."""
    if settings.slice_prefill not in SLICE_ORDERS:
        raise MedinpaintError(f"slice_prefill {settings.slice_prefill!r}: choose one of {', '.join(SLICE_ORDERS)}")
    if settings.task not in ("slices", "metal"):
        raise MedinpaintError(f"task {settings.task!r}: choose slices or metal")
    if settings.original_input and settings.task != "metal":
        raise MedinpaintError("original_input is for task metal (a missing slice has no original to read)")
    if settings.registered_input and settings.task != "slices":
        raise MedinpaintError("registered_input is for task slices (it interpolates missing slices)")
    if not 0.0 <= settings.in_plane_probability <= 1.0 or settings.in_plane_min_ratio < 1.0:
        raise MedinpaintError(f"in_plane_probability must be in [0, 1] and in_plane_min_ratio at least 1, got "
                              f"{settings.in_plane_probability} and {settings.in_plane_min_ratio}")
    if settings.loader_workers < 1:
        raise MedinpaintError(f"loader_workers must be at least 1, got {settings.loader_workers}")
    weights = {"l1_weight": settings.l1_weight, "l2_weight": settings.l2_weight, "ssim_weight": settings.ssim_weight}
    if min(weights.values()) < 0 or settings.l1_weight + settings.l2_weight == 0:
        raise MedinpaintError(f"loss weights must be >= 0 with l1_weight or l2_weight above 0, got {weights}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(settings.device)
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_determinism(seed=settings.seed + rank)
    out_dir = Path(settings.output_dir)
    main_process = rank == 0
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
        launch = {"world_size": world, "backend": dist.get_backend() if world > 1 else None, "device": str(device)}
        (out_dir / "launch.json").write_text(json.dumps(launch, indent=2))

    if settings.task == "metal":
        if main_process:
            metal_items(settings, progress=True)  # simulate once, on one rank
        if world > 1:
            dist.barrier()
        items = metal_items(settings, progress=False)
    else:
        items = source_items(settings)
    pipeline = patch_pipeline(settings)
    dataset = CacheDataset(items, transform=pipeline, progress=False, num_workers=settings.loader_workers)
    loader = DataLoader(dataset, batch_size=max(1, settings.batch_size // settings.patches_per_volume), shuffle=True,
                        num_workers=settings.loader_workers, persistent_workers=True)

    if settings.init:
        model, _ = load_model(settings.init)
        wanted = {"original_input": settings.original_input, "registered_input": settings.registered_input}
        if any(wanted.values()) and not model.takes_extra:  # widen: starts as exactly the init model
            wider = InpaintingUNet(model.features, **wanted)
            wider.load_narrower(model.state_dict())
            model = wider
        for name, value in wanted.items():
            if getattr(model, name) != value:
                raise MedinpaintError(f"init model {settings.init} has {name} {getattr(model, name)}; set {name}: "
                                      f"{str(getattr(model, name)).lower()}")
        model = model.train()
    else:
        model = InpaintingUNet(tuple(settings.features), original_input=settings.original_input,
                               registered_input=settings.registered_input)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.05)
    ssim = SSIMLoss(spatial_dims=3, data_range=2.0, win_size=7)
    adversary = _Adversary(settings, device) if settings.adversarial.enabled else None

    step, best = 0, math.inf
    checkpoint = out_dir / "checkpoint.pt"
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), float(state["best"])
        if state["scheduler"].get("total_steps") == settings.steps:
            scheduler.load_state_dict(state["scheduler"])
        elif step < settings.steps:  # training extended: a new one-cycle schedule over the remaining steps
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=settings.lr, total_steps=settings.steps - step, pct_start=0.05)
            log(f"steps changed to {settings.steps}: new learning-rate schedule for the last {settings.steps - step}")
        if adversary and "discriminator" in state:
            adversary.load_state_dict(state)
        log(f"resumed from {checkpoint} at step {step}")
    trainable = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    validation = _validation_batches(settings, items) if main_process else []
    writer = None
    if main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    progress = tqdm(total=settings.steps, initial=step, disable=not main_process, desc="training", unit="step")
    started, running = time.time(), []
    while step < settings.steps:
        for batch in loader:
            if step >= settings.steps:
                break
            image, *inputs = (_tensor(batch, k, device) for k in _input_keys(settings))
            mask = inputs[1]
            trainable.train()
            out = trainable(*inputs)
            l1 = masked_l1(out, image, mask)
            loss = settings.l1_weight * l1 + settings.ssim_weight * ssim(out, image)
            if settings.l2_weight:
                loss = loss + settings.l2_weight * masked_mse(out, image, mask)
            if adversary and step >= settings.adversarial.start_step:
                loss = loss + adversary.generator_loss(out, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if adversary and step >= settings.adversarial.start_step:
                adversary.discriminator_step(out.detach(), image)
            step += 1
            running.append(l1.item())
            progress.update(1)
            if main_process and step % 20 == 0:
                writer.add_scalar("train/masked_l1", float(np.mean(running)), step)
                progress.set_postfix(masked_l1=f"{np.mean(running):.4f}")
                running.clear()
            if main_process and (step % settings.validation_every == 0 or step == settings.steps):
                metrics = _validate(model, validation, device)
                for key, value in metrics.items():
                    writer.add_scalar(f"val/{key}", value, step)
                log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                    + f" ({time.time() - started:.0f} s)")
                if metrics["rmse_network"] < best:
                    best = metrics["rmse_network"]
                    save_model(model, out_dir / "best.safetensors", name=out_dir.name, steps=step,
                               validation=metrics, trained_with=f"medinpaint {__version__}",
                               slice_prefill=settings.slice_prefill, task=settings.task)
            if main_process and (step % settings.checkpoint_every == 0 or step == settings.steps):
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "step": step, "best": best}
                if adversary:
                    state.update(adversary.state_dict())
                tmp = checkpoint.with_suffix(".tmp")
                torch.save(state, tmp)
                os.replace(tmp, checkpoint)
    progress.close()
    if writer:
        writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out_dir / "best.safetensors"


def _validation_batches(settings: TrainSettings, items: list[dict]) -> list[dict]:
    """A fixed set of damaged patches (own seed), the same at every validation."""
    pipeline = patch_pipeline(settings)
    pipeline.set_random_state(seed=settings.seed + 99_991)
    batches = []
    rng = np.random.default_rng(settings.seed + 99_991)
    cache: dict[int, dict] = {}
    loader = pipeline.transforms[0]  # the deterministic read
    random_part = Compose(pipeline.transforms[1:])
    while len(batches) < settings.validation_patches:
        index = int(rng.integers(len(items)))
        if index not in cache:
            cache[index] = loader(items[index])
        for patch in random_part(dict(cache[index])):
            batches.append({k: patch[k] for k in _input_keys(settings)})
    return batches[: settings.validation_patches]


@torch.no_grad()
def _validate(model: InpaintingUNet, batches: list[dict], device: torch.device) -> dict[str, float]:
    model.eval()
    sq_net = sq_pre = count = 0.0
    for b in batches:
        image, *inputs = (torch.as_tensor(np.asarray(b[k]))[None].to(device, torch.float32) for k in b)
        prefilled, mask = inputs[:2]
        out = model(*inputs)
        sq_net += float(((out - image) ** 2 * mask).sum())
        sq_pre += float(((prefilled - image) ** 2 * mask).sum())
        count += float(mask.sum())
    if count == 0:
        raise MedinpaintError("the validation patches hold no voxel to fill (empty masks); more or other validation data is needed")
    rmse_net, rmse_pre = math.sqrt(sq_net / count), math.sqrt(sq_pre / count)
    return {"rmse_network": rmse_net, "rmse_prefill": rmse_pre, "gain_db": 20 * math.log10(rmse_pre / max(rmse_net, 1e-12))}


class _Adversary:
    """Optional GAN stage: a MONAI PatchDiscriminator judges filled vs real patches."""

    def __init__(self, settings: TrainSettings, device: torch.device) -> None:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        self.weight = settings.adversarial.weight
        self.net = PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=16, in_channels=1).to(device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=settings.adversarial.lr)
        self.loss = PatchAdversarialLoss(criterion="least_squares")

    def generator_loss(self, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.net(fake)[-1]
        return self.weight * self.loss(logits, target_is_real=True, for_discriminator=False)

    def discriminator_step(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        loss = 0.5 * (
            self.loss(self.net(fake)[-1], target_is_real=False, for_discriminator=True)
            + self.loss(self.net(real)[-1], target_is_real=True, for_discriminator=True)
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"discriminator": self.net.state_dict(), "discriminator_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["discriminator_optimizer"])
