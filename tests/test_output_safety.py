"""Output safety and messages (docs/reliability.md, "Fault matrix", rows 16-25): forged markers, concurrent runs
and writers, symlinked and unreadable folders, tampered ONNX files, interrupted archive runs, destinations checked
before the work. One test per case, named by the behaviour that holds; each fails when that behaviour is removed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY
from dualclip import DetectorConfig, DualClipDetector
from dualclip.cli.main import app
from dualclip.cli.predict import UsageError, run_predict
from dualclip.data.images import OUTPUT_MARKER, expand_paths


@pytest.fixture
def det(tiny_backbone):
    return DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(d: Path, texture_set, n: int = 3) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(texture_set[0][:n]):
        img.save(d / f"{i:02d}.png")
    return d


# -- D1: a forged marker never makes --overwrite delete outside --out ----------------------------------------------
def test_forged_marker_listing_paths_outside_out_is_refused_and_never_deletes_them(tmp_path, folder, det, monkeypatch):
    inv = tmp_path / "inv"
    inv.mkdir()
    victim = inv / "x.png"
    victim.write_bytes(b"keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "y.png").write_bytes(b"keep")
    forged = {"../inv/x.png": None, str(victim): None, "link/y.png": elsewhere}  # '..', absolute, a symlink
    for i, (listed, link) in enumerate(forged.items()):
        out = tmp_path / f"mk{i}"
        out.mkdir()
        if link is not None:
            (out / "link").symlink_to(link, target_is_directory=True)
        (out / OUTPUT_MARKER).write_text(json.dumps({"tool": "dualclip", "files": [listed]}))
        with pytest.raises(UsageError, match=re.escape(f"lists {listed!r}, which lies outside the folder")) as err:
            run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
        assert "nothing is replaced" in str(err.value)
    assert victim.read_bytes() == b"keep" and (elsewhere / "y.png").read_bytes() == b"keep"

    # a marker forged while the run is scoring (after the check) still deletes nothing outside --out
    out = tmp_path / "race"
    run_predict([str(folder)], out, det.config, detector=det)
    real = det.predict

    def forging(*args, **kwargs):
        doc = json.loads((out / OUTPUT_MARKER).read_text())
        doc["files"] += ["../inv/x.png", str(victim)]
        (out / OUTPUT_MARKER).write_text(json.dumps(doc))
        return real(*args, **kwargs)

    monkeypatch.setattr(det, "predict", forging)
    run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
    assert victim.read_bytes() == b"keep"
    assert (out / "predictions.json").is_file()

    # an archive run's marker lists only what it wrote, never a file someone else put into its folder
    pytest.importorskip("pyarrow", reason="the ray extra is not installed")
    from dualclip.distributed import run_archive

    items = [(str(p), None) for p in sorted(folder.glob("*.png"))[:4]]
    config = DetectorConfig(backbone="effnet-lite0", image_size=64, device="cpu", progress=False).to_dict()
    archive = tmp_path / "archive"
    run_archive(items, archive, spec_config=config, engine="inline", block_size=2, progress=False)
    (archive / "notes.txt").write_text("mine")
    run_archive(items, archive, spec_config=config, engine="inline", block_size=2, progress=False)  # resumed
    assert "notes.txt" not in json.loads((archive / OUTPUT_MARKER).read_text())["files"]
    with pytest.raises(UsageError, match=r"1 file\(s\) dualclip did not write \(notes.txt\)"):
        run_predict([str(folder)], archive, det.config, detector=det, overwrite=True)
    assert (archive / "notes.txt").read_text() == "mine"


# -- D4: request bodies held at once are bounded ---------------------------------------------------------------------
@pytest.fixture
def fitted(tiny_backbone, texture_set):
    """A detector fitted on the texture set's normal images (the service's profile)."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    images, _, labels = texture_set
    det = DualClipDetector(DetectorConfig(pretrained=None, progress=False), backbone=tiny_backbone)
    return det.fit([img for img, y in zip(images, labels, strict=True) if not y])


