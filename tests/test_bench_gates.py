"""bench fails closed: a failed case (exit 5), nothing measured (exit 5), a baseline case missing or
regressed (exit 4), and bad input refused before anything runs or is written (exit 1, one line)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slab_deploy.bench import (
    CACHE_RECORD,
    BenchReport,
    Case,
    Result,
    Target,
    cache_problem,
    checkpoint_identity,
    compare_against,
    estimate_memory,
    judge,
    load_baseline,
    onnx_for,
)
from slab_deploy.errors import BenchCaseError, ConfigError, RegressionError
from slab_deploy.profiles import load_profile

# torch backend only where no graph is needed (no export: fast); torchscript where one is.
TORCH = ["bench", "--device", "cpu", "--models", "test_slab_deit", "--backends", "torch", "--iters", "3",
         "--warmup", "1", "--min-seconds", "0"]
BOTH = ["bench", "--device", "cpu", "--models", "test_slab_deit", "--backends", "torch,ort-cpu",
        "--exporter", "torchscript", "--iters", "3", "--warmup", "1", "--min-seconds", "0"]


def _one_line_error(code: int, err: str, expected: int = 1) -> str:
    assert code == expected, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------- profiles

GOOD = "name: p\ndescription: d\ndevice: cpu\nbackends: [ort-cpu]\nprecisions: [fp32]\nbatches: [1]\n"


@pytest.mark.parametrize(
    "line, key, expected",
    [
        ("batches: [true]", "batches[0]", "a positive integer, not True (bool)"),
        ("batches: [0]", "batches[0]", "a positive integer"),
        ("batches: [1.5]", "batches[0]", "a positive integer, not 1.5 (float)"),
        ("batches: ['8']", "batches[0]", "a positive integer, not '8' (str)"),
        ("batches: 4", "batches", "a non-empty list"),
        ("iters: true", "iters", "an integer >= 1, not True (bool)"),
        ("iters: 0", "iters", "an integer >= 1"),
        ("warmup: -1", "warmup", "an integer >= 0"),
        ("warmup: 2.0", "warmup", "an integer >= 0, not 2.0 (float)"),
        ("min_seconds: -1", "min_seconds", "a finite number >= 0"),
        ("min_seconds: .nan", "min_seconds", "a finite number >= 0, not nan"),
        ("min_seconds: .inf", "min_seconds", "a finite number >= 0, not inf"),
        ("min_seconds: yes", "min_seconds", "a finite number >= 0, not True (bool)"),
        ("threads: true", "threads", "a positive integer"),
        ("threads: [0]", "threads[0]", "a positive integer"),
        ("threads: 100000", "threads", "<= 1024"),
        ("peak_tflops: 0", "peak_tflops", "a finite number > 0 or null"),
        ("peak_tflops: '790'", "peak_tflops", "a finite number > 0 or null, not '790' (str)"),
        ("emulated: 1", "emulated", "true or false, not 1 (int)"),
        ("compile_mode: fast", "compile_mode", "one of default, reduce-overhead"),
        ("sla_policy: half", "sla_policy", "one of fp32, mixed"),
        ("exporter: onnx", "exporter", "one of auto, dynamo, torchscript"),
        ("ort_cuda_layout: nhcw", "ort_cuda_layout", "one of nchw, nhwc"),
        ("device: gpu", "device", "one of cpu, cuda"),
        ("description: 3", "description", "a string, not 3 (int)"),
        ("backends: ort-cpu", "backends", "a non-empty list of torch"),
        ("backends: [ort-cpu, ort-cpu]", "backends", "lists 'ort-cpu' twice"),
        ("precisions: []", "precisions", "a non-empty list"),
        ("precisions: [fp8]", "precisions[0]", "one of fp32, fp16, bf16, int8, not 'fp8'"),
    ],
)
def test_profile_values_are_type_checked(tmp_path: Path, line: str, key: str, expected: str) -> None:
    """Every value of a profile file (parsed by PyYAML) is checked; bool is not an integer."""
    path = tmp_path / "bad.yaml"
    field_name = line.split(":")[0]
    kept = [ln for ln in GOOD.splitlines() if not ln.startswith(field_name + ":")]
    path.write_text("\n".join([*kept, line]) + "\n")
    with pytest.raises(ConfigError) as e:
        load_profile(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and key in msg and expected in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "text, match",
    [
        ("- a\n- b\n", "a profile must be a mapping of fields, not list"),
        (GOOD + "colour: red\n", "unknown field(s) colour"),
        ("name: p\n", "missing field(s) description"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_profile_shape_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_profile(str(path))
    assert match in str(e.value) and "\n" not in str(e.value)


def test_profile_too_large_is_refused_unparsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(GOOD + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="too large for a profile"):
        load_profile(str(path))


def test_profile_all_fields_typed(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(GOOD + "threads: 2\nwarmup: 0\niters: 5\nmin_seconds: 1\npeak_tflops: 42\n"
                    "emulated: true\ncompile_mode: reduce-overhead\nsla_policy: mixed\n"
                    "exporter: torchscript\n")
    p = load_profile(str(path))
    assert p.threads == (2,) and p.warmup == 0 and p.iters == 5 and p.emulated is True
    assert p.min_seconds == 1.0 and isinstance(p.min_seconds, float) and p.peak_tflops == 42.0
    assert (p.compile_mode, p.sla_policy, p.exporter) == ("reduce-overhead", "mixed", "torchscript")


def test_cli_profile_with_bool_batch_exits_1_writing_nothing(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    prof = tmp_path / "bt.yaml"
    prof.write_text(GOOD.replace("batches: [1]", "batches: [true]"))
    out = tmp_path / "out"
    code, _, err = run_cli(["bench", "--device", "cpu", "--models", "test_slab_deit", "--profile", str(prof),
                            "-o", str(out)], capsys, monkeypatch)
    line = _one_line_error(code, err)
    assert "batches[0] must be a positive integer, not True (bool)" in line and not out.exists()


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--batch", "1,x"], "--batch takes a comma list of positive integers (e.g. 1,8,64), not 'x'"),
        (["--batch", "0"], "--batch takes a comma list of positive integers"),
        (["--batch", "-4"], "not '-4'"),
        (["--batch", "\u0661"], "--batch takes"),  # an Arabic-Indic digit: str.isdigit() but not a batch
        (["--batch", "9" * 5000], "--batch takes"),  # int() of this raises ValueError (digit limit)
        (["--threads", "-1"], "--threads takes a comma list of positive integers"),
        (["--threads", "5000"], "threads[0] must be a positive integer <= 1024"),
        (["--iters", "0"], "iters must be an integer >= 1, not 0"),
        (["--warmup", "-1"], "warmup must be an integer >= 0"),
        (["--min-seconds", "nan"], "min_seconds must be a finite number >= 0, not nan"),
        (["--threshold", "-0.1"], "--threshold must be a finite fraction >= 0"),
        (["--threshold", "nan"], "--threshold must be a finite fraction >= 0"),
        (["--backends", "warp"], "backends[0] must be one of torch"),
        (["--precision", "fp8"], "precisions[0] must be one of fp32"),
        (["--compile-mode", "fast"], "compile_mode must be one of"),
        (["--sla-policy", "half"], "sla_policy must be one of fp32, mixed"),
        (["--exporter", "onnx"], "exporter must be one of auto"),
        (["--ort-cuda-layout", "NHWC"], "ort_cuda_layout must be one of nchw, nhwc"),
    ],
)
def test_cli_bad_options_exit_1_writing_nothing(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch, extra: list[str], match: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli([*TORCH, "-o", str(out), *extra], capsys, monkeypatch)
    assert match in _one_line_error(code, err) and not out.exists()


def test_huge_batch_is_refused_by_the_memory_estimate(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli([*TORCH, "-o", str(out), "--batch", "1,100000000"], capsys, monkeypatch)
    line = _one_line_error(code, err)
    assert ("batch 100000000 of test_slab_deit [folded] needs an estimated" in line
            and "TiB on the host" in line)
    assert "activations" in line and "batch-1 forward" in line and "pass a smaller --batch" in line
    assert not out.exists()  # refused before any case ran (batch 1 was not measured first)


def test_memory_estimate_scales_with_the_measured_peak() -> None:
    """The batch-1 activation peak is measured, not guessed: it is the size of real intermediate
    tensors (more than the input, less than every output of the forward added together)."""
    import torch

    from slab_deploy.bench import load_target
    from slab_deploy.models import get_spec

    m = load_target(Target("test_slab_swin", "folded"))
    size = get_spec("test_slab_swin").input_size
    est = estimate_memory(m, size, 64)
    assert est.input_per_image == math.prod(size) * 4
    total = 0

    def add(_m, _i, o) -> None:  # type: ignore[no-untyped-def]
        nonlocal total
        total += o.numel() * o.element_size() if isinstance(o, torch.Tensor) else 0

    hooks = [mod.register_forward_hook(add) for mod in m.modules()]
    with torch.inference_mode():
        m(torch.zeros(1, *size))
    for h in hooks:
        h.remove()
    assert est.input_per_image < est.activations_per_image < total
    assert est.device_bytes(False) == est.weights + 64 * (est.input_per_image + est.activations_per_image)


def test_check_memory_refuses_what_the_host_lacks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import slab_deploy.bench.memory as bench
    from slab_deploy.bench import load_target

    m = load_target(Target("test_slab_deit", "folded"))
    assert bench.available_memory() is not None  # Linux: /proc/meminfo
    assert bench.check_memory(m, Target("test_slab_deit", "folded"), 1, "cpu", []) is not None
    monkeypatch.setattr(bench, "available_memory", lambda: 1024)
    with pytest.raises(ConfigError, match=r"batch 1 of test_slab_deit \[folded\] needs an estimated .* "
                                          r"but 1.0 KiB is available"):
        bench.check_memory(m, Target("test_slab_deit", "folded"), 1, "cpu", [])


# ---------------------------------------------------------------------------------------------- checkpoints


def test_refused_checkpoints_exit_1_before_anything_runs(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    from slab_deploy.weights import random_checkpoint

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage\n")
    other = random_checkpoint("test_swin", tmp_path / "swin.pth", seed=3)  # torch.save'd, but another model
    for ckpt, match in ((junk, "is not a PyTorch (.pth) or safetensors checkpoint"), (other, "swin.pth")):
        out = tmp_path / f"out-{ckpt.stem}"
        code, _, err = run_cli([*BOTH, "--checkpoint", str(ckpt), "-o", str(out)], capsys, monkeypatch)
        assert match in _one_line_error(code, err) and not out.exists()


# ---------------------------------------------------------------------------------------------- failed cases


def _block_graph(cache: Path, model: str = "test_slab_deit", exporter: str = "torchscript") -> None:
    """Make the ort-cpu case fail for real: a file where its cached graph's directory must go."""
    ck = checkpoint_identity(Target(model, "folded"))
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{model}-folded-fp32-{exporter}-ck{ck[:12]}").write_text("not a directory\n")


