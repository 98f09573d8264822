"""How `batch --engine ray` scales: a batch of small volumes on a local Ray with 1, then 2, ... workers.

Each case is a 48x48x12 crop of the sample CT (different place per case) with one slice blanked,
corrected with --method network and one torch thread per worker. Prints seconds, cases per
second and the speed-up over one worker (numbers printed, not asserted). The default settings
are quick ones (one 48x48x16 window, no slice gate) so 100 cases take a few minutes on two
CPU cores; --config runs yours instead.

    python benchmarks/batch_engines.py                   # 100 cases, 1 and 2 workers
    python benchmarks/batch_engines.py --workers 1 2 4 --cases 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import medinpaint
from medinpaint.batch import list_cases, run_batch
from medinpaint.config import load_settings
from medinpaint.data.save import write_file

REPO = Path(__file__).resolve().parent.parent
QUICK = """\
inference:
  roi_size: [48, 48, 16]
  threads: 1
gate:
  enabled: false
"""


def make_cases(folder: Path, count: int, shape: tuple[int, int, int], seed: int = 0) -> None:
    source = medinpaint.load(REPO / "sample_data" / "ct_abdomen_3mm.nii.gz")
    rng = np.random.default_rng(seed)
    n_i, n_j, n_k = source.shape
    for index in range(count):
        i0, j0 = int(rng.integers(0, n_i - shape[0])), int(rng.integers(0, n_j - shape[1]))
        k0 = int(rng.integers(20, n_k - shape[2]))  # above the hip implant: slices only
        part = source.slab(k0, k0 + shape[2])
        affine = part.affine.copy()
        affine[:3, 3] += part.affine[:3, :3] @ np.array([float(i0), float(j0), 0.0])
        array = part.array[i0:i0 + shape[0], j0:j0 + shape[1]].copy()
        array[:, :, int(rng.integers(2, shape[2] - 2))] = array.min()
        write_file(medinpaint.Volume(array, affine, modality="CT"), folder / f"case_{index:04d}.nii.gz", "nifti", "int32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 12))
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--config", help="settings YAML (default: the quick settings above, one torch thread)")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        make_cases(tmp / "in", args.cases, tuple(args.shape))
        config = Path(args.config) if args.config else tmp / "quick.yaml"
        if not args.config:
            config.write_text(QUICK)
        settings = load_settings(config)
        cases = list_cases(tmp / "in")
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        try:
            timings = {}
            for workers in args.workers:
                started = time.perf_counter()
                results = run_batch(cases, tmp / f"out_{workers}", method="network", settings=settings,
                                    engine="ray", workers=workers, progress=False)
                timings[workers] = time.perf_counter() - started
                failed = [r for r in results if r.status != "done"]
                if failed:
                    raise SystemExit(f"{len(failed)} cases not done, e.g. {failed[0].case}: {failed[0].reason}")
        finally:
            ray.shutdown()
    first = timings[args.workers[0]]
    print(f"{args.cases} cases of {'x'.join(map(str, args.shape))}, --method network, local Ray, 1 torch thread per worker")
    print(f"{'workers':>8} {'seconds':>9} {'cases/s':>8} {'speed-up':>9}")
    for workers, seconds in timings.items():
        print(f"{workers:>8} {seconds:>9.1f} {args.cases / seconds:>8.2f} {first / seconds:>8.2f}x")


if __name__ == "__main__":
    main()
