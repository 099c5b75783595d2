"""The one output writer: one row schema for predict and archive runs, raw maps, tables, and the report's
histogram, filter and ground-truth outlines."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dualclip import DetectorConfig, DualClipDetector
from dualclip.cli.predict import UsageError, run_predict
from dualclip.data.images import OUTPUT_MARKER
from dualclip.output import ROW_FIELDS, load_map
from dualclip.visualization import edges

EFFNET = {"backbone": "effnet-lite0", "image_size": 64, "device": "cpu", "progress": False}


@pytest.fixture
def det():
    return DualClipDetector(DetectorConfig(**EFFNET))


def _report_json(html: str, element: str) -> dict:
    return json.loads(html.split(f'<script type="application/json" id="{element}">', 1)[1].split("</script>", 1)[0])


def test_archive_rows_and_predict_rows_have_one_schema(tmp_path, folder, det):
    from dualclip.distributed import run_archive

    _, doc = run_predict([str(folder)], tmp_path / "cli", det.config, detector=det, threshold=0.5, warn=print)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    run_archive(
        [(p, None) for p in paths],
        tmp_path / "arc",
        spec_config=det.config.to_dict(),
        threshold=0.5,
        engine="inline",
        block_size=50,
        progress=False,
    )
    cli = json.loads((tmp_path / "cli" / "predictions.json").read_text())["predictions"]
    arc = json.loads((tmp_path / "arc" / "predictions.json").read_text())["predictions"]
    assert [list(r) for r in cli] == [list(ROW_FIELDS)] * len(cli)
    assert [list(r) for r in arc] == [list(ROW_FIELDS)] * len(arc)
    assert [list(r) for r in doc["predictions"]] == [list(ROW_FIELDS)] * len(cli)
    heads = [next(csv.reader((tmp_path / d / "predictions.csv").open())) for d in ("cli", "arc")]
    assert heads[0] == heads[1] and heads[0][:4] == ["path", "score", "verdict", "threshold"]
    # one block of every image: the same run, so the same scores and references
    assert {r["path"]: r["score"] for r in cli} == {r["path"]: r["score"] for r in arc}
    assert {r["path"]: r["references"] for r in cli} == {r["path"]: r["references"] for r in arc}
    assert {r["block"] for r in cli} == {None} and len({r["block"] for r in arc}) == 1


def test_distributed_does_not_import_the_cli():
    code = (
        "import sys, dualclip.distributed.run, dualclip.distributed.scorer; "
        "print(sorted(m for m in sys.modules if m.startswith('dualclip.cli')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("fmt", ["npy", "tiff"])
def test_saved_raw_map_round_trips_to_the_prediction_map(tmp_path, folder, det, fmt):
    _, doc = run_predict([str(folder)], tmp_path / "o", det.config, detector=det, save_maps=fmt, warn=print)
    paths = [r["path"] for r in doc["predictions"]]
    preds = det.predict(paths)  # the same images in the same order: the same run
    for row, pred in zip(doc["predictions"], preds, strict=True):
        assert row["map"].startswith("maps/") and row["map"].endswith(f".{fmt}")
        saved = load_map(tmp_path / "o" / row["map"])
        assert saved.dtype == np.float32 and saved.shape == (row["size"][1], row["size"][0])
        np.testing.assert_array_equal(saved, pred.anomaly_map)
    marker = json.loads((tmp_path / "o" / OUTPUT_MARKER).read_text())
    assert sorted(f for f in marker["files"] if f.startswith("maps/")) == sorted(r["map"] for r in doc["predictions"])


def test_a_bad_map_format_or_parquet_without_pyarrow_is_refused_before_any_work(tmp_path, folder, det, monkeypatch):
    with pytest.raises(UsageError, match="--save-maps must be one of npy, tiff, got 'png'"):
        run_predict([str(folder)], tmp_path / "a", det.config, detector=det, save_maps="png")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(UsageError, match=r"--parquet: the parquet table needs pyarrow, which is not installed"):
        run_predict([str(folder)], tmp_path / "b", det.config, detector=det, tables=("json", "csv", "parquet"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_parquet_holds_the_csv_rows(tmp_path, folder, det):
    import pyarrow.parquet as pq

    run_predict(
        [str(folder)], tmp_path / "o", det.config, detector=det, threshold=0.5, tables=("json", "csv", "parquet")
    )
    table = pq.read_table(tmp_path / "o" / "predictions.parquet").to_pylist()
    rows = list(csv.DictReader((tmp_path / "o" / "predictions.csv").open()))
    assert list(table[0]) == list(rows[0])
    assert [(t["path"], t["score"], t["verdict"]) for t in table] == [
        (r["path"], float(r["score"]), r["verdict"]) for r in rows
    ]


def test_report_histogram_counts_the_scores_and_marks_the_threshold(tmp_path, folder, det):
    (folder / "broken.png").write_text("not an image")
    _, first = run_predict([str(folder)], tmp_path / "first", det.config, detector=det, warn=lambda m: None)
    threshold = float(np.median([r["score"] for r in first["predictions"] if r["score"] is not None]))
    _, doc = run_predict(
        [str(folder)], tmp_path / "o", det.config, detector=det, threshold=threshold, warn=lambda m: None
    )
    html = (tmp_path / "o" / "report.html").read_text()
    hist = _report_json(html, "histogram")
    got = [r["score"] for r in doc["predictions"] if r["score"] is not None]
    lo, hi = min(*got, threshold), max(*got, threshold)
    counts, edges_ = np.histogram(got, bins=20, range=(lo, hi))
    assert hist["counts"] == counts.tolist() and hist["edges"] == pytest.approx(edges_.tolist())
    assert sum(hist["counts"]) == 10  # the failed file is not counted
    flagged = sum(r["verdict"] == "defective" for r in doc["predictions"])
    assert hist["threshold"] == threshold and hist["above"] == flagged == sum(s >= threshold for s in got)
    assert hist["below"] == 10 - flagged
    assert f'id="threshold-line" data-value="{threshold}"' in html
    bars = [int(c) for c in html.split('class="bin" data-count="')[1:] for c in [c.split('"', 1)[0]]]
    assert bars == hist["counts"]
    assert f"show only the {flagged} flagged image(s)" in html and 'onchange="filterFlagged(this.checked)"' in html


def test_report_outlines_the_ground_truth_beside_an_image(tmp_path, texture_set, det):
    images, masks, labels = texture_set
    d = tmp_path / "tiles"
    d.mkdir()
    for i, (img, m) in enumerate(zip(images, masks, strict=True)):
        img.save(d / f"{i:02d}.bmp")
        if labels[i]:
            Image.fromarray((np.asarray(m) > 0).astype(np.uint8) * 255).save(d / f"{i:02d}.png")  # its mask, beside
    _, doc = run_predict([str(d)], tmp_path / "o", det.config, detector=det, warn=lambda m: None)
    assert len(doc["predictions"]) == len(images)  # the masks are not scored
    html = (tmp_path / "o" / "report.html").read_text()
    assert "green: the ground-truth defect" in html
    layers = {}
    for tr in html.split("<tr class=")[1:]:
        path = tr.split('data-v="', 1)[1].split('"', 1)[0]
        if "background-image:url(data:image/png;base64," in tr:
            uri = tr.split("background-image:url(data:image/png;base64,", 1)[1].split(")", 1)[0]
            layers[path] = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))))
    anomalous = {str(d / f"{i:02d}.bmp") for i, y in enumerate(labels) if y}
    assert set(layers) == anomalous  # no threshold: only the ground truth is outlined
    for i, y in enumerate(labels):
        if y:
            layer = layers[str(d / f"{i:02d}.bmp")]
            green = (layer[..., 3] == 255) & (layer[..., 1] == 255) & (layer[..., 0] == 0)
            np.testing.assert_array_equal(green, edges(np.asarray(masks[i]) > 0))


def test_an_archive_block_the_detector_refuses_gets_its_message_per_image(tmp_path, folder):
    from dualclip.distributed import run_archive

    paths = sorted(str(p) for p in folder.rglob("*.png"))
    items = [(p, "tile") for p in paths[:3]] + [(paths[3], "solo")]  # "solo": a block of one image
    run = run_archive(
        items, tmp_path / "o", spec_config=DetectorConfig(**EFFNET).to_dict(), engine="inline", progress=False
    )
    rows = {r["path"]: r for r in run.rows}
    solo = rows[paths[3]]
    assert solo["score"] is None and solo["class_name"] == "solo"
    assert solo["error"].startswith("one image and a vision-only backbone ('effnet-lite0'): give at least two")
    assert all(rows[p]["error"] is None and rows[p]["score"] is not None for p in paths[:3])


def test_cli_flags_save_maps_and_parquet(tmp_path, folder):
    from typer.testing import CliRunner

    from dualclip.cli.main import app

    common = ["predict", str(folder), "--backbone", "effnet-lite0", "--image-size", "64", "--device", "cpu", "-q"]
    r = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "bad"), "--save-maps", "png"])
    assert r.exit_code == 2 and "error: --save-maps must be one of npy, tiff, got 'png'" in r.output
    assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "o"), "--save-maps", "npy", "--parquet"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "o" / "maps").glob("*.npy"))) == 10
    assert (tmp_path / "o" / "predictions.parquet").is_file()


def test_an_interrupt_while_results_move_into_an_empty_folder_leaves_it_empty_or_complete(tmp_path, monkeypatch):
    """Results go into an existing empty -o in one exchange, not file by file: an interrupt at any rename leaves
    the folder as it was or complete, never half-filled without a marker."""
    import os

    from dualclip.output import folder

    out = tmp_path / "out"
    out.mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted)
    with folder.staged_output(out) as stage:
        (stage / "report.html").write_text("r")
        (stage / "predictions.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [".dualclip-output.json", "predictions.json", "report.html"]
    assert json.loads((out / ".dualclip-output.json").read_text())["files"] == ["predictions.json", "report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


def test_names_printed_on_the_terminal_cannot_act_on_it():
    from dualclip.output.rows import terminal_text

    assert terminal_text("esc/\x1b[31mRED\x1b]0;pwned\x07.jpg") == "esc/\\x1b[31mRED\\x1b]0;pwned\\x07.jpg"
    assert terminal_text("new\nline\r.jpg") == "new\\nline\\r.jpg"
    assert terminal_text("ünï ok.jpg") == "ünï ok.jpg"


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    from dualclip.output import OutputFolderError, output_lock
    from dualclip.output.folder import lock_path

    victim = tmp_path / "victim"
    victim.write_text("keep")
    out = tmp_path / "out"
    lock_path(out).symlink_to(victim)
    with pytest.raises(OutputFolderError, match="is a link or not a file: dualclip never writes through it"):
        with output_lock(out):
            pass
    assert victim.read_text() == "keep"


def test_an_invalid_marker_is_named_as_invalid_not_as_missing(tmp_path):
    from dualclip.output import OutputFolderError, check_output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("x")
    (out / ".dualclip-output.json").write_text("[1, 2]")
    with pytest.raises(OutputFolderError, match=r"\(an unreadable or invalid \.dualclip-output\.json\)"):
        check_output_folder(out, [], overwrite=True)
