"""Train the learned trust weight (``metal.learned_trust``) on records from ``metal_trust_data``.

The loss is what the benchmark scores: the squared error of image + weight x change against the
metal-free truth in the record's region, after the benchmark's low-pass (the streaks) and as is,
each as the log of its ratio to the uncorrected slice's, so every slice counts in decibels and a
mild case counts as much as a strong one.

    python -m medinpaint.training.metal_trust OUT.safetensors --train DIR [DIR ...] --test DIR [--steps 800]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from medinpaint.metal.learned_trust import CHANNELS, FEATURES, TrustNet, trust_inputs
from medinpaint.metal.mar import gaussian_smooth

STREAK_SIGMA_PX = 1.5  # as benchmarks/metal.py


def load_record(path: Path) -> dict:
    with np.load(path) as z:
        r = {k: z[k] for k in z.files}
    return {
        "name": path.stem,
        "inputs": trust_inputs(r["image"], r["change"], r["metal"], r["halo"], r["gradient_weight"], float(r["noise_hu"])),
        "image": r["image"].astype(np.float32), "change": r["change"].astype(np.float32), "truth": r["truth"].astype(np.float32),
        "region": r["region"].astype(bool), "metal": r["metal"].astype(bool), "evidence": float(r["evidence"]),
    }


def _gauss(x: torch.Tensor) -> torch.Tensor:
    """The streaks score's low-pass (the benchmark's sigma; mirrored edges) of (B, 1, H, W) slices."""
    return gaussian_smooth(x, STREAK_SIGMA_PX, padding="reflect")


def slice_errors(weight: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-passed, plain) MSE of image + weight x change in the region, and the same for the uncorrected image (B, 2).

    As the benchmark's ``streak_view``: outside the region (the kept metal and its edge) the truth's
    values are low-passed, so the metal does not leak into the scored voxels beside it.
    """
    image, change, truth, region = batch["image"], batch["change"], batch["truth"], batch["region"]
    corrected = image + weight * change
    n = region.sum((1, 2, 3)).clamp(min=1)
    out = []
    for x in (corrected, image):
        scored = x * region + truth * (1 - region)
        out.append(torch.stack([((_gauss(scored) - _gauss(truth)) ** 2 * region).sum((1, 2, 3)) / n,
                                ((x - truth) ** 2 * region).sum((1, 2, 3)) / n], 1))
    return out[0], out[1]


def loss_of(weight: torch.Tensor, batch: dict) -> torch.Tensor:
    corrected, uncorrected = slice_errors(weight, batch)
    return (torch.log(corrected + 1.0) - torch.log(uncorrected + 1.0)).mean(0) @ torch.tensor([1.0, 0.5])


def _as_batch(records: list[dict], crop: int | None, rng: np.random.Generator) -> dict:
    """Tensors (B, C, S, S): crops of ``crop`` pixels around the metal (padded with air where a slice is smaller)."""
    out = {k: [] for k in ("inputs", "image", "change", "truth", "region")}
    for r in records:
        h, w = r["image"].shape
        if crop is None:
            window = (slice(None), slice(None))
            pad = (0, 0)
        else:
            ii, jj = np.nonzero(r["metal"])
            c = (int(ii.mean()) + int(rng.integers(-crop // 4, crop // 4 + 1)), int(jj.mean()) + int(rng.integers(-crop // 4, crop // 4 + 1)))
            i0, j0 = (int(np.clip(c[0] - crop // 2, 0, max(0, h - crop))), int(np.clip(c[1] - crop // 2, 0, max(0, w - crop))))
            window = (slice(i0, i0 + crop), slice(j0, j0 + crop))
            pad = (max(0, crop - h), max(0, crop - w))
        turn = int(rng.integers(4))
        for key in out:
            x = r[key][(Ellipsis, *window)].astype(np.float32)
            fill = {"inputs": 0.0, "image": -1000.0, "truth": -1000.0, "change": 0.0, "region": 0.0}[key]
            x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad[0]), (0, pad[1])], constant_values=fill)
            out[key].append(np.rot90(x, turn, axes=(-2, -1)).copy())
    batch = {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}
    for k in ("image", "change", "truth", "region"):
        batch[k] = batch[k][:, None]
    return batch


def evaluate(model: TrustNet, records: list[dict]) -> list[dict]:
    """Per record: streaks and plain gain (dB) over uncorrected of the full change, the rule's weight and the network's."""
    rows = []
    rng = np.random.default_rng(0)
    model.eval()
    with torch.inference_mode():
        for r in records:
            b = _as_batch([r], None, rng)
            row = {"name": r["name"], "evidence": r["evidence"]}
            for label, weight in (("full", torch.ones_like(b["change"])), ("rule", b["inputs"][:, 3:4]), ("net", model(b["inputs"]))):
                corrected, uncorrected = slice_errors(weight, b)
                gain = 10 * torch.log10(uncorrected / corrected.clamp(min=1e-9))[0]
                row[label] = [round(float(gain[0]), 2), round(float(gain[1]), 2)]
            rows.append(row)
    return rows


def train(records: list[dict], steps: int, batch_size: int = 4, crop: int = 192, lr: float = 1e-3, seed: int = 0,
          log_every: int = 50, features: tuple[int, ...] = FEATURES) -> TrustNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TrustNet(features)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    started, running = time.time(), []
    model.train()
    for step in range(steps):
        batch = _as_batch([records[i] for i in rng.integers(len(records), size=batch_size)], crop, rng)
        loss = loss_of(model(batch["inputs"]), batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            running.append((float(loss), float(loss_of(batch["inputs"][:, 3:4], batch))))
        if (step + 1) % log_every == 0:
            net, rule = np.mean(running[-log_every:], 0)
            print(f"step {step + 1}/{steps} loss {net:+.4f} (the gradient rule's {rule:+.4f}; {time.time() - started:.0f} s)", flush=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where to write the weights (.safetensors)")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="folders of training records (metal_trust_data)")
    parser.add_argument("--test", type=Path, nargs="*", default=[], help="folders of held-out records, scored after training")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", type=lambda v: tuple(int(x) for x in v.split(",")), default=FEATURES,
                        help="BasicUNet features, six comma-separated numbers")
    args = parser.parse_args()
    records = [load_record(p) for d in args.train for p in sorted(d.glob("*.npz"))]
    if not records:
        raise SystemExit(f"error: no training records (*.npz) in {', '.join(map(str, args.train))}; "
                         "make them with python -m medinpaint.training.metal_trust_data")
    print(f"{len(records)} training records", flush=True)
    model = train(records, args.steps, lr=args.lr, seed=args.seed, features=args.features)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"task": "metal-trust", "channels": json.dumps(CHANNELS), "features": json.dumps(list(args.features)), "steps": str(args.steps),
            "train": json.dumps([str(d) for d in args.train]), "records": str(len(records))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out), metadata=meta)
    for d in args.test:
        rows = evaluate(model, [load_record(p) for p in sorted(d.glob("*.npz"))])
        for row in rows:
            print(json.dumps(row))
        for label in ("full", "rule", "net"):
            print(d, label, "mean streaks / plain gain dB", np.round(np.mean([r[label] for r in rows], 0), 3).tolist())


if __name__ == "__main__":
    main()
