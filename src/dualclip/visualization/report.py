"""A self-contained offline HTML report: counts, the colour bar, a score histogram with the threshold,
thumbnails with outlines, scores and verdicts (sortable, filterable), and larger views of each heat map.
Plain HTML, CSS and JavaScript: no network, no CDN."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
from PIL import Image

from .heatmap import COLORMAP, colour_ramp, outline_layer

THUMB = 256
"""Longest side of the thumbnails in the table (JPEG)."""
VIEW = 640
"""Longest side of the outline layer drawn over a heat map in the larger view."""
PREDICTED_COLOUR = (255, 255, 255)
TRUTH_COLOUR = (0, 255, 0)
HISTOGRAM_BINS = 20


def _data_uri(img: Image.Image, size: int = THUMB) -> str:
    thumb = img.convert("RGB").copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _view_size(width: int, height: int, most: int = VIEW) -> tuple[int, int]:
    f = min(1.0, most / max(width, height))
    return max(1, round(width * f)), max(1, round(height * f))


def _layer_uri(predicted: np.ndarray | None, truth: np.ndarray | None, size: tuple[int, int]) -> str | None:
    """The outlines of the predicted defect (white) and of the ground truth (green) as a transparent PNG at
    ``size``, or ``None`` when there is neither."""
    masks = [(m, c) for m, c in ((predicted, PREDICTED_COLOUR), (truth, TRUTH_COLOUR)) if m is not None]
    if not masks:
        return None
    resized = [(np.asarray(Image.fromarray(np.asarray(m, bool)).resize(size, Image.NEAREST)), c) for m, c in masks]
    buf = io.BytesIO()
    outline_layer(size, resized).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def score_histogram(scores: list[float], threshold: float | None, bins: int = HISTOGRAM_BINS) -> dict:
    """The histogram of the scored images' scores over a range that holds the threshold too: ``edges``,
    ``counts``, ``threshold``, and the images at or above it (``above``) and below it (``below``)."""
    values = np.asarray([s for s in scores if s is not None and np.isfinite(s)], dtype=np.float64)
    if values.size == 0:
        return {"edges": [], "counts": [], "threshold": threshold, "above": 0, "below": 0}
    ends = [values.min(), values.max(), *([threshold] if threshold is not None else [])]
    lo, hi = float(min(ends)), float(max(ends))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    above = int((values >= threshold).sum()) if threshold is not None else 0
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "threshold": threshold,
        "above": above,
        "below": int(values.size - above) if threshold is not None else 0,
    }


def _histogram_svg(hist: dict, width: int = 480, height: int = 120) -> str:
    if not hist["counts"]:
        return ""
    edges, counts = hist["edges"], hist["counts"]
    lo, hi, top = edges[0], edges[-1], max(max(counts), 1)
    x = lambda v: 30 + (v - lo) / (hi - lo) * (width - 40)  # noqa: E731
    bars = []
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        h = c / top * (height - 30)
        bars.append(
            f'<rect class="bin" data-count="{c}" x="{x(a):.1f}" y="{height - 20 - h:.1f}" '
            f'width="{max(x(b) - x(a) - 1, 1):.1f}" height="{h:.1f}"><title>{a:.4g} to {b:.4g}: {c}</title></rect>'
        )
    line = ""
    t = hist["threshold"]
    if t is not None:
        line = (
            f'<line id="threshold-line" data-value="{t}" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="4" y2="{height - 20}" '
            f'stroke="#b00" stroke-width="2"/><text x="{x(t) + 3:.1f}" y="12" fill="#b00">threshold {t:.4g}</text>'
        )
    return (
        f'<svg id="histogram-svg" width="{width}" height="{height}" role="img" aria-label="score histogram">'
        f"{''.join(bars)}{line}"
        f'<text x="30" y="{height - 5}">{lo:.4g}</text><text x="{width - 10}" y="{height - 5}" '
        f'text-anchor="end">{hi:.4g}</text><text x="2" y="12">{top}</text></svg>'
    )


def _colour_bar(scale: dict) -> str:
    """The heat maps' colour bar: the colour map from ``vmin`` to ``vmax`` with the threshold marked."""
    if "vmin" not in scale:
        return ""
    ramp = colour_ramp(16)
    stops = f"{ramp[0]}, {ramp[0]}" if scale.get("flat") else ", ".join(ramp)
    mark = ""
    pos = scale.get("threshold_position")
    if pos is not None:
        mark = f'<span class="tick" style="left:{100 * pos:.1f}%" title="threshold"></span>'
    return (
        f'<div class="colourbar"><span class="end">{scale["vmin"]:.4g}</span>'
        f'<span class="ramp" style="background:linear-gradient(to right, {stops})">{mark}</span>'
        f'<span class="end">{scale["vmax"]:.4g}</span></div>'
    )


