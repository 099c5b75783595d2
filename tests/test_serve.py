"""The inspection service: scores over HTTP equal the detector's, micro-batching, limits, errors, API key."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from dualclip import DetectorConfig  # noqa: E402
from dualclip.detector import DualClipDetector  # noqa: E402
from dualclip.serve import MicroBatcher, ServeSettings, create_app  # noqa: E402
from dualclip.visualization import THRESHOLD_POSITION, colorize, overlay, profile_scale  # noqa: E402


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory, texture_set):
    images, _, labels = texture_set
    normal = [img for img, y in zip(images, labels, strict=True) if not y]
    cfg = DetectorConfig(backbone="effnet-lite0", image_size=128, progress=False, device="cpu")
    det = DualClipDetector(cfg).fit(normal, threshold_quantile=0.9)
    return det.save(tmp_path_factory.mktemp("serve") / "profile")


@pytest.fixture(scope="module")
def reference_scores(profile_dir, texture_set):
    """Each test image scored alone by the library: what the service must answer."""
    det = DualClipDetector.load(profile_dir, progress=False)
    return [det.predict([img])[0].score for img in texture_set[0]]


def _client(profile_dir, **settings) -> TestClient:
    det = DualClipDetector.load(profile_dir)
    return TestClient(create_app(det, ServeSettings(**settings), profile_path=profile_dir))


def test_raw_and_multipart_uploads_score_like_the_detector_and_info_resolves_the_settings(
    profile_dir, texture_set, reference_scores
):
    images = texture_set[0]
    det = DualClipDetector.load(profile_dir)
    th = det.threshold_
    with _client(profile_dir) as c:
        for i in (0, len(images) - 1):
            raw = c.post("/v1/score", content=_png(images[i]), headers={"content-type": "image/png"})
            part = c.post("/v1/score", files={"image": ("tile.png", _png(images[i]), "image/png")})
            assert raw.status_code == part.status_code == 200
            for r in (raw.json(), part.json()):
                assert r["score"] == reference_scores[i]
                assert r["verdict"] == th.verdict(reference_scores[i])
                assert r["threshold"] == th.value
                assert r["size"] == list(images[i].size)
            assert part.json()["filename"] == "tile.png"
        info = c.get("/v1/info").json()
    assert info["weights_fingerprint"] == det.profile_.meta["weights_fingerprint"]
    assert info["threshold"]["value"] == th.value
    assert info["batching"]["items"] == 4
    assert info["service"]["api_key"] is None
    # settings left to the backbone's defaults (as in a profile saved before fit recorded them): shown resolved
    resolved = {"image_size": 128, "distance": "hybrid", "neighbourhood": [3]}  # a profile bank's default
    assert {k: info["config"][k] for k in resolved} == resolved
    det.config = dataclasses.replace(det.config, image_size=None, distance=None, neighbourhood=None)
    with TestClient(create_app(det, ServeSettings())) as c:
        assert {k: c.get("/v1/info").json()["config"][k] for k in resolved} == resolved


def test_concurrent_requests_share_batches_and_keep_their_own_scores(profile_dir, texture_set, reference_scores):
    images = texture_set[0]
    bodies = [_png(img) for img in images]
    with _client(profile_dir, batch_size=4, max_wait_ms=300) as c:

        def post(i):
            return c.post("/v1/score", content=bodies[i], headers={"content-type": "image/png"}).json()["score"]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(post, range(len(images))))
        stats = c.get("/v1/info").json()["batching"]
    assert got == reference_scores  # batched with others, each answer is the image's own score
    assert stats["items"] == len(images)
    assert stats["largest"] > 1 and stats["largest"] <= 4
    assert stats["batches"] < len(images)


def test_profile_heat_maps_agree_across_predict_report_and_service(profile_dir, texture_set, tmp_path):
    """In profile mode the CLI's heat-map file, the report's view of it and the service's answer are the same
    picture on the same fixed scale: a typical normal score is the coolest colour, the threshold sits at
    THRESHOLD_POSITION of the colour map, so red means at or above it."""
    from dualclip.cli.predict import run_predict

    img = texture_set[0][-1]
    folder = tmp_path / "in"
    folder.mkdir()
    img.save(folder / "x.png")
    det = DualClipDetector.load(profile_dir, progress=False)
    scale = profile_scale(det.profile_)
    normal = np.asarray(det.profile_.normal_scores)
    assert scale.vmin == pytest.approx(float(np.median(normal)))
    assert scale.position(det.threshold_.value) == pytest.approx(THRESHOLD_POSITION)
    at, below = colorize(np.array([[det.threshold_.value, scale.vmin + 0.8 * (scale.vmax - scale.vmin)]]), scale)[0]
    assert at[0] == 255 and at[1] <= 60 and at[2] == 0  # red from the threshold up
    assert below[0] == 255 and below[1] >= 100  # orange just below it
    _, doc = run_predict([str(folder)], tmp_path / "out", det.config, detector=det, warn=lambda m: None)
    row = doc["predictions"][0]
    cli_png = Image.open(tmp_path / "out" / row["heatmap"])
    assert cli_png.size == img.size  # pixel-aligned: no colour bar baked in
    with _client(profile_dir) as c:
        r = c.post("/v1/score?heatmap=true", content=_png(img)).json()
        info = c.get("/v1/info").json()
    got = Image.open(io.BytesIO(base64.b64decode(r["heatmap_png_base64"])))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(cli_png))
    expected = np.asarray(overlay(img, det.predict([img])[0].anomaly_map, scale))
    np.testing.assert_array_equal(np.asarray(cli_png), expected)
    assert info["heatmap_scale"] == doc["heatmap_scale"] == scale.to_dict()
    html = (tmp_path / "out" / "report.html").read_text()
    meta = json.loads(html.split('<script type="application/json" id="meta">', 1)[1].split("</script>", 1)[0])
    assert meta["heatmap_scale"] == info["heatmap_scale"]
    assert f'<a href="{row["heatmap"]}" title="full-size heat map"' in html  # the larger view shows that file
    thumb = html.split('alt="image">', 1)[1].split('<img src="data:image/jpeg;base64,', 1)[1].split('"', 1)[0]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumb))).convert("RGB"), dtype=np.float64)
    small = cli_png.convert("RGB").copy()
    small.thumbnail((256, 256))
    assert shown.shape == np.asarray(small).shape
    blocks = lambda a: a.reshape(12, 8, 12, 8, 3).mean(axis=(1, 3))  # noqa: E731 - JPEG keeps 8x8 block means
    diff = np.abs(blocks(shown) - blocks(np.asarray(small, dtype=np.float64)))
    assert diff.mean() < 1.5 and diff.max() < 8.0


def test_bad_requests_get_4xx_with_the_loaders_message(profile_dir, tmp_path):
    with _client(profile_dir, max_body_bytes=4096, max_pixels=100 * 100) as c:
        r = c.post("/v1/score", content=b"")
        assert (r.status_code, r.json()["detail"]) == (422, "empty file (0 bytes)")
        r = c.post("/v1/score", content=b"GIF89a not really")
        assert r.status_code == 422 and "not an image file" in r.json()["detail"]
        big = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        assert len(big) > 4096
        r = c.post("/v1/score", content=big)
        assert r.status_code == 413 and "4096" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit holds on the streamed body too
            yield big[:3000]
            yield big[3000:]

        assert c.post("/v1/score", content=chunks()).status_code == 413
        wide = _png(Image.new("RGB", (200, 60)))
        r = c.post("/v1/score", content=wide)
        assert r.status_code == 422 and "limit of 10000" in r.json()["detail"]
        r = c.post("/v1/score", files={"other": ("a.txt", b"x", "text/plain"), "b": ("b.txt", b"y", "text/plain")})
        assert r.status_code == 400 and "'image'" in r.json()["detail"]
        stats = c.get("/v1/info").json()["batching"]
    assert stats["items"] == 0  # nothing bad reached the model


def test_api_key_is_required_when_set_and_off_loopback():
    with pytest.raises(ValueError, match="API key"):
        ServeSettings(host="0.0.0.0")
    assert ServeSettings(host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert "k" not in repr(ServeSettings(api_key="k"))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert ServeSettings(host=host).api_key is None


def test_openapi_documents_the_upload_and_a_typed_answer(profile_dir):
    with _client(profile_dir) as c:
        api = c.get("/openapi.json").json()
    op = api["paths"]["/v1/score"]["post"]
    body = op["requestBody"]
    assert body["required"] is True
    assert body["content"]["image/*"]["schema"] == {"type": "string", "format": "binary"}
    form = body["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"] == {"type": "string", "format": "binary"} and form["required"] == ["image"]
    assert [p["name"] for p in op["parameters"]] == ["heatmap", "filename"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ScoreResponse"}
    score = api["components"]["schemas"]["ScoreResponse"]
    assert {"score", "verdict", "threshold", "size", "latency_ms"} <= set(score["required"])
    assert score["properties"]["score"]["type"] == "number"
    assert {"enum": ["defective", "ok", "unusable"], "type": "string"} in score["properties"]["verdict"]["anyOf"]
    for code in ("400", "413", "422"):
        assert op["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    info = api["paths"]["/v1/info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert info == {"$ref": "#/components/schemas/InfoResponse"}


def test_docs_page_works_offline(profile_dir):
    import re

    with _client(profile_dir, api_key="k") as c:  # the documentation needs no key (it holds no data)
        page = c.get("/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", page.text, re.I), "the page names another host"
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(assets) == [
            "/docs/assets/favicon-32x32.png",
            "/docs/assets/swagger-ui-bundle.js",
            "/docs/assets/swagger-ui.css",
        ]
        for a in assets:
            r = c.get(a)
            assert r.status_code == 200 and len(r.content) > 500, a
        assert "url: '/openapi.json'" in page.text and c.get("/openapi.json").status_code == 200
        assert '"validatorUrl": null' in page.text


def test_api_key_guards_every_endpoint_but_health_and_the_docs(profile_dir, texture_set):
    with _client(profile_dir, api_key="s3cret") as c:
        assert c.get("/healthz").status_code == 200
        schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
        assert schemes["APIKeyHeader"] == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "required when the service has a key",
        }
        assert c.get("/v1/info").status_code == 401
        assert c.post("/v1/score", content=_png(texture_set[0][0])).status_code == 401
        assert c.get("/v1/info", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/info", headers={"X-API-Key": "s3cret"}).json()["service"]["api_key"] == "set"


def test_micro_batcher_closes_batches_by_size_and_passes_errors_on():
    import asyncio

    calls = []

    def score(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("model failed")
        return [x.upper() for x in items]

    async def main():
        b = MicroBatcher(score, max_batch=3, max_wait_ms=200)
        await b.start()
        ok = await asyncio.gather(*(b.submit(x) for x in "abcde"))
        res = await asyncio.gather(b.submit("bad"), b.submit("x"), return_exceptions=True)
        await b.stop()
        return ok, res, b.stats

    ok, res, stats = asyncio.run(main())
    assert ok == list("ABCDE")
    assert [len(c) for c in calls[:2]] == [3, 2]
    assert all(isinstance(r, RuntimeError) for r in res)
    assert stats.failed_batches == 1 and stats.items == 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serve_answers_a_real_http_client(profile_dir, texture_set, reference_scores, tmp_path):
    port = _free_port()
    key = tmp_path / "key"
    key.write_text("line-7\n")
    env = dict(os.environ, DUALCLIP_API_KEY="")
    cmd = [sys.executable, "-m", "dualclip", "serve", "--profile", str(profile_dir), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--api-key-file", str(key), "--device", "cpu"], env=env, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
        req = urllib.request.Request(
            base + "/v1/score",
            data=_png(texture_set[0][2]),
            headers={"content-type": "image/png", "X-API-Key": "line-7"},
        )
        body = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert body["score"] == reference_scores[2]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(base + "/v1/info"), timeout=10)
        assert err.value.code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_cli_serve_refuses_an_open_host_without_a_key(profile_dir):
    env = dict(os.environ, DUALCLIP_API_KEY="")
    cmd = [sys.executable, "-m", "dualclip", "serve", "--profile", str(profile_dir), "--host", "0.0.0.0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "can be reached from other machines" in r.stderr and "Traceback" not in r.stderr


def test_an_address_in_use_is_one_config_error_before_the_server_starts():
    import socket

    from fastapi import FastAPI

    from dualclip.errors import ConfigError
    from dualclip.serve import ServeSettings
    from dualclip.serve.app import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on host=127.0.0.1 port={port}: Address already in use"):
            serve(FastAPI(), ServeSettings(port=port))
