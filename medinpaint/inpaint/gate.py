"""The "never below classical" gate: on the scan in front of it, the network must earn its place.

Acquired slices are left out (singly and in runs as long as the scan's real gaps, at seeded
positions at least two acquired slices away from the real gaps and from each other, over a few
rounds so that small scans get enough of them), filled by each classical method and by the
network, and scored against the truth inside the left-out slices and the body.  Methods a few
tenths of a dB apart are within the noise of a handful of picks, and one badly filled pick can
decide a pooled score, so the decision is paired and bounded: a method replaces the default
classical fill (``gate.default``), and the network replaces the classical choice, only when its
pooled gain and that gain's lower confidence bound (a seeded bootstrap over the picks) are above
zero (``gate.margin_db`` for the network).  A scan so short or so damaged that only one pick fits
cannot be bounded over picks: there the classical methods are compared over blocks of that pick's
plane (a weaker bound: one place in the scan), and the network, which must earn its place on
separate evidence, is not written.  A network adapted to the scan (``adapt.py``) is trained
with these picks hidden from it, so it is judged on slices it never learnt from.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from medinpaint.config import InferenceSettings, Settings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.adapt import adapt_model, adaptation_steps, save_adapted
from medinpaint.inpaint.classical import classical_fill, consecutive_runs, left_out, network_prefill
from medinpaint.inpaint.inference import network_fill
from medinpaint.inpaint.models import ModelInfo
from medinpaint.inpaint.network import InpaintingUNet
from medinpaint.inpaint.registered import registered_slices, with_registered_slices
from medinpaint.body import body_mask, body_threshold

log = logging.getLogger(__name__)

CLASSICAL = ("linear", "cubic", "registered")
MAX_RUN = 5  # longer real gaps are measured with runs of this length
MARGIN = 2  # acquired slices kept on each side of a pick (cubic reads two)
DRAWS = 2000  # bootstrap resamples of the picks
BLOCKS = 8  # a lone pick's plane is cut into BLOCKS x BLOCKS blocks, the units of its bound


def gap_lengths(bad_slices: list[int]) -> list[int]:
    """The distinct lengths of the runs of consecutive bad slices (capped at MAX_RUN)."""
    return sorted({min(len(run), MAX_RUN) for run in consecutive_runs(bad_slices)})


def leave_out_picks(n_k: int, bad_slices: list[int], lengths: list[int], count: int | dict[int, int], seed: int,
                    used: set[int] | None = None) -> list[list[int]]:
    """Up to ``count`` runs of consecutive acquired slices per gap length, placed by ``seed`` (deterministic).

    Each run keeps MARGIN acquired slices on both sides that no other run hides, so every run is
    predicted as ``interpolate_slices`` would fill it.  Runs at least MARGIN slices away from the
    real gaps come first; where the scan has too few (dense damage), runs beside a real gap are
    added, but only with an acquired slice right next to them on both sides, as every real gap has:
    a run walled in by real gaps would be predicted across them, a wider gap than any real one,
    which favours the methods that carry across wide gaps (measured: registered 2.5 dB above cubic on
    such runs of a cubic-resampled CT, 1.5 dB below it on its real gaps).  Where the scan holds fewer
    than two runs of a gap's length so, shorter runs stand for it (``pick_lengths``).  Runs touching a
    slice in ``used`` (an earlier round's picks) are not picked: each pick is its own piece of evidence.
    """
    wanted = count if isinstance(count, dict) else {length: count for length in lengths}
    return sorted(run for _, run in _placed(n_k, bad_slices, pick_lengths(n_k, bad_slices, lengths), wanted, seed, used or set()))


def pick_lengths(n_k: int, bad_slices: list[int], lengths: list[int]) -> dict[int, int]:
    """The length of the runs left out for each gap length: the gap's own, or the longest shorter one
    that the scan holds at least two of (the fewest a bound can be drawn from), placed as ``leave_out_picks`` does."""
    chosen = {}
    for gap in lengths:
        chosen[gap] = next((n for n in range(gap, 1, -1) if len(_placed(n_k, bad_slices, {gap: n}, {gap: 2}, 0, set())) == 2), 1)
    return chosen


def _placed(n_k: int, bad_slices: list[int], lengths: dict[int, int], wanted: dict[int, int], seed: int, used: set[int]) -> list[tuple[int, list[int]]]:
    """Runs left out for each gap length (runs of ``lengths[gap]`` slices), each with the gap length it stands for."""
    bad = set(bad_slices)
    valid = [k for k in range(n_k) if k not in bad]
    rng = np.random.default_rng(seed)
    hidden: set[int] = set()
    windows: list[range] = []
    picks = []
    for gap in sorted(lengths, reverse=True):  # long runs first: they need the most room
        taken = 0
        length = lengths[gap]
        acquired = [s for s in range(n_k - length + 1) if not bad.intersection(range(s, s + length))]
        clear = [s for s in acquired if s >= MARGIN and s + length + MARGIN <= n_k
                 and not bad.intersection(range(s - MARGIN, s + length + MARGIN))]
        beside = sorted(s for s in set(acquired) - set(clear) if s - 1 in valid and s + length in valid)
        for s in [int(x) for x in rng.permutation(clear)] + [int(x) for x in rng.permutation(beside)]:
            if taken >= wanted.get(gap, 0):
                break
            run = range(s, s + length)
            if used.intersection(run):
                continue
            remaining = [v for v in valid if v not in hidden and v not in run]
            below, above = [v for v in remaining if v < s][-MARGIN:], [v for v in remaining if v >= s + length][:MARGIN]
            if len(below) < MARGIN or len(above) < MARGIN:
                continue
            window = range(below[0], above[-1] + 1)
            if hidden.intersection(window) or any(w.start <= k < w.stop for w in windows for k in run):
                continue
            hidden.update(run)
            windows.append(window)
            picks.append((gap, list(run)))
            taken += 1
    return picks


def leave_out_rounds(n_k: int, bad_slices: list[int], run_lengths: dict[int, int], count: int, seed: int,
                     rounds: int) -> list[list[list[int]]]:
    """Rounds of ``leave_out_picks`` (seeds ``seed``, ``seed + 1``, ...), each hiding slices no earlier
    round hid, until ``count`` runs per gap length are picked or ``rounds`` are used: a scan too short
    to hide ``count`` runs at once is measured in several passes, each run predicted as in a single gap.
    ``run_lengths`` maps each gap length to the length of its runs (``pick_lengths``)."""
    found: list[list[list[int]]] = []
    used: set[int] = set()
    wanted = {length: count for length in run_lengths}
    for r in range(max(rounds, 1)):
        if not any(wanted.values()):
            break
        placed = _placed(n_k, bad_slices, run_lengths, wanted, seed + r, used)
        if not placed:
            break
        for gap, run in placed:
            wanted[gap] -= 1
            used.update(run)
        found.append(sorted(run for _, run in placed))
    return found


def paired_gain(sse: np.ndarray, reference_sse: np.ndarray, confidence: float, seed: int = 0) -> tuple[float, float]:
    """A method's pooled PSNR gain (dB) over a reference on the same picks (as the written fill is scored),
    and its one-sided lower confidence bound: the picks resampled with replacement, both methods on the
    same draw (paired), seeded.  A gain that one pick carries vanishes from the draws without it, so the
    bound drops below zero; none can be drawn from one pick.
    """
    sse, reference_sse = np.asarray(sse, np.float64), np.asarray(reference_sse, np.float64)
    tiny = 1e-12 * max(float(reference_sse.sum()), 1e-12)
    pooled = float(10 * np.log10((reference_sse.sum() + tiny) / (sse.sum() + tiny)))
    if len(sse) < 2:
        return pooled, float("-inf")
    draw = np.random.default_rng(seed).integers(0, len(sse), size=(DRAWS, len(sse)))
    gains = 10 * np.log10((reference_sse[draw].sum(axis=1) + tiny) / (sse[draw].sum(axis=1) + tiny))
    return pooled, float(np.quantile(gains, 1 - confidence))


def _score(mse: float, data_range: float) -> float:
    """PSNR (dB) over the body's range, as ``medinpaint.metrics``."""
    return float("inf") if mse == 0 else round(float(10 * np.log10(data_range**2 / mse)), 4)


def decide(sse: dict[str, np.ndarray], classical: tuple[str, ...], default: str, net_name: str, margin_db: float,
           confidence: float, seed: int = 0, units: str = "picks", network_eligible: bool = True) -> tuple[str, dict]:
    """The fill to write, from each method's squared errors per pick, and the record of why.

    A method wins over another when both its pooled gain and that gain's lower confidence bound
    (``paired_gain``) are above the threshold: 0 dB for a classical method against
    ``default`` (the best-scoring winner replaces it), ``margin_db`` for the network against that
    classical choice.  Without a clear win the safer fill stays: noise between methods a few tenths
    apart, or one lucky pick, must not decide.  ``units`` names what the entries of ``sse`` are;
    without ``network_eligible`` the network is scored but never written.
    """
    n = len(sse[default])
    rule = (f"paired over the {n} {units}: a classical method replaces {default} (the default), and {net_name} the "
            f"classical choice, only when its pooled PSNR gain and that gain's {confidence:.0%} lower bound (bootstrap over "
            f"the {units}, {DRAWS} draws, seed {seed}) are both above 0 dB ({margin_db} dB for {net_name})"
            + ("" if network_eligible else f"; {net_name} is not written on the evidence of one pick"))
    compared: dict[str, dict] = {}

    def wins(name: str, reference: str, threshold: float) -> bool:
        pooled, bound = paired_gain(sse[name], sse[reference], confidence, seed)
        better = sum(bool(a < b) for a, b in zip(sse[name], sse[reference]))
        compared[f"{name} vs {reference}"] = {"pooled_gain_db": round(pooled, 4), "lower_bound_db": round(bound, 4) if n > 1 else None,
                                              f"better_on_{units.split()[0]}": f"{better} of {n}"}
        return pooled > threshold and bound > threshold

    winners = [m for m in classical if m != default and wins(m, default, 0.0)]
    chosen = min(winners, key=lambda m: sse[m].sum()) if winners else default
    network_wins = wins(net_name, chosen, margin_db) and network_eligible
    network = compared[f"{net_name} vs {chosen}"]
    record = {"rule": rule, "default": default, "confidence": confidence, "comparisons": compared,
              "best_classical": min(classical, key=lambda m: sse[m].sum()), "classical_choice": chosen,
              "network_minus_classical_choice_db": network["pooled_gain_db"], "network_lower_bound_db": network["lower_bound_db"]}

    def bound(entry: dict) -> str:
        return f"none from one of the {units}" if entry["lower_bound_db"] is None else f"{entry['lower_bound_db']:+.2f} dB"

    if chosen == default:
        why = f"no classical method beats {default} clearly"
    else:
        entry = compared[f"{chosen} vs {default}"]
        why = f"{chosen} beats {default} clearly ({entry['pooled_gain_db']:+.2f} dB, lower bound {bound(entry)})"
    if network_eligible:
        verdict = "beats" if network_wins else "does not beat"
        why += f"; {net_name} {verdict} {chosen} clearly"
    else:
        why += f"; {net_name} is not written on one pick's evidence"
    why += (f" ({network['pooled_gain_db']:+.2f} dB, lower bound {bound(network)}, margin {margin_db} dB): "
            f"{net_name if network_wins else chosen} is written")
    choice = net_name if network_wins else chosen
    return choice, record | {"choice": choice, "why": why}


def block_sums(plane: np.ndarray, blocks: int = BLOCKS) -> np.ndarray:
    """The sums of ``plane`` over ``blocks`` x ``blocks`` blocks (edges as even as the size allows), flattened."""
    rows, cols = (np.linspace(0, n, min(blocks, n) + 1).astype(int)[:-1] for n in plane.shape)
    return np.add.reduceat(np.add.reduceat(plane, rows, axis=0), cols, axis=1).ravel()


def classical_left_out(scan: np.ndarray, bad_slices: list[int], hidden: list[int], methods: tuple[str, ...],
                       registered: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """The truth of the left-out slices and each classical method's prediction from the acquired
    slices that remain (never the real gaps, which ``scan`` may hold blank), as (X, Y, len(hidden))
    slabs; ``registered`` is ``left_out_registered``'s result when the caller already has it."""
    bad = set(bad_slices)
    valid = [k for k in range(scan.shape[2]) if k not in bad]
    orders = tuple(m for m in methods if m in ("linear", "cubic"))
    truth, predicted = left_out(scan, valid, hidden, orders or ("linear",))
    truth = truth.astype(np.float32)  # slabs held while the networks run: float32, scored in float64 per pick
    predicted = {m: predicted[m].astype(np.float32) for m in orders}
    if "registered" in methods:
        planes = registered if registered is not None else left_out_registered(scan, bad_slices, hidden)
        predicted["registered"] = np.stack([planes[k].astype(np.float32) for k in hidden], axis=-1)
    return truth, predicted


def left_out_registered(scan: np.ndarray, bad_slices: list[int], hidden: list[int]) -> dict[int, np.ndarray]:
    """The left-out slices filled by motion-compensated interpolation between the acquired slices
    around them (only their gaps are registered); the network's registered input reuses them."""
    return registered_slices(scan, sorted(set(bad_slices) | set(hidden)), wanted=hidden)


def network_left_out(array: np.ndarray, holes: np.ndarray, bad_slices: list[int], hidden: list[int], modality: str,
                     net: InpaintingUNet, info: ModelInfo, inference: InferenceSettings, device: torch.device,
                     registered: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """The network's fill of the left-out slices, the real holes missing as well (it never reads either:
    holes are zeroed before it sees them); only the crops around the left-out slices are run."""
    mask = holes.copy()
    mask[:, :, hidden] = True
    out = network_fill(array, mask, sorted(set(bad_slices) | set(hidden)), modality, net, inference, device,
                       slice_prefill=info.slice_prefill, keep_slices=hidden, registered_planes=registered)
    return out.astype(np.float32, copy=False)


def scored_body(base: np.ndarray, modality: str, hidden: list[int], chunk: int = 32) -> tuple[np.ndarray, float]:
    """The body (as metrics.py finds it) in the ``hidden`` slices, as (X, Y, len(hidden)), and the
    scan's range inside the whole body.  Found ``chunk`` slices at a time, each read with the two
    slices on either side that its 3D opening depends on, so that it equals the mask of the whole
    volume without holding one beside the scan."""
    threshold = body_threshold(base, modality)
    n_k = base.shape[2]
    position = {k: n for n, k in enumerate(hidden)}
    body = np.zeros(base.shape[:2] + (len(hidden),), bool)
    low, high = np.inf, -np.inf
    for a in range(0, n_k, chunk):
        b = min(a + chunk, n_k)
        a0, b0 = max(a - 2, 0), min(b + 2, n_k)
        part = body_mask(base[:, :, a0:b0], threshold, slice_axis=2, largest_only=False, opening=True)[:, :, a - a0 : b - a0]
        if part.any():
            values = base[:, :, a:b]
            low = min(low, float(np.min(values, where=part, initial=np.inf)))
            high = max(high, float(np.max(values, where=part, initial=-np.inf)))
        for k in range(a, b):
            if k in position:
                body[:, :, position[k]] = part[:, :, k - a]
    return body, (high - low if high >= low else 0.0)


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
    spacing: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Fill ``others`` (holes, whole slices ``whole_slices`` among them) with the fill the scan's own
    left-out slices favour; returns the filled array, the spread (with ``flip_axes``) and the record.
    ``spacing`` (mm) lets adaptation learn from the in-plane axes of thick-sliced scans."""
    gate, inference = settings.gate, settings.inference
    unknown = sorted(set(gate.classical) - set(CLASSICAL))
    if unknown or not gate.classical:
        raise MedinpaintError(f"gate.classical {list(gate.classical)}: choose from {', '.join(CLASSICAL)}")
    if gate.picks < 1:
        raise MedinpaintError(f"gate.picks must be at least 1, got {gate.picks}")
    if gate.default not in gate.classical:
        raise MedinpaintError(f"gate.default {gate.default!r} must be one of gate.classical {list(gate.classical)}")
    if gate.rounds < 1:
        raise MedinpaintError(f"gate.rounds must be at least 1, got {gate.rounds}")
    if not 0.5 <= gate.confidence < 1:
        raise MedinpaintError(f"gate.confidence must be in [0.5, 1), got {gate.confidence}")
    started = time.perf_counter()
    # The scan with its real holes pre-filled: what adaptation learns from and where the body is found.
    base = network_prefill(array, whole_slices, others, "linear")
    lengths = gap_lengths(whole_slices) or [1]
    requested = adapt if adapt is not None else settings.adapt.steps
    adapting = requested not in ("off", None, False, 0, "0")
    # An adapted copy must learn from none of the picks: one round leaves it the most to learn from.
    run_lengths = pick_lengths(array.shape[2], whole_slices, lengths)
    rounds = leave_out_rounds(array.shape[2], whole_slices, run_lengths, gate.picks, gate.seed, 1 if adapting else gate.rounds)
    picks = [run for picked in rounds for run in picked]
    hidden = sorted(k for run in picks for k in run)
    steps, why_steps = adaptation_steps(requested, device, array.shape[2] - len(whole_slices) - len(hidden), settings.adapt)
    record: dict = {"enabled": gate.enabled, "margin_db": gate.margin_db, "seed": gate.seed, "gap_lengths": lengths,
                    "picks": picks, "pick_count": len(picks), "rounds": len(rounds), "left_out_slices": len(hidden),
                    "pick_lengths": {str(gap): n for gap, n in run_lengths.items()}}
    adapted = None
    if steps:
        adapted, record["adaptation"] = adapt_model(
            net, info, base, modality, whole_slices, hidden, lengths, settings.adapt, steps, device, progress=progress,
            spacing=spacing)
        record["adaptation"]["validation"] = "the gate's left-out picks: hidden from adaptation (never a training target, never its input)"
        if save_adapted_to:
            save_adapted(adapted, info, save_adapted_to, overwrite, record["adaptation"])
    elif adapt not in (None, "off") or save_adapted_to:
        record["adaptation"] = {"steps": 0, "why": why_steps}
        if save_adapted_to:
            raise MedinpaintError(f"--save-adapted: no adaptation ran ({why_steps})")
    networks = {"network": net} | ({"adapted network": adapted} if adapted is not None else {})
    if not picks:
        del base  # nothing is scored
        if gate.enabled:
            choice = gate.default
            why = f"no acquired slices could be left out away from the gaps: nothing measured, so the default {choice} is written"
        else:
            choice = "adapted network" if adapted is not None else "network"
            why = "gate off and no acquired slices could be left out: the network is written unmeasured"
        record |= {"choice": choice, "why": why}
    else:
        body, data_range = scored_body(base, modality, hidden)
        record["scored_inside"] = "left-out slices, inside the body"
        if not body.any():
            body[...] = True
            data_range = float(np.ptp(base))
            record["scored_inside"] = "left-out slices (no body voxels in them)"
        del base  # the networks run on the scan as acquired
        methods = (tuple(gate.classical) if gate.enabled else ()) + tuple(networks)
        block_sse = {name: [] for name in methods}  # per pick (in the order of ``picks``), per block of its plane
        block_voxels = []
        for picked in rounds:
            round_hidden = sorted(k for run in picked for k in run)
            registered = left_out_registered(array, whole_slices, round_hidden) if info.registered_input or (
                gate.enabled and "registered" in gate.classical) else None
            if gate.enabled:
                truth, predicted = classical_left_out(array, whole_slices, round_hidden, gate.classical, registered)
            else:  # adaptation alone: only the networks are scored, before and after
                truth, predicted = np.asarray(array[:, :, round_hidden], np.float32), {}
            for name, model in networks.items():
                predicted[name] = network_left_out(array, others, whole_slices, round_hidden, modality, model, info, inference,
                                                   device, registered)
            for run in picked:
                columns = [round_hidden.index(k) for k in run]
                region = body[:, :, [hidden.index(k) for k in run]]
                block_voxels.append(block_sums(region.sum(axis=2, dtype=np.float64)))
                for name in methods:
                    squared = np.where(region, predicted[name][:, :, columns] - truth[:, :, columns].astype(np.float64), 0.0) ** 2
                    block_sse[name].append(block_sums(squared.sum(axis=2)))
        sse = {name: np.array([float(blocks.sum()) for blocks in values]) for name, values in block_sse.items()}
        voxels = [int(blocks.sum()) for blocks in block_voxels]
        total = max(sum(voxels), 1)
        scores = {name: _score(float(values.sum()) / total, data_range) for name, values in sse.items()}
        record["left_out_psnr_db"] = scores
        record["per_pick_psnr_db"] = {name: [_score(e / n, data_range) if n else None for e, n in zip(values, voxels)]
                                      for name, values in sse.items()}
        record["per_pick_voxels"] = voxels
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
            scored = np.array(voxels) > 0  # a pick outside the body says nothing about any method
            if scored.sum() == 1:  # no bound over picks: blocks of the lone pick's plane, and no network
                lone = int(np.flatnonzero(scored)[0])
                inside = block_voxels[lone] > 0
                units = {name: values[lone][inside] for name, values in block_sse.items()}
                choice, decision = decide(units, gate.classical, gate.default, net_name, gate.margin_db, gate.confidence,
                                          gate.seed, units=f"blocks of the one pick's plane ({BLOCKS} x {BLOCKS})",
                                          network_eligible=False)
            else:
                choice, decision = decide({name: values[scored] for name, values in sse.items()}, gate.classical,
                                          gate.default, net_name, gate.margin_db, gate.confidence, gate.seed)
            record |= decision
    record["seconds"] = round(time.perf_counter() - started, 2)
    log.info("slice gate: %s (%s)", record["choice"], record["why"])
    chosen_net = networks.get(choice)
    if chosen_net is not None:
        out = network_fill(array, others, whole_slices, modality, chosen_net, inference, device, progress=progress,
                           flip_axes=flip_axes, slice_prefill=info.slice_prefill, run_info=run_info)
        filled, spread = out if flip_axes else (out, None)
        return filled, spread, record
    filled = write_classical(array, whole_slices, choice)
    spread = np.zeros(array.shape, np.float32) if flip_axes else None
    per_slice = others.any(axis=(0, 1))
    per_slice[whole_slices] = False
    if per_slice.any():  # holes other than whole slices: the gate does not measure them, the network fills them as before
        rest = others.copy()
        rest[:, :, whole_slices] = False
        out = network_fill(filled, rest, [], modality, net, inference, device, progress=progress, flip_axes=flip_axes,
                           run_info=run_info)
        filled, spread = out if flip_axes else (out, None)
        record["other_holes"] = "network (the gate measures whole slices only)"
    if flip_axes:
        record["uncertainty"] = f"none for the slices filled by {choice} (zero in the map): it is a deterministic interpolation"
    return filled, spread, record


def write_classical(array: np.ndarray, whole_slices: list[int], method: str) -> np.ndarray:
    """The whole slices filled by ``method``; other holes are left for the caller (their values are unchanged)."""
    if method in ("linear", "cubic"):
        return classical_fill(array, whole_slices, None, order=method)
    filled = classical_fill(array, whole_slices, None, order="linear")
    return with_registered_slices(filled, array, whole_slices)
