"""`dualclip predict` / `eval`: outputs, thresholds, bad input, exit codes, resumability."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import write_mvtec_tree
from dualclip import DetectorConfig, DualClipDetector
from dualclip.cli.main import app
from dualclip.cli.predict import EXIT_NOTHING, EXIT_OK, EXIT_SOME_FAILED, UsageError, run_predict
from dualclip.data import datasets as D
from dualclip.data.images import ImageLoadError, load_image
from dualclip.data.synthetic import make_texture_set
from dualclip.evaluation import run_eval
from dualclip.metrics import image_auroc
from dualclip.thresholds import f1_threshold


@pytest.fixture
def det(tiny_backbone):
    return DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)


def _bad_files(d):
    (d / "zero.png").write_bytes(b"")
    (d / "notes.png").write_text("not an image")
    good = d / "00.png" if (d / "00.png").exists() else next(d.rglob("*.png"))
    data = good.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 3])


def test_predict_outputs_and_verdicts(tmp_path, folder, det):
    out = tmp_path / "out"
    code, doc = run_predict([str(folder)], out, det.config, class_name="tile", threshold=0.5, detector=det)
    assert code == EXIT_OK
    preds = doc["predictions"]
    assert len(preds) == 10
    for p in preds:
        assert p["verdict"] in ("ok", "defective") and p["threshold"] == 0.5
        assert (out / p["heatmap"]).is_file() and (out / p["mask"]).is_file()
        src = Image.open(p["path"])
        m = Image.open(out / p["mask"])
        assert m.size == src.size and set(np.unique(np.asarray(m))) <= {0, 255}
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["threshold"] == {"value": 0.5, "source": "manual"}
    assert saved["config"]["seed"] == 0 and "vmin" in saved["heatmap_scale"]
    csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert len(csv_lines) == 11 and csv_lines[0].startswith("path,score,verdict")
    html = (out / "report.html").read_text()
    assert html.count("<tr class=") == 10 and "data:image/jpeg;base64" in html


def test_bad_files_get_entries_and_run_goes_on(tmp_path, folder, det, caplog):
    _bad_files(folder)
    code, doc = run_predict([str(folder)], tmp_path / "out", det.config, detector=det)
    assert code == EXIT_SOME_FAILED
    errors = {p["path"].rsplit("/", 1)[-1]: p["error"] for p in doc["predictions"] if p.get("error")}
    assert set(errors) == {"zero.png", "notes.png", "truncated.png"}
    assert "empty" in errors["zero.png"] and "not an image" in errors["notes.png"]
    assert "truncated" in errors["truncated.png"] or "corrupt" in errors["truncated.png"]
    assert sum(p["score"] is not None for p in doc["predictions"]) == 10
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("dualclip")]
    assert any(level == "ERROR" and "zero.png" in m and "empty" in m for level, m in said)  # logged at its level


def test_nothing_readable_exits_2(tmp_path, det):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    code, _ = run_predict([str(d / "a.png")], tmp_path / "out", det.config, detector=det)
    assert code == EXIT_NOTHING


def test_existing_output_needs_overwrite(tmp_path, folder, det):
    out = tmp_path / "out"
    assert run_predict([str(folder)], out, det.config, detector=det)[0] == EXIT_OK
    first = (out / "predictions.json").read_text()
    with pytest.raises(UsageError, match="--overwrite"):
        run_predict([str(folder)], out, det.config, detector=det, threshold=0.5)
    assert (out / "predictions.json").read_text() == first
    code, doc = run_predict([str(folder)], out, det.config, detector=det, overwrite=True, threshold=0.5)
    assert code == EXIT_OK and json.loads((out / "predictions.json").read_text())["threshold"]["value"] == 0.5
    # a folder dualclip did not write is never replaced, not even with --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not written by dualclip"):
        run_predict([str(folder)], mine, det.config, detector=det, overwrite=True)
    assert (mine / "keep.txt").read_text() == "mine" and sorted(os.listdir(mine)) == ["keep.txt"]


def test_threshold_from_references_and_validation(tmp_path, folder, det, texture_set):
    refs = [str(p) for p in sorted(folder.rglob("*.png"))[:4]]
    _, doc = run_predict(
        [str(folder)], tmp_path / "a", det.config, references=refs, threshold_quantile=0.9, detector=det
    )
    assert doc["threshold"]["source"].startswith("quantile 0.9")
    assert all(p["references"] == "golden" for p in doc["predictions"])
    normal = [str(folder / "00.png"), str(folder / "sub" / "01.png"), str(folder / "02.png")]
    anomalous = [str(folder / "sub" / "07.png"), str(folder / "08.png")]
    _, doc = run_predict([str(folder)], tmp_path / "b", det.config, validation=(normal, anomalous), detector=det)
    assert doc["threshold"]["source"].startswith("F1-optimal")


def test_f1_optimal_threshold():
    assert f1_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])).value == 0.8
    with pytest.raises(ValueError, match="both normal and anomalous"):
        f1_threshold(np.array([0, 0]), np.array([0.1, 0.2]))


def test_single_image_without_reference_warns_text_only(tmp_path, folder, det, caplog):
    code, doc = run_predict([str(folder / "00.png")], tmp_path / "o", det.config, detector=det)
    assert any(r.levelname == "WARNING" and "text-only" in r.getMessage() for r in caplog.records)
    assert code == EXIT_OK and doc["run"]["branches"] == ["text"]


def _png_16bit(path, h=20, w=24):
    arr = (np.arange(h * w).reshape(h, w) * 100).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in arr)

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def test_image_modes_exif_and_bombs(tmp_path):
    rgb = Image.new("RGB", (30, 20), (10, 200, 30))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.convert("P").save(tmp_path / "pal.png")
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    rgb.convert("L").save(tmp_path / "gray.png")
    _png_16bit(tmp_path / "g16.png")
    for name in ("cmyk.jpg", "pal.png", "rgba.png", "gray.png"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (30, 20)
    g16 = np.asarray(load_image(tmp_path / "g16.png"))
    assert g16.shape == (20, 24, 3) and g16.max() > 100  # scaled from 16 bit, not clipped to 255 everywhere
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    rgb.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 30)
    with pytest.raises(ImageLoadError, match="too many pixels|exceeds the limit"):
        load_image(tmp_path / "gray.png", max_pixels=100)


def test_cli_predict_json_and_exit_codes(tmp_path, folder, monkeypatch, tiny_backbone):
    import dualclip.cli.predict as P

    real = P.DualClipDetector
    monkeypatch.setattr(P, "DualClipDetector", lambda cfg: real(cfg, backbone=tiny_backbone))
    r = CliRunner().invoke(
        app,
        [
            "predict",
            str(folder),
            "--out",
            str(tmp_path / "o"),
            "--json",
            "--quiet",
            "--threshold",
            "0.5",
            "--pretrained",
            "random",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["predictions"]) == 10
    r = CliRunner().invoke(app, ["predict", str(folder), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "missing"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_eval_mvtec_layout_resumable(tmp_path, texture_set, tiny_backbone, monkeypatch):
    write_mvtec_tree(tmp_path / "mv", texture_set)
    cats = D.mvtec(tmp_path / "mv")
    assert [c.name for c in cats] == ["bottle"] and cats[0].labels.sum() == 4
    import dualclip.evaluation as E

    real = E.DualClipDetector
    monkeypatch.setattr(E, "DualClipDetector", lambda cfg, backbone=None: real(cfg, backbone=tiny_backbone))
    cfg = DetectorConfig(pretrained=None, progress=False)
    res = run_eval(cfg, cats, [0, 1], tmp_path / "out")
    r = res["categories"]["bottle"]
    for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_auroc_std", "ms_per_image", "peak_rss_mb"):
        assert k in r
    assert 0 <= r["pixel_aupro"] <= 1
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| bottle |" in md and "| mean |" in md and "±" in md
    # a rerun skips the finished category (no detector is even built)
    monkeypatch.setattr(E, "DualClipDetector", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = run_eval(cfg, cats, [0, 1], tmp_path / "out")
    assert again["categories"]["bottle"] == r


def test_layout_errors_say_what_was_expected(tmp_path):
    with pytest.raises(D.DatasetLayoutError, match="expected <root>/<category>/test"):
        D.mvtec(tmp_path)
    with pytest.raises(D.DatasetLayoutError, match="split_csv/1cls.csv"):
        D.visa(tmp_path)
    with pytest.raises(D.DatasetLayoutError, match="no image matches"):
        D.folder("x", normal=[str(tmp_path / "*.png")])


def test_visa_csv_layout(tmp_path, texture_set):
    images, masks, labels = texture_set
    (tmp_path / "split_csv").mkdir()
    rows = ["object,split,label,image,mask"]
    for i, (img, m, y) in enumerate(zip(images, masks, labels, strict=True)):
        img.save(tmp_path / f"{i}.png")
        mask = ""
        if y:
            Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / f"{i}_m.png")
            mask = f"{i}_m.png"
        rows.append(f"pcb1,test,{'anomaly' if y else 'normal'},{i}.png,{mask}")
    rows.append("pcb1,train,normal,0.png,")
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows))
    (cat,) = D.visa(tmp_path)
    assert cat.name == "pcb1" and len(cat.samples) == 10 and cat.labels.sum() == 4
    assert cat.masks(32)[labels.index(1)].any()


def test_evaluate_category_with_golden_references(tmp_path, texture_set, tiny_backbone):
    """A category's golden references replace the test images as each other's partners."""
    import dualclip.evaluation as E

    write_mvtec_tree(tmp_path / "mv", texture_set)
    (cat,) = D.mvtec(tmp_path / "mv")
    golden = tmp_path / "golden"
    golden.mkdir()
    for i, img in enumerate(make_texture_set(3, 0, 96, seed=5)[0]):
        img.save(golden / f"{i}.png")
    cat.references = sorted(golden.iterdir())
    cfg = DetectorConfig(pretrained=None, progress=False, use_text=False)
    out = E.evaluate_category(cfg, cat, [0], {"backbone": tiny_backbone})
    assert out["n_references"] == 3 and 0 <= out["pixel_auroc"] <= 1
    det = DualClipDetector(cfg, backbone=tiny_backbone)
    direct = det.score_images(cat.images(), golden=[Image.open(p).convert("RGB") for p in cat.references])
    assert direct.run.pairing == "golden"
    assert out["image_auroc"] == pytest.approx(image_auroc(cat.labels, direct.image_scores.numpy()))


def test_device_auto_and_clear_errors_for_devices_torch_cannot_use(tmp_path, folder, monkeypatch):
    import torch

    from dualclip.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="torch sees no CUDA GPU here"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        resolve_device("banana")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda"
    with pytest.raises(ValueError, match="sees 1 CUDA GPU"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(
        app, ["predict", str(folder), "-o", str(tmp_path / "o"), "--backbone", "effnet-lite0", "--device", "cuda"]
    )
    assert r.exit_code == 2 and "torch sees no CUDA GPU here" in r.output
    assert not (tmp_path / "o").exists()


def test_16_bit_32_bit_and_float_grey_images_become_8_bit_exactly_and_block_by_block():
    import warnings

    from dualclip.data.images import _grey8, to_rgb8

    def reference(arr):  # the whole image in float64 at once
        a = arr.astype(np.float64)
        if arr.dtype == np.uint16:
            a = a / 257.0
        elif a.max() > 255 or a.min() < 0:
            a = (a - a.min()) / (a.max() - a.min()) * 255.0 if a.max() > a.min() else np.zeros_like(a)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 65536, (37, 5)).astype(np.uint16),
        rng.integers(-5, 70000, (37, 5)).astype(np.int32),  # scaled from its range
        rng.integers(0, 256, (37, 5)).astype(np.int32),  # kept
        rng.normal(0, 1000, (37, 3)).astype(np.float32),
        rng.uniform(0, 255, (37, 3)).astype(np.float32),
        np.full((3, 3), -7, np.int32),  # one value outside [0, 255]: black
    ]
    for arr in cases:
        want = reference(arr)
        assert np.array_equal(np.asarray(to_rgb8(Image.fromarray(arr)))[..., 0], want), arr.dtype
        assert np.array_equal(_grey8(arr, rows=4), want), arr.dtype  # blocks of 4 rows, same values
    holes = np.full((4, 4), np.nan, np.float32)
    holes[0, :2] = [10.0, 600.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value" warning from a float TIFF's NaN holes
        got = np.asarray(to_rgb8(Image.fromarray(holes)))[..., 0]
    assert got[0, 0] == 0 and got[0, 1] == 255 and (got[1:] == 0).all()


def test_a_16_bit_image_decoded_reduced_is_its_8_bit_grey_reduced():
    import io

    from dualclip.data.images import decode_image

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 65536, (300, 240)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    got = decode_image(buf.getvalue(), "g16.png", max_side=100)
    grey = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    want = grey.reduce(3).resize((80, 100), Image.BILINEAR).convert("RGB")
    assert got.mode == "RGB" and got.size == (80, 100)
    assert np.array_equal(np.asarray(got), np.asarray(want))
