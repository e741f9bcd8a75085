"""tools/perf_targets.py judges the GPU performance targets from real bench.json files (those the
H200 and H100 runs wrote, under docs/results/), refuses files of different GPUs, and plans runs the
CLI accepts."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers import import_tool, run_cli

from slab_deploy import choices
from slab_deploy.models import get_spec

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "docs/results/h200-2026-12-03-perf3"
H100 = ROOT / "docs/results/h100-2026-12-07-verify"


def _rows(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("target", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_targets_from_the_h200_runs() -> None:
    tool = import_tool("perf_targets")
    files = [str(H200 / d / "bench.json")
             for d in ("after-swin", "compile-swin", "after-deit", "compile-deit")]
    text = tool.table(files)
    assert text.startswith("Performance targets on NVIDIA H200")
    rows = _rows(text)
    measured, status = rows["slab_swin_tiny >= 1.25x swin_tiny, batch 64, ONNX artefact in ONNX Runtime CUDA"]
    assert status == "missed" and "ort-cuda" in measured
    # 4.129 / 3.593 is 1.149: below 1.15 although two decimals would print 1.15
    measured, status = rows["slab_deit_small >= 1.15x deit_small, batch 64, best backend each side"]
    assert measured.startswith("1.149x") and status == "missed"
    measured, status = rows["MFU >= 25%, slab_swin_tiny, batch 256"]
    assert measured.startswith("11.4%") and status == "missed"
    assert rows["slab_swin_small >= 1.15x swin_small, batch 64, best backend each side"][1].startswith(
        "not established: slab_swin_small, swin_small not measured")


def test_targets_need_torch_compile_on_both_sides() -> None:
    tool = import_tool("perf_targets")
    cudagraph_only = tool.table([str(H100 / "after-cg/bench.json")])
    rows = _rows(cudagraph_only)
    assert rows["slab_deit_small >= 1.15x deit_small, batch 64, best backend each side"][1] == (
        "not established: torch-compile not measured for slab_deit_small, deit_small")
    rows = _rows(tool.table([str(H100 / d / "bench.json")
                             for d in ("after-cg", "compile-deit", "compile-pvt")]))
    assert rows["slab_deit_small >= 1.15x deit_small, batch 64, best backend each side"][1] == "met"
    assert rows["slab_pvt_tiny >= 1.15x pvt_tiny, batch 64, best backend each side"][1] == "missed"
    assert rows["batch 1: slab_deit_small not slower than deit_small"][1] == "missed"


@pytest.mark.parametrize("case", ["two-gpus", "cpu", "not-json", "bad-results"])
def test_files_that_cannot_be_judged_together_exit_1(case: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tool = import_tool("perf_targets")
    if case == "two-gpus":
        files = [H200 / "after-swin/bench.json", H100 / "after-cg/bench.json"]
        expect = "different GPUs"
    elif case == "cpu":
        files = [ROOT / "docs/results/cpu2-2026-11-29/bench-slab_swin_tiny/bench.json"]
        expect = "not measured on a GPU"
    else:
        files = [tmp_path / "bench.json"]
        body = {"environment": {"gpu": "NVIDIA H100"}, "results": ["not a case"]}
        files[0].write_text("{not json" if case == "not-json" else json.dumps(body))
        expect = "is not a bench.json"
    assert tool.main([str(f) for f in files]) == 1
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1


def test_plan_names_real_models_and_backends(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every planned command names zoo models and known backends, covers every judged model, and the
    real CLI parses it (on a host without CUDA, here made so, it stops with the one-line CUDA error,
    exit 1, not the parser's exit 2)."""
    import torch

    tool = import_tool("perf_targets")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = tool.plan()
    judged = {m for t in tool.RATIOS for m in (t.slab, t.other)} | {m for pair in tool.BATCH1 for m in pair}
    planned = set()
    for command in plan:
        args = shlex.split(command)
        assert args[:2] == ["slab-deploy", "bench"]
        opts = dict(zip(args[2::2], args[3::2], strict=True))
        models = opts["--models"].split(",")
        for m in models:
            get_spec(m)
        planned |= set(models)
        assert set(opts["--backends"].split(",")) <= set(choices.BACKENDS)
        code, _, err = run_cli([*args[1:-2], "--output", str(tmp_path / "out")], capsys, monkeypatch)
        assert code == 1 and "no CUDA device" in err, (code, err)
        assert not (tmp_path / "out").exists()
    assert judged <= planned


def test_run_fails_closed_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--run` where bench refuses (no CUDA device visible to its process): exit 1, the failed run
    named, no table."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    tool = import_tool("perf_targets")
    first = shlex.split(tool.plan()[0])
    monkeypatch.setattr(tool, "plan", lambda: [shlex.join(first)])
    assert tool.main(["--run", str(tmp_path / "runs")]) == 1
    out, err = capsys.readouterr()
    assert "Performance targets" not in out
    assert f"1 run(s) failed: {Path(first[-1]).name} (exit 1)" in err
    assert not list((tmp_path / "runs").rglob("bench.json"))


def test_run_refuses_a_folder_with_earlier_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier run's bench.json in DIR would be judged as this run's: --run refuses before it runs
    anything, and leaves the folder as it was."""
    tool = import_tool("perf_targets")
    earlier = tmp_path / "runs" / shlex.split(tool.plan()[0])[-1]
    earlier.mkdir(parents=True)
    (earlier / "bench.json").write_text("{}")
    assert tool.main(["--run", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "pass a new folder" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [earlier.name]
    assert (earlier / "bench.json").read_text() == "{}"