_SCRIPT = """
function sortBy(col, numeric) {
  const body = document.querySelector('#preds tbody');
  const rows = Array.from(body.rows);
  const dir = body.dataset.dir === 'desc' ? 'asc' : 'desc';
  body.dataset.dir = dir;
  rows.sort((a, b) => {
    let x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    if (numeric) { x = parseFloat(x); y = parseFloat(y); if (isNaN(x)) x = -Infinity; if (isNaN(y)) y = -Infinity; }
    return (x < y ? -1 : x > y ? 1 : 0) * (dir === 'asc' ? 1 : -1);
  });
  rows.forEach(r => body.appendChild(r));
}
function filterFlagged(only) {
  document.querySelectorAll('#preds tbody tr').forEach(tr => {
    tr.hidden = only && !tr.classList.contains('defective');
  });
}
function openView(link) {
  const dlg = document.getElementById('view');
  const img = dlg.querySelector('img.heat');
  img.src = link.getAttribute('href');
  img.onerror = () => { img.src = link.querySelector('img').src; };
  const layer = dlg.querySelector('.layer');
  layer.style.backgroundImage = link.dataset.layer ? 'url(' + link.dataset.layer + ')' : 'none';
  dlg.querySelector('.caption').textContent = link.dataset.caption;
  dlg.showModal();
  return false;
}
"""


def _script_json(value) -> str:
    """JSON to embed in a <script> element: its text is not entity-decoded, so only the characters that
    could close the element or open a comment are escaped, JSON-style."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def summary_counts(rows: list[dict]) -> dict[str, int]:
    """files, scored, flagged (verdict defective), ok, unusable (outside the profile's distribution), failed (an
    error) among the report's rows."""
    verdicts = [r.get("verdict") for r in rows]
    failed = sum(1 for r in rows if r.get("error"))
    return {
        "files": len(rows),
        "scored": len(rows) - failed,
        "flagged": verdicts.count("defective"),
        "ok": verdicts.count("ok"),
        "unusable": verdicts.count("unusable"),
        "failed": failed,
    }


