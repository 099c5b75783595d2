"""report.html rendered in headless Chromium (Debian's `chromium`; `.ci/run` installs it where missing).

Skipped, with the reason, where no Chromium or no Playwright is available.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from browser import find_chromium, launch
from dualclip import DetectorConfig, DualClipDetector
from dualclip.cli.predict import EXIT_SOME_FAILED, run_predict

CHROMIUM = find_chromium()
if CHROMIUM is None and os.environ.get("CI") == "true":
    raise RuntimeError("CI: .ci/run must install Debian's chromium for tests/test_report_browser.py")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")

CLASS_NAME = 'tile </script> "quoted" & <b>bold</b>'  # must survive the page as text and as JSON
ROWS_JS = """() => Array.from(document.querySelectorAll('#preds tbody tr')).map(tr => ({
  path: tr.cells[0].dataset.v,
  error: tr.querySelector('.err').textContent,
  score: tr.cells[3].textContent,
  verdict: tr.cells[4].textContent,
  images: Array.from(tr.querySelectorAll('img')).map(img => ({
    decoded: img.complete && img.naturalWidth > 0,
    width: img.getBoundingClientRect().width,
    visible: getComputedStyle(img).visibility !== 'hidden' && img.getBoundingClientRect().height > 0,
  })),
}))"""


@pytest.fixture
def report(tmp_path, folder, tiny_backbone):
    (folder / "broken.png").write_text("not an image")
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    code, doc = run_predict(
        [str(folder)], tmp_path / "out", det.config, class_name=CLASS_NAME, threshold=0.0, detector=det
    )
    assert code == EXIT_SOME_FAILED
    return tmp_path / "out" / "report.html", doc


@contextlib.contextmanager
def opened(path):
    """The report loaded in headless Chromium: its page and the list its script errors are collected in."""
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            yield page, errors
        finally:
            browser.close()


@pytest.mark.slow
def test_report_shows_every_image_with_its_score_and_sorts(report):
    path, doc = report
    with opened(path) as (page, errors):
        rows = page.evaluate(ROWS_JS)
        assert errors == []
        assert len(rows) == len(doc["predictions"]) == 11
        expected = {p["path"]: p for p in doc["predictions"]}
        for row in rows:
            pred = expected[row["path"]]
            if pred.get("error"):
                assert row["images"] == [] and row["verdict"] == "error" and row["error"] == pred["error"]
                continue
            assert row["score"] == f"{pred['score']:.4f}"
            assert row["verdict"] == pred["verdict"]
            assert len(row["images"]) == 2  # the image and its heat-map overlay
            assert all(i["decoded"] and i["visible"] and i["width"] > 0 for i in row["images"])
        # rows come sorted by score, highest first (errors last); a click on the score header sorts
        # ascending, a second click descending again
        scores = sorted((p["score"] for p in doc["predictions"] if p.get("score") is not None), reverse=True)
        for order in (scores, scores[::-1], scores):
            shown = [r["score"] for r in page.evaluate(ROWS_JS) if r["score"] != "-"]
            assert shown == [f"{s:.4f}" for s in order]
            page.click("th:has-text('score')")
        meta = json.loads(page.locator("#meta").text_content())
        assert meta["threshold"]["source"] == "manual" and meta["class_name"] == CLASS_NAME
        paragraphs = page.locator("body > p").all_text_contents()
        flagged = sum(p.get("verdict") == "defective" for p in doc["predictions"])
        assert paragraphs[0] == f"11 files: 10 scored, {flagged} flagged defective {10 - flagged} ok 1 failed"
        assert CLASS_NAME in paragraphs[1]


@pytest.mark.slow
def test_report_filters_flagged_images_and_opens_a_larger_view(report):
    path, doc = report
    flagged = sorted(p["path"] for p in doc["predictions"] if p.get("verdict") == "defective")
    assert 0 < len(flagged) < 10  # the filter has something to hide
    visible_js = (
        "() => Array.from(document.querySelectorAll('#preds tbody tr')).filter(tr => !tr.hidden)"
        ".map(tr => tr.cells[0].dataset.v).sort()"
    )
    with opened(path) as (page, errors):
        assert len(page.evaluate(visible_js)) == 11
        page.check("#flagged-only")
        assert page.evaluate(visible_js) == flagged
        page.uncheck("#flagged-only")
        assert len(page.evaluate(visible_js)) == 11
        first = next(p for p in doc["predictions"] if p.get("heatmap"))
        page.click(f'a.view[href="{first["heatmap"]}"]')
        view = page.locator("dialog#view")
        assert view.evaluate("d => d.open")
        page.wait_for_function("() => document.querySelector('dialog#view img.heat').naturalWidth > 0")
        src = view.locator("img.heat").evaluate("i => i.src")
        assert src.endswith(first["heatmap"])  # the full-size heat-map file, not the thumbnail
        width = view.locator("img.heat").evaluate("i => i.naturalWidth")
        assert width == first["size"][0]
        assert errors == []
