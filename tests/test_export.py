"""ONNX export of the one-pass image encoder and scoring with onnxruntime: parity with torch, identity checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the convert extra (onnx, onnxruntime) is not installed")

from typer.testing import CliRunner  # noqa: E402

from conftest import TINY  # noqa: E402
from dualclip import DetectorConfig  # noqa: E402
from dualclip.backbone import EffNetLite0Backbone, build_clip_backbone  # noqa: E402
from dualclip.cli.main import app  # noqa: E402
from dualclip.detector import DualClipDetector  # noqa: E402
from dualclip.errors import OutputError  # noqa: E402
from dualclip.export import OnnxBackbone, export_onnx, onnx_metadata, output_names  # noqa: E402
from dualclip.profile import weights_fingerprint  # noqa: E402

TOL = 1e-4
REL = 5e-5
"""A whole model's scores and maps against predict's: within TOL, or REL of the value (profile units magnify
the float32 rounding of a bank search, which differs with the thread count, by 1 / the normal spread)."""


def _assert_same_features(a, b, tol=TOL):
    assert a.grid == b.grid
    torch.testing.assert_close(a.global_embedding, b.global_embedding, atol=tol, rtol=0)
    if a.patch_embeddings is None:
        assert b.patch_embeddings is None
    else:
        torch.testing.assert_close(a.patch_embeddings, b.patch_embeddings, atol=tol, rtol=0)
    assert len(a.match_features) == len(b.match_features)
    for x, y in zip(a.match_features, b.match_features, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "effnet", "dinov2"])
def test_export_matches_torch_on_every_output_at_any_batch_size(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "clip":  # random CLIP weights (none can be had here), V-V from block 2
        model = build_clip_backbone(TINY, pretrained=None, image_size=None, vv_start=2).eval()
    elif kind == "effnet":  # the real ImageNet weights
        model = EffNetLite0Backbone(image_size=128).eval()
    else:  # random weights, positions resized from 37 x 37 to 8 x 8 inside the graph
        pytest.importorskip("timm", reason="the dinov2 extra (timm) is not installed")
        from dualclip.backbone import DinoV2Backbone

        model = DinoV2Backbone(pretrained=None, image_size=112).eval()
    path = export_onnx(model, tmp_path / "encoder.onnx")
    meta = onnx_metadata(path)
    assert meta["weights_fingerprint"] == weights_fingerprint(model)
    assert meta["outputs"] == output_names(model)
    assert meta["image_size"] == model.image_size
    runner = OnnxBackbone(model, path)
    x = torch.randn(3, 3, model.image_size, model.image_size)  # exported at batch 2: the batch axis is dynamic
    with torch.inference_mode():
        want = model(x)
    got = runner(x)
    _assert_same_features(got, want)
    assert len(got.match_features) == len(model.feature_layers)
    assert (got.patch_embeddings is not None) == (kind == "clip")


def test_a_file_for_other_weights_or_settings_is_refused(tmp_path):
    torch.manual_seed(0)
    a = build_clip_backbone(TINY, pretrained=None, image_size=None)
    path = export_onnx(a, tmp_path / "a.onnx")
    b = build_clip_backbone(TINY, pretrained=None, image_size=None)
    with torch.no_grad():
        b.model.visual.proj.add_(1e-3)  # other weights
    with pytest.raises(ValueError, match="weights_fingerprint"):
        OnnxBackbone(b, path)
    torch.manual_seed(0)
    c = build_clip_backbone(TINY, pretrained=None, image_size=None, vv_start=3)
    with pytest.raises(ValueError, match="vv_start: file 1, model 3"):
        OnnxBackbone(c, path)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        onnx_metadata(tmp_path / "junk.onnx")


def test_runtime_onnxruntime_scores_like_torch_and_loads_torch_profiles(tmp_path, texture_set):
    images, _, labels = texture_set
    base = dict(backbone="effnet-lite0", image_size=128, progress=False, device="cpu", cache_dir=str(tmp_path))
    torch_det = DualClipDetector(DetectorConfig(**base))
    ort_det = DualClipDetector(DetectorConfig(**base, runtime="onnxruntime"))
    a, b = torch_det.predict(images), ort_det.predict(images)
    assert isinstance(ort_det.backbone, OnnxBackbone)
    assert list(ort_det.backbone.path.parent.glob("*.onnx")) == [ort_det.backbone.path]  # exported once, cached
    np.testing.assert_allclose([p.score for p in b], [p.score for p in a], atol=1e-3)
    np.testing.assert_allclose(b[0].anomaly_map, a[0].anomaly_map, atol=1e-3)
    # a profile fitted with torch runs on onnxruntime (same weights fingerprint)
    normal = [img for img, y in zip(images, labels, strict=True) if not y]
    profile = torch_det.fit(normal).save(tmp_path / "profile")
    loaded = DualClipDetector.load(profile, runtime="onnxruntime")
    assert loaded.config.runtime == "onnxruntime"
    want = torch_det.predict(images[-2:])
    got = loaded.predict(images[-2:])
    np.testing.assert_allclose([p.score for p in got], [p.score for p in want], atol=1e-3)


def test_cli_export_writes_the_profile_model_and_refuses_to_overwrite(tmp_path, texture_set):
    images, _, labels = texture_set
    det = DualClipDetector(DetectorConfig(backbone="effnet-lite0", image_size=96, progress=False, device="cpu"))
    profile = det.fit([img for img, y in zip(images, labels, strict=True) if not y]).save(tmp_path / "p")
    out = tmp_path / "enc.onnx"
    r = CliRunner().invoke(app, ["export", "--format", "onnx", "-o", str(out), "--profile", str(profile)])
    assert r.exit_code == 0, r.output
    meta = onnx_metadata(out)
    assert (meta["image_size"], meta["weights_fingerprint"]) == (96, det.profile_.meta["weights_fingerprint"])
    r = CliRunner().invoke(app, ["export", "-o", str(out), "--profile", str(profile)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(app, ["export", "-o", str(out), "--profile", str(profile), "--overwrite", "-q"])
    assert r.exit_code == 0 and r.output.startswith(f"wrote {out}"), r.output  # -q as every command takes it
    r = CliRunner().invoke(
        app, ["export", "--format", "tflite", "-o", str(tmp_path / "x"), "--backbone", "effnet-lite0"]
    )
    assert r.exit_code == 2 and "onnx is the only export format" in r.output
    r = CliRunner().invoke(
        app, ["predict", str(tmp_path), "-o", str(tmp_path / "o"), "--profile", str(profile), "--onnx-file", str(out)]
    )
    assert (
        r.exit_code == 2
        and "error: " in r.output
        and "--onnx-file is only used with --runtime 'onnxruntime'" in r.output
    )


# -- the whole model: image to score and anomaly map -------------------------------------------------------------

MODEL_CASES = {
    # random CLIP: text (prompt embeddings as constants), hybrid parts, two neighbourhood sizes, position
    # centring, the top 1% image score
    "clip-hybrid": dict(
        backbone=TINY,
        pretrained=None,
        distance="hybrid",
        neighbourhood=(1, 3),
        centring="position",
        image_score="top1pct",
    ),
    # random CLIP with the adaptation head trained at fit time, ring centring, cosine
    "clip-head": dict(
        backbone=TINY, pretrained=None, tta=True, centring="ring", adaptation={"num_images": 4, "steps": 5}
    ),
    # vision-only, the real bundled weights (random effnet-lite0 features are near zero: no test of anything),
    # the image reflect-padded before the network
    "effnet": dict(backbone="effnet-lite0", image_size=96, centring="position", border="reflect", plain_weight=0.0),
    # the plain view: a second input at its own size, its bank and the two views' mix inside the graph
    "effnet-plain": dict(backbone="effnet-lite0", image_size=96, plain_image_size=64, plain_weight=0.5),
}


def _split(texture_set):
    images, _, labels = texture_set
    normal = [im for im, y in zip(images, labels, strict=True) if not y]
    anomalous = [im for im, y in zip(images, labels, strict=True) if y]
    return normal[:5], [normal[5], *anomalous[:2]]  # fitted on 5; scored: a held-out normal image, 2 defects


def _fitted_profile(tmp_path, texture_set, case: str):
    train, _ = _split(texture_set)
    cfg = DetectorConfig(progress=False, device="cpu", **MODEL_CASES[case])
    return DualClipDetector(cfg).fit(train, class_name="tile", threshold_quantile=0.9).save(tmp_path / "profile")


def _run_model(path, x, outputs=("score", "anomaly_map")) -> tuple[np.ndarray, ...]:
    """The model's outputs for ``x``: the ``images`` input, or ``{input name: array}``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(session.run(list(outputs), x if isinstance(x, dict) else {"images": x}))


