"""`slab-deploy build` and the engine record: option validation, the profile shapes, the record and
its refusals, the all-or-nothing write, the refusal without TensorRT; and, where TensorRT-RTX is
installed (marker `tensorrt`), real ahead-of-time builds of real exports on this CPU host.

TensorRT-RTX compiles for named compute capabilities without a GPU, so the `tensorrt` tests build
real engines anywhere the wheel installs (`pip install tensorrt-rtx`); running an engine needs a
GPU that TensorRT-RTX supports (marker `cuda` as well).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from slab_deploy.errors import ArtifactError, ConfigError
from slab_deploy.export.api import ExportOptions, export_model
from slab_deploy.runtime.engine import EngineOptions, Export, batch_range, build_engine, read_export
from slab_deploy.runtime.engine_record import (
    PLAN_NAME,
    RECORD_NAME,
    EngineMismatch,
    EngineRecord,
    commit_engine,
    load_plan,
    read_record,
    verify_record,
)

NAME = "test_slab_deit"
BLOCK_TENSORRT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'tensorrt_rtx_bindings', 'tensorrt_rtx_libs'):
            raise ImportError('blocked for the test: ' + name)
        return None
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real fp32 export (dynamic batch) of a tiny SLAB model, its embedded untrained weights."""
    d = tmp_path_factory.mktemp("trt") / "fp32"
    export_model(NAME, None, d)
    return d


def _listing(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def _export(batch: int | None = None) -> Export:
    return Export(Path("art"), NAME, Path("art/model.onnx"), "0" * 64, "fp32", batch, ["batch", 3, 32, 32],
                  ("sla",))


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("kw", "message"), [
    ({"min_batch": 8, "max_batch": 4}, "min <= opt <= max, not 8/-/4"),
    ({"min_batch": 2, "opt_batch": 1}, "min <= opt <= max"),
    ({"opt_batch": 0}, "--opt-batch must be a positive integer"),
    ({"max_batch": True}, "--max-batch must be a positive integer"),
    ({"workspace_gib": 0.0}, "--workspace must be a positive number"),
    ({"workspace_gib": float("nan")}, "--workspace must be a positive number"),
    ({"opt_level": 6}, "--opt-level must be 0 to 5"),
    ({"hardware_compat": "turing-plus"},
     "--hardware-compat must be none, ampere-plus or same-compute-capability"),
    ({"compute_capability": ("89",)}, "like 8.9,12.0"),
    ({"compute_capability": ("current", "8.9")}, "current stands alone"),
])
def test_bad_options_are_refused_in_one_line(kw: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message) as info:
        EngineOptions(**kw).validate()
    assert "\n" not in str(info.value)


def test_profile_shapes_from_the_command_line() -> None:
    dyn = _export()
    assert batch_range(EngineOptions(), dyn) == (1, 1, 64)
    assert batch_range(EngineOptions(min_batch=2, opt_batch=8, max_batch=32), dyn) == (2, 8, 32)
    assert batch_range(EngineOptions(max_batch=256), dyn) == (1, 1, 256)
    assert batch_range(EngineOptions(opt_batch=128), dyn) == (1, 128, 128)  # max follows a larger opt
    assert batch_range(EngineOptions(min_batch=4), dyn) == (4, 4, 64)  # opt follows a larger min
    assert batch_range(EngineOptions(max_batch=8, opt_batch=8, min_batch=8), dyn) == (8, 8, 8)


def test_profile_shapes_from_a_device_profile() -> None:
    dyn = _export()
    assert batch_range(EngineOptions(profile="h200"), dyn) == (1, 64, 256)  # batches [1, 64, 256]
    assert batch_range(EngineOptions(profile="rtx4090"), dyn) == (1, 8, 64)
    assert batch_range(EngineOptions(profile="h200", max_batch=512), dyn) == (1, 64, 512)  # the option wins
    # opt kept inside the range
    assert batch_range(EngineOptions(profile="h200", max_batch=32), dyn) == (1, 32, 32)
    assert batch_range(EngineOptions(profile="h200", min_batch=300), dyn) == (300, 300, 300)
    with pytest.raises(ConfigError, match="is for --device cpu; an engine needs a CUDA profile"):
        batch_range(EngineOptions(profile="ci-cpu"), dyn)


def test_a_static_batch_graph_takes_no_range() -> None:
    static = _export(batch=4)
    assert batch_range(EngineOptions(), static) == (4, 4, 4)
    assert batch_range(EngineOptions(min_batch=4, max_batch=4), static) == (4, 4, 4)
    with pytest.raises(ConfigError, match="static batch of 4, so it takes no batch range .*1/-/8") as info:
        batch_range(EngineOptions(min_batch=1, max_batch=8), static)
    assert "export without --batch" in str(info.value)
    with pytest.raises(ConfigError, match="--profile h200"):
        batch_range(EngineOptions(profile="h200"), static)