def test_concurrent_bodies_over_the_byte_budget_get_503_and_the_budget_returns_to_zero(fitted):
    import httpx

    from dualclip.serve import ServeSettings, create_app

    app_ = create_app(fitted, ServeSettings(max_body_bytes=1000, max_pending_bytes=2500))
    budget = app_.state.budget

    async def main() -> None:
        gate = asyncio.Event()

        async def slow(n: int):  # a client sending its body slowly: its bytes are held meanwhile
            yield b"x" * 10
            await gate.wait()
            yield b"x" * (n - 10)

        async def chunked(n: int):  # no Content-Length: counted as it streams in
            for _ in range(n // 100):
                yield b"z" * 100

        transport = httpx.ASGITransport(app=app_)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as c:
            post = c.post
            held = [
                asyncio.create_task(post("/v1/score", content=slow(1000), headers={"content-length": "1000"}))
                for _ in range(2)
            ]
            for _ in range(500):
                if budget.held == 2000:
                    break
                await asyncio.sleep(0.01)
            assert budget.held == 2000
            r = await post("/v1/score", content=b"y" * 1000)  # 2000 + 1000 > 2500: refused before it is read
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["detail"].startswith("busy: 2000 bytes of request bodies are held (limit 2500)")
            r = await post("/v1/score", content=chunked(800))  # refused once it passes the budget
            assert r.status_code == 503
            assert budget.held == 2000  # the refused requests hold nothing
            gate.set()
            done = await asyncio.gather(*held)
            assert [d.status_code for d in done] == [422, 422]  # admitted (and then not an image)
            info = (await c.get("/v1/info")).json()["memory"]
        assert budget.held == 0
        assert info == {"held_bytes": 0, "limit_bytes": 2500, "refused": 2}

    asyncio.run(main())
    with pytest.raises(ValueError, match="max_pending_bytes .* must be at least max_body_bytes"):
        ServeSettings(max_body_bytes=1000, max_pending_bytes=999)


# -- D5: a file written into --out during a run stays there (or the run says where it went) --------------------------
def test_a_file_written_into_out_during_a_run_is_kept_in_place_or_named(tmp_path, folder, det, monkeypatch):
    out = tmp_path / "out"
    run_predict([str(folder)], out, det.config, detector=det)  # no threshold: no masks/
    first_heatmap = json.loads((out / "predictions.json").read_text())["predictions"][0]["heatmap"]
    taken = Path("masks") / Path(first_heatmap).name  # a name the next run (with a threshold) writes
    real = det.predict

    def writes_into_out(*args, **kwargs):
        (out / "notes.txt").write_text("mine")
        (out / "heatmaps" / "extra.txt").write_text("also mine")
        (out / "masks").mkdir()
        (out / taken).write_text("mine too")
        return real(*args, **kwargs)

    monkeypatch.setattr(det, "predict", writes_into_out)
    messages: list[str] = []
    run_predict([str(folder)], out, det.config, detector=det, overwrite=True, threshold=0.5, warn=messages.append)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "heatmaps" / "extra.txt").read_text() == "also mine"
    assert (out / taken).read_bytes().startswith(b"\x89PNG")  # the new run's mask
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.kept-")]
    assert len(kept) == 1 and (kept[0] / taken).read_text() == "mine too"
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]  # nothing left hidden
    said = "\n".join(messages)
    assert "2 file(s) written into" in said and "kept in place (heatmaps/extra.txt, notes.txt)" in said
    assert f"moved to {kept[0]} ({taken})" in said