def _inputs(det, images, rows=slice(None)) -> dict:
    """Every input of ``det``'s exported model for ``images`` (``images``, and ``plain_images`` with a plain view)."""
    from dualclip.backbone.preprocess import to_tensor

    bb = det.backbone
    feeds = {"images": to_tensor(images, bb.image_size, bb.mean, bb.std).numpy()[rows]}
    if det.profile_.plain is not None:
        side = det.plain_backbone.image_size
        feeds["plain_images"] = to_tensor(images, side, bb.mean, bb.std).numpy()[rows]
    return feeds


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_whole_model_export_scores_like_predict_profile_at_batch_1_and_3(case, tmp_path, texture_set):
    from dualclip.export import export_model

    _, test = _split(texture_set)
    profile = _fitted_profile(tmp_path, texture_set, case)
    det = DualClipDetector.load(profile)  # what `predict --profile` scores with
    path = export_model(det, tmp_path / "model.onnx", profile_path=profile)
    want = det.score_images(test)  # maps at S x S, image scores in profile units
    assert [p.score for p in det.predict(test)] == pytest.approx(want.image_scores.tolist(), abs=1e-6)
    bb = det.backbone
    x = _inputs(det, test)
    scores, maps = _run_model(path, x)  # batch 3
    assert maps.shape == (3, bb.image_size, bb.image_size)
    np.testing.assert_allclose(scores, want.image_scores.numpy(), atol=TOL, rtol=REL)
    np.testing.assert_allclose(maps, want.maps.numpy(), atol=TOL, rtol=REL)
    for i in range(3):  # batch 1
        s1, m1 = _run_model(path, _inputs(det, test, slice(i, i + 1)))
        np.testing.assert_allclose(s1, want.image_scores.numpy()[i : i + 1], atol=TOL, rtol=REL)
        np.testing.assert_allclose(m1[0], want.maps.numpy()[i], atol=TOL, rtol=REL)
    # the out-of-distribution guard's distance, and the verdicts it gives, as predict's
    (ood,) = _run_model(path, x, ["ood_distance"])
    guard = det.profile_.ood
    np.testing.assert_allclose(ood, guard.distances(det.features(test).global_embedding).numpy(), atol=1e-6)
    unusable = [guard.limit is not None and d > guard.limit for d in ood]  # the textured test images
    assert unusable == [u is not None for u in want.unusable]
    meta = onnx_metadata(path)
    assert meta["ood"] == {**guard.to_dict(), "rule": meta["ood"]["rule"]} and "texture_floor" in meta["ood"]["rule"]
    assert list(meta["outputs"]) == ["score", "anomaly_map", "ood_distance"]
    assert meta["what"] == "model"
    assert meta["threshold"] == det.threshold_.to_dict()
    assert meta["profile"]["fingerprint"] == det.profile_.fingerprint()
    assert meta["profile"]["centring"] == MODEL_CASES[case].get("centring", "none")
    assert meta["preprocess"]["resize"] == "bicubic" and meta["preprocess"]["mean"] == list(bb.mean)
    want_branches = {
        "clip-hybrid": ["text", "visual"],
        "clip-head": ["adapted", "text", "visual"],
        "effnet-plain": ["plain", "visual"],
    }
    assert {k: v[2] for k, v in meta["inputs"].items()} == {k: v.shape[2] for k, v in x.items()}
    assert meta["branches"] == want_branches.get(case, ["visual"])