def test_cli_refuses_a_bad_range_before_anything_is_read(  # type: ignore[no-untyped-def]
    exported: Path, capsys, monkeypatch
) -> None:
    before = _listing(exported)
    code, _out, err = run_cli(["build", str(exported), "--min-batch", "8", "--max-batch", "2"],
                              capsys, monkeypatch)
    assert code == 1 and "min <= opt <= max" in err and "Traceback" not in err
    assert _listing(exported) == before


def test_build_refuses_a_directory_that_is_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not an export directory"):
        build_engine(tmp_path)


def test_build_refuses_an_onnx_that_its_manifest_does_not_describe(exported: Path, tmp_path: Path) -> None:
    d = tmp_path / "art"
    d.mkdir()
    for name in ("manifest.json", "model.onnx"):
        (d / name).write_bytes((exported / name).read_bytes())
    with open(d / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        read_export(d)


# ------------------------------------------------------------------------------------------- without TensorRT


def test_build_without_tensorrt_names_the_extra_and_the_image(exported: Path) -> None:
    """Where no TensorRT can be imported `build` exits 1 with one line, and DIR is left as it was."""
    before = _listing(exported)
    code = (BLOCK_TENSORRT + f"sys.argv = ['slab-deploy', 'build', {str(exported)!r}]\n"
            "from slab_deploy.cli import main\nmain()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed"), r.stderr
    assert "pip install 'slab-deploy[tensorrt]'" in lines[0] and "nvcr.io/nvidia/tensorrt" in lines[0]
    assert _listing(exported) == before


# ---------------------------------------------------------------------------------------------- the record


def _record(**over: object) -> EngineRecord:
    base: dict = {  # type: ignore[type-arg]
        "model": NAME, "precision": "fp16", "typing": "strong",
        "onnx": {"file": "model.onnx", "sha256": "a" * 64},
        "plan": {"file": PLAN_NAME, "sha256": "", "bytes": 0},
        "tensorrt": {"flavour": "tensorrt", "module": "tensorrt", "version": "10.14.1"},
        "gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"},
        "targets": {"compute_capabilities": ["8.9"], "hardware_compat": "none", "version_compatible": False},
        "profile": {"input": "images", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [64, 3, 32, 32],
                    "static": False},
        "flags": {"workspace_gib": None, "opt_level": None, "timing_cache": None, "pinned_fp32_layers": 0},
        "build_seconds": 1.0, "network": {"layers": 1, "by_dtype": {"HALF": 1}, "matmul_conv_by_dtype": {}},
    }
    base.update(over)
    return EngineRecord(**base)


HERE = {"flavour": "tensorrt", "version": "10.14.1"}
L4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}


def test_record_mismatches_are_refused_naming_what_differs(tmp_path: Path) -> None:
    rec = _record()
    verify_record(rec, tmp_path, onnx_sha256="a" * 64, tensorrt=HERE, gpu=L4)  # matches
    with pytest.raises(EngineMismatch, match=r"built from another model.onnx \(sha256 aaaaaaaaaaaa\.\.\., "
                                             r"the graph there now is bbbbbbbbbbbb") as e:
        verify_record(rec, tmp_path, onnx_sha256="b" * 64, tensorrt=HERE, gpu=L4)
    assert e.value.what == "onnx" and "slab-deploy build" in str(e.value) and "--force" in str(e.value)
    with pytest.raises(EngineMismatch,
                       match="built with tensorrt 10.14.1, this host runs tensorrt 10.15.0") as e:
        verify_record(rec, tmp_path, onnx_sha256="a" * 64,
                      tensorrt={"flavour": "tensorrt", "version": "10.15.0"}, gpu=L4)
    assert e.value.what == "tensorrt"
    with pytest.raises(EngineMismatch, match="this host runs tensorrt-rtx 1.7.1.116"):
        verify_record(rec, tmp_path, onnx_sha256="a" * 64,
                      tensorrt={"flavour": "tensorrt-rtx", "version": "1.7.1.116"}, gpu=L4)
    with pytest.raises(EngineMismatch,
                       match=r"built for compute capability 8.9, this GPU \(NVIDIA H200\) is 9.0") as e:
        verify_record(rec, tmp_path, onnx_sha256="a" * 64, tensorrt=HERE,
                      gpu={"name": "NVIDIA H200", "compute_capability": "9.0"})
    assert e.value.what == "gpu" and isinstance(e.value, ArtifactError) and e.value.exit_code == 1