# -- D6: one run at a time per output folder -------------------------------------------------------------------------
def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, folder, tiny_backbone):
    cfg = DetectorConfig(pretrained=None, progress=False)
    first, second = DualClipDetector(cfg, backbone=tiny_backbone), DualClipDetector(cfg, backbone=tiny_backbone)
    out = tmp_path / "new"
    started, release = threading.Event(), threading.Event()
    real = first.predict

    def slow(*args, **kwargs):
        started.set()
        release.wait(60)
        return real(*args, **kwargs)

    first.predict = slow
    result = {}
    t = threading.Thread(target=lambda: result.update(code=run_predict([str(folder)], out, cfg, detector=first)[0]))
    t.start()
    try:
        assert started.wait(60)
        with pytest.raises(UsageError, match=f"another dualclip run is writing --out {out}"):
            run_predict([str(folder)], out, cfg, detector=second, threshold=0.5)
    finally:
        release.set()
        t.join(120)
    assert result["code"] == 0
    assert json.loads((out / "predictions.json").read_text())["threshold"]["value"] is None  # the first run's
    run_predict([str(folder)], out, cfg, detector=second, threshold=0.5, overwrite=True)  # free again afterwards
    skipped = expand_paths([str(tmp_path)], exclude=[out]).skipped  # the lock file is never an input
    assert not [p for p, _ in skipped if p.endswith(".lock")]