def test_profile_fingerprint_is_kept_through_save_and_load_and_changes_with_the_profile(tmp_path, texture_set):
    from dualclip.profile import Profile
    from dualclip.thresholds import manual_threshold

    path = _fitted_profile(tmp_path, texture_set, "clip-hybrid")
    loaded = Profile.load(path)
    fitted = DualClipDetector.load(path).profile_
    assert loaded.fingerprint() == fitted.fingerprint()
    train, _ = _split(texture_set)
    cfg = DetectorConfig(progress=False, device="cpu", **MODEL_CASES["clip-hybrid"])
    refit = DualClipDetector(cfg).fit(train, class_name="tile", threshold_quantile=0.9).profile_
    assert refit.fingerprint() == loaded.fingerprint()  # in memory, before any save
    refit.threshold = manual_threshold(3.0)
    assert refit.fingerprint() != loaded.fingerprint()
    loaded.bank_owner = loaded.bank_owner.flip(0)
    assert loaded.fingerprint() != fitted.fingerprint()


def _docs_block(marker: str) -> str:
    """The ```python block after ``<!-- marker`` in docs/export.md (the README links it)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text(encoding="utf-8")
    after = text.split(f"<!-- {marker}", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("case", ["clip-hybrid", "effnet-plain"])
def test_docs_onnx_example_runs_the_exported_model_without_dualclip(tmp_path, texture_set, case):
    """The docs' example, as written, on a product image and on a blank frame: the score, map, threshold and
    verdict (``unusable`` for the blank frame, by the profile's guard) of `dualclip predict --profile`; also for
    a model with the plain view's second input."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from PIL import Image

    profile = _fitted_profile(tmp_path, texture_set, case)
    model = tmp_path / "model.onnx"
    r = CliRunner().invoke(app, ["export", "--profile", str(profile), "-o", str(model)])
    assert r.exit_code == 0, r.output
    said = {
        "clip-hybrid": "images -> score, anomaly_map, ood_distance (text, visual), threshold",
        "effnet-plain": "images, plain_images -> score, anomaly_map, ood_distance (plain, visual), threshold",
    }
    assert said[case] in r.output
    det = DualClipDetector.load(profile)
    _, test = _split(texture_set)
    code = _docs_block("onnx-model-example") + (
        "\nimport sys\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'dualclip'], 'the example imported dualclip'\n"
        "np.save('map.npy', anomaly_map)\n"
        "print(json.dumps({'score': float(score[0]), 'threshold': threshold, 'verdict': verdict}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # not square: the example squashes it as dualclip does
    images = {"part": test[1].resize((90, 70)), "blank": Image.new("RGB", (90, 70), (128, 128, 128))}
    verdicts = {}
    for name, image in images.items():
        work = tmp_path / name
        (work / "in").mkdir(parents=True)
        shutil.copy(model, work / "model.onnx")
        image.save(work / "part.png")
        image.save(work / "in" / "part.png")
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=work, capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 0, run.stderr
        printed, result = run.stdout.strip().splitlines()[-2:]
        got = json.loads(result)
        assert printed.startswith(f"score {got['score']:.3f} (threshold {got['threshold']}): {got['verdict']}; ")
        # the same as `dualclip predict --profile` (score, verdict, threshold) and its map at S x S
        r = CliRunner().invoke(
            app, ["predict", str(work / "in"), "--profile", str(profile), "-o", str(work / "o"), "-q"]
        )
        assert r.exit_code == 0, r.output
        row = json.loads((work / "o" / "predictions.json").read_text())["predictions"][0]
        assert got["score"] == pytest.approx(row["score"], abs=TOL, rel=REL)
        assert got["threshold"] == row["threshold"] and got["verdict"] == row["verdict"]
        want = det.score_images([image]).maps[0].numpy()
        np.testing.assert_allclose(np.load(work / "map.npy")[0], want, atol=TOL, rtol=REL)
        verdicts[name] = got["verdict"]
    assert verdicts["part"] in ("ok", "defective") and verdicts["blank"] == "unusable"


def test_export_what_chooses_model_or_encoder_and_each_file_keeps_to_its_use(tmp_path, texture_set):
    profile = _fitted_profile(tmp_path, texture_set, "effnet")
    enc, model = tmp_path / "enc.onnx", tmp_path / "model.onnx"
    r = CliRunner().invoke(app, ["export", "--profile", str(profile), "--what", "encoder", "-o", str(enc)])
    assert r.exit_code == 0, r.output
    det = DualClipDetector.load(profile)
    assert onnx_metadata(enc)["outputs"] == output_names(det.backbone)
    assert isinstance(DualClipDetector.load(profile, runtime="onnxruntime", onnx_file=enc).backbone, OnnxBackbone)
    r = CliRunner().invoke(app, ["export", "--profile", str(profile), "-o", str(model)])
    assert r.exit_code == 0 and onnx_metadata(model)["what"] == "model", r.output
    with pytest.raises(ValueError, match="is a whole-model export .*: onnx_file takes the encoder alone"):
        DualClipDetector.load(profile, runtime="onnxruntime", onnx_file=model)
    r = CliRunner().invoke(app, ["export", "--what", "model", "-o", str(tmp_path / "m2.onnx")])
    assert r.exit_code == 2 and "error: --what model exports a fitted profile's scoring: give --profile" in r.output
    r = CliRunner().invoke(app, ["export", "--what", "all", "--profile", str(profile), "-o", str(tmp_path / "m3.onnx")])
    assert r.exit_code == 2 and "error: unknown --what 'all': choose model or encoder" in r.output
    assert not (tmp_path / "m2.onnx").exists() and not (tmp_path / "m3.onnx").exists()


def test_whole_model_export_refuses_an_unfitted_detector_a_missing_folder_and_a_graph_over_2_gib(
    tmp_path, texture_set, monkeypatch
):
    from dualclip.export import export_model
    from dualclip.export import model as model_module

    with pytest.raises(ValueError, match="export_model needs a fitted detector"):
        export_model(DualClipDetector(DetectorConfig(backbone="effnet-lite0", image_size=96)), tmp_path / "m.onnx")
    det = DualClipDetector.load(_fitted_profile(tmp_path, texture_set, "effnet"))
    with pytest.raises(OutputError, match=r"the folder of .*missing.*m.onnx \(.*\) does not exist"):
        export_model(det, tmp_path / "missing" / "m.onnx")
    monkeypatch.setattr(model_module, "MAX_GRAPH_BYTES", 2**20)  # this model and bank take about 20 MiB
    with pytest.raises(ValueError, match=r"weights and memory bank take 0.02 GiB, over the 2 GiB one ONNX file"):
        export_model(det, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_whole_model_export_matches_predict_profile_on_real_metal_plates(tmp_path):
    """The real effnet-lite0 at its S = 320 on mpdd_metal_plate: hybrid distance on real features, a bank of
    every fitted patch, position centring, the plain view at 224 px; 5 defect-free plates fitted, a good one and
    two defective scored."""
    from PIL import Image

    from conftest import shared_dataset
    from dualclip.data.images import load_image
    from dualclip.export import export_model

    root = shared_dataset("mpdd_metal_plate") / "data_supervised" / "metal_plate"

    def split(name: str) -> tuple[list, list]:
        good, bad = [], []
        for mask in sorted((root / name / "masks").glob("*.png")):
            (bad if np.asarray(Image.open(mask)).any() else good).append(root / name / "images" / mask.name)
        return good, bad

    train_good, _ = split("train")
    test_good, test_bad = split("test")
    cfg = DetectorConfig(backbone="effnet-lite0", centring="position", progress=False, device="cpu")
    fitted = DualClipDetector(cfg).fit([load_image(p) for p in train_good[:5]], threshold_quantile=0.9)
    det = DualClipDetector.load(fitted.save(tmp_path / "profile"))
    path = export_model(det, tmp_path / "model.onnx")
    test = [load_image(p) for p in [test_good[0], *test_bad[:2]]]
    want = det.score_images(test)
    assert det.profile_.plain is not None  # effnet-lite0's default: the plain view's second input
    scores, maps = _run_model(path, _inputs(det, test))
    np.testing.assert_allclose(scores, want.image_scores.numpy(), atol=TOL, rtol=REL)
    np.testing.assert_allclose(maps, want.maps.numpy(), atol=TOL, rtol=REL)


def test_a_plain_images_batch_of_another_size_is_refused_by_the_model(tmp_path, texture_set):
    """One plain_images row per image: a batch of 1 beside 3 images fails in the graph (it broadcast image 0's
    plain distances to every image)."""
    from dualclip.export import export_model

    _, test = _split(texture_set)
    det = DualClipDetector.load(_fitted_profile(tmp_path, texture_set, "effnet-plain"))
    path = export_model(det, tmp_path / "model.onnx")
    feeds = _inputs(det, test)
    _run_model(path, feeds)  # matching batches run
    with pytest.raises(Exception, match="mismatched dimensions"):
        _run_model(path, {**feeds, "plain_images": feeds["plain_images"][:1]})
