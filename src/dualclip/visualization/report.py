"""A self-contained offline HTML report: thumbnails, overlays, scores and verdicts, sortable by score."""

from __future__ import annotations

import base64
import html
import io
import json

from PIL import Image


def _data_uri(img: Image.Image, size: int = 256) -> str:
    thumb = img.convert("RGB").copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


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
    """``rows``: dicts with path, score, verdict, error, image (PIL or None), overlay (PIL or None) and
    optionally heatmap (the full-size heat map's path relative to the report, linked from its thumbnail).

    The page opens with the counts (files, flagged, failed), then lists the files by score, highest first,
    then those that failed; a click on a header re-sorts."""
    th = meta.get("threshold") or {}
    value = th.get("value")
    scale = meta.get("heatmap_scale") or {}
    scale_text = (
        f"{scale['vmin']:.4g} to {scale['vmax']:.4g} ({scale.get('colormap', '')}; {scale.get('note', '')})"
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

    head = (
        f'<p class="summary"><b>{counts["files"]}</b> files: {counts["scored"]} scored, {flagged}'
        f'<span class="badge {"error" if counts["failed"] else "none"}">{counts["failed"]} failed</span></p>'
        f"<p>class <b>{html.escape(str(meta.get('class_name')))}</b> &middot; "
        f"backbone <b>{html.escape(str(meta.get('backbone')))}</b> &middot; seed {meta.get('seed')} &middot; "
        f"threshold: {threshold_text}</p><p>heat-map scale: {html.escape(scale_text)}"
        f"{'; defect outlines: pixels at or above the threshold' if value is not None else ''}</p>"
    )
    trs = []
    # most anomalous first (the header's sort arrow says so); files that failed last
    for r in sorted(rows, key=lambda r: (r.get("score") is None, -(r.get("score") or 0.0))):
        score = r.get("score")
        v = "" if score is None else f"{score:.4f}"
        verdict = r.get("verdict") or ("error" if r.get("error") else "-")
        img = f'<img src="{_data_uri(r["image"])}" alt="image">' if r.get("image") is not None else ""
        ov = f'<img src="{_data_uri(r["overlay"])}" alt="heat map">' if r.get("overlay") is not None else ""
        if ov and r.get("heatmap"):
            ov = f'<a href="{html.escape(r["heatmap"])}" title="full-size heat map">{ov}</a>'
        err = html.escape(r.get("error") or r.get("reason") or "")
        trs.append(
            f'<tr class="{html.escape(verdict)}"><td data-v="{html.escape(r["path"])}">{html.escape(r["path"])}'
            f'<div class="err">{err}</div></td><td>{img}</td><td>{ov}</td>'
            f'<td class="score" data-v="{v or "nan"}">{v or "-"}</td>'
            f'<td class="verdict" data-v="{html.escape(verdict)}">{html.escape(verdict)}</td></tr>'
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
img {{ max-height: 160px; }}
</style></head><body>
<h1>dualclip report</h1>
{head}
<script type="application/json" id="meta">{_script_json(meta)}</script>
<table id="preds"><thead><tr>
<th onclick="sortBy(0, false)">file</th><th>image</th><th>heat map</th>
<th onclick="sortBy(3, true)">score &#x25BE;</th><th onclick="sortBy(4, false)">verdict</th>
</tr></thead><tbody data-dir="desc">
{"".join(trs)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
