"""Engines that schedule a batch's cases: ``local`` (threads in this process) and ``ray`` (a Ray cluster).

Both call the same per-case steps of ``medinpaint.batch``; an engine only decides where and when.
"""

from __future__ import annotations

import importlib.util

from medinpaint.errors import MedinpaintError

ENGINES = ("local", "ray")
RAY_MISSING = "--engine ray needs Ray: pip install 'medinpaint[ray]'"


def check_engine(engine: str, address: str | None = None) -> None:
    """Fail before any case is touched on an engine that cannot run here."""
    if engine not in ENGINES:
        raise MedinpaintError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise MedinpaintError(RAY_MISSING)
    if engine != "ray" and address is not None:
        raise MedinpaintError("--address needs --engine ray")


def run_engine(engine: str, cases, request, *, workers: int, progress: bool, desc: str, address: str | None = None):
    if engine == "ray":
        from medinpaint.engines.ray_engine import run_ray

        return run_ray(cases, request, workers=workers, progress=progress, address=address)
    from medinpaint.engines.local import run_local

    return run_local(cases, request, workers=workers, progress=progress, desc=desc)