# -- D7: demo never replaces a predict output without --overwrite ----------------------------------------------------
def test_demo_does_not_replace_a_predict_output_without_overwrite(tmp_path, folder, det, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    run_predict([str(folder)], out, det.config, detector=det)
    before = _tree(out)
    r = CliRunner().invoke(app, ["demo", "-o", str(out), "-q"])
    assert r.exit_code == 2 and "pass --overwrite to replace it" in r.output, r.output
    assert _tree(out) == before
    r = CliRunner().invoke(app, ["demo", "-o", str(out), "-q", "--overwrite"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["demo", "-o", str(out), "-q"])  # its own earlier output: replaced
    assert r.exit_code == 0, r.output
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "demo"


# -- D9: images in symlinked sub-folders are read, loops listed ------------------------------------------------------
def test_images_in_symlinked_sub_folders_are_scored_and_loops_are_listed(tmp_path, texture_set, det):
    d = _images(tmp_path / "in", texture_set, 2)
    other = _images(tmp_path / "other", texture_set, 1)
    (d / "linked").symlink_to(other, target_is_directory=True)
    (d / "again").symlink_to(other, target_is_directory=True)
    (d / "loop").symlink_to(d, target_is_directory=True)
    exp = expand_paths([str(d)])
    assert [str(p.relative_to(d)) for p in exp.files] == ["00.png", "01.png", "again/00.png"]
    reasons = {str(Path(p).relative_to(d)): r for p, r in exp.skipped}
    assert reasons == {
        "linked": f"a link to a folder already read ({d / 'again'})",
        "loop": f"a link to a folder already read ({d})",
    }
    _, doc = run_predict([str(d)], tmp_path / "o", det.config, detector=det)
    assert len([p for p in doc["predictions"] if p["score"] is not None]) == 3


# -- D11: an unreadable sub-folder is skipped and listed -------------------------------------------------------------
def test_an_unreadable_sub_folder_is_skipped_and_listed(tmp_path, texture_set, det, monkeypatch):
    d = _images(tmp_path / "in", texture_set, 2)
    locked = d / "locked_sub"
    _images(locked, texture_set, 1)
    real_stat, real_scandir = os.stat, os.scandir

    def denied(path) -> bool:  # what a user who is not root sees in a folder of mode 000
        return Path(os.fsdecode(path)).parent == locked

    def stat(path, *args, **kwargs):
        if isinstance(path, str | os.PathLike) and denied(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    def scandir(path="."):
        if Path(os.fsdecode(path)) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "scandir", scandir)
    code, doc = run_predict([str(d)], tmp_path / "o", det.config, detector=det)
    assert code == 0 and len(doc["predictions"]) == 2
    assert doc["skipped"] == [{"path": str(locked), "reason": "folder cannot be read: Permission denied"}]


# -- D12: the ONNX file's weights and graph are checked, not only its metadata ---------------------------------------
def test_onnx_file_with_changed_weights_or_another_graph_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the convert extra (onnx, onnxruntime) is not installed")
    pytest.importorskip("onnxruntime", reason="the convert extra (onnx, onnxruntime) is not installed")
    from dualclip.backbone import build_clip_backbone
    from dualclip.export import OnnxBackbone, export_onnx

    torch.manual_seed(0)
    a = build_clip_backbone(TINY, pretrained=None, image_size=None)
    path = export_onnx(a, tmp_path / "a.onnx")
    OnnxBackbone(a, path)  # the file as exported loads

    zeroed = onnx.load(str(path))
    weight = max((t for t in zeroed.graph.initializer if t.raw_data), key=lambda t: len(t.raw_data))
    weight.raw_data = bytes(len(weight.raw_data))
    onnx.save(zeroed, str(tmp_path / "zeroed.onnx"))
    with pytest.raises(ValueError, match="its graph or weights differ from the ones exported") as err:
        OnnxBackbone(a, tmp_path / "zeroed.onnx")
    assert "graph_sha256" in str(err.value)

    b = build_clip_backbone(TINY, pretrained=None, image_size=None)
    with torch.no_grad():
        b.model.visual.proj.add_(1e-3)  # other weights: another graph
    other = onnx.load(str(export_onnx(b, tmp_path / "b.onnx")))
    del other.metadata_props[:]
    other.metadata_props.extend(onnx.load(str(path)).metadata_props)  # under a's metadata
    onnx.save(other, str(tmp_path / "swapped.onnx"))
    with pytest.raises(ValueError, match="its graph or weights differ from the ones exported"):
        OnnxBackbone(a, tmp_path / "swapped.onnx")


# -- D19: an interrupted archive run says what it kept; bad pool settings write nothing -------------------------------
def test_interrupted_archive_run_says_what_was_kept_and_bad_pool_settings_write_nothing(
    tmp_path, texture_set, monkeypatch
):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import dualclip.distributed.engines as E
    from dualclip.distributed.scorer import BlockScorer

    d = _images(tmp_path / "in", texture_set, 6)
    args = ["predict", "--engine", "ray", str(d), "--backbone", "effnet-lite0", "--image-size", "64"]
    args += ["--device", "cpu", "--block-size", "3", "-q"]

    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "none"), "--num-actors", "0"])
    assert r.exit_code == 2 and "num_actors must be >= 1, got 0" in r.output, r.output
    assert not (tmp_path / "none").exists()  # nothing written

    def interrupted_ray(blocks, spec, **kwargs):  # Ctrl-C after the first block
        def stream():
            scorer = BlockScorer(spec)
            yield scorer(blocks[0])
            raise KeyboardInterrupt

        return stream()

    monkeypatch.setattr(E, "run_ray", interrupted_ray)
    out = tmp_path / "o"
    r = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert r.exit_code == 130
    assert r.output.strip().splitlines()[-1] == (
        f"interrupted (SIGINT): 1 of 2 block(s) finished and kept in {out / 'blocks'}; no predictions merged yet: "
        "run the same command again to resume"
    )
    assert len(list((out / "blocks").glob("*.json"))) == 1


