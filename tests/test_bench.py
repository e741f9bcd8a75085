"""bench: profiles, statistics, outputs, speed-ups, regressions against an earlier run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import run_cli

from slab_deploy.bench import (
    Case,
    Result,
    compare_against,
    compare_targets,
    run_bench,
    speedups,
    stats,
    write_outputs,
)
from slab_deploy.errors import ConfigError
from slab_deploy.profiles import Profile, list_profiles, load_profile, validate

REQUIRED_PROFILES = {"h200", "rtx4090", "jetson-orin", "edge-cpu-1t", "edge-cpu-2t", "edge-cpu-4t", "ci-cpu"}


def test_shipped_profiles_validate() -> None:
    names = set(list_profiles())
    assert REQUIRED_PROFILES <= names
    for n in names:
        p = load_profile(n)
        assert p.name == n and p.iters >= 1
        if n.startswith("edge-cpu"):
            assert p.emulated and p.threads == (int(n.split("-")[-1][:-1]),)


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"backends": ["warp-drive"]}, r"backends\[0\] must be one of torch, .*not 'warp-drive'"),
        ({"precisions": ["fp8"]}, r"precisions\[0\] must be one of fp32, fp16, bf16"),
        ({"batches": []}, "batches must be a non-empty list"),
        ({"device": "tpu"}, "device must be one of cpu, cuda"),
        ({"iters": "many"}, r"iters must be an integer >= 1, not 'many' \(str\)"),
        ({"colour": "red"}, "unknown field"),
    ],
)
def test_bad_profiles(patch: dict, match: str) -> None:
    base = {"name": "x", "description": "x", "device": "cpu", "backends": ["ort-cpu"], "precisions": ["fp32"],
            "batches": [1]}
    with pytest.raises(ConfigError, match=match):
        validate({**base, **patch}, "test.yaml")


def test_stats() -> None:
    s = stats([1.0] * 90 + [2.0] * 9 + [10.0])
    assert s["median_ms"] == 1.0 and s["min_ms"] == 1.0 and s["p99_ms"] > 2.0 and s["cv"] > 0.5


def test_compare_targets() -> None:
    t = compare_targets("test_slab_swin", unfolded=True)
    assert [(x.model, x.variant) for x in t] == [
        ("test_slab_swin", "folded"), ("test_slab_swin", "unfolded"), ("test_swin", "baseline"),
        ("test_flatten_swin", "baseline")]
    with pytest.raises(ConfigError, match="SLAB model"):
        compare_targets("test_swin")


def _profile(**kw) -> Profile:  # type: ignore[no-untyped-def]
    base = dict(name="t", description="t", device="cpu", backends=("ort-cpu", "torch", "ort-cuda"),
                precisions=("fp32",), batches=(1, 2), threads=(1,), warmup=1, iters=3, min_seconds=0.0)
    return Profile(**{**base, **kw})


def test_run_bench_cpu(tmp_path: Path) -> None:
    rep = run_bench(compare_targets("test_slab_swin", unfolded=True), _profile(), tmp_path)
    ok = [r for r in rep.results if r.status == "ok"]
    skipped = [r for r in rep.results if r.status == "skipped"]
    assert len(ok) == 4 * 2 * 2  # 4 targets x (ort-cpu, torch) x 2 batches
    assert skipped and all("CUDA" in r.reason for r in skipped)  # ort-cuda on a CPU host: said, not crashed
    for r in ok:
        assert r.median_ms and r.median_ms > 0 and r.p99_ms >= r.median_ms and r.samples >= 3
        assert r.throughput == pytest.approx(r.case.batch / (r.median_ms / 1e3))
    assert {s["other"] for s in rep.speedups} == {"test_swin", "test_flatten_swin",
                                                  "test_slab_swin (unfolded)"}
    paths = write_outputs(rep, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["cpu"] and data["results"][0]["key"]
    assert paths["csv"].read_text().startswith("model,variant,backend")
    assert "Speed-up" in paths["markdown"].read_text()
    assert paths["latency_plot"].stat().st_size > 1000 and paths["speedup_plot"].exists()
    # the exported graphs are cached for the next run, keyed by the checkpoint they came from
    from slab_deploy.bench import CACHE_RECORD, Target, checkpoint_identity

    d = (tmp_path / "onnx"
         / f"test_slab_swin-folded-fp32-ck{checkpoint_identity(Target('test_slab_swin', 'folded'))[:12]}")
    assert (d / "model.onnx").exists() and (d / CACHE_RECORD).exists()


def _result(key_ms: float, variant: str = "folded", model: str = "m") -> Result:
    return Result(Case(model, variant, "ort-cpu", "fp32", 1, None), "ok", median_ms=key_ms)


def test_regression_detection(tmp_path: Path) -> None:
    from slab_deploy.bench import BenchReport, load_baseline

    old = BenchReport({}, {}, [_result(10.0)])
    (tmp_path / "old.json").write_text(json.dumps(old.to_dict()))
    base = load_baseline(tmp_path / "old.json")
    cmp = compare_against(BenchReport({}, {}, [_result(10.5)]), base, 0.10)
    assert cmp.regressions == [] and cmp.missing == [] and cmp.compared == 1
    regs = compare_against(BenchReport({}, {}, [_result(12.0)]), base, 0.10).regressions
    assert len(regs) == 1 and "+20%" in regs[0]
    with pytest.raises(ConfigError):
        load_baseline(tmp_path / "missing.json")


def test_speedups_pair_only_matching_cases() -> None:
    rs = [_result(5.0, "folded", "slab"), _result(10.0, "baseline", "ln"),
          Result(Case("ln", "baseline", "ort-cpu", "fp32", 8), "ok", median_ms=1.0)]
    s = speedups(rs)
    assert len(s) == 1 and s[0]["speedup"] == 2.0


def test_best_speedups_compare_only_common_backends() -> None:
    """Best backend each side, but only over backends measured for both: a backend run for the SLAB
    model alone (here torch-compile) must not win it a speed-up."""
    from slab_deploy.bench import best_speedups

    def r(model: str, variant: str, backend: str, ms: float, batch: int = 64) -> Result:
        return Result(Case(model, variant, backend, "fp16", batch), "ok", median_ms=ms)

    rs = [r("slab", "folded", "torch-cudagraph", 7.0), r("slab", "folded", "ort-cuda", 9.0),
          r("slab", "folded", "torch-compile", 5.0),
          r("ln", "baseline", "torch-cudagraph", 9.0), r("ln", "baseline", "ort-cuda", 8.0),
          r("slab", "unfolded", "torch-cudagraph", 11.0), r("ln", "baseline", "ort-cuda", 1.0, batch=1)]
    best = {(b["other"], b["batch"]): b for b in best_speedups(rs)}
    ln = best[("ln", 64)]
    assert (ln["slab_ms"], ln["slab_backend"], ln["other_ms"], ln["other_backend"]) == (
        7.0, "torch-cudagraph", 8.0, "ort-cuda")
    assert ln["speedup"] == pytest.approx(8.0 / 7.0) and ln["backends"] == ["ort-cuda", "torch-cudagraph"]
    assert best[("slab (unfolded)", 64)]["speedup"] == pytest.approx(11.0 / 7.0)
    assert ("ln", 1) not in best  # no SLAB case at batch 1


def test_cli_bench_against_exits_4(  # type: ignore[no-untyped-def]
    tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "b"
    args = ["bench", "--device", "cpu", "--models", "test_slab_deit", "--backends", "ort-cpu", "--iters", "3",
            "--warmup", "1", "-o", str(out)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    data = json.loads((out / "bench.json").read_text())
    for r in data["results"]:
        r["median_ms"] /= 100  # pretend the earlier run was 100x faster
    (tmp_path / "fast.json").write_text(json.dumps(data))
    code, _, err = run_cli([*args, "--against", str(tmp_path / "fast.json")], capsys, monkeypatch)
    assert code == 4 and "slower than the baseline" in err


def test_cli_bench_errors(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(["bench", "--device", "cpu"], capsys, monkeypatch)
    assert code == 1 and "--compare" in err
    code, _, err = run_cli(["bench", "--device", "cpu", "--compare", "test_slab_swin", "--profile", "h200"],
                           capsys, monkeypatch)
    assert code == 1 and "profile h200 is for --device cuda" in err
    code, _, err = run_cli(["bench", "--device", "cpu", "--compare", "test_slab_swin", "--profile", "nope"],
                           capsys, monkeypatch)
    assert code == 1 and "unknown profile" in err


def test_resolve_profile_defaults_and_overrides() -> None:
    """The command-line profile: the device's default (or a named profile for that device), with
    the options given merged over it and checked like a profile file."""
    from slab_deploy.profiles import default_profile, resolve_profile

    cpu = resolve_profile("cpu")
    assert cpu == default_profile("cpu") and cpu.backends == ("ort-cpu",) and cpu.batches == (1,)
    assert default_profile("cuda").backends == ("torch", "torch-cudagraph", "ort-cuda")
    p = resolve_profile("cpu", None, {"backends": "torch,ort-cpu", "batches": "1,8", "threads": "2",
                                      "iters": 4, "warmup": None})
    assert (p.backends, p.batches, p.threads, p.iters, p.warmup) == (
        ("torch", "ort-cpu"), (1, 8), (2,), 4, cpu.warmup)
    named = resolve_profile("cpu", "ci-cpu", {"iters": 7})
    assert named.name == "ci-cpu" and named.iters == 7 and named.source == load_profile("ci-cpu").source
    assert resolve_profile("cpu", None, {"batches": 4}, command="trace").batches == (4,)
    with pytest.raises(ConfigError, match="profile h200 is for --device cuda, not cpu"):
        resolve_profile("cpu", "h200")
    with pytest.raises(ConfigError, match="--device must be cpu or cuda, not 'tpu'"):
        resolve_profile("tpu")
    with pytest.raises(ConfigError,
                       match=r"--batch takes a comma list of positive integers \(e.g. 1,8,64\), not 'x'"):
        resolve_profile("cpu", None, {"batches": "1,x"})
    with pytest.raises(ConfigError, match="device cannot be overridden"):
        resolve_profile("cpu", None, {"device": "cuda"})


def test_bench_int8_cases_are_labelled_and_cached_by_quantisation(tmp_path: Path) -> None:
    """fp32 and int8 on ort-cpu: the demo model's int8 graph is calibrated on its held-out digits, a
    model without shipped images on seeded random ones, and its case says that is for latency only;
    the cached graph is keyed by the quantisation options (a record for others is not reused)."""
    from slab_deploy.bench import CACHE_RECORD, Target, build_targets, checkpoint_identity

    prof = _profile(backends=("ort-cpu",), precisions=("fp32", "int8"), batches=(1,), iters=2, warmup=1)
    rep = run_bench(build_targets(models=["slab_deit_demo", "test_slab_deit"]), prof, tmp_path)
    got = {(r.case.model, r.case.precision): r for r in rep.results}
    assert all(r.status == "ok" for r in got.values()), [r.reason for r in got.values()]
    demo = got["slab_deit_demo", "int8"].note
    assert "held-out digits" in demo and "LATENCY ONLY" not in demo
    assert "LATENCY ONLY" in got["test_slab_deit", "int8"].note and got["test_slab_deit", "fp32"].note == ""
    assert any("test_slab_deit" in n and "LATENCY ONLY" in n for n in rep.notes)
    assert {s["other"] for s in rep.speedups if s["precision"] == "int8 vs fp32"} == {
        "slab_deit_demo (folded, fp32)", "test_slab_deit (folded, fp32)"}
    paths = write_outputs(rep, tmp_path)
    assert "LATENCY ONLY" in paths["markdown"].read_text() and "LATENCY ONLY" in paths["csv"].read_text()
    ck = checkpoint_identity(Target("test_slab_deit", "folded"))[:12]
    d = tmp_path / "onnx" / f"test_slab_deit-folded-int8-minmax-pc-random-ck{ck}"
    record = json.loads((d / CACHE_RECORD).read_text())
    assert record["int8"]["calibration"] == "random" and record["int8"]["method"] == "minmax"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["precision"]["int8"]["calibration"]["latency_only"]
    from slab_deploy.bench.cache import cache_problem, onnx_for

    notes: list[str] = []
    got_path = onnx_for(Target("test_slab_deit", "folded"), "int8", tmp_path / "onnx", notes=notes)
    assert got_path == d / "model.onnx"
    assert notes == []  # the same request: reused
    keys = ("model", "variant", "precision", "sla_policy", "exporter", "checkpoint_sha256", "int8")
    want = {k: record[k] for k in keys}
    assert cache_problem(d / "model.onnx", d / CACHE_RECORD, want) is None
    other = {**want, "int8": {**want["int8"], "method": "entropy"}}
    assert "written for another int8" in str(cache_problem(d / "model.onnx", d / CACHE_RECORD, other))
    assert record["int8"]["activation_type"] == "int8" and "int8 activations" in demo
    # --activation-type uint8: its own graph (the cache does not hand back the int8 one), and its case
    # and manifest say uint8
    u8 = replace(prof, activation_type="uint8", precisions=("int8",))
    rep8 = run_bench(build_targets(models=["test_slab_deit"]), u8, tmp_path)
    (res8,) = rep8.results
    assert res8.status == "ok" and "uint8 activations (CPU only)" in res8.note, res8.reason
    d8 = tmp_path / "onnx" / f"test_slab_deit-folded-int8-minmax-pc-uint8-random-ck{ck}"
    m8 = json.loads((d8 / "manifest.json").read_text())
    assert m8["precision"]["int8"]["activation_type"] == "uint8"
    assert json.loads((d8 / CACHE_RECORD).read_text())["int8"]["activation_type"] == "uint8"
