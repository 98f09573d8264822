"""The default engine: the next cases load in threads while one is filled, and finished ones are written in another.

So the accelerator is not idle while files are read and written.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm import tqdm

from medinpaint.batch import (Case, CaseResult, RunRequest, correct_case, failed_result, load_networks, prepare_case,
                              skipped_result, write_case)


def run_local(cases: list[Case], request: RunRequest, *, workers: int = 2, progress: bool = True,
              desc: str = "batch") -> list[CaseResult]:
    results: list[CaseResult] = []
    networks = load_networks(request) if cases else None
    bar = tqdm(total=len(cases), desc=desc, unit="case", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as loaders, ThreadPoolExecutor(max_workers=1) as writers:
        pending: list[tuple[Case, Future]] = []
        writes: list[tuple[Case, Future]] = []
        queue = list(cases)
        while queue or pending:
            while queue and len(pending) < max(1, workers):
                case = queue.pop(0)
                pending.append((case, loaders.submit(prepare_case, case, request)))
            case, job = pending.pop(0)
            started = time.perf_counter()
            try:
                prepared = job.result()
                if prepared.skip:
                    results.append(skipped_result(case, request, prepared.reason))
                else:
                    correction = correct_case(prepared, request, networks)
                    writes.append((case, writers.submit(write_case, case, correction, request,
                                                        started - prepared.seconds, prepared.reason)))
            except Exception as exc:  # a bug on one case must not stop a dataset run; it is recorded as such
                results.append(failed_result(case, exc))
            results.extend(_collect(writes, block=False))
            bar.update(1)
        results.extend(_collect(writes, block=True))
    bar.close()
    return results


def _collect(writes: list, block: bool) -> list[CaseResult]:
    done = []
    for item in list(writes):
        case, future = item
        if block or future.done():
            writes.remove(item)
            try:
                done.append(future.result())
            except Exception as exc:
                done.append(failed_result(case, exc))
    return done