def test_version_compatible_and_hardware_compatible_records_widen_the_match(tmp_path: Path) -> None:
    vc = _record(targets={"compute_capabilities": ["8.0+"], "hardware_compat": "ampere-plus",
                          "version_compatible": True})
    later = {"flavour": "tensorrt", "version": "10.15.0"}
    verify_record(vc, tmp_path, onnx_sha256="a" * 64, tensorrt=later,
                  gpu={"name": "A100", "compute_capability": "8.0"})
    verify_record(vc, tmp_path, onnx_sha256="a" * 64, tensorrt=later,
                  gpu={"name": "B200", "compute_capability": "10.0"})
    with pytest.raises(EngineMismatch, match="this host runs tensorrt 10.13.0"):  # older than the build
        verify_record(vc, tmp_path, onnx_sha256="a" * 64,
                      tensorrt={"flavour": "tensorrt", "version": "10.13.0"}, gpu=L4)
    with pytest.raises(EngineMismatch, match="this host runs tensorrt 11.0.0"):  # another major
        verify_record(vc, tmp_path, onnx_sha256="a" * 64,
                      tensorrt={"flavour": "tensorrt", "version": "11.0.0"}, gpu=L4)
    with pytest.raises(EngineMismatch, match=r"compute capability 8.0\+, this GPU \(T4\) is 7.5"):
        verify_record(vc, tmp_path, onnx_sha256="a" * 64, tensorrt=later,
                      gpu={"name": "T4", "compute_capability": "7.5"})


# The plan bytes below are opaque to everything under test (the record stores their sha256 and
# size); `test_real_build_and_its_refusals` runs the same checks on an engine TensorRT-RTX built.
PLAN_V1, PLAN_V2 = b"plan bytes of build one", b"plan bytes of build two, longer"