# -- D20: export and fit check where they write before the work ------------------------------------------------------
def test_export_and_fit_check_their_destination_before_the_work(tmp_path, texture_set, monkeypatch):
    import dualclip.export as X

    calls = []
    monkeypatch.setattr(X, "export_onnx", lambda *a, **k: calls.append("export"))
    monkeypatch.setattr(DualClipDetector, "fit", lambda *a, **k: calls.append("fit"))
    base = ["--backbone", "effnet-lite0", "--image-size", "64"]
    missing = tmp_path / "missing"
    r = CliRunner().invoke(app, ["export", "-o", str(missing / "enc.onnx"), *base])
    assert r.exit_code == 2 and r.output.strip() == f"error: the folder of --out ({missing}) does not exist"
    real_access = os.access
    read_only = tmp_path / "ro"
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != read_only and real_access(p, mode, **k))
    r = CliRunner().invoke(app, ["export", "-o", str(read_only / "enc.onnx"), *base])
    assert r.exit_code == 2 and r.output.strip() == f"error: cannot write in {read_only} (permission denied)"

    normal = _images(tmp_path / "normal", texture_set, 3)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    r = CliRunner().invoke(app, ["fit", str(normal), "-o", str(notes), "--overwrite", *base, "-q"])
    assert r.exit_code == 2 and f"{notes} is not a profile folder: refusing to replace it" in r.output, r.output
    r = CliRunner().invoke(app, ["fit", str(normal), "-o", str(read_only / "p"), *base, "-q"])
    assert r.exit_code == 2 and f"cannot write in {read_only} (permission denied)" in r.output, r.output
    assert calls == []  # refused before any export or fit
    assert (notes / "a.txt").read_text() == "mine"


@pytest.fixture
def eval_cat(tmp_path, texture_set, monkeypatch):
    """One mvtec category on disk, scored by a stand-in (the folder rules do not depend on the scores)."""
    import dualclip.data.datasets as D
    import dualclip.evaluation as E
    from conftest import write_mvtec_tree

    write_mvtec_tree(tmp_path / "mv", texture_set)
    monkeypatch.setattr(E, "evaluate_category", lambda *a, **k: {"image_auroc": 0.5, "warnings": []})
    return D.mvtec(tmp_path / "mv")


def _run_eval(cats, out):
    from dualclip.evaluation import run_eval

    return run_eval(DetectorConfig(pretrained=None, progress=False), cats, [0], out, warn=lambda m: None)


def test_eval_never_replaces_a_file_it_did_not_write(tmp_path, eval_cat):
    from dualclip.output import OutputFolderError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my own notes")
    with pytest.raises(OutputFolderError, match="holds no results of dualclip eval"):
        _run_eval(eval_cat, mine)
    assert (mine / "results.json").read_text() == "my own notes" and len(list(mine.iterdir())) == 1
    # a predict output is not an eval folder either
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / OUTPUT_MARKER).write_text(json.dumps({"command": "predict", "files": ["predictions.csv"]}))
    (pred / "predictions.csv").write_text("x")
    with pytest.raises(OutputFolderError, match="output of dualclip predict"):
        _run_eval(eval_cat, pred)
    # an eval folder: its own files are rewritten, a file of the same name it did not list is refused
    out = tmp_path / "out"
    _run_eval(eval_cat, out)
    listed = json.loads((out / OUTPUT_MARKER).read_text())
    assert listed["command"] == "eval"
    assert listed["files"] == ["categories/bottle.json", "results.csv", "results.json", "results.md"]
    (out / "notes.txt").write_text("kept")
    _run_eval(eval_cat, out)  # resumes; a file it does not write is left alone
    assert (out / "notes.txt").read_text() == "kept"
    (out / "categories" / "other.json").write_text("not ours")
    other = [dataclasses.replace(eval_cat[0], name="other")]
    with pytest.raises(OutputFolderError, match="holds categories/other.json, which dualclip eval did not write"):
        _run_eval(other, out)
    assert (out / "categories" / "other.json").read_text() == "not ours"