def test_failed_case_exits_5_after_writing_complete_reports(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    base, bad = tmp_path / "base", tmp_path / "bad"
    code, _, err = run_cli([*TORCH, "--batch", "1,2", "-o", str(base)], capsys, monkeypatch)
    assert code == 0, err
    _block_graph(tmp_path / "blocked")
    code, _, err = run_cli([*BOTH, "-o", str(bad), "--onnx-cache", str(tmp_path / "blocked"),
                            "--against", str(base / "bench.json")],
                           capsys, monkeypatch)
    # A failed case outranks the baseline case gone missing (4).
    line = _one_line_error(code, err, expected=5)
    assert ("1 of 2 case(s) failed: test_slab_deit[folded]/ort-cpu/fp32/b1: ArtifactError:" in line
            and "is a file" in line)
    assert f"reports written: {bad / 'bench.json'}, bench.csv, bench.md" in line
    data = json.loads((bad / "bench.json").read_text())
    assert [r["status"] for r in data["results"]] == ["ok", "error"]
    v = data["verdict"]
    assert (v["exit_code"], v["passed"], v["errors"], v["ok"]) == (5, False, 1, 1)
    assert (v["against"]["missing"] == ["test_slab_deit[folded]/torch/fp32/b2: not in this run"]
            and v["against"]["compared"] == 1)
    assert len((bad / "bench.csv").read_text().splitlines()) == 3
    assert "- verdict: FAILED (exit 5)" in (bad / "bench.md").read_text()


def test_nothing_measured_exits_5(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    # torch fp16 on a CPU: skipped
    code, _, err = run_cli([*TORCH, "--precision", "fp16", "-o", str(out)], capsys, monkeypatch)
    line = _one_line_error(code, err, expected=5)
    assert "nothing was measured: all 1 case(s) were skipped" in line and "not a deployment target" in line
    assert json.loads((out / "bench.json").read_text())["verdict"]["exit_code"] == 5


def test_judge_order_and_nan_safety() -> None:
    ok = Result(Case("m", "folded", "torch", "fp32", 1), "ok", median_ms=2.0)
    err = Result(Case("m", "folded", "ort-cpu", "fp32", 1), "error", reason="RuntimeError: boom")
    skip = Result(Case("m", "folded", "ort-cuda", "fp32", 1), "skipped", reason="no CUDA")
    assert judge(BenchReport({}, {}, [ok, skip])) is None
    assert isinstance(judge(BenchReport({}, {}, [ok, err])), BenchCaseError)
    assert isinstance(judge(BenchReport({}, {}, [skip])), BenchCaseError)
    rep = BenchReport({}, {}, [ok, skip])
    from slab_deploy.bench import Baseline

    base = Baseline(Path("b.json"), {ok.case.key: 1.0, skip.case.key: 1.0})
    exc = judge(rep, compare_against(rep, base, 0.1))
    assert isinstance(exc, RegressionError) and exc.exit_code == 4
    assert "1 measured case(s) of the baseline not measured now" in str(exc) and "+100%" in str(exc)
    assert rep.verdict["against"]["regressions"] and rep.verdict["exit_code"] == 4


# ---------------------------------------------------------------------------------------------- --against


def test_against_case_missing_now_exits_4(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    base = tmp_path / "base"
    code, _, err = run_cli([*TORCH, "--batch", "1,2", "-o", str(base)], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli([*TORCH, "--batch", "2", "-o", str(tmp_path / "now"),
                            "--against", str(base / "bench.json"), "--threshold", "100"], capsys, monkeypatch)
    line = _one_line_error(code, err, expected=4)
    assert ("1 measured case(s) of the baseline not measured now: "
            "test_slab_deit[folded]/torch/fp32/b1: not in this run") in line


def _bench_json(results: list[object]) -> bytes:
    return json.dumps({"results": results}).encode()


OK_ROW = {"key": "k", "status": "ok", "median_ms": 1.0}


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # nesting beyond the parser's recursion limit
        (b"[]", "the top level must be a JSON object, not a list"),
        (b"3", "the top level must be a JSON object, not a number"),
        (b'"x"', "the top level must be a JSON object, not a string"),
        (b"{}", "'results' must be a list of cases, not null"),
        (b'{"results": {}}', "'results' must be a list of cases, not an object"),
        (_bench_json([]), "no measured (status ok) case to compare against"),
        (_bench_json([1]), "results[0] must be an object, not a number"),
        (_bench_json([[OK_ROW]]), "results[0] must be an object, not a list"),
        (_bench_json([{"status": "ok", "median_ms": 1.0}]),
         "results[0].key must be a non-empty string, not null"),
        (_bench_json([OK_ROW, OK_ROW]), "case k appears twice"),
        (_bench_json([{**OK_ROW, "status": "great"}]), "status must be ok, skipped or error, not 'great'"),
        (_bench_json([{**OK_ROW, "median_ms": "3"}]),
         "median_ms of ok case k must be a finite number > 0, not '3'"),
        (_bench_json([{**OK_ROW, "median_ms": True}]), "not True"),
        (_bench_json([{**OK_ROW, "median_ms": None}]), "not None"),
        (_bench_json([{**OK_ROW, "median_ms": -1.0}]), "not -1.0"),
        (_bench_json([{**OK_ROW, "median_ms": 0}]), "not 0"),
        (b'{"results": [{"key": "k", "status": "ok", "median_ms": NaN}]}', "not nan"),
        (b'{"results": [{"key": "k", "status": "ok", "median_ms": Infinity}]}', "not inf"),
        (_bench_json([{"key": "k", "status": "error", "median_ms": None}]), "no measured (status ok) case"),
    ],
)
def test_malformed_against_exits_1_before_running(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch, content: bytes, match: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    out = tmp_path / "out"
    code, _, err = run_cli([*TORCH, "-o", str(out), "--against", str(bad)], capsys, monkeypatch)
    line = _one_line_error(code, err)
    assert line.startswith(f"error: --against {bad}") and match in line and not out.exists()


def test_against_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_baseline(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="is not a file"):
        load_baseline(tmp_path)


_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=4)
    | st.sampled_from(["ok", "error", "skipped", "k"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["results", "key", "status", "median_ms", "x"]), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_json)
def test_load_baseline_fuzz_only_config_errors(tmp_path_factory: pytest.TempPathFactory, doc: object) -> None:
    """Any JSON document either loads as a baseline of finite positive medians or is a ConfigError."""
    path = tmp_path_factory.mktemp("fuzz") / "b.json"
    path.write_text(json.dumps(doc))
    try:
        base = load_baseline(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert base.medians and all(math.isfinite(v) and v > 0 for v in base.medians.values())


# --------------------------------------------------------------------------------------------- the ONNX cache


@pytest.fixture(scope="module")
def cached_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One graph exported through bench's cache (torchscript: the quick exporter)."""
    cache = tmp_path_factory.mktemp("cache")
    return onnx_for(Target("test_slab_deit", "folded"), "fp32", cache, exporter="torchscript").parent


def _want(d: Path) -> dict[str, object]:
    rec = json.loads((d / CACHE_RECORD).read_text())
    return {k: rec[k]
            for k in ("model", "variant", "precision", "sla_policy", "exporter", "checkpoint_sha256")}


def test_cache_record_describes_the_graph(cached_graph: Path) -> None:
    from slab_deploy.utils import sha256_file

    rec = json.loads((cached_graph / CACHE_RECORD).read_text())
    assert rec["onnx_sha256"] == sha256_file(cached_graph / "model.onnx") and rec["exporter"] == "torchscript"
    assert rec["checkpoint_sha256"] == checkpoint_identity(Target("test_slab_deit", "folded"))
    assert cached_graph.name.endswith(f"-ck{rec['checkpoint_sha256'][:12]}")
    assert cache_problem(cached_graph / "model.onnx", cached_graph / CACHE_RECORD,
                         _want(cached_graph)) is None


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda d: (d / "model.onnx").write_bytes(b"junk"), "does not match the sha256 recorded"),
        (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-1]),
         "does not match the sha256 recorded"),
        (lambda d: (d / CACHE_RECORD).unlink(), f"no {CACHE_RECORD} beside model.onnx"),
        (lambda d: (d / CACHE_RECORD).write_text("{"), "is unreadable"),
        (lambda d: (d / CACHE_RECORD).write_text("[]"), "not a record of this format"),
        (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
    ],
)
def test_cache_problems_are_named(  # type: ignore[no-untyped-def]
        tmp_path: Path, cached_graph: Path, tamper, problem: str) -> None:
    d = tmp_path / cached_graph.name
    shutil.copytree(cached_graph, d)
    tamper(d)
    assert problem in (cache_problem(d / "model.onnx", d / CACHE_RECORD, _want(cached_graph)) or "")


