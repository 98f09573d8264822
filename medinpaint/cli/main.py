"""Argument parsing and the error contract: one ``error:`` line and exit 2 for bad input, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from medinpaint import __version__
from medinpaint.cli import commands
from medinpaint.errors import MedinpaintError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # batch: 3 when some case failed

DESCRIPTION = """\
Repair damaged CT and MR volumes and record exactly which voxels were synthesized.

Typical use:
  medinpaint info scan/                          what is in a DICOM folder or file, what is broken
  medinpaint correct scan/ fixed.nii.gz          find broken slices, fill them, write with provenance
  medinpaint correct scan.nii.gz out/            same, writing a derived DICOM series + SEG
  medinpaint correct scan.nrrd out.nrrd --mask holes.nrrd --method classical
  medinpaint simulate ct.nii.gz bad.nii.gz --artifact slices --seed 1
  medinpaint evaluate ct.nii.gz fixed.nii.gz --mask bad_desc-damage_mask.nii.gz

Outputs never overwrite an existing file unless --overwrite is given; every output is
written atomically, and the input is never modified.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints a whole usage block)
        raise MedinpaintError(f"{message} (see '{self.prog} --help')")


def _add_input(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="NIfTI (.nii/.nii.gz), NRRD/MHA, a DICOM series folder or an enhanced multi-frame DICOM file")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read when a folder holds several series")
    p.add_argument("--modality", choices=("CT", "MR"), help="override the modality (NIfTI/NRRD do not record it; it is guessed from intensities)")
    p.add_argument("--slice-spacing", metavar="MM", type=float,
                   help="DICOM series: the slice grid's step in mm along the slice normal (default: the most common step, "
                        "ties the smaller); slices off the grid are resampled, empty grid positions synthesized")