def test_eval_writes_nothing_through_a_symbolic_link_nor_outside_its_folder(tmp_path, eval_cat):
    from dualclip.output import OutputFolderError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    with pytest.raises(OutputFolderError, match="is a symbolic link"):
        _run_eval(eval_cat, link)
    out = tmp_path / "out"
    _run_eval(eval_cat, out)
    (out / "categories" / "bottle.json").unlink()
    (out / "categories").rmdir()
    (out / "categories").symlink_to(elsewhere)
    with pytest.raises(OutputFolderError, match="symbolic link"):
        _run_eval(eval_cat, out)
    marker = json.loads((out / OUTPUT_MARKER).read_text())  # a marker that lists no category
    (out / OUTPUT_MARKER).write_text(json.dumps({**marker, "files": ["results.csv", "results.json", "results.md"]}))
    with pytest.raises(OutputFolderError, match="categories/bottle.json would be written through a symbolic link"):
        _run_eval(eval_cat, out)
    assert list(elsewhere.iterdir()) == []
    for bad in ("../../escaped", "a/b", "..", ""):
        with pytest.raises(OutputFolderError, match="is not a plain file name"):
            _run_eval([dataclasses.replace(eval_cat[0], name=bad)], tmp_path / "new")
    assert not (tmp_path / "new").exists() and not (tmp_path / "escaped.json").exists()


def test_eval_cli_name_escaping_out_is_a_usage_error_and_writes_nothing(tmp_path, texture_set):
    d = _images(tmp_path / "good", texture_set)
    r = CliRunner().invoke(
        app, ["eval", "--dataset", "folder", "--name", "../../x", "--normal", str(d), "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "is not a plain file name" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_an_eval_folder_without_a_marker_is_refused_whatever_it_holds(tmp_path, eval_cat):
    """Results files of one's own that look like an eval's (a results.json with config and categories beside
    one's notes in results.md) are never taken for an earlier eval's."""
    from dualclip.output import OutputFolderError

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"config": {}, "categories": {}}))
    (out / "results.md").write_text("MY IMPORTANT NOTES")
    with pytest.raises(OutputFolderError, match="holds no results of dualclip eval"):
        _run_eval(eval_cat, out)
    assert (out / "results.md").read_text() == "MY IMPORTANT NOTES"


def test_a_stalled_upload_gets_408_and_gives_its_declared_bytes_back(fitted):
    import httpx

    from dualclip.serve import ServeSettings, create_app

    app_ = create_app(fitted, ServeSettings(max_body_bytes=1000, max_pending_bytes=2500, body_timeout_s=0.2))
    budget = app_.state.budget

    async def main() -> tuple:
        never = asyncio.Event()

        async def stalled():  # declares 1000 bytes, sends 10, then nothing
            yield b"x" * 10
            await never.wait()

        transport = httpx.ASGITransport(app=app_)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as c:
            r = await asyncio.wait_for(
                c.post("/v1/score", content=stalled(), headers={"content-length": "1000"}), timeout=20
            )
            info = (await c.get("/v1/info")).json()["memory"]
        return r, info

    r, info = asyncio.run(main())
    assert r.status_code == 408 and r.headers["connection"] == "close"
    assert re.fullmatch(
        r"request body stalled: 10 bytes in [\d.]+ s \(a body may pause at most 0.2 s, and after its first 0.2 s "
        r"must come at 65536 bytes/s at least\)",
        r.json()["detail"],
    ), r.json()["detail"]
    assert budget.held == 0 and info["held_bytes"] == 0

    async def drip() -> tuple:  # a byte every 0.1 s never stalls 0.2 s, and never reaches 50 bytes/s
        app_.state.budget.refused = 0

        async def slow():
            for _ in range(200):
                yield b"x"
                await asyncio.sleep(0.1)

        transport = httpx.ASGITransport(app=app_)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as c:
            return await asyncio.wait_for(
                c.post("/v1/score", content=slow(), headers={"content-length": "1000"}), timeout=20
            )

    app_ = create_app(
        fitted,
        ServeSettings(max_body_bytes=1000, max_pending_bytes=2500, body_timeout_s=0.2, min_body_bytes_per_s=50),
    )
    budget = app_.state.budget
    r = asyncio.run(drip())
    assert r.status_code == 408 and budget.held == 0
    got = re.fullmatch(
        r"request body stalled: (\d+) bytes in ([\d.]+) s \(.* must come at 50 bytes/s at least\)", r.json()["detail"]
    )
    assert got and int(got[1]) < 50 * (float(got[2]) - 0.2) + 2 and float(got[2]) < 5, r.json()["detail"]  # cut early
    for bad in (0, -1, float("nan"), 3601):
        with pytest.raises(ValueError, match="body_timeout_s must lie in"):
            ServeSettings(body_timeout_s=bad)


