"""The command line: models, inspect, fold, export; one-line errors with exit 1 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from slab_deploy.models import get_spec, list_models
from slab_deploy.weights import random_checkpoint

REQUIRED = {
    "slab_deit_tiny", "slab_deit_small", "slab_pvt_tiny", "slab_swin_tiny", "slab_swin_small",
    "slab_cswin_tiny",
    "deit_tiny_prepbn", "deit_small_prepbn", "pvt_tiny_prepbn", "pvt_small_prepbn", "pvt_medium_prepbn",
    "swin_tiny_prepbn",
    "slab_pvt_small", "slab_pvt_medium", "slab_swin_base", "slab_cswin_small",
    "deit_tiny", "deit_small", "pvt_tiny", "pvt_small", "pvt_medium", "swin_tiny", "swin_small", "swin_base",
    "cswin_tiny",
    "flatten_swin_tiny", "flatten_swin_small", "flatten_pvt_tiny", "flatten_cswin_tiny",
}


def test_zoo_has_every_required_name() -> None:
    assert REQUIRED <= set(list_models())
    released = {n for n in list_models() if get_spec(n).released}
    assert {"slab_swin_tiny", "deit_tiny_prepbn", "slab_cswin_tiny"} <= released
    assert not {"slab_swin_base", "slab_pvt_small", "slab_cswin_small"} & released


def test_models_command_measures_params_and_gmacs(  # type: ignore[no-untyped-def]
    capsys, monkeypatch
) -> None:
    code, out, _ = run_cli(["models", "slab_swin_t*", "--json"], capsys, monkeypatch)
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["slab_swin_tiny"]
    r = rows[0]
    assert abs(r["params_m"] - 29.2) < 0.1 and abs(r["gmacs"] - 4.5) < 0.1 and r["released"]
    assert r["attention"] == ["sla", "sla", "window", "window"] and r["norm"] == "prepbn"
    code, out, _ = run_cli(["models"], capsys, monkeypatch)
    assert code == 0 and "flatten_cswin_tiny" in out and "test_" not in out


def test_unknown_model_suggests(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(["export", "-m", "slab_swin_tiyn"], capsys, monkeypatch)
    assert code == 1 and "Did you mean slab_swin_tiny" in err


def test_inspect_authors_checkpoint(  # type: ignore[no-untyped-def]
    tmp_path: Path, capsys, monkeypatch
) -> None:
    ckpt = random_checkpoint("test_slab_deit", tmp_path / "c.pth", seed=1, with_ema=True, prepbn_iter=100)
    code, out, _ = run_cli(["inspect", str(ckpt), "--json"], capsys, monkeypatch)
    assert code == 0
    d = json.loads(out)
    assert d["variants"] == []  # tiny test variants are not offered to users
    assert d["layout"] == "prepbn" and d["has_ema"] and not d["prepbn_finished"]
    assert d["opaque_objects"] == ["yacs.config.CfgNode"] and len(d["sha256"]) == 64
    full = random_checkpoint("slab_deit_tiny", tmp_path / "full.pth", seed=1)
    code, out, _ = run_cli(["inspect", str(full), "--json"], capsys, monkeypatch)
    assert json.loads(out)["variants"] == ["slab_deit_tiny"]
    code, out, _ = run_cli(["inspect", str(full)], capsys, monkeypatch)
    assert "slab_deit_tiny" in out and "finished" in out


def test_fold_command_roundtrip(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ckpt = random_checkpoint("test_slab_pvt", tmp_path / "c.pth", seed=1)
    out = tmp_path / "f.pt"
    code, stdout, err = run_cli(["fold", "-m", "test_slab_pvt", "-c", str(ckpt), "-o", str(out)],
                                capsys, monkeypatch)
    assert code == 0, err
    assert "norms folded" in stdout and out.exists()
    code, _, err = run_cli(["fold", "-m", "test_slab_pvt", "-c", str(ckpt), "-o", str(out)],
                           capsys, monkeypatch)
    assert code == 1 and "--force" in err
    code, stdout, _ = run_cli(["inspect", str(out), "--json"], capsys, monkeypatch)
    assert json.loads(stdout)["folded"]["model"] == "test_slab_pvt"


def test_export_command(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "e"
    code, stdout, err = run_cli(["export", "-m", "test_slab_cswin", "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert "UNTRAINED" in stdout and (out / "model.onnx").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["untrained"] and m["status"] == "ok"
    code, _, err = run_cli(["export", "-m", "test_slab_cswin", "-o", str(out),
                            "--batch", "2", "--dynamic-batch"], capsys, monkeypatch)
    assert code == 1 and "exclude each other" in err
    code, _, err = run_cli(["export", "-m", "test_slab_cswin", "-o", str(out),
                            "--force", "--precision", "int4"], capsys, monkeypatch)
    assert code == 1 and "unsupported precision" in err


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(os.urandom(1000)), "not a PyTorch"),
    ],
)
def test_bad_checkpoint_is_one_line_exit_1_no_traceback(  # type: ignore[no-untyped-def]
    tmp_path: Path, make, match: str
) -> None:
    bad = tmp_path / "bad.pth"
    make(bad)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "slab_deploy.cli", "export", "-m", "test_slab_swin",
                        "-c", str(bad), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert match in r.stderr and "Traceback" not in r.stderr
    # one message (rich may wrap it)
    assert len([ln for ln in r.stderr.strip().splitlines() if ln.strip()]) <= 3
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_wrong_variant_checkpoint(tmp_path: Path) -> None:
    ckpt = random_checkpoint("slab_deit_tiny", tmp_path / "c.pth", seed=0)
    r = subprocess.run([sys.executable, "-m", "slab_deploy.cli", "fold", "-m", "slab_deit_small",
                        "-c", str(ckpt), "-o", str(tmp_path / "f.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--model slab_deit_tiny" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "f.pt").exists()


def test_unfinished_prepbn_cli(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ckpt = random_checkpoint("test_slab_swin", tmp_path / "c.pth", seed=0, prepbn_iter=30000)
    code, _, err = run_cli(["fold", "-m", "test_slab_swin", "-c", str(ckpt), "-o", str(tmp_path / "f.pt")],
                           capsys, monkeypatch)
    assert code == 1 and "saved before PRepBN finished" in err
    code, _, err = run_cli(["fold", "-m", "test_slab_swin", "-c", str(ckpt), "-o", str(tmp_path / "f.pt"),
                            "--allow-unfinished-prepbn"], capsys, monkeypatch)
    assert code == 0, err


def test_zoo_rows_filters_and_measures() -> None:
    from slab_deploy.models import model_stats, zoo_rows

    tiny = zoo_rows("test_*", include_test=True, measure=False)
    assert tiny and all(r["name"].startswith("test_") for r in tiny)
    assert all(r["params_m"] is None and r["gmacs"] is None for r in tiny)
    assert zoo_rows("test_*") == []  # test variants only on request
    [row] = zoo_rows("test_slab_deit", include_test=True)
    params, gmacs = model_stats("test_slab_deit")
    assert row["params_m"] == round(params / 1e6, 2) and row["gmacs"] == round(gmacs, 2)
    assert row["norm"] == get_spec("test_slab_deit").norm and json.loads(json.dumps(row)) == row


def test_export_options_from_text() -> None:
    from slab_deploy.errors import UnsupportedInputError
    from slab_deploy.export.api import ExportOptions

    o = ExportOptions.from_text(batch=" 4", opset="17", img_size=None, precision="fp16", seed=3)
    assert (o.batch, o.opset, o.img_size, o.precision, o.seed) == (4, 17, None, "fp16", 3)
    assert ExportOptions.from_text() == ExportOptions()
    with pytest.raises(UnsupportedInputError, match="exclude each other"):
        ExportOptions.from_text(batch="2", dynamic_batch=True)
    for flag, kw in (("--opset", {"opset": "x18"}), ("--batch", {"batch": "2.5"}),
                     ("--img-size", {"img_size": ""})):
        with pytest.raises(UnsupportedInputError, match=f"{flag} must be a whole number"):
            ExportOptions.from_text(**kw)  # type: ignore[arg-type]


def test_replay_command_parses_back_to_the_same_check() -> None:
    import shlex

    from typer.main import get_command

    from slab_deploy.check import replay_base
    from slab_deploy.choices import CHECK_BACKENDS
    from slab_deploy.cli import app

    assert replay_base("m", precisions=["fp32", "fp16"]) == (
        "slab-deploy check --model m --precision fp32,fp16")
    base = replay_base("slab_deit_tiny", Path("my weights/c.pth"), artifacts=Path("out dir"),
                       backends=["onnx", "ort-cpu"], tolerance=["onnx:max_abs=1e-3"], ema=True)
    words = shlex.split(base + " --replay r/io.npz")
    assert words[:2] == ["slab-deploy", "check"]
    cmd = get_command(app).commands["check"]  # type: ignore[attr-defined]
    params = cmd.make_context("check", words[2:]).params
    assert params["checkpoint"] == Path("my weights/c.pth") and params["artifacts"] == Path("out dir")
    assert params["backends"] == "onnx,ort-cpu" and params["ema"] and not params["allow_unfinished_prepbn"]
    assert params["tolerance"] == ["onnx:max_abs=1e-3"] and params["replay"] == Path("r/io.npz")
    assert "--backends" not in replay_base("m", backends=CHECK_BACKENDS)


def test_check_output_is_report(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    afile = tmp_path / "a-file"
    afile.write_text("mine")
    for flag in ("--report", "--output", "-o"):
        code, _, err = run_cli(["check", "-m", "test_slab_deit", flag, str(afile)], capsys, monkeypatch)
        assert code == 1 and "is a file" in err and "Traceback" not in err
    assert afile.read_text() == "mine"


def test_profiles_command(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from slab_deploy.profiles import list_profiles

    names = list_profiles()
    code, out, _ = run_cli(["profiles", "--json"], capsys, monkeypatch)
    assert code == 0 and [p["name"] for p in json.loads(out)] == names
    code, out, _ = run_cli(["profiles"], capsys, monkeypatch)
    assert code == 0 and "device profiles" in out and all(n in out for n in names)


def test_cli_reference_lists_every_command_and_option() -> None:
    from typer.main import get_command

    from slab_deploy.cli import app
    from slab_deploy.render import cli_reference

    group = get_command(app)
    md = cli_reference(group)
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        section = md.split(f"## `slab-deploy {name}`\n", 1)[1].split("\n## ", 1)[0]
        for p in cmd.params:
            if p.param_type_name == "option":
                assert all(f"`{o}`" in section for o in p.opts), (name, p.opts)
    assert "| `--model`, `-m` | required |" in md and "| `--measure`, `--no-measure` | `--measure` |" in md


def test_signals_interrupt_raises_once_and_restores() -> None:
    import signal

    from slab_deploy.utils import Interrupted, signals_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info, signals_interrupt():
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            signal.raise_signal(signal.SIGINT)  # a repeat while cleaning up is ignored
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
