"""`check` fails closed: a broken artefact or bad input is never a pass, costs nothing, and says
what to fix in one line (exit 1); wrong numbers exit 3; a skip is only a backend the host lacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_cli

from slab_deploy.check import CheckReport, RungResult, raise_for_verdict, read_replay
from slab_deploy.errors import ArtifactError, ConfigError, ParityError
from slab_deploy.export.api import export_model
from slab_deploy.weights import random_checkpoint

NAME = "test_slab_deit"  # the fastest tiny SLAB variant
OTHER = "test_slab_pvt"  # another model, of another input size


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gates")
    ckpt = random_checkpoint(NAME, d / "c.pth", seed=2)
    export_model(NAME, ckpt, d / "art")
    export_model(OTHER, random_checkpoint(OTHER, d / "o.pth", seed=2), d / "other")
    return {"ckpt": ckpt, "art": d / "art", "other": d / "other"}


def _copy(exports: dict[str, Path], tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(exports["art"], art)
    return art


def _edit_manifest(art: Path, **changes: object) -> None:
    m = json.loads((art / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    (art / "manifest.json").write_text(json.dumps(m))


def _check(exports: dict[str, Path], art: Path | None, *extra: str) -> list[str]:
    args = ["check", "-m", NAME, "-c", str(exports["ckpt"]), "--inputs", "2"]
    return args + (["-a", str(art)] if art is not None else []) + list(extra)


def _refused(  # type: ignore[no-untyped-def]
        args: list[str], tmp_path: Path, capsys, monkeypatch, match: str) -> str:
    """Exit 1, one line naming the problem, no traceback, no report written."""
    report = tmp_path / "report"
    code, out, err = run_cli([*args, "--report", str(report)], capsys, monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1, out + err
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert "PASS" not in out and not report.exists()
    return lines[0]


# ------------------------------------------------------------------------------ broken deployed graphs


def _truncate(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _not_onnx(p: Path) -> None:
    p.write_text('{"this is": "not a protobuf"}\n' * 50)


@pytest.mark.parametrize("damage, match", [
    (_truncate, "is not a readable ONNX model"),
    (_empty, "is empty"),
    (_directory, "is not a file"),
    (_not_onnx, "is not a readable ONNX model"),
])
@pytest.mark.parametrize("target", ["model.onnx", "model.unsimplified.onnx"])
def test_broken_graph_is_refused_not_passed(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch, damage, match: str, target: str) -> None:
    art = _copy(exports, tmp_path)
    damage(art / target)
    line = _refused(_check(exports, art), tmp_path, capsys, monkeypatch, match)
    assert target in line


def test_missing_graph_named_by_the_manifest(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    art = _copy(exports, tmp_path)
    (art / "model.unsimplified.onnx").unlink()
    _refused(_check(exports, art), tmp_path, capsys, monkeypatch, "model.unsimplified.onnx is missing")


def test_another_models_graph_is_refused(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    art = _copy(exports, tmp_path)
    shutil.copy(exports["other"] / "model.onnx", art / "model.onnx")
    _refused(_check(exports, art), tmp_path, capsys, monkeypatch, f"is the graph of '{OTHER}'")
    # without slab-deploy's metadata the input shape still gives it away
    g = onnx.load(str(art / "model.onnx"))
    del g.metadata_props[:]
    onnx.save(g, str(art / "model.onnx"))
    _refused(_check(exports, art), tmp_path, capsys, monkeypatch, "takes images of shape [None, 3, 64, 64]")


def test_graph_that_will_not_load_is_an_error_exit_1(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    """Parses as ONNX, but no runtime can load it: the rung errors (never a skip) and check exits 1
    with the report that says so."""
    art = _copy(exports, tmp_path)
    g = onnx.load(str(art / "model.onnx"))
    g.graph.node[len(g.graph.node) // 2].op_type = "NoSuchOp"
    onnx.save(g, str(art / "model.onnx"))
    code, out, err = run_cli(_check(exports, art, "--report", str(tmp_path / "r"),
                                    "--backends", "torch,onnx,ort-cpu"), capsys, monkeypatch)
    assert code == 1, out + err
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    by = {r["rung"]: r for r in rep["rungs"]}
    assert rep["outcome"] == "error" and rep["exit_code"] == 1 and not rep["passed"]
    assert by["onnx"]["status"] == "pass"  # the unsimplified graph is intact
    assert (by["simplified"]["status"] == by["ort_cpu"]["status"] == "error"
            and "NoSuchOp" in by["simplified"]["reason"])
    assert rep["first_failure"] == "simplified" and "ERROR at rung simplified" in err
    assert "| simplified | fp32 | error: " in (tmp_path / "r" / "report.md").read_text()


def test_nan_in_the_graph_fails_parity_exit_3(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    art = _copy(exports, tmp_path)
    g = onnx.load(str(art / "model.onnx"))
    init = max(g.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.dims else 0)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.reshape(-1)[0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(g, str(art / "model.onnx"))
    code, out, err = run_cli(_check(exports, art, "--json"), capsys, monkeypatch)
    assert code == 3
    rep = json.loads(out)
    assert rep["first_failure"] == "simplified" and "NaN/Inf in the candidate output" in rep["verdict"]


def test_static_batch_graph_runs_in_batches(exports, tmp_path: Path) -> None:
    """A --batch 3 export checked on 4 images: whole batches, the last one padded."""
    from slab_deploy.check import run_check
    from slab_deploy.export.api import ExportOptions

    export_model(NAME, exports["ckpt"], tmp_path / "b3", ExportOptions(batch=3))
    rep = run_check(NAME, exports["ckpt"], artifacts=tmp_path / "b3", inputs=4, backends=("onnx", "ort-cpu"))
    assert rep.passed, rep.verdict()
    assert rep.deployed_ran == 2


# ------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize("manifest, match", [
    ("[1, 2]", "holds a JSON list"),
    ('"model.onnx"', "holds a JSON str"),
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ("[" * 100000 + "]" * 100000, "is not valid JSON"),
])
def test_manifest_that_is_not_an_object(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch, manifest, match: str) -> None:
    art = _copy(exports, tmp_path)
    (art / "manifest.json").write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
    _refused(_check(exports, art), tmp_path, capsys, monkeypatch, match)


def test_manifest_pointing_outside_its_folder(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    art = _copy(exports, tmp_path)
    good = exports["art"] / "model.onnx"
    for name in ("../elsewhere/model.onnx", str(good), "sub/../../x.onnx"):
        _edit_manifest(art, onnx=name)
        _refused(_check(exports, art), tmp_path, capsys, monkeypatch, "points outside")
    _edit_manifest(art, onnx="model.onnx", unsimplified_onnx=str(good))
    _refused(_check(exports, art), tmp_path, capsys, monkeypatch, "unsimplified_onnx")
    # a link inside the folder that leads out of it
    _edit_manifest(art, onnx="link.onnx", unsimplified_onnx="model.unsimplified.onnx")
    (art / "link.onnx").symlink_to(good)
    _refused(_check(exports, art), tmp_path, capsys, monkeypatch, "resolves outside")


@pytest.mark.parametrize("changes, match", [
    ({"model": None}, "names no model"),
    ({"model": ["x"]}, "names no model"),
    ({"onnx": 3}, "'onnx' must name a file"),
    ({"onnx": "a\x00b"}, "'onnx' must name a file"),
    ({"precision": "fp32"}, "'precision' is"),
    ({"precision": {"mode": "int4"}}, "precision mode 'int4'"),
])
def test_manifest_fields(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch, changes: dict, match: str) -> None:
    art = _copy(exports, tmp_path)
    _edit_manifest(art, **changes)
    _refused(_check(exports, art), tmp_path, capsys, monkeypatch, match)


def test_manifest_of_another_model(  # type: ignore[no-untyped-def]
        exports, capsys, monkeypatch, tmp_path: Path) -> None:
    _refused(_check(exports, exports["other"]), tmp_path, capsys, monkeypatch, f"pass --model {OTHER}")


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize("extra, match", [
    (["--backends", ""], "--backends is empty"),
    (["--backends", "torch"], "runs no rung on the deployed graph"),
    (["--backends", "torch,warp"], "unknown backend(s) 'warp'"),
    (["--inputs", "0"], "--inputs must be between 1 and 4096, not 0"),
    (["--inputs", "-2"], "--inputs must be between 1 and 4096, not -2"),
    (["--inputs", "100000"], "--inputs must be between 1 and 4096"),
    (["--tolerance", "fold:max_rel=nan"], "must be a finite number"),
    (["--tolerance", "warp:max_rel=1"], "unknown rung 'warp'"),
    (["--precision", ","], "--precision is empty"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
])
def test_bad_options(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch, extra: list[str], match: str) -> None:
    _refused(_check(exports, exports["art"], *extra), tmp_path, capsys, monkeypatch, match)


def test_report_naming_a_file(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("the user's own notes\n")
    code, _, err = run_cli(_check(exports, exports["art"], "--report", str(f)), capsys, monkeypatch)
    assert code == 1 and "is a file" in err and len(err.strip().splitlines()) == 1
    assert f.read_text() == "the user's own notes\n"
    code, _, err = run_cli(_check(exports, exports["art"], "--report", str(f / "sub")), capsys, monkeypatch)
    assert code == 1 and "is a file" in err


def test_images_and_replay_exclude_each_other(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    _refused(_check(exports, exports["art"], "--images", str(tmp_path), "--replay", str(tmp_path / "io.npz")),
             tmp_path, capsys, monkeypatch, "exclude each other")


# ------------------------------------------------------------------------------ replay files


class _Touch:
    """Unpickling this creates `path`: proof that a reader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def _replay_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import zipfile

    d = tmp_path / "npz"
    d.mkdir()
    good = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    cases: dict[str, tuple[Path, str]] = {}

    def save(name: str, match: str, **arrays: np.ndarray) -> None:
        np.savez_compressed(d / name, **arrays)
        cases[name] = (d / name, match)

    save("no_inputs.npz", "holds no 'inputs' array", reference=good)
    save("strings.npz", "not floating-point images", inputs=np.array(["a", "b"]))
    save("ints.npz", "not floating-point images", inputs=np.zeros((2, 3, 32, 32), np.int64))
    save("complex.npz", "not floating-point images", inputs=good.astype(np.complex64))
    save("pickle.npz", "object arrays are never unpickled",
         inputs=np.array([_Touch(d / "PWNED")], dtype=object))
    save("nan.npz", "NaN/Inf", inputs=np.where(np.arange(good.size).reshape(good.shape) == 5, np.nan, good))
    save("inf64.npz", "NaN/Inf", inputs=good.astype(np.float64) * 1e300)  # finite in float64, Inf as float32
    save("flat.npz", "not (N, 3, H, W)", inputs=good.reshape(-1))
    save("zero.npz", "holds 0 images", inputs=good[:0])
    (d / "garbage.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    cases["garbage.npz"] = (d / "garbage.npz", "not an .npz")
    np.save(d / "plain.npy", good)
    cases["plain.npy"] = (d / "plain.npy", "not an .npz")
    b = (d / "nan.npz").read_bytes()
    (d / "truncated.npz").write_bytes(b[: len(b) // 2])
    cases["truncated.npz"] = (d / "truncated.npz", "not an .npz")
    with zipfile.ZipFile(d / "many.npz", "w") as z:
        for i in range(300):
            z.writestr(f"a{i}.npy", b"")
    cases["many.npz"] = (d / "many.npz", "300 entries")
    # a header that claims 10^12 images over a few bytes of data: must not allocate them
    with zipfile.ZipFile(d / "huge_header.npz", "w") as z, z.open("inputs.npy", "w") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3, 32, 32)})
        f.write(b"\0" * 64)
    cases["huge_header.npz"] = (d / "huge_header.npz", "more than the file holds")
    with zipfile.ZipFile(d / "dir.npz", "w") as z:
        z.writestr("inputs.npy/", b"")
    cases["dir.npz"] = (d / "dir.npz", "holds no 'inputs' array")
    return cases


