"""One case's QA page: before / after / synthesized overlay, a fader and flicker, and what the provenance says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.correct import Correction
from medinpaint.data.output_names import output_format, split_name
from medinpaint.provenance import synthesized_summary
from medinpaint.report.page import esc, page, pretty, write_page
from medinpaint.report.views import KIND_COLOURS, OTHER_COLOUR, cuts, windows

GATE_KEYS = re.compile(r"gate|adapt|kept", re.IGNORECASE)  # decisions some fills record (names vary by version)
WARNING_KEYS = re.compile(r"warn", re.IGNORECASE)

SCRIPT = """
document.querySelectorAll('.cmp').forEach(function(box){
  var top=box.querySelector('img.top'), range=box.querySelector('input'), button=box.querySelector('button'), timer=null;
  range.addEventListener('input',function(){top.style.opacity=range.value/100;});
  button.addEventListener('click',function(){
    if(timer){clearInterval(timer);timer=null;button.textContent='flicker';top.style.opacity=range.value/100;return;}
    button.textContent='stop';timer=setInterval(function(){top.style.opacity=top.style.opacity==='0'?'1':'0';},500);
  });
});
"""


def report_path(output: str | Path) -> Path:
    """Where ``correct --report`` puts the page: ``<stem>_report.html`` beside a file, ``report.html`` inside a DICOM folder."""
    output = Path(output)
    if output_format(output) == "dicom":
        return output / "report.html"
    stem, _ = split_name(output)
    return output.with_name(f"{stem}_report.html")


def write_case_report(correction: Correction, path: str | Path, provenance: dict | str | Path | None = None,
                      title: str | None = None, overwrite: bool = True) -> Path:
    """Write the page for ``correction``; ``provenance`` is the written record (dict or its JSON file)."""
    path = Path(path)
    if isinstance(provenance, (str, Path)):
        provenance = json.loads(Path(provenance).read_text())
    return write_page(case_html(correction, provenance, title or path.stem), path, overwrite=overwrite)


def case_html(correction: Correction, provenance: dict | None, title: str) -> str:
    labels = correction.artifacts.labels
    synthesized = correction.artifacts.synthesized  # computed once: each call is a pass over the volume
    record = provenance or _minimal_provenance(correction, synthesized)
    before, after = correction.original.array, correction.volume.array
    has_metal = bool((labels == ArtifactKind.METAL).any() or (labels == ArtifactKind.METAL_STREAK).any())
    shown = windows(correction.volume.modality, before, has_metal)
    pictures = cuts(before, after, labels, synthesized, correction.volume.affine, shown)
    geometry = record.get("Geometry") or correction.original.describe()
    source = (record.get("Sources") or [{}])[0]
    body = [
        f"<h1>medinpaint QA: {esc(title)}</h1>",
        f"<p class='sub'>{esc(source.get('Path') or 'in-memory volume')} &middot; {esc(correction.volume.modality)} &middot; "
        f"{' x '.join(map(str, correction.volume.shape))} voxels &middot; spacing "
        f"{' x '.join(f'{s:.3g}' for s in correction.volume.spacing)} mm</p>",
        _warnings(correction, record, synthesized),
        _kinds(record, correction),
        _pictures(pictures),
        _gates(record),
        _provenance_summary(record, geometry),
    ]
    return page(f"medinpaint QA: {title}", "\n".join(body), SCRIPT)


def _minimal_provenance(correction: Correction, holes: np.ndarray) -> dict:
    """What a report needs when no provenance file was written (e.g. an API caller)."""
    return {"Method": correction.method, "Model": correction.model, "Models": correction.models or {},
            "Parameters": correction.parameters, "Seconds": round(correction.seconds, 3),
            "SynthesizedVoxels": synthesized_summary(np.where(holes, correction.artifacts.labels, 0)), "ArtifactsFound": correction.artifacts.summary()}


def _warnings(correction: Correction, record: dict, holes: np.ndarray) -> str:
    notes = [f"{esc(path)}: {pretty(value)}" for path, value in find_keys(record, WARNING_KEYS)]
    if not (record.get("Sources") or [{}])[0].get("SHA256"):
        notes.append("no input SHA-256 recorded: the input was not read from a file")
    before = correction.original.array
    acquired = ~holes & np.isfinite(before)  # masks, not copies: volumes can be large
    if holes.any() and acquired.any():
        lo = float(np.min(before, where=acquired, initial=np.inf))
        hi = float(np.max(before, where=acquired, initial=-np.inf))
        filled = correction.volume.array[holes]
        outside = int(((filled < lo) | (filled > hi)).sum())
        if outside:
            notes.append(f"{outside} synthesized voxels lie outside the acquired range {lo:.4g}..{hi:.4g}")
    if not holes.any():
        notes.append("nothing was synthesized: the output equals the input")
    uncertainty = record.get("Uncertainty")
    if uncertainty:
        notes.append(f"fill uncertainty (flip TTA spread): mean {uncertainty.get('Mean', 0):.4g}, max {uncertainty.get('Max', 0):.4g}")
    if not notes:
        return "<h2>Warnings</h2><p class='ok'>none</p>"
    return "<h2>Warnings</h2><div class='warn'><ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul></div>"


def _kinds(record: dict, correction: Correction) -> str:
    voxels = record["SynthesizedVoxels"]
    rows = []
    for name, entry in (voxels.get("by_kind") or {}).items():
        colour = _colour_of(name)
        rows.append(f"<tr><td><span class='swatch' style='background:{colour}'></span>{esc(name)}</td>"
                    f"<td class='num'>{entry['count']}</td><td class='num'>{entry['fraction']:.4%}</td></tr>")
    metal = int((correction.artifacts.labels == ArtifactKind.METAL).sum())
    if metal:
        rows.append(f"<tr><td><span class='swatch' style='background:{_colour_of('metal')}'></span>metal (kept as acquired, "
                    f"not synthesized)</td><td class='num'>{metal}</td><td class='num'>{metal / correction.artifacts.labels.size:.4%}</td></tr>")
    total = f"<tr><th>all synthesized</th><th class='num'>{voxels.get('count', 0)}</th><th class='num'>{voxels.get('fraction', 0):.4%}</th></tr>"
    slices = (record.get("ArtifactsFound") or {}).get("bad_slices") or {}
    listed = ", ".join(f"{k}: {esc(v)}" for k, v in slices.items())
    return ("<h2>Synthesized voxels by kind</h2><table><tr><th>kind</th><th>voxels</th><th>fraction of the volume</th></tr>"
            + "".join(rows) + total + "</table>" + (f"<p>Whole slices filled (k): {listed}</p>" if listed else ""))


def _colour_of(name: str) -> str:
    return "rgb(%d,%d,%d)" % KIND_COLOURS.get(name, OTHER_COLOUR)


def _pictures(pictures) -> str:
    parts = ["<h2>Before and after</h2><p>Each row cuts through the most synthesized voxels (the bone window, shown around metal: through the metal). Radiological view: the "
             "patient's right is on the left; superior (axial: anterior) is up; sizes follow the voxel spacing. "
             "Overlay colours are the kinds above. The fourth column fades <i>after</i> over <i>before</i> "
             "(slider) or flickers between them.</p>"]
    for window in dict.fromkeys(p.window for p in pictures):
        parts.append(f"<h3>Window: {esc(window.name)}</h3><div class='grid'>")
        for p in (p for p in pictures if p.window == window):
            size = f"width='{p.width}' height='{p.height}'"
            where = f"{p.plane} ({p.voxel_axis} = {p.index})"
            parts.append(
                f"<div class='rowhead'>{esc(where)}</div>"
                f"<figure><figcaption>before</figcaption><img alt='before {esc(where)}' {size} src='{p.before}'></figure>"
                f"<figure><figcaption>after</figcaption><img alt='after {esc(where)}' {size} src='{p.after}'></figure>"
                f"<figure><figcaption>after + synthesized</figcaption><img alt='synthesized {esc(where)}' {size} src='{p.overlay}'></figure>"
                f"<figure><figcaption>before &harr; after</figcaption><div class='cmp' style='width:{p.width}px'>"
                f"<img alt='compare before {esc(where)}' {size} src='{p.before}'>"
                f"<img class='top' alt='compare after {esc(where)}' {size} src='{p.after}'>"
                "<div class='ctl'>before<input type='range' min='0' max='100' value='100' aria-label='fade'>after"
                "<button type='button'>flicker</button></div></div></figure>"
            )
        parts.append("</div>")
    return "".join(parts)


def find_keys(value, pattern: re.Pattern, prefix: str = "") -> list[tuple[str, object]]:
    """Every entry whose key matches ``pattern``, anywhere in a nested record, as (dotted path, value)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}{key}"
            if pattern.search(str(key)):
                found.append((path, item))
            else:
                found.extend(find_keys(item, pattern, path + "."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(find_keys(item, pattern, f"{prefix[:-1]}[{i}]."))
    return found


def _gates(record: dict) -> str:
    found = find_keys({k: v for k, v in record.items() if k != "Run"}, GATE_KEYS)  # Run: a copy of the settings for resume
    if not found:
        return "<h2>Gate decisions</h2><p>The provenance records none.</p>"
    flat = {}
    for path, value in found:  # a decision recorded as a block (choice, why, scores) gets a row per entry
        flat |= _flatten(value, path + ".") if isinstance(value, dict) and value else {path: value}
    rows = "".join(f"<tr><td class='mono'>{esc(path)}</td><td class='mono'>{pretty(value)}</td></tr>" for path, value in flat.items())
    return f"<h2>Gate decisions</h2><table><tr><th>entry</th><th>value</th></tr>{rows}</table>"


def _models(record: dict) -> list[dict]:
    """Every model named in the record (Name + SHA256 anywhere), once each."""
    seen: dict[str, dict] = {}

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            if "SHA256" in value and "Name" in value:
                seen.setdefault(value["SHA256"], {"Name": value["Name"], "SHA256": value["SHA256"], "where": where})
            for key, item in value.items():
                if key != "Sources":
                    walk(item, f"{where}.{key}" if where else key)
        elif isinstance(value, list):
            for item in value:
                walk(item, where)

    walk({k: v for k, v in record.items() if k != "Sources"}, "")
    return list(seen.values())


def _provenance_summary(record: dict, geometry: dict) -> str:
    source = (record.get("Sources") or [{}])[0]
    generated = (record.get("GeneratedBy") or [{}])[0]
    rows = [
        ("method", record.get("Method")),
        ("input", source.get("Path")),
        ("input SHA-256", source.get("SHA256")),
        ("seconds", record.get("Seconds")),
        ("written", record.get("DateTime")),
        ("by", f"{generated.get('Name', 'medinpaint')} {generated.get('Version', '')}".strip()),
        ("files", record.get("Files")),
        ("mask files", record.get("SynthesizedMask")),
        ("geometry", {k: geometry.get(k) for k in ("shape", "spacing_mm", "oblique_stack", "placeholder_slices")}),
    ]
    table = "".join(f"<tr><th>{esc(k)}</th><td class='mono'>{pretty(v)}</td></tr>" for k, v in rows if v not in (None, {}, []))
    models = _models(record)
    model_rows = "".join(f"<tr><td>{esc(m['Name'])}</td><td class='mono'>{esc(m['SHA256'])}</td><td class='mono'>{esc(m['where'])}</td></tr>"
                         for m in models)
    model_table = (f"<h3>Models</h3><table><tr><th>name</th><th>SHA-256</th><th>recorded at</th></tr>{model_rows}</table>"
                   if models else "<h3>Models</h3><p>none (classical fill)</p>")
    settings = {k: record[k] for k in ("Parameters", "Run", "Detection", "UserMask") if record.get(k) is not None}
    flat = "".join(f"<tr><td class='mono'>{esc(k)}</td><td class='mono'>{pretty(v)}</td></tr>" for k, v in _flatten(settings).items())
    return (
        "<h2>Provenance</h2><table>" + table + "</table>" + model_table
        + f"<h3>Settings</h3><table><tr><th>setting</th><th>value</th></tr>{flat}</table>"
        + "<details><summary>the whole provenance record (JSON)</summary><pre>"
        + esc(json.dumps(record, indent=2, default=str)) + "</pre></details>"
    )


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        flat: dict = {}
        for k, v in value.items():
            flat |= _flatten(v, f"{prefix}{k}.")
        return flat
    return {prefix[:-1]: value} if prefix else {}