def test_serve_flags_that_cannot_be_used_are_usage_errors(tmp_path):
    key_dir = tmp_path / "keydir"
    key_dir.mkdir()
    binary = tmp_path / "key.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    cases = [
        (["--api-key-file", str(tmp_path / "missing")], "--api-key-file"),
        (["--api-key-file", str(key_dir)], "cannot be read"),
        (["--api-key-file", str(binary)], "cannot be read: not UTF-8 text"),
        (["--max-body-mb", "nan"], "--max-body-mb must be a positive number of MiB up to 1048576, got nan"),
        (["--max-pending-mb", "inf"], "--max-pending-mb must be a positive number of MiB up to 1048576, got inf"),
        (["--max-body-mb", "1e300"], "--max-body-mb must be a positive number of MiB up to 1048576, got 1e+300"),
        (["--max-pending-mb", "1"], "--max-pending-mb 1 must be at least --max-body-mb 32"),
        (["--max-wait-ms", "nan"], "--max-wait-ms nan must lie in [0, 10000]"),
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--port", "70000"], "--port 70000 must lie in 1..65535"),
        (["--body-timeout", "0"], "--body-timeout must lie in (0, 3600] seconds, got 0.0"),
        (["--min-body-rate", "nan"], "--min-body-rate must be a positive number of KiB/s, got nan"),
    ]
    for name, text in (("two_lines", "abc\ndef"), ("accents", "clé-secrète"), ("spaced", "a key")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        cases.append((["--api-key-file", str(tmp_path / name)], "--api-key-file FILE must be printable ASCII"))
    for args, said in cases:
        r = CliRunner().invoke(app, ["serve", "--profile", str(tmp_path / "p"), *args])
        assert r.exit_code == 2 and said in r.output, (args, r.output)


def test_an_empty_out_one_made_keeps_its_mode_and_group(tmp_path, folder, det):
    """Filled in one exchange (an interrupt leaves it empty or complete), by a staging folder that was given its
    mode and group before anything was written."""
    out = tmp_path / "shared_out"
    out.mkdir()
    os.chmod(out, 0o2750)  # setgid, group-readable: the folder's own settings
    before = out.stat()
    run_predict([str(folder)], out, det.config, detector=det)
    after = out.stat()
    assert (after.st_mode, after.st_gid) == (before.st_mode, before.st_gid)
    assert (out / OUTPUT_MARKER).is_file() and (out / "predictions.csv").is_file()


def test_markers_and_saved_results_nested_too_deeply_are_treated_as_unreadable(tmp_path, eval_cat, folder, det):
    from dualclip.output import OutputFolderError

    deep = "[" * 100_000 + "]" * 100_000
    out = tmp_path / "out"
    _run_eval(eval_cat, out)
    (out / "categories" / "bottle.json").write_text(deep)  # a saved result that cannot be read: recomputed
    assert _run_eval(eval_cat, out)["categories"]["bottle"]["image_auroc"] == 0.5
    (out / OUTPUT_MARKER).write_text(deep)
    with pytest.raises(OutputFolderError, match="cannot be read or lists no files"):
        _run_eval(eval_cat, out)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "x.txt").write_text("mine")
    (pred / OUTPUT_MARKER).write_text(deep)
    with pytest.raises(UsageError, match="unreadable or invalid"):
        run_predict([str(folder)], pred, det.config, detector=det, overwrite=True)


