"""The Ray engine: Ray Data hands the cases to a fixed pool of actors, one per worker.

Each actor is a long-lived process (imports, torch and its threads set up once) that runs the
same per-case steps as the local engine, so the skip, resume and summary rules are the same.
A worker that dies (out of memory, a crashed node) is restarted and its case retried by Ray,
``RETRIES`` times; a case whose worker still dies is recorded as failed. Paths must be
visible at the same place on every node (a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from medinpaint.batch import Case, CaseResult, RunRequest, load_networks, process_case
from medinpaint.errors import MedinpaintError

RETRIES = 2  # restarts of a dead worker, and retries of the case it held


class CaseWorker:
    """One per worker: set up once (on its first case), then correct the cases Ray Data hands it."""

    def __init__(self) -> None:
        self.networks = None
        self.ready = False

    def __call__(self, batch: dict[str, np.ndarray], request: RunRequest) -> dict[str, np.ndarray]:
        if not self.ready:
            from medinpaint.data.atomic import set_shard_tag
            from medinpaint.inpaint.inference import set_cpu_threads

            set_shard_tag(request.shard_tag)  # this process stages its files under the run's shard too
            set_cpu_threads(request.settings.inference.threads)
            self.networks = load_networks(request)  # once per worker, not once per case
            self.ready = True
        cases = [Case(str(c), Path(p), s or None) for c, p, s in zip(batch["case"], batch["input"], batch["series"])]
        results = [process_case(case, request, self.networks) for case in cases]
        return {"result": np.array([json.dumps(asdict(r)) for r in results], dtype=object)}


def run_ray(cases: list[Case], request: RunRequest, *, workers: int = 2, progress: bool = True,
            address: str | None = None) -> list[CaseResult]:
    import ray

    if not cases:
        return []
    load_networks(request)  # a model that cannot load fails here, once, not in every actor
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        except ConnectionError as exc:
            raise MedinpaintError(f"--address {address}: cannot reach a Ray cluster ({str(exc).splitlines()[0]})") from None
    saved_level = os.environ.get("RAY_DATA_LOG_LEVEL")
    # Ray Data's own knob: no per-run INFO lines (its progress bar shows the run), nothing but errors when quiet.
    os.environ["RAY_DATA_LOG_LEVEL"] = "WARNING" if progress else "ERROR"
    try:
        context = ray.data.DataContext.get_current()
        saved = context.enable_progress_bars, context.max_errored_blocks
        context.enable_progress_bars = progress
        context.max_errored_blocks = -1  # a case whose worker died every retry is reported, not fatal to the run
        try:
            with warnings.catch_warnings():  # bounded retries have no named parameter yet (pyproject pins ray < 2.64)
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                dataset = (
                    ray.data.from_items([{"case": c.case, "input": str(c.input), "series": c.series or ""} for c in cases],
                                        override_num_blocks=len(cases))
                    .map_batches(
                        CaseWorker, batch_size=1, fn_kwargs={"request": request},
                        compute=ray.data.ActorPoolStrategy(size=max(1, workers)), num_cpus=1,
                        max_restarts=-1, max_task_retries=RETRIES,  # a dead worker is replaced; its case tried RETRIES more times
                    )
                )
            rows = dataset.take_all()
        finally:
            context.enable_progress_bars, context.max_errored_blocks = saved
    finally:
        if saved_level is None:
            os.environ.pop("RAY_DATA_LOG_LEVEL", None)
        else:
            os.environ["RAY_DATA_LOG_LEVEL"] = saved_level
        if started_here:
            ray.shutdown()
    results = {r.case: r for r in (CaseResult(**json.loads(row["result"])) for row in rows)}
    lost = [c for c in cases if c.case not in results]
    for case in lost:
        results[case.case] = CaseResult(case.case, str(case.input), "failed",
                                        reason=f"its Ray worker died {RETRIES + 1} times (out of memory?)")
    return list(results.values())
