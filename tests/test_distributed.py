"""Archive runs in blocks: the plan, the manifest, the block scorer against the library, the Ray engine
against the in-process engine, a worker killed mid-block, and resumption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dualclip import DetectorConfig, DualClipDetector
from dualclip.distributed import ManifestError, plan_blocks, read_manifest, run_archive
from dualclip.distributed.engines import check_resources
from dualclip.distributed.run import ArchiveFolderError

CONFIG = DetectorConfig(backbone="effnet-lite0", image_size=64, device="cpu", progress=False).to_dict()
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def archive(tmp_path_factory, texture_set):
    """18 images of two classes on disk, and their (path, class) items."""
    from dualclip.data.synthetic import make_texture_set

    d = tmp_path_factory.mktemp("archive")
    images = list(texture_set[0]) + list(make_texture_set(6, 2, 96, seed=1)[0])
    items = []
    for i, img in enumerate(images):
        p = d / f"{i:03d}.png"
        img.save(p)
        items.append((str(p), "tile" if i % 3 else "plate"))
    return items


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def test_plan_groups_by_class_in_seeded_near_equal_blocks():
    items = [(f"{i}.png", "a" if i < 9 else "b") for i in range(13)] + [("3.png", "a")]
    blocks = plan_blocks(items, block_size=4, seed=0)
    assert [b.id for b in blocks] == ["000-a-00000", "000-a-00001", "000-a-00002", "001-b-00000"]
    assert [len(b.paths) for b in blocks] == [3, 3, 3, 4]  # 9 split 3/3/3, never 4/4/1
    assert sorted(i for b in blocks for i in b.index) == list(range(13))  # the duplicate kept once
    assert all(b.class_name == ("a" if b.id.startswith("000") else "b") for b in blocks)
    again = plan_blocks(items, block_size=4, seed=0)
    assert [b.paths for b in again] == [b.paths for b in blocks]
    other = plan_blocks(items, block_size=4, seed=1)
    assert [b.paths for b in other] != [b.paths for b in blocks]
    assert {p for b in other for p in b.paths} == {p for b in blocks for p in b.paths}
    assert blocks[0].fingerprint != other[0].fingerprint
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        plan_blocks(items, block_size=1)


def test_manifest_csv_and_parquet(tmp_path):
    (tmp_path / "m.csv").write_text("\ufeffpath, class\nimgs/a.png,tile\n/abs/b.png,\n")
    assert read_manifest(tmp_path / "m.csv") == [(str(tmp_path / "imgs/a.png"), "tile"), ("/abs/b.png", None)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x.png", "y.png"]}), tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet") == [(str(tmp_path / "x.png"), None), (str(tmp_path / "y.png"), None)]
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(ManifestError, match="no 'path' column"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "gap.csv").write_text("path\na.png\n\n,\n")
    with pytest.raises(ManifestError, match=r"1 row\(s\) without a path"):
        read_manifest(tmp_path / "gap.csv")


def test_each_block_scores_like_the_library_on_its_images(tmp_path, archive):
    run = run_archive(archive, tmp_path / "o", spec_config=CONFIG, engine="inline", block_size=5, progress=False)
    assert run.images == len(archive) and run.failed == 0 and run.blocks == 5  # plate 3+3, tile 4+4+4
    rows = {r["path"]: r for r in run.rows}
    det = DualClipDetector(DetectorConfig(**CONFIG))
    for block in plan_blocks(archive, block_size=5, seed=0):
        preds = det.predict(list(block.paths), class_name=block.class_name)
        assert [rows[p]["score"] for p in block.paths] == [p.score for p in preds]
        assert all(rows[p]["block"] == block.id for p in block.paths)
    saved = json.loads((tmp_path / "o" / "predictions.json").read_text())["predictions"]
    assert [r["index"] for r in saved] == list(range(len(archive)))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "o" / "predictions.parquet").to_pylist()
    assert [(r["path"], r["score"]) for r in table] == [(r["path"], r["score"]) for r in saved]
    assert len((tmp_path / "o" / "predictions.csv").read_text().splitlines()) == len(archive) + 1
    assert all((tmp_path / "o" / r["heatmap"]).is_file() for r in saved)


def _scores(out: Path) -> list[tuple[str, float]]:
    rows = json.loads((out / "predictions.json").read_text())["predictions"]
    return [(r["path"], r["score"]) for r in rows]


@pytest.mark.slow
def test_ray_engine_equals_the_in_process_engine(tmp_path, archive, ray_cluster):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray actor with one CPU: the same arithmetic, bit for bit
    try:
        run_archive(archive, tmp_path / "inline", spec_config=CONFIG, engine="inline", block_size=5, progress=False)
    finally:
        torch.set_num_threads(threads)
    run = run_archive(archive, tmp_path / "ray", spec_config=CONFIG, engine="ray", block_size=5, progress=False)
    assert (run.engine, run.scored_blocks, run.failed) == ("ray", 5, 0)
    ray, inline = _scores(tmp_path / "ray"), _scores(tmp_path / "inline")
    assert [p for p, _ in ray] == [p for p, _ in inline]
    # the same images, partners and settings; the scores agree to float rounding (the reflect-padded effnet
    # in an actor's process: up to 6e-5 relative measured), no longer bit for bit
    np.testing.assert_allclose([s for _, s in ray], [s for _, s in inline], rtol=1e-4)


@pytest.mark.slow
def test_a_worker_killed_mid_block_is_retried_without_losing_or_duplicating_rows(tmp_path, archive, ray_cluster):
    from ray_faults import DiesOnceScorer

    clean = run_archive(archive, tmp_path / "clean", spec_config=CONFIG, engine="ray", block_size=5, progress=False)
    run = run_archive(
        archive,
        tmp_path / "flaky",
        spec_config=CONFIG,
        engine="ray",
        block_size=5,
        progress=False,
        scorer_cls=DiesOnceScorer,
    )
    assert (tmp_path / "flaky.died-once").is_file()  # the worker did die once
    paths = [r["path"] for r in run.rows]
    assert sorted(paths) == sorted(p for p, _ in archive) and len(set(paths)) == len(paths)
    assert _scores(tmp_path / "flaky") == _scores(tmp_path / "clean") and clean.failed == 0


def test_an_interrupted_run_resumes_without_rescoring_finished_blocks(tmp_path, archive):
    from ray_faults import RaisesOnScorer

    args = dict(spec_config=CONFIG, engine="inline", block_size=4, progress=False)
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        run_archive(archive, tmp_path / "o", scorer_cls=RaisesOnScorer, **args)
    finished = sorted(p.stem for p in (tmp_path / "o" / "blocks").glob("*.json"))
    assert finished == ["000-plate-00000", "000-plate-00001", "001-tile-00000"]
    assert not (tmp_path / "o" / "predictions.json").exists()
    run = run_archive(archive, tmp_path / "o", **args)
    assert (run.reused_blocks, run.scored_blocks) == (3, run.blocks - 3)
    run_archive(archive, tmp_path / "fresh", **args)
    assert _scores(tmp_path / "o") == _scores(tmp_path / "fresh")
    again = run_archive(archive, tmp_path / "o", **args)
    assert again.scored_blocks == 0  # nothing left to do
    with pytest.raises(ArchiveFolderError, match="other inputs or settings"):
        run_archive(archive, tmp_path / "o", **{**args, "block_size": 5})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ArchiveFolderError, match="holds no dualclip archive run"):
        run_archive(archive, tmp_path / "foreign", **args)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_resources_that_cannot_start_are_refused_before_running():
    check_resources({"CPU": 2.0}, 1, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="need 2.5 CPUs; the cluster has 2"):
        check_resources({"CPU": 2.0}, 2, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="need 1 GPUs; the cluster has 0"):
        check_resources({"CPU": 8.0}, 1, 1.0, 1.0, 0.5)


@pytest.mark.slow
def test_cli_predict_engine_ray_with_a_manifest(tmp_path, archive, ray_cluster):
    from dualclip.cli.main import app

    manifest = tmp_path / "m.csv"
    manifest.write_text("path,class\n" + "".join(f"{p},{c}\n" for p, c in archive))
    args = ["predict", "--engine", "ray", "--manifest", str(manifest), "-o", str(tmp_path / "o")]
    args += ["--backbone", "effnet-lite0", "--image-size", "64", "--device", "cpu", "--block-size", "5", "-q"]
    r = CliRunner().invoke(app, [*args, "--threshold", "1.0"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "o" / "predictions.json").read_text())["predictions"]
    assert len(rows) == len(archive) and all(r["verdict"] in ("ok", "defective") for r in rows)
    assert np.isfinite([r["score"] for r in rows]).all()
    r = CliRunner().invoke(app, [*args, "--reference", str(archive[0][0])])
    assert r.exit_code == 2 and "--engine ray does not take --reference" in r.output


def test_with_a_profile_every_image_scores_on_its_own(tmp_path, archive, texture_set):
    images, _, labels = texture_set
    normal = [img for img, y in zip(images, labels, strict=True) if not y]
    det = DualClipDetector(DetectorConfig(**CONFIG)).fit(normal, threshold_quantile=0.9)
    profile = det.save(tmp_path / "profile")
    run = run_archive(archive, tmp_path / "o", profile=profile, engine="inline", block_size=4, progress=False)
    loaded = DualClipDetector.load(profile)
    want = {p: loaded.predict([p])[0].score for p, _ in archive}
    assert {r["path"]: r["score"] for r in run.rows} == want  # alone, whatever block it was in
    assert all(r["verdict"] == det.threshold_.verdict(r["score"]) for r in run.rows)
