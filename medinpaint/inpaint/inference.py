"""Network fill with MONAI sliding-window inference, run only where there are holes.

The volume is normalised, pre-filled, cropped to the holes plus some valid context,
and passed through ``monai.inferers.SlidingWindowInferer`` (Gaussian blending).  On
CUDA the network runs under autocast (bf16 where supported, else fp16).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from scipy import ndimage
from tqdm import tqdm

from medinpaint.config import InferenceSettings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.classical import choose_slice_order, consecutive_runs, network_prefill, valid_neighbours
from medinpaint.inpaint.registered import registered_slices
from medinpaint.inpaint.network import SIZE_DIVISOR, InpaintingUNet
from medinpaint.inpaint.normalize import Normalizer

log = logging.getLogger(__name__)


def set_cpu_threads(threads: int) -> None:
    """Cap the CPU threads of torch and of SimpleITK (registration): workers sharing a machine
    each take ``threads`` cores instead of all of them. 0 keeps the libraries' defaults."""
    if threads:
        import SimpleITK as sitk

        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def pick_device(name: str) -> torch.device:
    """The torch device for ``auto``/``cpu``/``cuda`` (inference and training alike); a clear error for the impossible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedinpaintError("device cuda asked for (--device or the device setting), but no CUDA device is available; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise MedinpaintError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def _pad_to(array: np.ndarray, roi: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Mirror-pad each axis up to the ROI (the network saw mirrored, not empty, borders)."""
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(array.shape, roi)]
    if not any(a or b for a, b in pads):
        return array, tuple(slice(None) for _ in array.shape)
    mode = "reflect" if all(max(p) < s for p, s in zip(pads, array.shape)) else "edge"
    padded = np.pad(array, pads, mode=mode)
    return padded, tuple(slice(a, a + s) for (a, _), s in zip(pads, array.shape))