def test_replacing_an_output_keeps_its_folders_mode_and_group(tmp_path, folder, det):
    """--overwrite of a private (0o700) or setgid folder: the new outputs keep its mode, and files made in it
    take its group (the setgid bit is set before anything is written)."""
    import grp

    out = tmp_path / "private"
    run_predict([str(folder)], out, det.config, detector=det)
    groups = [g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()]
    gid = groups[0] if groups and os.geteuid() == 0 else os.getgid()
    os.chown(out, -1, gid)
    os.chmod(out, 0o2700)
    run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
    st = out.stat()
    assert (st.st_mode & 0o7777, st.st_gid) == (0o2700, gid)
    assert {p.stat().st_gid for p in out.rglob("*")} == {gid}  # files and sub-folders too
    fitted = tmp_path / "p.dualclip"
    det.fit([str(p) for p in sorted(folder.glob("*.png"))[:3]]).save(fitted)
    os.chmod(fitted, 0o700)
    det.save(fitted, overwrite=True)
    assert fitted.stat().st_mode & 0o7777 == 0o700


def test_out_that_is_or_holds_the_working_folder_is_refused_before_anything_is_written(
    tmp_path, folder, det, monkeypatch
):
    out = tmp_path / "here"
    (out / "sub").mkdir(parents=True)
    for cwd, given in ((out, "."), (out, ""), (out / "sub", "..")):
        monkeypatch.chdir(cwd)
        with pytest.raises(UsageError, match="is or holds the folder you are in"):
            run_predict([str(folder)], Path(given), det.config, detector=det)
    assert [p.name for p in out.iterdir()] == ["sub"] and not list(tmp_path.glob(".*dualclip-*"))


def test_predict_never_replaces_an_eval_folder_even_with_overwrite(tmp_path, eval_cat, folder, det):
    out = tmp_path / "ev"
    _run_eval(eval_cat, out)
    before = _tree(out)
    with pytest.raises(UsageError, match="holds the output of dualclip eval; predict never replaces it"):
        run_predict([str(folder)], out, det.config, detector=det, overwrite=True)
    assert _tree(out) == before


def test_eval_refuses_a_marker_or_a_result_that_is_no_regular_file_and_recomputes_damaged_results(tmp_path, eval_cat):
    from dualclip.output import OutputFolderError

    fifo = tmp_path / "fifo"
    fifo.mkdir()
    (fifo / "x").write_text("mine")
    os.mkfifo(fifo / OUTPUT_MARKER)  # reading it would wait forever
    with pytest.raises(OutputFolderError, match=r"\.dualclip-output\.json is not a regular file"):
        _run_eval(eval_cat, fifo)
    out = tmp_path / "out"
    first = _run_eval(eval_cat, out)["categories"]["bottle"]
    (out / "results.md").unlink()
    (out / "results.md").mkdir()
    with pytest.raises(OutputFolderError, match="results.md is not a regular file"):
        _run_eval(eval_cat, out)
    (out / "results.md").rmdir()
    saved = out / "categories" / "bottle.json"
    for damaged in (
        [1, 2],
        {"fingerprint": first["fingerprint"]},
        {**first, "image_auroc": "abc"},
        {**first, "warnings": 5},
    ):
        saved.write_text(json.dumps(damaged))
        assert _run_eval(eval_cat, out)["categories"]["bottle"] == first  # recomputed, never a crash
        assert json.loads(saved.read_text()) == first


def test_eval_writes_file_names_that_are_not_utf8_as_valid_json(tmp_path, eval_cat):
    cat = dataclasses.replace(eval_cat[0], name="b\udcffd")
    out = tmp_path / "out"
    res = _run_eval([cat], out)
    doc = json.loads((out / "categories" / "b\udcffd.json").read_bytes().decode("utf-8"))
    assert doc == res["categories"]["b\udcffd"]
    assert "b\\udcffd" in (out / "results.md").read_text(encoding="utf-8")
