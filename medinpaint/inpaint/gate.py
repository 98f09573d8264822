"""The "never below classical" gate: on the scan in front of it, the network must earn its place.

Acquired slices are left out (singly and in runs as long as the scan's real gaps, at seeded
positions at least two acquired slices away from the real gaps and from each other), filled by
each classical method and by the network, and scored against the truth inside the left-out
slices and the body (PSNR over the body's range, as ``medinpaint.metrics``).  The best
classical fill is the fallback; the network is written only when its own left-out score beats
that by ``gate.margin_db``.  A network adapted to the scan (``adapt.py``) is trained with these
picks hidden from it, so it is judged on slices it never learnt from.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from medinpaint.config import InferenceSettings, Settings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.adapt import adapt_model, adaptation_steps, save_adapted
from medinpaint.inpaint.classical import classical_fill, left_out, network_prefill
from medinpaint.inpaint.inference import network_fill
from medinpaint.inpaint.models import ModelInfo
from medinpaint.inpaint.network import InpaintingUNet
from medinpaint.inpaint.registered import registered_slices, with_registered_slices
from medinpaint.body import body_mask, body_threshold

log = logging.getLogger(__name__)

CLASSICAL = ("linear", "cubic", "registered")
MAX_RUN = 5  # longer real gaps are measured with runs of this length
MARGIN = 2  # acquired slices kept on each side of a pick (cubic reads two)


def gap_lengths(bad_slices: list[int]) -> list[int]:
    """The distinct lengths of the runs of consecutive bad slices (capped at MAX_RUN)."""
    ks, lengths, run = sorted(set(bad_slices)), set(), 0
    for i, k in enumerate(ks):
        run = run + 1 if i and k == ks[i - 1] + 1 else 1
        if i == len(ks) - 1 or ks[i + 1] != k + 1:
            lengths.add(min(run, MAX_RUN))
    return sorted(lengths)


def leave_out_picks(n_k: int, bad_slices: list[int], lengths: list[int], count: int, seed: int) -> list[list[int]]:
    """Up to ``count`` runs of consecutive acquired slices per length, placed by ``seed`` (deterministic).

    Each run keeps MARGIN acquired slices on both sides that no other run hides, so every run is
    predicted as ``interpolate_slices`` would fill it.  Runs at least MARGIN slices away from the
    real gaps come first; where the scan has too few (sparse damage), runs beside a real gap are
    added, predicted across it, as ``choose_slice_order`` judges sparse patterns.
    """
    bad = set(bad_slices)
    valid = [k for k in range(n_k) if k not in bad]
    rng = np.random.default_rng(seed)
    hidden: set[int] = set()
    windows: list[range] = []
    picks = []
    for length in sorted(lengths, reverse=True):  # long runs first: they need the most room
        acquired = [s for s in range(n_k - length + 1) if not bad.intersection(range(s, s + length))]
        clear = [s for s in acquired if s >= MARGIN and s + length + MARGIN <= n_k
                 and not bad.intersection(range(s - MARGIN, s + length + MARGIN))]
        beside = sorted(set(acquired) - set(clear))
        taken = 0
        for s in [int(x) for x in rng.permutation(clear)] + [int(x) for x in rng.permutation(beside)]:
            if taken == count:
                break
            run = range(s, s + length)
            remaining = [v for v in valid if v not in hidden and v not in run]
            below, above = [v for v in remaining if v < s][-MARGIN:], [v for v in remaining if v >= s + length][:MARGIN]
            if len(below) < MARGIN or len(above) < MARGIN:
                continue
            window = range(below[0], above[-1] + 1)
            if hidden.intersection(window) or any(w.start <= k < w.stop for w in windows for k in run):
                continue
            hidden.update(run)
            windows.append(window)
            picks.append(list(run))
            taken += 1
    return sorted(picks)


def _psnr(errors: np.ndarray, data_range: float) -> float:
    mse = float(np.mean(errors**2))
    return float("inf") if mse == 0 else round(10 * np.log10(data_range**2 / mse), 4)


def classical_left_out(base: np.ndarray, bad_slices: list[int], hidden: list[int], methods: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """The truth of the left-out slices and each classical method's prediction from the acquired
    slices that remain (never the real gaps), as (X, Y, len(hidden)) slabs."""
    bad = set(bad_slices)
    valid = [k for k in range(base.shape[2]) if k not in bad]
    orders = tuple(m for m in methods if m in ("linear", "cubic"))
    truth, predicted = left_out(base, valid, hidden, orders or ("linear",))
    predicted = {m: predicted[m] for m in orders}
    if "registered" in methods:
        remaining = [v for v in valid if v not in set(hidden)]
        planes: dict[int, np.ndarray] = {}
        for k in hidden:  # only the two acquired slices around each gap are registered
            if k in planes:
                continue
            lo, hi = max(v for v in remaining if v < k), min(v for v in remaining if v > k)
            found = registered_slices(base[:, :, lo : hi + 1], list(range(1, hi - lo)))
            planes |= {lo + n: plane for n, plane in found.items() if lo + n in set(hidden)}
        predicted["registered"] = np.stack([planes[k].astype(np.float64) for k in hidden], axis=-1)
    return truth, predicted


def network_left_out(array: np.ndarray, holes: np.ndarray, bad_slices: list[int], hidden: list[int], modality: str,
                     net: InpaintingUNet, info: ModelInfo, inference: InferenceSettings, device: torch.device) -> np.ndarray:
    """The network's fill of the left-out slices, the real holes missing as well (it never reads either:
    holes are zeroed before it sees them)."""
    mask = holes.copy()
    mask[:, :, hidden] = True
    out = network_fill(array, mask, sorted(set(bad_slices) | set(hidden)), modality, net, inference, device,
                       slice_prefill=info.slice_prefill)
    return out[:, :, hidden].astype(np.float64)


def gated_fill(
    array: np.ndarray,
    whole_slices: list[int],
    others: np.ndarray,
    modality: str,
    net: InpaintingUNet,
    info: ModelInfo,
    settings: Settings,
    device: torch.device,
    adapt: str | int | None = None,
    save_adapted_to: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    flip_axes: tuple[int, ...] = (),
    run_info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Fill ``others`` (holes, whole slices ``whole_slices`` among them) with the fill the scan's own
    left-out slices favour; returns the filled array, the spread (with ``flip_axes``) and the record."""
    gate, inference = settings.gate, settings.inference
    unknown = sorted(set(gate.classical) - set(CLASSICAL))
    if unknown or not gate.classical:
        raise MedinpaintError(f"gate.classical {list(gate.classical)}: choose from {', '.join(CLASSICAL)}")
    if gate.picks < 1:
        raise MedinpaintError(f"gate.picks must be at least 1, got {gate.picks}")
    started = time.perf_counter()
    # The scan with its real holes pre-filled: what adaptation learns from and where the body is found.
    base = network_prefill(array, whole_slices, others, "linear")
    lengths = gap_lengths(whole_slices) or [1]
    picks = leave_out_picks(array.shape[2], whole_slices, lengths, gate.picks, gate.seed)
    hidden = sorted(k for run in picks for k in run)
    steps, why_steps = adaptation_steps(adapt if adapt is not None else settings.adapt.steps, device,
                                        array.shape[2] - len(whole_slices) - len(hidden), settings.adapt)
    record: dict = {"enabled": gate.enabled, "margin_db": gate.margin_db, "seed": gate.seed,
                    "gap_lengths": lengths, "picks": picks, "pick_count": len(picks), "left_out_slices": len(hidden)}
    adapted = None
    if steps:
        adapted, record["adaptation"] = adapt_model(
            net, info, base, modality, whole_slices, hidden, lengths, settings.adapt, steps, device, progress=progress)
        record["adaptation"]["validation"] = "the gate's left-out picks: hidden from adaptation (never a training target, never its input)"
        if save_adapted_to:
            save_adapted(adapted, info, save_adapted_to, overwrite, record["adaptation"])
    elif adapt not in (None, "off") or save_adapted_to:
        record["adaptation"] = {"steps": 0, "why": why_steps}
        if save_adapted_to:
            raise MedinpaintError(f"--save-adapted: no adaptation ran ({why_steps})")
    choice, networks = "network", {"network": net} | ({"adapted network": adapted} if adapted is not None else {})
    if not picks:
        record |= {"choice": "adapted network" if adapted is not None else "network",
                   "why": "too few acquired slices away from the gaps to leave any out; the network is written unmeasured"}
        choice = record["choice"]
    else:
        body = body_mask(base, body_threshold(base, modality), slice_axis=2, largest_only=False, opening=True)  # as metrics.py
        region = body[:, :, hidden]
        record["scored_inside"] = "left-out slices, inside the body"
        if not region.any():
            region = np.ones_like(region)
            record["scored_inside"] = "left-out slices (no body voxels in them)"
        data_range = float(np.ptp(base[body])) if body.any() else float(np.ptp(base))
        if gate.enabled:
            truth, predicted = classical_left_out(base, whole_slices, hidden, gate.classical)
        else:  # adaptation alone: only the networks are scored, before and after
            truth, predicted = base[:, :, hidden].astype(np.float64), {}
        for name, model in networks.items():
            predicted[name] = network_left_out(array, others, whole_slices, hidden, modality, model, info, inference, device)
        scores = {name: _psnr(values[region] - truth[region], data_range) for name, values in predicted.items()}
        record["left_out_psnr_db"] = scores
        if adapted is not None:
            record["adaptation"] |= {"left_out_psnr_before_db": scores["network"], "left_out_psnr_after_db": scores["adapted network"]}
        net_name = "adapted network" if adapted is not None and scores["adapted network"] > scores["network"] else "network"
        if adapted is not None and net_name == "network":
            record["adaptation"]["used"] = False
            record["adaptation"]["why_not_used"] = "it scored below the shipped model on the left-out picks"
        if not gate.enabled:
            choice = net_name
            record |= {"choice": choice, "why": "gate off: the network is written whatever the scores"}
        else:
            best = max(gate.classical, key=lambda m: scores[m])
            gain = scores[net_name] - scores[best]
            record |= {"best_classical": best, "network_minus_best_classical_db": round(gain, 4)}
            if gain > gate.margin_db:
                choice = net_name
                record["why"] = f"{net_name} beats {best} by {gain:+.2f} dB on the left-out slices (margin {gate.margin_db} dB)"
            else:
                choice = best
                record["why"] = (f"{net_name} does not beat {best} by the margin of {gate.margin_db} dB on the left-out slices "
                                 f"({gain:+.2f} dB): {best} is written")
            record["choice"] = choice
    del base
    record["seconds"] = round(time.perf_counter() - started, 2)
    log.info("slice gate: %s (%s)", record["choice"], record["why"])
    chosen_net = networks.get(choice)
    if chosen_net is not None:
        out = network_fill(array, others, whole_slices, modality, chosen_net, inference, device, progress=progress,
                           flip_axes=flip_axes, slice_prefill=info.slice_prefill, run_info=run_info)
        filled, spread = out if flip_axes else (out, None)
        return filled, spread, record
    filled = write_classical(array, whole_slices, others, choice)
    rest = others.copy()
    rest[:, :, whole_slices] = False
    spread = np.zeros(array.shape, np.float32) if flip_axes else None
    if rest.any():  # holes other than whole slices: the gate does not measure them, the network fills them as before
        out = network_fill(filled, rest, [], modality, net, inference, device, progress=progress, flip_axes=flip_axes,
                           run_info=run_info)
        filled, spread = out if flip_axes else (out, None)
        record["other_holes"] = "network (the gate measures whole slices only)"
    if flip_axes:
        record["uncertainty"] = f"none for the slices filled by {choice} (zero in the map): it is a deterministic interpolation"
    return filled, spread, record


def write_classical(array: np.ndarray, whole_slices: list[int], others: np.ndarray, method: str) -> np.ndarray:
    """The whole slices filled by ``method``; other holes are left for the caller (their values are unchanged)."""
    if method in ("linear", "cubic"):
        only_slices = np.zeros(others.shape, bool)
        return classical_fill(array, whole_slices, only_slices, order=method)
    filled = classical_fill(array, whole_slices, np.zeros(others.shape, bool), order="linear")
    return with_registered_slices(filled, array, whole_slices)