def network_fill(
    array: np.ndarray,
    holes: np.ndarray,
    whole_slices: list[int],
    modality: str,
    model: InpaintingUNet,
    settings: InferenceSettings,
    device: torch.device,
    progress: bool = False,
    flip_axes: tuple[int, ...] = (),
    slice_prefill: str = "linear",
    run_info: dict | None = None,
    holes_prefilled: bool = False,
    original: np.ndarray | None = None,
    keep_slices: list[int] | None = None,
    registered_planes: dict[int, np.ndarray] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Return ``array`` with ``holes`` filled by the network (values in the input's units).

    With ``flip_axes`` the prediction is averaged over flipped copies (test-time
    augmentation) and the per-voxel standard deviation is returned as well.  ``run_info``,
    when given, receives what the run actually used (batch size and stitching device after
    any out-of-memory retries).  With ``holes_prefilled`` the holes of ``array`` already
    hold the network's starting point (e.g. an NMAR correction) and are refined as they are.
    ``original`` (same grid) is the scan as acquired, for a model that reads it too.
    With ``keep_slices`` only those slices are returned, as (X, Y, len(keep_slices)), and only the
    crops that hold one of them are run: a caller that scores a few slices needs no copy of the scan.
    ``registered_planes`` are missing slices already filled by ``registered_slices`` (the same call
    on the same scan and gaps), reused instead of registered again.
    """
    if keep_slices is not None and flip_axes:
        raise MedinpaintError("keep_slices returns no uncertainty map: leave flip_axes empty")
    reads_original = getattr(model, "original_input", False)  # wrappers without the flag read no original
    if reads_original != (original is not None):
        raise MedinpaintError("this model reads the original scan; pass it" if reads_original
                              else "this model does not read the original scan")
    if not holes.any():
        return (array.copy(), np.zeros(array.shape, np.float32)) if flip_axes else (array.copy() if keep_slices is None else array[:, :, keep_slices].copy())
    roi = tuple(int(r) for r in settings.roi_size)
    if any(r % SIZE_DIVISOR for r in roi):
        raise MedinpaintError(f"roi_size {roi} must be a multiple of {SIZE_DIVISOR} on every axis")
    margins = [min(settings.context_voxels, (r - 1) // 2) for r in roi]
    kept = {k: n for n, k in enumerate(keep_slices)} if keep_slices is not None else None
    # Kept slices: one crop per run of them, never merged with its neighbours' (merged crops of many
    # picks grow to a hundred full slices); otherwise the groups of holes, merged where they overlap.
    boxes, owned = kept_boxes(holes, keep_slices, margins) if kept is not None else (hole_boxes(holes, margins), None)
    normalizer = Normalizer.for_volume(array, modality, holes=holes)

    def network_input(index: tuple[slice, ...]) -> np.ndarray:
        # Only crops are normalised, never the whole volume: one copy of the scan (the result) is enough.
        raw = array[index]
        if holes_prefilled:
            return normalizer.forward(np.nan_to_num(raw).astype(np.float32))
        return normalizer.forward(np.where(holes[index] | ~np.isfinite(raw), 0.0, raw).astype(np.float32))

    bad = set(whole_slices)
    valid_slices = [k for k in range(array.shape[2]) if k not in bad]
    # Whole missing slices only (2D planes, not a copy of the scan); other holes see the pre-fill there.
    registered = None
    if getattr(model, "registered_input", False):
        registered = dict(registered_planes or {})
        wanted = [k for k in whole_slices if k not in registered and any(b[2].start <= k < b[2].stop for b in boxes)]
        registered |= registered_slices(array, whole_slices, progress, wanted=wanted) if wanted else {}
    order = slice_prefill
    if slice_prefill == "auto" and whole_slices:
        order = choose_slice_order(array, valid_slices, read=lambda ks: network_input((slice(None), slice(None), ks)))

    batch = sw_batch_size(settings.sw_batch_size, device, roi)
    stitch_device = device  # the blended crop stays on the GPU until it is done, unless memory runs out
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if device.type == "cuda"
        else nullcontext()
    )
    model = model.to(device).eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        # Windows without a hole keep their input: the network would return it unchanged anyway
        # (its output is prefilled + mask * correction), so they are not run at all.
        out = x[:, :1].clone()
        has_hole = x[:, 1].flatten(1).amax(dim=1) > 0
        if has_hole.any():
            extra = (x[has_hole, 2:3],) if x.shape[1] == 3 else ()
            out[has_hole] = model(x[has_hole, :1], x[has_hole, 1:2], *extra).to(out.dtype)
        return out

    result = array.astype(np.float32, copy=True) if kept is None else array[:, :, keep_slices].astype(np.float32, copy=False)
    spread = np.zeros(array.shape, dtype=np.float32) if flip_axes else None
    bar = tqdm(total=len(boxes) * (1 + len(flip_axes)), desc="inpainting", unit="region", disable=not progress or len(boxes) < 2)
    for number, box in enumerate(boxes):
        # Per box only the network input and the hole values are held: a few crops, never the scan.
        inside = holes[box]
        start = network_input(box) if holes_prefilled else _prefilled(network_input, holes, bad, valid_slices, box, order)
        image, inner = _pad_to(start, roi)
        x = torch.empty((1, 2 + (original is not None or registered is not None)) + image.shape, dtype=torch.float32)
        x[0, 0] = torch.from_numpy(image)
        del image
        x[0, 1] = torch.from_numpy(_pad_to(inside.astype(np.float32), roi)[0])
        if original is not None:
            x[0, 2] = torch.from_numpy(_pad_to(normalizer.forward(np.nan_to_num(original[box], nan=normalizer.offset)), roi)[0])
        if registered is not None:
            guide = start.copy()
            for k in range(box[2].start, box[2].stop):
                if k in registered:
                    guide[:, :, k - box[2].start] = normalizer.forward(registered[k][box[0], box[1]])
            x[0, 2] = torch.from_numpy(_pad_to(guide, roi)[0])
        total = squares = None
        for axes in ((),) + tuple((a,) for a in flip_axes):
            flipped = torch.flip(x, dims=[a + 2 for a in axes]) if axes else x
            while True:
                inferer = SlidingWindowInferer(
                    roi_size=roi, sw_batch_size=batch, overlap=settings.overlap, mode=settings.blend_mode,
                    progress=progress and len(boxes) < 2, sw_device=device, device=stitch_device,
                )
                try:
                    with torch.inference_mode(), autocast:
                        y = inferer(flipped, predict)[0, 0].float().cpu()
                    break
                except torch.OutOfMemoryError:
                    batch, stitch_device = _after_out_of_memory(batch, stitch_device)
            values = (torch.flip(y, dims=list(axes)) if axes else y).numpy()[inner][inside].astype(np.float64)
            del y, flipped
            total = values if total is None else total + values
            squares = values**2 if squares is None else squares + values**2
            bar.update(1)
        runs = 1 + len(flip_axes)
        mean = total / runs
        if kept is None:
            result[box][inside] = normalizer.inverse(mean)
        else:
            _write_kept(result, kept, owned[number], box, inside, normalizer.inverse(mean))
        if spread is not None:
            spread[box][inside] = np.sqrt(np.maximum(squares / runs - mean**2, 0.0)) * normalizer.scale
    bar.close()
    if run_info is not None:
        run_info |= {"sw_batch_size": batch, "stitch_device": str(stitch_device)}
    return (result, spread) if flip_axes else result


def _write_kept(result: np.ndarray, kept: dict[int, int], slices: list[int], box: tuple[slice, ...], inside: np.ndarray,
                values: np.ndarray) -> None:
    """Write the box's hole ``values`` (in ``inside`` order) of ``slices`` into their places ``kept`` in ``result``."""
    block = np.zeros(inside.shape, np.float32)
    block[inside] = values
    for k in slices:
        where = inside[:, :, k - box[2].start]
        result[box[0], box[1], kept[k]][where] = block[:, :, k - box[2].start][where]


# Activation memory per window voxel of the shipped UNet under autocast, with headroom (measured
# peak is about a third of this); only used to size the batch from the free GPU memory.
_CUDA_BYTES_PER_VOXEL = 600


def sw_batch_size(setting: int | str, device: torch.device, roi: tuple[int, ...]) -> int:
    """Windows per forward pass: the setting, or for ``auto`` one on the CPU (fastest per voxel
    there: a bigger batch spills the caches) and as many as half the free GPU memory holds."""
    if setting != "auto":
        if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
            raise MedinpaintError(f"sw_batch_size must be a positive integer or auto, not {setting!r}")
        return setting
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(free, roi)


def batch_for_memory(free_bytes: int, roi: tuple[int, ...], most: int = 16) -> int:
    return int(min(max(free_bytes // 2 // (int(np.prod(roi)) * _CUDA_BYTES_PER_VOXEL), 1), most))


def _after_out_of_memory(batch: int, stitch_device: torch.device) -> tuple[int, torch.device]:
    """Smaller batches first, then stitching on the CPU; only then give up with a clear error."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if batch > 1:
        log.warning("out of GPU memory with %d windows per pass; retrying with %d", batch, batch // 2)
        return batch // 2, stitch_device
    if stitch_device.type != "cpu":
        log.warning("out of GPU memory with one window per pass; stitching on the CPU instead")
        return batch, torch.device("cpu")
    raise MedinpaintError("out of GPU memory even with one window per pass; use --device cpu or a smaller roi_size")


def _prefilled(
    network_input: Callable[[tuple[slice, ...]], np.ndarray],
    holes: np.ndarray,
    bad: set[int],
    valid_slices: list[int],
    box: tuple[slice, ...],
    order: str,
) -> np.ndarray:
    """The network's input in ``box``: normalised, holes pre-filled exactly as over the whole scan.

    The crop is widened along k to the valid slices that the interpolation of its bad
    slices reads (two on each side for cubic), then cut back to ``box``.
    """
    lo, hi = box[2].start, box[2].stop
    for k in (k for k in range(box[2].start, box[2].stop) if k in bad):
        below, above = valid_neighbours(valid_slices, k, 2)
        lo, hi = min([lo] + below), max([hi] + [v + 1 for v in above])
    index = (box[0], box[1], slice(lo, hi))
    local_bad = [k - lo for k in range(lo, hi) if k in bad]
    other = holes[index].copy()
    other[:, :, local_bad] = False
    filled = network_prefill(network_input(index), local_bad, other, order)
    return filled[:, :, box[2].start - lo : box[2].stop - lo]


def kept_boxes(holes: np.ndarray, keep_slices: list[int], margins: list[int]) -> tuple[list[tuple[slice, ...]], list[list[int]]]:
    """One box per run of consecutive ``keep_slices`` (the holes in them plus context), and each
    box's run: the only slices that box writes."""
    boxes, owned = [], []
    for run in consecutive_runs(keep_slices):
        found = np.nonzero(holes[:, :, run[0] : run[-1] + 1].any(axis=2))
        if not found[0].size:
            continue
        spans = [(int(f.min()), int(f.max()) + 1) for f in found] + [(run[0], run[-1] + 1)]
        boxes.append(tuple(slice(max(a - m, 0), min(b + m, n)) for (a, b), m, n in zip(spans, margins, holes.shape)))
        owned.append(run)
    return boxes, owned


def hole_boxes(holes: np.ndarray, margins: list[int], cell: int = 4) -> list[tuple[slice, ...]]:
    """Bounding boxes (plus context) of separate groups of holes; boxes that overlap are merged.

    Filling each group in its own crop keeps the network off the acquired voxels between
    distant holes, which is most of a large scan with a few bad slices.  Groups are found on
    a grid of ``cell`` x ``cell`` in-plane cells (labels 1/16 the size of a full-resolution
    labelling, which would need four bytes per voxel); each box is then fitted to its voxels.
    """
    coarse = holes
    if cell > 1:
        pad = [(0, -n % cell) for n in holes.shape[:2]] + [(0, 0)]
        coarse = np.pad(holes, pad).reshape(
            holes.shape[0] // cell + bool(pad[0][1]), cell, holes.shape[1] // cell + bool(pad[1][1]), cell, holes.shape[2]
        ).any(axis=(1, 3))
    labels, _ = ndimage.label(coarse, structure=np.ones((3, 3, 3), bool))
    boxes = []
    for number, found in enumerate(ndimage.find_objects(labels), start=1):
        region = (slice(found[0].start * cell, found[0].stop * cell), slice(found[1].start * cell, found[1].stop * cell), found[2])
        mine = np.repeat(np.repeat(labels[found] == number, cell, axis=0), cell, axis=1)
        inside = holes[region]
        idx = np.nonzero(inside & mine[: inside.shape[0], : inside.shape[1]])
        fitted = [(r.start + int(i.min()), r.start + int(i.max()) + 1) for r, i in zip(region, idx)]
        boxes.append([[max(a - m, 0), min(b + m, n)] for (a, b), m, n in zip(fitted, margins, holes.shape)])
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if all(a[0] < b[1] and b[0] < a[1] for a, b in zip(boxes[i], boxes[j])):
                    boxes[i] = [[min(a[0], b[0]), max(a[1], b[1])] for a, b in zip(boxes[i], boxes[j])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return [tuple(slice(a, b) for a, b in box) for box in sorted(boxes)]