def test_cache_record_for_another_request_is_stale(cached_graph: Path) -> None:
    want = {**_want(cached_graph), "exporter": "dynamo", "checkpoint_sha256": "0" * 64}
    problem = cache_problem(cached_graph / "model.onnx", cached_graph / CACHE_RECORD, want)
    assert problem == f"{CACHE_RECORD} was written for another exporter, checkpoint_sha256"


@pytest.mark.slow  # two CLI runs and an export: ~10 s on the 2-core runner
def test_corrupt_cached_graph_is_reexported_with_a_note(  # type: ignore[no-untyped-def]
        tmp_path: Path, cached_graph: Path, capsys, monkeypatch) -> None:
    """A graph in --onnx-cache that no longer matches its record is never run: bench exports it
    again, says so in a note (console, bench.json, bench.md), and reuses the verified file next time."""
    import onnx

    cache = tmp_path / "cache"
    shutil.copytree(cached_graph, cache / cached_graph.name)
    graph = cache / cached_graph.name / "model.onnx"
    graph.write_bytes(b"junk")
    args = [*BOTH, "--backends", "ort-cpu", "--onnx-cache", str(cache)]
    code, out, err = run_cli([*args, "-o", str(tmp_path / "a")], capsys, monkeypatch)
    assert code == 0, err
    data = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert [r["status"] for r in data["results"]] == ["ok"]
    assert (len(data["notes"]) == 1 and "re-exported" in data["notes"][0]
            and "does not match the sha256" in data["notes"][0])
    assert "note: re-exported" in out and "## Notes" in (tmp_path / "a" / "bench.md").read_text()
    onnx.checker.check_model(onnx.load(str(graph)))
    assert cache_problem(graph, graph.parent / CACHE_RECORD, _want(cached_graph)) is None
    mtime = graph.stat().st_mtime_ns
    code, out, err = run_cli([*args, "-o", str(tmp_path / "b")], capsys, monkeypatch)
    assert code == 0, err
    assert (json.loads((tmp_path / "b" / "bench.json").read_text())["notes"] == []
            and graph.stat().st_mtime_ns == mtime)