def test_replay_reader_refuses_every_bad_file(tmp_path: Path) -> None:
    import tracemalloc

    cases = _replay_cases(tmp_path)
    before = sorted(p.name for p in (tmp_path / "npz").iterdir())
    tracemalloc.start()
    try:
        for name, (path, match) in cases.items():
            with pytest.raises(ArtifactError) as info:
                read_replay(path)
            assert match in str(info.value) and len(str(info.value).splitlines()) == 1, (
                name, str(info.value))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"reading bad replay files peaked at {peak >> 20} MiB"
    assert not (tmp_path / "npz" / "PWNED").exists(), "the pickle in the replay file was executed"
    assert sorted(p.name for p in (tmp_path / "npz").iterdir()) == before


def test_replay_refusals_through_the_cli(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    cases = _replay_cases(tmp_path)
    for name in ("no_inputs.npz", "garbage.npz", "pickle.npz", "nan.npz"):
        path, match = cases[name]
        _refused(_check(exports, exports["art"], "--replay", str(path)), tmp_path, capsys, monkeypatch, match)
    np.savez_compressed(tmp_path / "small.npz", inputs=np.zeros((2, 3, 7, 7), np.float32))
    _refused(_check(exports, exports["art"], "--replay", str(tmp_path / "small.npz")), tmp_path, capsys,
             monkeypatch, "inputs have shape (3, 7, 7)")
    assert not (tmp_path / "npz" / "PWNED").exists()


def test_replay_of_a_real_report_round_trips(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, _ = run_cli(_check(exports, exports["art"], "--report", str(tmp_path / "r")), capsys,
                         monkeypatch)
    assert code == 0
    x = read_replay(tmp_path / "r" / "io.npz")
    assert x.dtype == np.float32 and x.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(x, np.load(tmp_path / "r" / "io.npz", allow_pickle=False)["inputs"])


# ------------------------------------------------------------------------------ verdicts


def _report(*rungs: tuple[str, str], exported_here: bool = False) -> CheckReport:
    rs = [RungResult(rung, "fp32", status, reason="why",
                     failures=["max_rel 1e-01 > 1e-04"] if status == "fail" else [])
          for rung, status in rungs]
    return CheckReport(NAME, None, None, True, {}, rs, {}, exported_here=exported_here)


@pytest.mark.parametrize("rungs, outcome, error", [
    ([("fold", "pass"), ("simplified", "pass")], "pass", None),
    ([("fold", "pass"), ("onnx", "pass"), ("simplified", "skipped"), ("ort_cpu", "skipped")], "unjudged",
     ConfigError),
    ([("fold", "pass")], "unjudged", ConfigError),
    ([], "unjudged", ConfigError),
    ([("fold", "pass"), ("simplified", "fail"), ("ort_cpu", "pass")], "fail", ParityError),
    ([("fold", "fail"), ("simplified", "error"), ("ort_cpu", "pass")], "error", ArtifactError),
    ([("simplified", "pass"), ("ort_cpu", "error")], "error", ArtifactError),
])
def test_verdict_rule(rungs: list[tuple[str, str]], outcome: str, error: type[Exception] | None) -> None:
    rep = _report(*rungs)
    assert rep.outcome == outcome and rep.passed == (outcome == "pass")
    assert rep.exit_code == (error.exit_code if error else 0)  # type: ignore[attr-defined]
    assert rep.to_dict()["outcome"] == outcome
    if error is None:
        raise_for_verdict(rep)
        assert rep.verdict().startswith("PASS")
    else:
        with pytest.raises(error) as info:
            raise_for_verdict(rep)
        assert "PASS" not in str(info.value)


def test_error_on_checks_own_export_is_called_a_bug() -> None:
    rep = _report(("simplified", "error"), exported_here=True)
    assert "a bug in slab-deploy" in rep.verdict()
    assert "export again" in _report(("simplified", "error")).verdict()
    assert "earlier, FAIL at rung fold" in _report(("fold", "fail"), ("simplified", "error")).verdict()


def test_nan_reference_is_refused(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    """A checkpoint with a NaN weight cannot give a reference: the reader names the tensor before any
    rung runs (one line, exit 1)."""
    import torch

    from slab_deploy.models import build_model
    from slab_deploy.weights import randomize_weights, save_authors_checkpoint

    model = randomize_weights(build_model(NAME), seed=3)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    ckpt = save_authors_checkpoint(tmp_path / "nan.pth", model.state_dict(), model_name=NAME)
    args = ["check", "-m", NAME, "-c", str(ckpt), "--inputs", "2", "--backends", "torch,onnx"]
    _refused(args, tmp_path, capsys, monkeypatch, "NaN or Inf weights in head.bias")


def test_only_missing_backends_is_not_judged(  # type: ignore[no-untyped-def]
        exports, tmp_path: Path, capsys, monkeypatch) -> None:
    """Every deployed rung skipped because the host lacks its runtime: NOT JUDGED, exit 1, never PASS."""
    from slab_deploy.runtime.ort import cuda_available

    if cuda_available():
        pytest.skip("ONNX Runtime CUDA is here, so the rung runs; test_verdict_rule covers the rule")
    code, out, err = run_cli(_check(exports, exports["art"], "--backends", "torch,ort-cuda",
                                    "--report", str(tmp_path / "r")),
                             capsys, monkeypatch)
    assert code == 1 and "NOT JUDGED" in err and "PASS" not in out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["outcome"] == "unjudged" and not rep["passed"]
    assert {r["rung"]: r["status"] for r in rep["rungs"]}["ort_cuda"] == "skipped"


def test_ci_doc_states_the_real_exit_codes_and_options(  # type: ignore[no-untyped-def]
        capsys, monkeypatch) -> None:
    """docs/ci.md: its job parses, branches on the codes the errors really carry, and uses only
    options the commands have."""
    import re

    import yaml

    from slab_deploy.errors import RegressionError

    text = (Path(__file__).resolve().parents[1] / "docs" / "ci.md").read_text()
    job = yaml.safe_load(text.split("```yaml", 1)[1].split("```", 1)[0])
    runs = [s["run"] for s in job["jobs"]["export-check-bench"]["steps"] if "run" in s]
    for command, codes in (("check", {0, 1, 3}), ("bench", {0, 4, 5})):
        run = next(r for r in runs if f"slab-deploy {command} " in r)
        assert {int(c) for c in re.findall(r"^\s*(\d)\)", run, re.M)} == codes, command
        assert "exit $code" in run
        _, help_out, _ = run_cli([command, "--help"], capsys, monkeypatch)
        opts = set(re.findall(r"(?<=\s)(--[a-z][a-z-]*)",
                              run.split(f"slab-deploy {command} ", 1)[1].split("code=")[0]))
        assert len(opts) >= 3, opts
        for opt in opts:
            assert opt in help_out, f"docs/ci.md uses {command} {opt}, which the command does not have"
    rows = dict(re.findall(r"^\| (\d) \| ([^|]+) \|", text, re.M))
    assert (rows["0"].startswith("PASS") and rows["3"].startswith("parity failure")
            and "broken artefact" in rows["1"])
    assert (ArtifactError.exit_code, ConfigError.exit_code, ParityError.exit_code,
            RegressionError.exit_code) == (1, 1, 3, 4)
