"""`export --format`: onnx (unchanged), engine (TensorRT required first: refused in one line with
nothing written on a host without it), triton (a repository model whose config Triton's own
protobuf parses, and no temporary export left behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from slab_deploy.runtime.tensorrt import find_tensorrt

DEMO = "slab_deit_demo"


def test_triton_format_writes_a_repository_model(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient not installed")
    from google.protobuf import text_format

    repo = tmp_path / "repo"
    code, out, err = run_cli(["export", "-m", DEMO, "--format", "triton", "-o", str(repo), "--json"],
                             capsys, monkeypatch)
    assert code == 0, err
    d = json.loads(out)
    assert d["format"] == "triton" and "manifest" not in d
    cfg = text_format.Parse((repo / DEMO / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == DEMO and cfg.platform == "onnxruntime_onnx"
    assert (repo / DEMO / "1" / "model.onnx").stat().st_size > 0
    manifest = json.loads((repo / DEMO / "manifest.json").read_text())
    assert manifest["model"] == DEMO and manifest["weights"]["kind"] == "demo"
    # the export was made beside the repository and is gone
    assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == []
    # the model is there already: refused before any export is made (export_model is never called)
    import slab_deploy.export.api as api

    def no_export(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("exported before the repository's refusal")

    monkeypatch.setattr(api, "export_model", no_export)
    code, out, err = run_cli(["export", "-m", DEMO, "--format", "triton", "-o", str(repo)],
                             capsys, monkeypatch)
    assert code == 1 and "--force" in err and "Traceback" not in err


def test_engine_format_without_tensorrt_costs_nothing(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    if find_tensorrt() is not None:
        pytest.skip("TensorRT is installed here: the refusal cannot happen")
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["export", "-m", DEMO, "--format", "engine", "-o", str(out_dir)],
                             capsys, monkeypatch)
    assert code == 1 and "slab-deploy[tensorrt]" in err and "docker" in err.lower()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_unknown_format_and_onnx_default(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    code, out, err = run_cli(["export", "-m", DEMO, "--format", "tflite", "-o", str(tmp_path / "x")],
                             capsys, monkeypatch)
    assert code == 1 and "onnx, engine, triton" in err and not (tmp_path / "x").exists()
    code, out, err = run_cli(["export", "-m", DEMO, "-o", str(tmp_path / "o"), "--json"], capsys, monkeypatch)
    # --json of an onnx export is the manifest, as before
    assert code == 0 and json.loads(out)["model"] == DEMO
