"""Which exceptions the command line reports how: a DualclipError is the user's (one line, exit 2), anything
else is a bug (one line with a --debug hint, exit 1); library messages name parameters, the CLI shows flags."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

import dualclip.cli.predict as P
from dualclip.cli.main import app
from dualclip.errors import ConfigError, DualclipError, InputError, ProfileError, UsageError


def _predict_raising(monkeypatch, exc):
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(P, "run_predict", boom)
    return CliRunner().invoke(app, ["predict", "x.png", "-o", "out"])


def test_an_unexpected_error_mid_run_is_reported_as_a_bug_with_exit_1(monkeypatch):
    r = _predict_raising(monkeypatch, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines"))
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB "
        "(this is a bug; rerun with --debug (or DUALCLIP_DEBUG=1) for the traceback)"
    ]


def test_a_bare_value_error_is_a_bug_not_a_usage_error(monkeypatch):
    r = _predict_raising(monkeypatch, ValueError("index out of range"))
    assert r.exit_code == 1 and "this is a bug" in r.output and "Traceback" not in r.output


def test_a_dualclip_error_is_one_line_with_exit_2_and_its_parameters_named_as_flags(monkeypatch):
    r = _predict_raising(monkeypatch, ConfigError("memory_bank_size=8 is too small; batch_size= must be >= 1"))
    assert r.exit_code == 2
    assert r.output.strip() == "error: --memory-bank-size 8 is too small; --batch-size must be >= 1"
    r = _predict_raising(monkeypatch, ConfigError("reused; overwrite=True replaces it"))
    assert r.output.strip() == "error: reused; --overwrite replaces it"  # a switch is named without a value


def test_debug_from_the_environment_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("DUALCLIP_DEBUG", "1")
    r = _predict_raising(monkeypatch, RuntimeError("boom"))
    assert isinstance(r.exception, RuntimeError) and r.exit_code != 2


@pytest.mark.parametrize(
    "cls,base",
    [(InputError, ValueError), (ConfigError, ValueError), (ProfileError, ValueError), (UsageError, ValueError)],
)
def test_every_domain_error_is_a_dualclip_error_and_keeps_its_old_base(cls, base):
    assert issubclass(cls, DualclipError) and issubclass(cls, base)


def test_quiet_keeps_warnings_and_drops_progress_text(monkeypatch):
    def talk(*args, **kwargs):
        log = logging.getLogger("dualclip.test")
        log.info("progress text")
        log.warning("a warning")
        return 0, {"predictions": []}

    monkeypatch.setattr(P, "run_predict", talk)
    loud = CliRunner().invoke(app, ["predict", "x.png", "-o", "out"])
    quiet = CliRunner().invoke(app, ["predict", "x.png", "-o", "out", "-q"])
    assert "progress text" in loud.output and "warning: a warning" in loud.output
    assert "progress text" not in quiet.output and "warning: a warning" in quiet.output


@pytest.mark.parametrize("pretrained", [None, "random"])
def test_an_unknown_backbone_name_is_one_error_naming_the_backbones(tmp_path, pretrained):
    """A typo in the backbone (``effnet_lite0``) is a usage error that names the valid backbones, with or without
    weights given (it used to ask for weights, then crash inside open_clip)."""
    (tmp_path / "a.png").write_bytes(b"")
    args = ["predict", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--backbone", "effnet_lite0", "-q"]
    r = CliRunner().invoke(app, args + (["--pretrained", pretrained] if pretrained else []))
    assert r.exit_code == 2, r.output
    assert "unknown backbone 'effnet_lite0': use effnet-lite0, dinov2-vits14 or an open_clip model name" in r.output
    assert "bug" not in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "abc"], "--k takes comma-separated integers, got 'abc'"),
        (["--k", "1,2"], "--k takes one integer or 'all', got '1,2'"),
        (["--seed", "-1"], "must be an integer in [0, 2**32), got -1"),
    ],
)
def test_malformed_numbers_are_usage_errors_naming_the_flag(tmp_path, extra, message):
    (tmp_path / "a.png").write_bytes(b"")
    args = ["predict", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--backbone", "effnet-lite0", "-q"]
    r = CliRunner().invoke(app, args + extra)
    assert r.exit_code == 2, r.output
    assert message in r.output and "bug" not in r.output


def test_malformed_neighbourhood_and_seed_lists_are_usage_errors(tmp_path):
    fit = ["fit", str(tmp_path), "-o", str(tmp_path / "p"), "--backbone", "effnet-lite0", "--neighbourhood", "1,a"]
    r = CliRunner().invoke(app, fit)
    assert r.exit_code == 2 and "--neighbourhood takes comma-separated integers, got '1,a'" in r.output, r.output
    from PIL import Image

    for sub in ("good", "bad"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 40), (i * 90, 60, 30)).save(tmp_path / sub / f"{i}.png")
    ev = ["eval", "--dataset", "folder", "--root", str(tmp_path), "--normal", str(tmp_path / "good"), "--anomalous"]
    r = CliRunner().invoke(app, ev + [str(tmp_path / "bad"), "-o", str(tmp_path / "e"), "--seeds", "a", "-q"])
    assert r.exit_code == 2 and "--seeds takes comma-separated integers, got 'a'" in r.output, r.output
