"""End-to-end speed and memory of `correct` on a 512 x 512 x 300 CT, against a plain MONAI call.

The CT is the real `ct_abdomen_dicom` series (512 x 512 x 20, 2 mm) mirrored along z to 300
slices, with 6 slices blanked.  Stages: load (NIfTI, int16), find artifacts, network fill,
write (volume + mask + provenance).  The baseline is `monai.inferers.sliding_window_inference`
with its defaults (overlap 0.25, constant blending, sw_batch_size 1) over the whole volume with
the same weights and the same pre-filled input; its masked PSNR is printed beside ours.

    python benchmarks/speed.py [--device all|cpu|cuda] [--skip-plain] [--adapt auto|STEPS]

`--adapt` first fine-tunes the model on the scan (as `correct --adapt`); its seconds are in
`fill`, its memory in the peak (issue 18 asks for at most 4 float32 volumes).  Peaks are above
the resident memory before loading (the scan itself counts), per stage and overall.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import medinpaint
from medinpaint.config import Settings
from medinpaint.data.save import write_file
from medinpaint.inpaint.classical import network_prefill
from medinpaint.inpaint.inference import pick_device
from medinpaint.inpaint.models import load_model
from medinpaint.inpaint.normalize import Normalizer
from medinpaint.inpaint.registered import with_registered_slices
from medinpaint.metrics import masked_metrics

REPO = Path(__file__).resolve().parent.parent
BLANKED = [45, 95, 146, 193, 245, 286]  # away from the mirror turns (k % 20 in {19, 0}), where two neighbours are equal


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak resident memory since the last ``reset_peak`` (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Restart the peak count, so a second device's run is not charged for the first one's."""
    Path("/proc/self/clear_refs").write_text("5")


def build_ct(data: Path) -> medinpaint.Volume:
    source = medinpaint.load(data / "ct_abdomen_dicom")
    n = source.shape[2]
    period = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    index = period[np.arange(300) % len(period)]
    return medinpaint.Volume(np.ascontiguousarray(source.array[:, :, index]), source.affine, modality="CT")


def run(device: torch.device, data: Path, skip_plain: bool, adapt: str = "off") -> dict:
    settings = Settings()
    settings = dataclasses.replace(settings, adapt=dataclasses.replace(settings.adapt, steps=int(adapt) if adapt.isdigit() else adapt))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = build_ct(data)
        damaged = clean.array.copy()
        damaged[:, :, BLANKED] = -1024
        write_file(clean.with_array(damaged), tmp / "ct512x300.nii.gz", "nifti", "int16")
        truth = np.zeros(clean.shape, bool)
        truth[:, :, BLANKED] = True
        reference = clean.array
        del clean, damaged
        volume_mb = 512 * 512 * 300 * 4 / 2**20
        load_model(None, device)  # warm the weights file cache; not part of a per-scan cost
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        baseline = rss_mb()
        reset_peak()
        times, stage_peaks = {}, {}

        def stage_done(name: str, t: float) -> None:
            times[name] = time.perf_counter() - t
            stage_peaks[name] = peak_mb() - baseline
            reset_peak()

        started = time.perf_counter()
        volume = medinpaint.load(tmp / "ct512x300.nii.gz")
        stage_done("load", started)
        t = time.perf_counter()
        artifacts = medinpaint.find_artifacts(volume, slice_settings=settings.slices)
        stage_done("find_artifacts", t)
        assert sorted(artifacts.bad_slices) == BLANKED, artifacts.bad_slices
        t = time.perf_counter()
        result = medinpaint.correct(volume, artifacts, settings=settings, device=str(device))
        stage_done("fill", t)
        (tmp / "out").mkdir()
        t = time.perf_counter()
        medinpaint.save(result, tmp / "out" / "fixed.nii.gz")
        stage_done("write", t)
        times["end_to_end"] = time.perf_counter() - started
        peak = max(stage_peaks.values())
        ours = masked_metrics(reference, result.volume.array, truth, "CT")
        report = {
            "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"),
            "shape": list(volume.shape),
            "sw_batch_size": result.parameters.get("sw_batch_size"),
            "adaptation": result.parameters.get("slice_gate", {}).get("adaptation", adapt),
            "seconds": {k: round(v, 2) for k, v in times.items()},
            "peak_ram_above_baseline_mb": round(peak, 1),
            "peak_ram_in_float32_volumes": round(peak / volume_mb, 2),
            "peak_ram_in_float32_volumes_by_stage": {k: round(v / volume_mb, 2) for k, v in stage_peaks.items()},
            "masked_psnr_db": ours["psnr_db"],
        }
        if device.type == "cuda":
            report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        del result

        if not skip_plain:
            from monai.inferers import sliding_window_inference

            model, info = load_model(None, device)
            normalizer = Normalizer.for_volume(volume.array, "CT")
            prefilled = network_prefill(normalizer.forward(np.where(truth, 0, volume.array)), BLANKED,
                                        np.zeros(truth.shape, bool), info.slice_prefill)  # the same input as ours
            channels = [prefilled, truth.astype(np.float32)]
            t = time.perf_counter()
            if info.registered_input:  # the same third input as ours (timed: the plain call needs it too)
                channels.append(with_registered_slices(prefilled, volume.array, BLANKED, normalizer.forward))
            x = torch.from_numpy(np.stack(channels)[None])
            del prefilled, channels
            with torch.no_grad():
                y = sliding_window_inference(x, settings.inference.roi_size, 1,
                                             lambda w: model(*(w[:, c : c + 1].to(device) for c in range(w.shape[1]))))
            if device.type == "cuda":
                torch.cuda.synchronize()
            plain_seconds = time.perf_counter() - t
            plain = np.where(truth, normalizer.inverse(y[0, 0].float().cpu().numpy()), volume.array)
            report["plain_monai_fill_seconds"] = round(plain_seconds, 2)
            report["speedup_fill_vs_plain_monai"] = round(plain_seconds / times["fill"], 2)
            report["plain_monai_masked_psnr_db"] = masked_metrics(reference, plain, truth, "CT")["psnr_db"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (the CPU, then CUDA when present)")
    parser.add_argument("--skip-plain", action="store_true", help="do not run the plain MONAI baseline")
    parser.add_argument("--adapt", default="off", help="off, auto or a number of steps: adapt the model to the scan first")
    args = parser.parse_args()
    names = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.device == "all" else [args.device]
    for name in names:
        print(json.dumps(run(pick_device(name), args.data, args.skip_plain, args.adapt), indent=2), flush=True)


if __name__ == "__main__":
    main()