def _commit(d: Path, plan: bytes) -> EngineRecord:
    import hashlib

    rec = _record(plan={"file": PLAN_NAME, "sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)})
    commit_engine(d, plan, rec)
    return rec


def test_commit_writes_both_files_and_a_load_checks_them(tmp_path: Path) -> None:
    rec = _commit(tmp_path, PLAN_V1)
    assert (tmp_path / PLAN_NAME).read_bytes() == PLAN_V1
    assert read_record(tmp_path) == rec
    assert json.loads((tmp_path / RECORD_NAME).read_text())["format"] == "slab-deploy engine record"
    plan, got = load_plan(tmp_path, onnx_sha256="a" * 64, tensorrt=HERE, gpu=L4)
    assert plan == PLAN_V1 and got == rec
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD_NAME, PLAN_NAME]  # no temporary left
    # a plan its record does not describe (replaced by hand, or half a swap)
    (tmp_path / PLAN_NAME).write_bytes(PLAN_V2)
    with pytest.raises(EngineMismatch, match="does not match its record engine.json") as e:
        load_plan(tmp_path, onnx_sha256="a" * 64, tensorrt=HERE, gpu=L4)
    assert e.value.what == "plan"


def test_a_failed_commit_leaves_the_previous_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _commit(tmp_path, PLAN_V1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == RECORD_NAME:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr("slab_deploy.runtime.engine_record.os.replace", replace)
    with pytest.raises(OSError, match="No space left"):
        _commit(tmp_path, PLAN_V2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old plan back, nothing partial


def test_a_failed_first_commit_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_a: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("slab_deploy.runtime.engine_record.os.chmod", fail)
    with pytest.raises(OSError, match="Input/output"):
        _commit(tmp_path, PLAN_V1)
    assert list(tmp_path.iterdir()) == []


def test_records_that_are_not_ours_are_refused(tmp_path: Path) -> None:
    (tmp_path / RECORD_NAME).write_text("{not json")
    with pytest.raises(EngineMismatch, match="not valid JSON"):
        read_record(tmp_path)
    (tmp_path / RECORD_NAME).write_text(json.dumps({"format": "slab-deploy engine record", "version": 1,
                                                    "model": NAME}))
    with pytest.raises(EngineMismatch, match="lacks precision, typing, onnx"):
        read_record(tmp_path)
    (tmp_path / RECORD_NAME).write_text(json.dumps({"format": "slab-deploy engine record", "version": 99}))
    with pytest.raises(EngineMismatch, match="record version 99"):
        read_record(tmp_path)


# ---------------------------------------------------------------------------------------------- real builds


@pytest.fixture(scope="module")
def exported_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("trt16") / "fp16"
    export_model(NAME, None, d, ExportOptions(precision="fp16", sla_policy="fp32"))
    return d


def _rtx():  # type: ignore[no-untyped-def]
    from slab_deploy.runtime.tensorrt import require_tensorrt

    trt = require_tensorrt()
    if not trt.rtx:
        pytest.skip(f"{trt.label} builds on a GPU only; this test builds ahead of time with TensorRT-RTX")
    return trt


@pytest.mark.tensorrt
def test_real_build_keeps_the_fp32_islands_of_an_fp16_export(  # type: ignore[no-untyped-def]
    exported: Path, exported_fp16: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    trt = _rtx()
    results = {}
    for prec, src in (("fp32", exported), ("fp16", exported_fp16)):
        d = tmp_path / prec
        d.mkdir()
        for p in src.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        code, out, err = run_cli(["build", str(d), "--compute-capability", "8.9", "--opt-batch", "4",
                                  "--max-batch", "16", "--json"], capsys, monkeypatch)
        assert code == 0, err
        results[prec] = json.loads(out)
        assert (d / PLAN_NAME).stat().st_size == results[prec]["plan"]["bytes"] > 100_000
    for prec, rec in results.items():
        assert rec["tensorrt"] == {"flavour": "tensorrt-rtx", "module": trt.name, "version": trt.version}
        assert rec["typing"] == "strong" and rec["precision"] == prec
        assert rec["targets"]["compute_capabilities"] == ["8.9"]
        assert (rec["profile"]["min"][0] == 1 and rec["profile"]["opt"][0] == 4
                and rec["profile"]["max"][0] == 16)
        assert rec["profile"]["max"][1:] == [3, 32, 32]
    assert set(results["fp32"]["network"]["matmul_conv_by_dtype"]) == {"FLOAT"}
    heavy16 = results["fp16"]["network"]["matmul_conv_by_dtype"]
    # SLA's normaliser and k^T v stay fp32 (both blocks), everything else runs in fp16
    assert heavy16["HALF"] > heavy16["FLOAT"] > 0


@pytest.mark.tensorrt
def test_real_build_and_its_refusals(  # type: ignore[no-untyped-def]
    exported: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    trt = _rtx()
    d = tmp_path / "art"
    d.mkdir()
    for p in exported.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    result = build_engine(d, EngineOptions(compute_capability=("8.9", "12.0")))
    assert result.record.targets["compute_capabilities"] == ["8.9", "12.0"]
    here = {"flavour": trt.flavour, "version": trt.version}
    sha = result.record.onnx["sha256"]
    plan, _ = load_plan(d, onnx_sha256=sha, tensorrt=here,
                        gpu={"name": "RTX 4090", "compute_capability": "8.9"})
    assert plan == (d / PLAN_NAME).read_bytes()
    with pytest.raises(EngineMismatch,
                       match=r"compute capability 8.9, 12.0, this GPU \(NVIDIA H200\) is 9.0"):
        load_plan(d, onnx_sha256=sha, tensorrt=here, gpu={"name": "NVIDIA H200", "compute_capability": "9.0"})
    with pytest.raises(EngineMismatch,
                       match=f"built with tensorrt-rtx {trt.version}, this host runs tensorrt 10.14.1"):
        load_plan(d, onnx_sha256=sha, tensorrt=HERE, gpu=None)
    before = _listing(d)
    code, _out, err = run_cli(["build", str(d), "--compute-capability", "8.9"], capsys, monkeypatch)
    assert code == 1 and "model.plan exists; pass --force" in err
    for option in (["--weak-fp16"], ["--timing-cache", str(tmp_path / "tc")],
                   ["--hardware-compat", "ampere-plus"], ["--version-compatible"],
                   ["--compute-capability", "9.0"]):
        code, _out, err = run_cli(["build", str(d), "--force", *option], capsys, monkeypatch)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (option, err)
    assert _listing(d) == before and not (tmp_path / "tc").exists()


@pytest.mark.tensorrt
@pytest.mark.cuda
def test_check_runs_the_built_engine(exported: Path, tmp_path: Path) -> None:
    """Needs a GPU TensorRT runs engines on (TensorRT-RTX: compute capability 8.x or 12.x)."""
    from slab_deploy.check import run_check
    from slab_deploy.runtime.base import UnsupportedBackend
    from slab_deploy.runtime.tensorrt import TensorRTRunner

    d = tmp_path / "art"
    d.mkdir()
    for p in exported.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    build_engine(d)
    try:
        runner = TensorRTRunner.from_onnx(d / "model.onnx")
    except UnsupportedBackend as exc:
        pytest.skip(str(exc))
    assert runner.source == PLAN_NAME
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert np.isfinite(runner(x)).all()
    report = run_check(NAME, None, artifacts=d, backends=["torch", "tensorrt"])
    rung = next(r for r in report.rungs if r.rung == "tensorrt")
    assert rung.status == "pass" and rung.artifact == PLAN_NAME
