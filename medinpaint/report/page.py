"""The HTML shell shared by the case and index pages: inline CSS and JS only, so a page is one self-contained file."""

from __future__ import annotations

import html
import json
from pathlib import Path

from medinpaint import __version__
from medinpaint.data.atomic import StagedOutputs

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.2em 2em;color:#222;background:#fafafa}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
.sub{color:#666;margin-top:0}.num{text-align:right;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;margin:.4em 0}th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#eee;white-space:nowrap}th[data-col]{cursor:pointer;user-select:none}th[data-col]:after{content:' \\2195';color:#999}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.5em 1em;border-radius:4px}
.ok{background:#e8f5e9;border:1px solid #81c784;padding:.5em 1em;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(4,max-content);gap:6px 10px;align-items:start}
.grid figure{margin:0}.grid figcaption{font-size:.85em;color:#444;margin-bottom:2px}
.grid img{display:block;background:#000;image-rendering:auto}
.rowhead{grid-column:1/-1;font-weight:600;margin-top:.6em}
.cmp{position:relative}.cmp img.top{position:absolute;left:0;top:0}
.cmp .ctl{display:flex;gap:6px;align-items:center;font-size:.85em;margin-top:3px}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;vertical-align:middle;margin-right:.3em}
.status-done{color:#1b7f3b}.status-skipped{color:#666}.status-failed{color:#b3261e;font-weight:600}
details pre{background:#f0f0f0;padding:.6em;overflow:auto;max-height:30em}
footer{margin-top:2em;color:#888;font-size:.85em}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def pretty(value) -> str:
    """A JSON value as compact, escaped text for a table cell."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return esc(text)


def page(title: str, body: str, script: str = "") -> str:
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{body}\n"
        f"<footer>medinpaint {esc(__version__)}: synthesized voxels are not measurements.</footer>"
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>\n"
    )


def write_page(text: str, path: Path, overwrite: bool = True) -> Path:
    """Atomically: a reader sees the old page or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with StagedOutputs(overwrite=overwrite) as staged:
        staged.path_for(path).write_text(text, encoding="utf-8")
    return path