def render_report(rows: list[dict], meta: dict) -> str:
    """``rows``: dicts with path, score, verdict, error, image (PIL or None), overlay (the heat map, PIL or
    None), optionally heatmap (the full-size heat map's path relative to the report: the larger view shows
    it), predicted and truth (``(H, W)`` bool masks at the image's size: the predicted defect, outlined in
    white, and the ground truth, outlined in green).

    The page opens with the counts (files, flagged, failed), the colour bar of ``meta["heatmap_scale"]``, the
    histogram of the scores with the threshold, and a filter for flagged images; then it lists the files by
    score, highest first, then those that failed; a click on a header re-sorts, a click on a heat map opens its
    larger view."""
    th = meta.get("threshold") or {}
    value = th.get("value")
    scale = meta.get("heatmap_scale") or {}
    scale_text = (
        f"{scale['vmin']:.4g} to {scale['vmax']:.4g} ({scale.get('colormap', COLORMAP)}; {scale.get('note', '')})"
        if "vmin" in scale
        else str(scale or "-")
    )
    source = html.escape(str(th.get("source")))
    threshold_text = source if value is None else f"<b>{value:.4g}</b> ({source})"
    counts = summary_counts(rows)
    flagged = (
        f'<span class="badge defective">{counts["flagged"]} flagged defective</span> '
        f'<span class="badge ok">{counts["ok"]} ok</span> '
        if value is not None
        else ""
    )
    if counts["unusable"]:
        flagged += f'<span class="badge unusable">{counts["unusable"]} unusable</span> '
    has_truth = any(r.get("truth") is not None for r in rows)
    outlines = []
    if value is not None:
        outlines.append("white: pixels at or above the threshold")
    if has_truth:
        outlines.append("green: the ground-truth defect")
    hist = score_histogram([r.get("score") for r in rows if not r.get("error")], value)

    head = (
        f'<p class="summary"><b>{counts["files"]}</b> files: {counts["scored"]} scored, {flagged}'
        f'<span class="badge {"error" if counts["failed"] else "none"}">{counts["failed"]} failed</span></p>'
        + (f"<p>class <b>{html.escape(str(meta['class_name']))}</b> &middot; " if meta.get("class_name") else "<p>")
        + f"backbone <b>{html.escape(str(meta.get('backbone')))}</b> &middot; seed {meta.get('seed')} &middot; "
        f"threshold: {threshold_text}</p><p>heat-map scale: {html.escape(scale_text)}"
        f"{'; outlines: ' + ', '.join(outlines) if outlines else ''}</p>"
    )
    trs = []
    # most anomalous first (the header's sort arrow says so); files that failed last
    for r in sorted(rows, key=lambda r: (r.get("score") is None, -(r.get("score") or 0.0))):
        score = r.get("score")
        v = "" if score is None else f"{score:.4f}"
        verdict = r.get("verdict") or ("error" if r.get("error") else "-")
        img = f'<img src="{_data_uri(r["image"])}" alt="image">' if r.get("image") is not None else ""
        ov = ""
        if r.get("overlay") is not None:
            heat = r["overlay"]
            layer = _layer_uri(r.get("predicted"), r.get("truth"), _view_size(heat.width, heat.height))
            style = f' style="background-image:url({layer})"' if layer else ""
            ov = f'<span class="stack"><img src="{_data_uri(heat)}" alt="heat map"><span class="layer"{style}></span></span>'
            if r.get("heatmap"):
                caption = html.escape(f"{r['path']} - score {v} - {verdict}", quote=True)
                ov = (
                    f'<a href="{html.escape(r["heatmap"])}" title="full-size heat map" class="view" '
                    f'data-caption="{caption}" data-layer="{layer or ""}" onclick="return openView(this)">{ov}</a>'
                )
        err = html.escape(r.get("error") or r.get("reason") or "")
        trs.append(
            f'<tr class="{html.escape(verdict)}"><td data-v="{html.escape(r["path"])}">{html.escape(r["path"])}'
            f'<div class="err">{err}</div></td><td>{img}</td><td>{ov}</td>'
            f'<td class="score" data-v="{v or "nan"}">{v or "-"}</td>'
            f'<td class="verdict" data-v="{html.escape(verdict)}">{html.escape(verdict)}</td></tr>'
        )
    flagged_filter = (
        '<p><label><input type="checkbox" id="flagged-only" onchange="filterFlagged(this.checked)"> '
        f"show only the {counts['flagged']} flagged image(s)</label></p>"
        if value is not None
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dualclip report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; }}
th {{ cursor: pointer; background: #eee; }}
tr.defective td.score, tr.defective td.verdict {{ color: #b00; font-weight: bold; }}
tr.ok td.verdict {{ color: #070; }}
tr.error {{ background: #fdd; }}
tr.unusable td.verdict {{ color: #850; font-weight: bold; }}
.badge {{ padding: 1px 6px; border-radius: 4px; }}
.badge.defective {{ background: #fcc; color: #800; }}
.badge.ok {{ background: #cfc; color: #050; }}
.badge.error {{ background: #fdd; color: #800; }}
.badge.unusable {{ background: #fe9; color: #640; }}
.err {{ color: #b00; font-size: 90%; }}
img {{ max-height: 200px; display: block; }}
.stack {{ position: relative; display: inline-block; }}
.layer {{ position: absolute; inset: 0; background-size: 100% 100%; pointer-events: none; }}
.colourbar {{ display: flex; align-items: center; gap: 6px; }}
.colourbar .ramp {{ position: relative; display: inline-block; width: 320px; height: 14px; border: 1px solid #999; }}
.colourbar .tick {{ position: absolute; top: -4px; bottom: -4px; width: 2px; background: #000; }}
rect.bin {{ fill: #69c; }}
dialog {{ max-width: 95vw; max-height: 95vh; }}
dialog .stack img {{ max-height: 85vh; max-width: 90vw; }}
</style></head><body>
<h1>dualclip report</h1>
{head}
{_colour_bar(scale)}
<h2>scores</h2>
{_histogram_svg(hist)}
<script type="application/json" id="histogram">{_script_json(hist)}</script>
{flagged_filter}
<script type="application/json" id="meta">{_script_json(meta)}</script>
<table id="preds"><thead><tr>
<th onclick="sortBy(0, false)">file</th><th>image</th><th>heat map</th>
<th onclick="sortBy(3, true)">score &#x25BE;</th><th onclick="sortBy(4, false)">verdict</th>
</tr></thead><tbody data-dir="desc">
{"".join(trs)}
</tbody></table>
<dialog id="view"><form method="dialog"><button>close</button></form><p class="caption"></p>
<span class="stack"><img class="heat" alt="heat map, full size"><span class="layer"></span></span></dialog>
<script>{_SCRIPT}</script>
</body></html>
"""
