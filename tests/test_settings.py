"""The two kinds of settings: what is computed (saved in profiles, in the archive resume key and the eval
fingerprint) apart from how it runs (never saved, never in a key); both frozen; every allowed-value set
declared once."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from conftest import unseal_profile
from dualclip import DetectorConfig, DualClipDetector
from dualclip import config as C
from dualclip.distributed import run_archive
from dualclip.distributed.run import ArchiveFolderError
from dualclip.distributed.scorer import block_result_path
from dualclip.evaluation import fingerprint

BASE = dict(backbone="effnet-lite0", pretrained=None, image_size=64, device="cpu", progress=False)
HOW_IT_RUNS = dict(num_workers=3, batch_size=2, progress=True, device="cpu", cache_dir="/tmp/elsewhere")


class RecordingScorer:
    """Scores nothing: writes each block's result file (so that a later run can resume it) with its rows."""

    def __init__(self, spec) -> None:
        self.spec = spec

    def __call__(self, block, decoded=None) -> dict:
        rows = [
            {"index": i, "path": p, "class_name": block.class_name, "block": block.id, "score": 0.5}
            for i, p in zip(block.index, block.paths, strict=True)
        ]
        result = {"block": block.to_dict(), "rows": rows}
        path = block_result_path(self.spec.out, block.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        return result


@pytest.fixture
def items(tmp_path, texture_set) -> list[tuple[str, str | None]]:
    found = []
    for i, img in enumerate(texture_set[0][:4]):
        p = tmp_path / f"{i}.png"
        img.save(p)
        found.append((str(p), "tile"))
    return found


def _archive(items, out: Path, **settings):
    config = DetectorConfig(**{**BASE, **settings}).to_dict()
    return run_archive(
        items, out, spec_config=config, engine="inline", block_size=2, progress=False, scorer_cls=RecordingScorer
    )


def test_how_it_runs_leaves_the_archive_resume_key_unchanged_and_k_changes_it(tmp_path, items):
    out = tmp_path / "run"
    first = _archive(items, out)
    key = json.loads((out / "run.json").read_text())["key"]
    assert (first.scored_blocks, first.reused_blocks) == (2, 0)
    resumed = _archive(items, out, **HOW_IT_RUNS)  # other decoding threads, batch size, progress, cache: resumed
    assert (resumed.scored_blocks, resumed.reused_blocks) == (0, 2)
    assert json.loads((out / "run.json").read_text())["key"] == key
    with pytest.raises(ArchiveFolderError, match=f"holds an archive run of other inputs or settings \\(key {key}"):
        _archive(items, out, k=2)  # another method: never mixed into the same run
    with pytest.raises(ArchiveFolderError, match="other inputs or settings"):
        _archive(items, out, precision="bf16")  # other arithmetic: other numbers


def test_archive_workers_get_the_method_apart_from_how_they_run(tmp_path, items):
    _archive(items, tmp_path / "run", num_workers=3, batch_size=2, k=1)
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert set(settings["config"]) == set(C.METHOD_FIELDS)
    assert (settings["config"]["k"], settings["config"]["backbone"]) == (1, "effnet-lite0")
    assert settings["where"] == {
        "device": "cpu",
        "cache_dir": None,
        "precision": "auto",
        "batch_size": 2,
        "num_workers": 3,
        "runtime": "torch",
        "onnx_file": None,
        "match_memory_mb": 512.0,
        "progress": False,
    }


def test_how_it_runs_leaves_the_eval_fingerprint_unchanged_and_k_changes_it(tmp_path, items):
    from dualclip.data.datasets import Category, Sample

    cat = Category("tile", samples=[Sample(Path(p), 0) for p, _ in items])
    cfg = DetectorConfig(**BASE)
    key = fingerprint(cfg, cat, [0])
    assert len(key) == 16
    assert fingerprint(dataclasses.replace(cfg, **HOW_IT_RUNS), cat, [0]) == key
    assert fingerprint(dataclasses.replace(cfg, k=2), cat, [0]) != key
    assert fingerprint(dataclasses.replace(cfg, precision="bf16"), cat, [0]) != key
    assert fingerprint(cfg, cat, [1]) != key


def test_numbers_key_holds_the_method_and_the_arithmetic_only():
    cfg = DetectorConfig(**BASE, k=3, num_workers=2, batch_size=5)
    key = cfg.numbers_key()
    assert set(key) == {"method", "precision"}
    assert key["precision"] == "auto"
    assert key["method"] == cfg.method_key() == cfg.method.to_dict()
    assert (key["method"]["k"], key["method"]["image_size"]) == (3, 64)
    assert not set(key["method"]) & set(C.EXECUTION_FIELDS)
    assert json.loads(json.dumps(key)) == key  # canonical JSON values (tuples as lists)


def test_settings_are_frozen_after_validation():
    cfg = DetectorConfig(**BASE)
    for obj, name, value in (
        (cfg, "num_workers", 2),
        (cfg, "k", 2),
        (cfg.method, "k", 2),
        (cfg.execution, "batch_size", 2),
        (cfg.adaptation, "steps", 1),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
    changed = dataclasses.replace(cfg, k=3, batch_size=4)
    assert (changed.k, changed.batch_size, cfg.k, cfg.batch_size) == (3, 4, 1, 8)
    with pytest.raises(ValueError, match="k must be an int >= 1 or 'all', got 0"):
        dataclasses.replace(cfg, k=0)  # a copy is validated like a new one
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        dataclasses.replace(cfg, batch_size=0)
    with pytest.raises(TypeError, match="unknown setting\\(s\\): bogus"):
        DetectorConfig(bogus=1)


def test_flat_keywords_and_parts_build_the_same_settings():
    flat = DetectorConfig(backbone="effnet-lite0", k=3, neighbourhood=[3], adaptation={"steps": 5}, device="cpu")
    parts = DetectorConfig(
        method=C.MethodSettings(backbone="effnet-lite0", k=3, neighbourhood=3, adaptation=C.AdaptationConfig(steps=5)),
        execution={"device": "cpu"},
    )
    assert flat == parts
    assert (flat.k, flat.neighbourhood, flat.adaptation.steps, flat.device) == (3, 3, 5, "cpu")
    assert flat.to_dict() == {**flat.method.to_dict(), **flat.execution.to_dict()}
    assert DetectorConfig(**flat.to_dict()) == flat  # a recorded config builds the same settings again


def test_a_profile_saves_the_method_only_and_loads_with_the_callers_execution(tmp_path, texture_set):
    det = DualClipDetector(DetectorConfig(**BASE, batch_size=3, num_workers=1)).fit(texture_set[0][:3])
    saved = det.profile_.meta["config"]
    assert not set(saved) & set(C.EXECUTION_FIELDS)
    det.save(tmp_path / "p")
    loaded = DualClipDetector.load(tmp_path / "p", device="cpu", batch_size=2, progress=False)
    assert loaded.config.method == dataclasses.replace(
        det.config.method,
        **{k: saved[k] for k in ("distance", "neighbourhood", "border", "hybrid_norm", "centring", "plain_weight")},
    )
    assert (loaded.config.batch_size, loaded.config.num_workers, loaded.config.progress) == (2, 0, False)


def test_an_older_profile_that_saved_how_it_ran_still_loads(tmp_path, texture_set):
    det = DualClipDetector(DetectorConfig(**BASE, plain_weight=0.0)).fit(texture_set[0][:3])  # no plain view then
    det.save(tmp_path / "p")
    doc = json.loads((tmp_path / "p" / "profile.json").read_text())
    doc["config"].update(  # what profiles saved before the split: the fitting machine's execution settings
        device="cuda:3",
        cache_dir="/nowhere",
        precision="bf16",
        batch_size=3,
        num_workers=5,
        runtime="torch",
        onnx_file=None,
        progress=True,
    )
    unseal_profile(tmp_path / "p", doc=lambda _: doc)
    loaded = DualClipDetector.load(tmp_path / "p", device="cpu")
    assert loaded.config.execution == C.ExecutionSettings(device="cpu")  # the caller's, never the file's
    assert loaded.config.k == det.config.k and loaded.config.backbone == "effnet-lite0"
    assert loaded.predict(texture_set[0][:1])[0].score == pytest.approx(det.predict(texture_set[0][:1])[0].score)


def _literals() -> dict[str, tuple]:
    """Every ``Literal`` alias of the config module, by name, with its values."""
    return {
        name: typing.get_args(value) for name, value in vars(C).items() if typing.get_origin(value) is typing.Literal
    }


def test_every_allowed_value_set_is_declared_once():
    literals = _literals()
    assert set(literals) == {
        "Aggregation",
        "Distance",
        "FusionNorm",
        "ImageScoreMode",
        "HybridNorm",
        "Border",
        "Centring",
        "TTAScope",
        "Runtime",
        "Precision",
    }
    derived = {
        "Aggregation": C.AGGREGATIONS,
        "Distance": C.DISTANCES,
        "FusionNorm": C.FUSION_NORMS,
        "ImageScoreMode": C.IMAGE_SCORES,
        "HybridNorm": C.HYBRID_NORMS,
        "Border": C.BORDERS,
        "Centring": C.CENTRINGS,
        "TTAScope": C.TTA_SCOPES,
        "Runtime": C.RUNTIMES,
        "Precision": C.PRECISIONS,
    }
    for name, values in derived.items():
        assert values == literals[name], name
    assert C.CENTRINGS == ("none", "ring", "position") and C.PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    # validation uses the same values: one outside the set is refused, naming the set
    with pytest.raises(ValueError, match="^fusion_norm must be one of zscore, rank, got 'minmax'$"):
        DetectorConfig(fusion_norm="minmax")
    with pytest.raises(ValueError, match="^adaptation.scope must be one of category, image, got 'run'$"):
        C.AdaptationConfig(scope="run")


FLAG_OF = {
    "Distance": "distance",
    "HybridNorm": "hybrid_norm",
    "Border": "border",
    "Centring": "centring",
    "Runtime": "runtime",
    "Precision": "precision",
}
"""The Literals the CLI sets by a flag (the others: library settings without a flag)."""


def test_every_cli_flag_with_fixed_values_shows_its_literals_choices():
    import typer

    from dualclip.cli.main import app

    group = typer.main.get_command(app)
    seen = {name: 0 for name in FLAG_OF}
    for command in group.commands.values():
        for param in command.params:
            for literal, flag in FLAG_OF.items():
                if param.name == flag:
                    assert param.metavar == "[" + "|".join(_literals()[literal]) + "]", (command.name, flag)
                    seen[literal] += 1
    assert seen == {"Distance": 1, "HybridNorm": 1, "Border": 1, "Centring": 1, "Runtime": 4, "Precision": 3}


def test_a_cli_value_outside_a_literal_is_one_error_line(tmp_path, texture_set):
    from typer.testing import CliRunner

    from dualclip.cli.main import app

    d = tmp_path / "n"
    d.mkdir()
    texture_set[0][0].save(d / "0.png")
    res = CliRunner().invoke(app, ["fit", str(d), "-o", str(tmp_path / "p"), "--precision", "fp64", "-q"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: precision must be one of auto, fp32, bf16, fp16, got 'fp64'"
