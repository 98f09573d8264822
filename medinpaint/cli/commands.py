"""One function per subcommand; each turns parsed arguments into API calls and prints a short report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from medinpaint.artifacts.find import find_artifacts
from medinpaint.config import DataSettings, load_settings, load_train_settings, TrainSettings
from medinpaint.correct import correct as correct_volume, detect
from medinpaint.data.atomic import StagedOutputs
from medinpaint.data.dicom_series import list_series, summarize_series
from medinpaint.data.load import load
from medinpaint.data.save import write_file
from medinpaint.errors import MedinpaintError
from medinpaint.data.output_names import check_files, check_outputs, file_pair, output_format
from medinpaint.output import save, save_mask
from medinpaint.provenance import run_settings


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _load(args: argparse.Namespace):
    volume = load(args.input, series=args.series, modality=args.modality, slice_spacing=getattr(args, "slice_spacing", None))
    _say(args, f"loaded {args.input}: {volume.modality}, {'x'.join(map(str, volume.shape))} voxels, "
               f"spacing {', '.join(f'{s:.3g}' for s in volume.spacing)} mm")
    grid = volume.slice_grid
    if grid and (grid["resampled"] or grid["to_synthesize"] or grid["unused_slices"]):
        _say(args, f"slice steps {grid['steps_found']}; grid {_grid_plan(grid)}")
    return volume


def _grid_plan(grid: dict) -> str:
    """One line: the grid a DICOM series was put on and what becomes of each position."""
    unused = grid["unused_slices"]
    return (f"{grid['grid_step_mm']:.4g} mm ({grid['grid_rule']}): {grid['on_grid']} acquired slices on it, "
            f"{grid['resampled']} resampled, {grid['to_synthesize']} to synthesize"
            + (f"; {len(unused)} acquired slices unused ({', '.join(u['file'] for u in unused)})" if unused else ""))


def _artifacts(args: argparse.Namespace, volume, settings):
    found = detect(volume, settings, artifacts=args.artifacts, user_mask=args.mask, progress=not getattr(args, "quiet", False))
    counts = found.counts()
    if counts:
        slices = ", ".join(f"{k}:{v.name.lower()}" for k, v in sorted(found.bad_slices.items()))
        _say(args, "found " + ", ".join(f"{n} {name} voxels" for name, n in counts.items())
             + (f" (slices {slices})" if slices else ""))
    else:
        _say(args, "found nothing to repair")
    return found


def correct(args: argparse.Namespace) -> int:
    check_outputs(args.output, args.overwrite)  # fail on a bad OUTPUT before any heavy work
    report = None
    if args.report:
        from medinpaint.report import report_path

        report = report_path(args.output)  # <stem>_report.html beside a file; report.html inside a DICOM folder
        if output_format(args.output) != "dicom":
            check_files([report], args.overwrite)
    if args.save_adapted:
        if not str(args.save_adapted).endswith(".safetensors"):
            raise MedinpaintError(f"--save-adapted {args.save_adapted}: the file name must end in .safetensors")
        check_files([Path(args.save_adapted)], args.overwrite)
    if args.adapt is not None and args.adapt not in ("auto", "off") and not args.adapt.isdigit():
        raise MedinpaintError(f"--adapt {args.adapt}: choose auto, off or a number of steps")
    settings = load_settings(args.config)
    run = run_settings(method=args.method, settings=settings, output_format=output_format(args.output), model=args.model,
                       metal_model=args.metal_model, artifacts=args.artifacts, user_mask=args.mask,
                       uncertainty=args.uncertainty, device=args.device,
                       slice_spacing=args.slice_spacing)  # recorded in the provenance
    volume = _load(args)
    found = _artifacts(args, volume, settings)
    if found.synthesized.any():
        kept = int(found.synthesized.sum() - found.to_fill.sum())
        _say(args, f"filling {int(found.to_fill.sum())} voxels ({args.method})"
                   + (f"; {kept} resampled voxels kept as interpolated, flagged" if kept else ""))
    result = correct_volume(
        volume, found, method=args.method, model=args.model, metal_model=args.metal_model, settings=settings, device=args.device,
        progress=not getattr(args, "quiet", False), uncertainty=args.uncertainty,
        gate=None if args.gate is None else args.gate == "on", adapt=args.adapt, save_adapted=args.save_adapted,
        overwrite=args.overwrite,
    )
    result.run = run
    written = save(result, args.output, overwrite=args.overwrite)
    if report is not None:  # after the outputs, from the provenance as written
        from medinpaint.report import write_case_report

        written["report"] = write_case_report(result, report, written["provenance"], title=Path(args.output).name,
                                              overwrite=args.overwrite)
    _say(args, f"wrote {', '.join(str(p) for p in written.values())} ({result.seconds:.1f} s)")
    return 0


EXIT_CASES_FAILED = 3


def batch(args: argparse.Namespace) -> int:
    from medinpaint.batch import list_cases, merge_shards, parse_shard, run_batch, write_summary
    from medinpaint.report import write_index

    from medinpaint.engines import check_engine

    check_engine(args.engine, args.address)  # e.g. --engine ray without Ray: one line, before anything else
    settings = load_settings(args.config)
    cases = list_cases(Path(args.input))
    if not cases:
        raise MedinpaintError(f"{args.input}: no volumes or DICOM series found")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedinpaintError(f"{out_dir}: exists and is not a folder")
    index, count = parse_shard(args.shard)
    torchrun = args.shard is None and count > 1
    if torchrun:
        import torch.distributed as dist

        dist.init_process_group(backend="gloo")
    suffix = "dicom" if args.format == "dicom" else "." + args.format
    _say(args, f"{len(cases)} cases" + (f"; shard {index}/{count} takes {len(cases[index::count])}" if count > 1 else ""))
    results = run_batch(
        cases, out_dir, shard=(index, count), method=args.method, model=args.model, metal_model=args.metal_model, device=args.device,
        settings=settings, suffix=suffix, workers=args.workers, report=args.report, progress=not getattr(args, "quiet", False),
        engine=args.engine, address=args.address, artifacts=args.artifacts, slice_spacing=args.slice_spacing,
    )
    if count > 1:
        write_summary(results, out_dir, name=f"summary-shard-{index}-of-{count}")
    if torchrun:
        dist.barrier()  # every rank has written its shard summary
    merged = results
    if count > 1 and (not torchrun or index == 0):
        merged, found = merge_shards(out_dir, count)
        if found < count:  # a job array: the last shard to finish writes the complete summary
            merged = None
    if merged is not None and (not torchrun or index == 0):
        csv_path, _ = write_summary(merged, out_dir)
        if args.report:
            write_index(merged, out_dir)
        counts = {s: sum(r.status == s for r in merged) for s in ("done", "skipped", "failed")}
        _say(args, f"{counts['done']} corrected, {counts['skipped']} already done, {counts['failed']} failed; summary: {csv_path}")
    if torchrun:
        dist.barrier()
        dist.destroy_process_group()
    for r in results:
        if r.status == "failed":
            _say(args, f"failed: {r.case}: {r.reason}")
    return EXIT_CASES_FAILED if any(r.status == "failed" for r in results) else 0


def mask(args: argparse.Namespace) -> int:
    output, summary, _ = file_pair(args.output, "json", "the mask")
    check_files([output, summary], args.overwrite)
    settings = load_settings(args.config)
    volume = _load(args)
    found = _artifacts(args, volume, settings)
    written = save_mask(found, volume, args.output, overwrite=args.overwrite)
    _say(args, f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


def info(args: argparse.Namespace) -> int:
    path = Path(args.input)
    if path.is_dir() and args.series is None:
        series = list_series(path)
        if len(series) > 1:
            listing = [summarize_series(h) for h in series.values()]
            if args.json:
                print(json.dumps({"path": str(path), "series": listing}, indent=2))
            else:
                print(f"{path}: {len(series)} series (pick one with --series UID):")
                for line in listing:
                    print(f"  {line}")
            return 0
    volume = load(path, series=args.series, modality=args.modality, slice_spacing=args.slice_spacing)
    found = find_artifacts(volume)
    report = {"path": str(path)} | volume.describe() | {"problems": found.summary()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{path}")
    print(f"  format      {report['format']}" + (f"  series {report['series_uid']}" if report["series_uid"] else ""))
    print(f"  modality    {report['modality']}")
    print(f"  shape       {' x '.join(map(str, report['shape']))}")
    print(f"  spacing     {' x '.join(f'{s:g}' for s in report['spacing_mm'])} mm")
    print(f"  origin      {', '.join(f'{s:g}' for s in report['origin_ras_mm'])} mm (RAS)")
    print(f"  direction   {report['direction_ras']} (RAS, columns = voxel axes)")
    if report["oblique_stack"]:
        print("  oblique     yes: gantry-tilted stack, kept oblique (sheared affine), not resampled")
    if report.get("slice_grid"):
        print(f"  slice steps {report['slice_grid']['steps_found']} (along the slice normal)")
        print(f"  slice grid  {_grid_plan(report['slice_grid'])}")
    if report["intensity_range"]:
        lo, hi = report["intensity_range"]
        print(f"  intensities {lo:g} .. {hi:g}")
    problems = found.summary()
    slices = [f"slice {k}: {v}" for k, v in problems["bad_slices"].items()]
    slice_kinds = set(problems["bad_slices"].values())
    if problems.get("resampled_slices"):
        slice_kinds.add("resampled_slice")
        slices.append("slices " + ", ".join(map(str, problems["resampled_slices"])) + ": resampled_slice (kept, flagged)")
    voxels = [f"{n}: {v['count']} voxels" for n, v in problems["voxels"].items() if n not in slice_kinds]
    if slices or voxels:
        print("  problems    " + ", ".join(slices + voxels))
    else:
        print("  problems    none found")
    return 0


def models(args: argparse.Namespace) -> int:
    from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, DEFAULT_MODEL, list_models

    found = list_models()
    defaults = {DEFAULT_MODEL: "default for slices and holes", DEFAULT_METAL_MODEL: "default for metal streaks"}
    if args.json:
        print(json.dumps([m.describe() | {"default": defaults.get(m.name)} for m in found], indent=2, default=str))
        return 0
    if not found:
        raise MedinpaintError("no shipped models found in the package (broken installation?)")
    for m in found:
        marker = f" ({defaults[m.name]})" if m.name in defaults else ""
        validation = m.metadata.get("validation", {})
        baseline = "NMAR" if m.task == "metal" else "interpolation"
        gain = f", validation gain over {baseline} {validation['gain_db']:.2f} dB" if "gain_db" in validation else ""
        print(f"{m.name}{marker}: {m.metadata.get('steps', '?')} steps{gain}, sha256 {m.sha256[:12]}, {m.path}")
    return 0


def train(args: argparse.Namespace) -> int:
    from medinpaint.training.train import train as run_training

    overrides = {"steps": args.steps, "output_dir": args.output_dir, "init": args.init}
    if args.config:
        settings = load_train_settings(args.config, **overrides)
        if args.data:
            settings = _replace_data(settings, folders=tuple(args.data))
    elif args.init and args.data:
        # Fine-tuning on the user's own scans only, gently, from a trained model.
        from medinpaint.inpaint.models import read_info, resolve

        init = read_info(resolve(args.init))  # keep refining what the model was trained on, from the inputs it reads
        settings = TrainSettings(
            output_dir=args.output_dir or "runs/finetune", steps=args.steps or 300, lr=1e-4, init=args.init,
            slice_prefill=init.slice_prefill, registered_input=init.registered_input,
            data=DataSettings(folders=tuple(args.data), procedural_ct=0, procedural_mr=0),
        )
    else:
        raise MedinpaintError("give --config YAML, or --init MODEL with --data FOLDER to fine-tune")
    best = run_training(settings, resume=args.resume, log=lambda m: _say(args, m))
    _say(args, f"best model: {best}")
    return 0


def _replace_data(settings: TrainSettings, **changes) -> TrainSettings:
    from dataclasses import replace

    return replace(settings, data=replace(settings.data, **changes))


def simulate(args: argparse.Namespace) -> int:
    from medinpaint.simulate import simulate as damage

    out, mask_path, fmt = file_pair(args.output, "damage_mask", "the simulated volume")
    if args.artifact == "metal":
        return _simulate_metal(args, out, mask_path, fmt)
    check_files([out, mask_path], args.overwrite)
    volume = _load(args)
    damaged, truth = damage(volume, args.artifact, seed=args.seed, count=args.count or 5, run=args.run)
    dtype = volume.source.stored_dtype if volume.source else None
    with StagedOutputs(overwrite=args.overwrite) as staged:
        write_file(damaged, staged.path_for(out), fmt, dtype, f"medinpaint simulate {args.artifact} seed {args.seed}")
        write_file(volume.with_array(truth.astype(np.uint8)), staged.path_for(mask_path), fmt, "uint8", "medinpaint damage mask")
    k = sorted(set(np.nonzero(truth.any(axis=(0, 1)))[0].tolist())) if args.artifact == "slices" else None
    _say(args, f"wrote {out} and {mask_path}: {int(truth.sum())} damaged voxels" + (f" (slices {k})" if k else ""))
    return 0


def _simulate_metal(args: argparse.Namespace, out: Path, mask_path: Path, fmt: str) -> int:
    from medinpaint.simulate import simulate_metal_volume

    _, reference_path, _ = file_pair(out, "reference", "the simulated volume")
    check_files([out, mask_path, reference_path], args.overwrite)
    volume = _load(args)
    if args.views < 16:
        raise MedinpaintError(f"--views must be at least 16, not {args.views}")
    if not args.photons > 0:
        raise MedinpaintError(f"--photons must be above 0, not {args.photons:g}")
    damaged, labels, reference = simulate_metal_volume(
        volume, seed=args.seed, count=args.count or 1, kind=args.kind, views=args.views, photons=args.photons,
    )
    note = f"medinpaint simulate metal seed {args.seed} photons {args.photons:g}"
    with StagedOutputs(overwrite=args.overwrite) as staged:
        write_file(damaged, staged.path_for(out), fmt, None, note)
        write_file(volume.with_array(labels), staged.path_for(mask_path), fmt, "uint8", "medinpaint metal 7, artifact 6")
        write_file(reference, staged.path_for(reference_path), fmt, None, note + " metal-free reference")
    ks = sorted(set(np.nonzero(labels.any(axis=(0, 1)))[0].tolist()))
    _say(args, f"wrote {out}, {mask_path} and {reference_path}: {int((labels == 7).sum())} metal voxels, "
               f"{int((labels == 6).sum())} artifact voxels in slices {ks[0]}..{ks[-1]}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from medinpaint.metrics import masked_metrics

    reference = load(args.reference, modality=args.modality)
    corrected = load(args.corrected, modality=reference.modality)
    mask_volume = load(args.mask)
    for name, other in (("CORRECTED", corrected), ("MASK", mask_volume)):
        if not reference.same_grid(other):
            raise MedinpaintError(f"{name} is not on the grid of REFERENCE (shape or geometry differ)")
    metrics = masked_metrics(reference.array, corrected.array, np.nan_to_num(mask_volume.array) > 0, reference.modality)
    print(json.dumps(metrics, indent=2))
    return 0
