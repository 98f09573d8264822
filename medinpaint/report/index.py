"""report/index.html: every case of a batch run in a sortable table and a strip plot (the MRIQC group-report idea)."""

from __future__ import annotations

import hashlib
import math
import json
from dataclasses import dataclass
from pathlib import Path

from medinpaint.data.output_names import companion_paths
from medinpaint.report.page import esc, page, write_page

STATUS_COLOURS = {"done": "#1f77b4", "skipped": "#8c8c8c", "failed": "#d62728"}

SCRIPT = """
document.querySelectorAll('th[data-col]').forEach(function(th){
  th.addEventListener('click',function(){
    var table=th.closest('table'), body=table.tBodies[0], col=+th.dataset.col, up=th.dataset.dir!=='asc';
    table.querySelectorAll('th[data-col]').forEach(function(h){delete h.dataset.dir;});
    th.dataset.dir=up?'asc':'desc';
    var key=function(row){var c=row.cells[col];return c.dataset.sort!==undefined?c.dataset.sort:c.textContent;};
    Array.prototype.slice.call(body.rows).sort(function(a,b){
      var x=key(a), y=key(b), nx=parseFloat(x), ny=parseFloat(y);
      var d=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);
      return up?d:-d;
    }).forEach(function(row){body.appendChild(row);});
  });
});
"""


@dataclass
class Row:
    case: str
    status: str
    artifacts: str
    fraction: float | None
    seconds: float | None
    reason: str
    link: str | None
    earlier: bool  # numbers from an earlier run's provenance (a skipped case)


def write_index(results: list, out_dir: Path) -> Path:
    """Write ``out_dir/report/index.html`` for a batch run's results (done, skipped and failed)."""
    folder = Path(out_dir) / "report"
    return write_page(index_html([_row(r, folder) for r in results]), folder / "index.html")


def _row(result, folder: Path) -> Row:
    fraction, seconds, earlier = result.synthesized_fraction, result.seconds, False
    if result.status == "skipped" and result.output:
        try:  # a case done by an earlier run: show that run's numbers
            record = json.loads(companion_paths(result.output)["provenance"].read_text())
            fraction, seconds, earlier = record["SynthesizedVoxels"]["fraction"], record["Seconds"], True
        except (OSError, ValueError, KeyError, TypeError):
            fraction = seconds = None
    if result.status == "failed":
        fraction = seconds = None
    page_file = folder / f"{result.case}.html"
    return Row(result.case, result.status, result.artifacts, fraction, seconds, result.reason,
               page_file.name if page_file.exists() else None, earlier)


def index_html(rows: list[Row]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in STATUS_COLOURS}
    body = [
        "<h1>medinpaint batch report</h1>",
        "<p class='sub'>" + ", ".join(f"<span class='status-{s}'>{n} {s}</span>" for s, n in counts.items())
        + ". Click a case for its before / after page; click a column header to sort.</p>",
        "<h2>Per case</h2>",
        _strip("synthesized (% of the volume)", [(r, 100 * r.fraction) for r in rows if r.fraction is not None]),
        _strip("seconds per case", [(r, r.seconds) for r in rows if r.seconds is not None]),
        "<p class='sub'>One dot per case (hover for its name, click for its page): "
        + ", ".join(f"<span class='swatch' style='background:{c}'></span>{s}" for s, c in STATUS_COLOURS.items() if s != "failed")
        + " (numbers from the run that made the output). Failed cases have no numbers.</p>",
        _table(rows),
    ]
    return page("medinpaint batch report", "\n".join(body), SCRIPT)


def _table(rows: list[Row]) -> str:
    head = "".join(f"<th data-col='{i}'>{name}</th>" for i, name in
                   enumerate(("case", "status", "synthesized", "seconds", "artifacts", "reason")))
    lines = []
    for r in rows:
        name = f"<a href='{esc(r.link)}'>{esc(r.case)}</a>" if r.link else esc(r.case)
        fraction = "" if r.fraction is None else f"{r.fraction:.4%}"
        seconds = "" if r.seconds is None else f"{r.seconds:.1f}" + (" (earlier run)" if r.earlier else "")
        lines.append(
            f"<tr><td data-sort='{esc(r.case)}'>{name}</td><td class='status-{esc(r.status)}'>{esc(r.status)}</td>"
            f"<td class='num' data-sort='{-1 if r.fraction is None else r.fraction!r}'>{fraction}</td>"
            f"<td class='num' data-sort='{-1 if r.seconds is None else r.seconds!r}'>{seconds}</td>"
            f"<td>{esc(r.artifacts)}</td><td>{esc(r.reason)}</td></tr>"
        )
    return f"<table id='cases'><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _strip(title: str, points: list) -> str:
    """One horizontal strip: a dot per case (linked to its page), jittered vertically so ties stay visible."""
    width, height, left, right = 760, 70, 20, 20
    top = _nice(max([v for _, v in points], default=0.0))
    span = width - left - right
    ticks = "".join(
        f"<line x1='{left + span * f:.1f}' x2='{left + span * f:.1f}' y1='48' y2='52' stroke='#888'/>"
        f"<text x='{left + span * f:.1f}' y='64' font-size='10' text-anchor='middle' fill='#555'>{top * f:.3g}</text>"
        for f in (0, 0.25, 0.5, 0.75, 1)
    )
    dots = []
    for row, value in points:
        jitter = int(hashlib.sha1(row.case.encode()).hexdigest()[:4], 16) / 0xFFFF * 30 + 10
        dot = (f"<circle cx='{left + span * value / top:.1f}' cy='{jitter:.1f}' r='5' fill='{STATUS_COLOURS.get(row.status, '#000')}' "
               f"fill-opacity='0.75'><title>{esc(row.case)}: {value:.4g}</title></circle>")
        dots.append(f"<a href='{esc(row.link)}'>{dot}</a>" if row.link else dot)
    return (f"<figure style='margin:0'><figcaption>{esc(title)}</figcaption>"
            f"<svg class='strip' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' aria-label='{esc(title)}'>"
            f"<line x1='{left}' x2='{width - right}' y1='48' y2='48' stroke='#888'/>{ticks}{''.join(dots)}</svg></figure>")


def _nice(value: float) -> float:
    """The axis end: ``value`` rounded up to 1, 2, 4 or 8 times a power of ten, so its quarter ticks read well."""
    if not value > 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 4, 8, 10) if m * power >= value * (1 - 1e-9))