def test_earlier_bench_results_load_as_baselines() -> None:
    """The bench.json files of the published runs (written by bench itself) are valid --against input."""
    paths = sorted((Path(__file__).resolve().parent.parent / "docs" / "results").rglob("bench.json"))
    assert paths
    for p in paths:
        base = load_baseline(p)
        data = json.loads(p.read_text())
        assert len(base.medians) == sum(r["status"] == "ok" for r in data["results"])


def test_cache_is_keyed_by_checkpoint(tmp_path: Path, cached_graph: Path) -> None:
    """Another checkpoint of the same model is not served the graph of the first."""
    from slab_deploy.weights import random_checkpoint

    ckpt = random_checkpoint("test_slab_deit", tmp_path / "mine.pth", seed=11)
    cache = tmp_path / "cache"
    shutil.copytree(cached_graph, cache / cached_graph.name)
    path = onnx_for(Target("test_slab_deit", "folded", str(ckpt)), "fp32", cache, exporter="torchscript")
    assert path.parent != cache / cached_graph.name
    assert json.loads((path.parent / CACHE_RECORD).read_text())["checkpoint_sha256"] == checkpoint_identity(
        Target("test_slab_deit", "folded", str(ckpt)))


# ----------------------------------------------------------------------------- one runner for check and bench