def _add_detection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", default="auto", choices=("auto", "slices", "metal", "none"),
                   help="what to look for (default: auto = missing, blank, NaN and corrupt slices)")
    p.add_argument("--mask", metavar="MASK", help="a mask file on the input's grid (nonzero = fill); replaces detection, missing slices are still filled")
    p.add_argument("--config", metavar="YAML", help="settings file (see configs/inference.yaml); defaults are used when omitted")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medinpaint", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medinpaint {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress messages or bars")
    common = argparse.ArgumentParser(add_help=False)  # so the flags also work after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress messages or bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("correct", parents=[common], help="find what is broken, fill it, write the result with provenance",
                       description="Find broken regions (or take --mask), fill them and write OUTPUT with a synthesized-voxel "
                       "mask and a provenance JSON. OUTPUT ending in .nii/.nii.gz/.nrrd/.mha writes that format; "
                       "a folder name writes a derived DICOM series with a DICOM SEG of the synthesized voxels.")
    _add_input(p)
    p.add_argument("output", metavar="OUTPUT", help="output file (.nii.gz, .nii, .nrrd, .mha) or folder (DICOM)")
    _add_detection(p)
    p.add_argument("--method", default="network", choices=("network", "classical"),
                   help="network: the trained 3D inpainting model (default); classical: linear interpolation across slices and a diffusion fill")
    p.add_argument("--model", metavar="NAME_OR_PATH", help="the model for missing slices and holes: a shipped name (see 'medinpaint models') or a .safetensors file")
    p.add_argument("--metal-model", metavar="NAME_OR_PATH", help="the model that refines metal streaks (default: the shipped metal model), e.g. one fine-tuned with 'medinpaint train'")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the network runs (default auto: CUDA with mixed precision when present)")
    p.add_argument("--uncertainty", action="store_true", help="also write a per-voxel uncertainty map of the fill (flip test-time augmentation)")
    p.add_argument("--report", action="store_true", help="also write a self-contained HTML QA page: <stem>_report.html beside OUTPUT (report.html inside a DICOM folder)")
    p.add_argument("--gate", choices=("on", "off"), help="on (default, settings gate.enabled): write the network's missing slices only where this "
                   "scan's own left-out slices show it beats the best classical fill (linear, cubic, registered); off: always the network")
    p.add_argument("--adapt", metavar="auto|off|STEPS", help="fine-tune a copy of the slice model on this scan's acquired slices "
                   "before filling (default: settings adapt.steps, off); auto picks the steps by device, bounded by adapt.seconds")
    p.add_argument("--save-adapted", metavar="PATH", help="also write the adapted model to PATH (.safetensors, readable by --model); "
                   "otherwise it never leaves memory")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=commands.correct)

    p = sub.add_parser("mask", parents=[common], help="write the labelled artifact mask without correcting",
                       description="Write the artifact labels (1 missing, 2 blank, 3 corrupt slice, 4 user mask, 5 invalid voxel, "
                       "6 metal streak, 7 metal, 8 resampled slice) "
                       "on the input's grid, plus a JSON summary beside it.")
    _add_input(p)
    p.add_argument("output", metavar="OUTPUT", help="mask file (.nii.gz, .nii, .nrrd, .mha)")
    _add_detection(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=commands.mask)

    p = sub.add_parser("batch", parents=[common], help="correct every case in a folder or CSV manifest (resumable, shardable)",
                       description="Correct every volume file and DICOM series found under INPUT (recursively), or listed in a "
                       "CSV manifest (columns: path, optional id and series). Finished cases (complete outputs whose provenance "
                       "matches the input's SHA-256 and this run's settings: method, models, detection, inference, format) "
                       "are skipped, so a killed run resumes where it stopped; a case made with other settings is redone and "
                       "the summary's reason says why. Failing cases are "
                       "recorded and the rest go on. Writes OUTPUT_DIR/summary.csv and summary.json; exit status 3 when any case "
                       "failed. Split over a job array with --shard I/N; under torchrun each rank takes its own shard.")
    p.add_argument("input", metavar="INPUT", help="folder of scans, or a .csv manifest")
    p.add_argument("output", metavar="OUTPUT_DIR", help="folder for the corrected cases (created if needed)")
    p.add_argument("--format", default="nii.gz", choices=("nii.gz", "nii", "nrrd", "mha", "dicom"), help="output format per case (default nii.gz)")
    p.add_argument("--artifacts", default="auto", choices=("auto", "slices", "metal", "none"),
                   help="what to look for in each case (default: auto = broken slices in every scan, metal in CTs)")
    p.add_argument("--slice-spacing", metavar="MM", type=float,
                   help="DICOM series: the slice grid's step in mm (default: each series' most common step; other formats keep their grid); see 'correct --help'")
    p.add_argument("--method", default="network", choices=("network", "classical"), help="fill method (default network)")
    p.add_argument("--model", metavar="NAME_OR_PATH", help="the model for missing slices and holes: a shipped name or a .safetensors file")
    p.add_argument("--metal-model", metavar="NAME_OR_PATH", help="the model that refines metal streaks (default: the shipped metal model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the network runs (default auto)")
    p.add_argument("--config", metavar="YAML", help="settings file (see configs/inference.yaml)")
    p.add_argument("--shard", metavar="I/N", help="process only cases I, I+N, I+2N, ... (0-based); default: the torchrun rank, else all")
    p.add_argument("--workers", type=int, default=2, help="local: threads loading the next cases while one is filled; ray: worker processes (default 2)")
    p.add_argument("--report", action="store_true", help="write a self-contained HTML QA page per finished case (report/CASE.html) and report/index.html")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this process (default); ray: a pool of Ray workers (pip install 'medinpaint[ray]')")
    p.add_argument("--address", metavar="ADDR", help="with --engine ray: the cluster to join (e.g. auto, or HOST:6379); default: a local Ray")
    p.set_defaults(handler=commands.batch)

    p = sub.add_parser("info", parents=[common], help="geometry, modality, series and problems found")
    _add_input(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=commands.info)

    p = sub.add_parser("models", parents=[common], help="list the shipped models")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=commands.models)

    p = sub.add_parser("train", parents=[common], help="train or fine-tune the inpainting network (self-supervised)",
                       description="Damage clean volumes on the fly and train the network to fill them. "
                       "Run under 'torchrun --nproc_per_node N' for DistributedDataParallel. "
                       "Fine-tune on your own scans: medinpaint train --init medinpaint-slices-v3 --data my_scans/ --output-dir runs/mine")
    p.add_argument("--config", metavar="YAML", help="training recipe (e.g. configs/train_default.yaml)")
    p.add_argument("--init", metavar="NAME_OR_PATH", help="start from a shipped model or a .safetensors file (fine-tuning)")
    p.add_argument("--data", metavar="FOLDER", action="append", help="folder of your scans (repeatable); with --init and no --config, only these are used")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--output-dir", metavar="DIR", help="where checkpoints, logs and the exported model go")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.set_defaults(handler=commands.train)

    p = sub.add_parser(
        "simulate", parents=[common], help="write a damaged copy of a clean volume and its ground-truth mask",
        description="Damage a clean volume in a known way, to score a correction against the truth. "
        "slices: blank runs of slices; holes: random 3D holes; metal (CT): insert metal objects and re-scan "
        "the slices holding them (polychromatic 120 kVp, Poisson noise, water beam-hardening correction, "
        "fan-beam FBP), also writing the metal-free reference scanned the same way (<stem>_desc-reference<ext>). "
        "The mask labels metal 7 and the true artifact 6 (|damaged - reference| > 50 HU).",
    )
    _add_input(p)
    p.add_argument("output", metavar="OUTPUT", help="damaged volume file; the mask goes to <stem>_desc-damage_mask<ext>")
    p.add_argument("--artifact", default="slices", choices=("slices", "holes", "metal"), help="what damage to simulate")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same damage)")
    p.add_argument("--count", type=int, help="slices: number of damaged runs (default 5); metal: objects (default 1)")
    p.add_argument("--kind", choices=("ball", "rod", "screw", "irregular"), help="metal: object shape (default: random)")
    p.add_argument("--views", type=int, default=720,
                   help="metal: views of the simulated scan over 360 degrees (default 720, with 736 channels; "
                        "channels scale with views; fewer is faster and coarser)")
    p.add_argument("--photons", type=float, default=2e5,
                   help="metal: unattenuated photons per detector bin, the noise level (default 2e5, noisy: about 95 HU "
                        "in 1 mm pixels; 2e6 gives about a third of that)")
    p.add_argument("--run", type=int, default=1, help="slices: consecutive slices per run (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=commands.simulate)

    p = sub.add_parser("evaluate", parents=[common], help="masked PSNR, SSIM and MAE inside the body, as JSON")
    p.add_argument("reference", metavar="REFERENCE", help="the clean volume")
    p.add_argument("corrected", metavar="CORRECTED", help="the corrected volume")
    p.add_argument("--mask", metavar="MASK", required=True, help="where to score (e.g. the mask written by simulate)")
    p.add_argument("--modality", choices=("CT", "MR"), help="override the guessed modality (sets the body threshold)")
    p.set_defaults(handler=commands.evaluate)
    return parser


def _show_warnings() -> None:
    """Library warnings (e.g. an out-of-memory retry) reach the user as one plain line each."""
    logger = logging.getLogger("medinpaint")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        _show_warnings()
        if not getattr(args, "handler", None):
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        return args.handler(args) or EXIT_OK
    except MedinpaintError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # unreadable input, full disk, permissions: the user's environment, not a bug
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; no partial outputs were kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so in one line, full trace with --debug
        if debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error ({type(exc).__name__}: {message}); rerun with --debug and report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