def test_bench_times_the_runner_check_calls(cached_graph: Path) -> None:
    """The step bench times is the runner check calls: same logits, from make_runner's runner."""
    import numpy as np
    import torch

    from slab_deploy.bench import load_target
    from slab_deploy.models import get_spec
    from slab_deploy.runtime import UnsupportedBackend, make_runner
    from slab_deploy.tolerances import tolerance_for

    x = np.random.default_rng(1).standard_normal((2, *get_spec("test_slab_deit").input_size),
                                                 dtype=np.float32)
    max_rel = tolerance_for("ort_cpu", "fp32").max_rel
    assert max_rel is not None

    def close(a: np.ndarray, ref: np.ndarray) -> bool:  # the table's max_rel: max|delta| / max|reference|
        return a.shape == ref.shape and float(np.abs(a - ref).max()) <= max_rel * float(np.abs(ref).max())

    ort = make_runner("ort-cpu", cached_graph / "model.onnx", "cpu", "fp32", threads=1)
    p = ort.prepare(x)
    assert p.timer == "perf_counter" and p.output_elems == 0 and ort.info.backend == "ort-cpu"
    assert np.array_equal(p.step()[0], ort(x))  # the timed step and the call run the same session
    model = load_target(Target("test_slab_deit", "folded"))  # folding needs autograd: outside inference mode
    with torch.inference_mode():
        eager = make_runner("torch", model, "cpu", "fp32")
        step_out = eager.prepare(x).step().float().numpy()
    assert np.array_equal(step_out, eager(x))
    assert close(step_out, ort(x))
    with pytest.raises(UnsupportedBackend, match="not a deployment target"):
        make_runner("torch", model, "cpu", "fp16")
    with pytest.raises(UnsupportedBackend, match="torch-cudagraph needs a CUDA device"):
        make_runner("torch-cudagraph", model, "cpu", "fp32")
    with pytest.raises(ValueError, match="unknown backend"):
        make_runner("warp", None, "cpu", "fp32")
