"""`check`: passes on good artefacts, fails with exit 3 at the right rung for each injected fault."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import break_the_fold, run_cli, tiny_slab_models

from slab_deploy.check import parse_tolerance_overrides, run_check
from slab_deploy.errors import ConfigError
from slab_deploy.export.api import ExportOptions, export_model
from slab_deploy.weights import random_checkpoint

NAME = "test_slab_swin"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("check")
    ckpt = random_checkpoint(NAME, d / "c.pth", seed=2)
    export_model(NAME, ckpt, d / "art")
    return ckpt, d / "art"


def test_check_passes_and_writes_reports(  # type: ignore[no-untyped-def]
    exported: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    ckpt, art = exported
    code, out, err = run_cli(["check", "-m", NAME, "-c", str(ckpt), "-a", str(art),
                              "--report", str(tmp_path / "r")], capsys, monkeypatch)
    assert code == 0, out + err
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["passed"] and rep["first_failure"] is None
    ran = {r["rung"]: r for r in rep["rungs"]}
    assert [r for r in ("fold", "onnx", "simplified", "ort_cpu") if ran[r]["status"] == "pass"] == [
        "fold", "onnx", "simplified", "ort_cpu"]
    for r in ("fold", "ort_cpu"):
        m = ran[r]["metrics"]
        assert {"max_abs", "max_rel", "mean_abs", "cosine", "sqnr_db", "top1", "top5"} <= set(m)
        assert ran[r]["needed"]["max_rel"] == m["max_rel"]
    assert ran["ort_cuda"]["status"] == "skipped" and ran["ort_cuda"]["reason"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "PASS" in md and "| fold | fp32 | pass |" in md and "--replay" in md
    npz = np.load(tmp_path / "r" / "io.npz")
    assert npz["inputs"].shape[0] == 8 and "ort_cpu_fp32" in npz.files
    # the printed replay command reproduces the run from the saved inputs
    code2, _, _ = run_cli(["check", "-m", NAME, "-c", str(ckpt), "-a", str(art),
                           "--replay", str(tmp_path / "r" / "io.npz")], capsys, monkeypatch)
    assert code2 == 0


def _corrupt_initializer(path: Path) -> None:
    m = onnx.load(str(path))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.dims else 0)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.reshape(-1)[: arr.size // 3] *= -1.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(path))


@pytest.mark.parametrize("target, rung", [("model.unsimplified.onnx", "onnx"), ("model.onnx", "simplified")])
def test_corrupted_initializer_fails_at_its_rung(  # type: ignore[no-untyped-def]
    exported, tmp_path: Path, target: str, rung: str, capsys, monkeypatch
) -> None:
    import shutil

    ckpt, art = exported
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    _corrupt_initializer(bad / target)
    code, out, err = run_cli(["check", "-m", NAME, "-c", str(ckpt), "-a", str(bad),
                              "--report", str(tmp_path / "r")], capsys, monkeypatch)
    assert code == 3, out + err
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["first_failure"] == rung
    assert f"FAIL at rung {rung}" in out


def test_wrong_fold_fails_at_fold(exported, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    break_the_fold(monkeypatch, lambda folded: folded.head.weight.mul_(1.1))
    ckpt, art = exported
    code, out, err = run_cli(["check", "-m", NAME, "-c", str(ckpt), "-a", str(art), "--json"],
                             capsys, monkeypatch)
    assert code == 3
    rep = json.loads(out)
    assert rep["first_failure"] == "fold" and rep["rungs"][0]["failures"]


def _large_k_checkpoint(path: Path) -> Path:
    """A checkpoint whose SLA keys are scaled by 300: SLA's output is invariant to the scale of k
    (numerator and normaliser scale alike), but q . sum(k) and k^T v then exceed fp16's range."""
    from slab_deploy.models import build_model
    from slab_deploy.models.layers import SLACore
    from slab_deploy.weights import randomize_weights, save_authors_checkpoint

    model = randomize_weights(build_model(NAME), seed=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "core", None), SLACore):
                c = m.qkv.in_features
                m.qkv.weight[c : 2 * c] *= 300
                m.qkv.bias[c : 2 * c] *= 300
                m.positional_encoding *= 300
    return save_authors_checkpoint(path, model.state_dict(), model_name=NAME)


@pytest.mark.gpu_ort
def test_fp16_without_fp32_islands_fails_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On ONNX Runtime CUDA (real fp16 kernels) the islands decide: without them SLA's normaliser
    overflows and check fails at the CUDA fp16 rung. (ONNX Runtime's CPU provider runs most fp16
    nodes through fp32 kernels, so the CPU rungs cannot see this fault.)"""
    import slab_deploy.export.api as api
    from slab_deploy.models.layers import SLACore

    ckpt = _large_k_checkpoint(tmp_path / "c.pth")
    good = tmp_path / "good"
    export_model(NAME, ckpt, good, ExportOptions(precision="fp16", sla_policy="fp32"))
    rep_good = run_check(NAME, ckpt, artifacts=good, inputs=4, backends=("torch", "ort-cuda"))
    assert rep_good.passed, rep_good.verdict()
    assert any(r.rung == "ort_cuda" and r.status == "pass" for r in rep_good.rungs)

    real = api.prepare_precision

    def no_islands(model, precision, sla_policy):  # type: ignore[no-untyped-def]
        wrapped = real(model, precision, sla_policy)
        for m in wrapped.modules():
            if isinstance(m, SLACore):
                m.policy = "native"
        return wrapped

    monkeypatch.setattr(api, "prepare_precision", no_islands)
    bad = tmp_path / "bad"
    export_model(NAME, ckpt, bad, ExportOptions(precision="fp16", sla_policy="fp32"))  # not seen on the CPU
    rep_bad = run_check(NAME, ckpt, artifacts=bad, inputs=4, backends=("torch", "ort-cuda"))
    assert rep_bad.first_failure is not None
    assert (rep_bad.first_failure.rung, rep_bad.first_failure.precision) == ("ort_cuda", "fp16")


def test_tolerance_overrides() -> None:
    assert parse_tolerance_overrides(["ort_cuda:min_cosine=0.99", "fold:max_rel=1e-3"]) == {
        "ort_cuda": {"min_cosine": 0.99}, "fold": {"max_rel": 1e-3}}
    for bad in ("nope", "warp:max_rel=1", "fold:speed=2", "fold:max_rel=abc"):
        with pytest.raises(ConfigError):
            parse_tolerance_overrides([bad])


def test_tolerance_override_can_fail_a_good_artefact(  # type: ignore[no-untyped-def]
    exported, capsys, monkeypatch
) -> None:
    ckpt, art = exported
    code, out, _ = run_cli(["check", "-m", NAME, "-c", str(ckpt), "-a", str(art),
                            "--tolerance", "fold:max_rel=1e-12"], capsys, monkeypatch)
    assert code == 3 and "FAIL at rung fold" in out


def test_images_folder(exported, tmp_path: Path) -> None:
    from PIL import Image

    ckpt, art = exported
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(80, 64), (64, 100), (120, 90)]):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    rep = run_check(NAME, ckpt, artifacts=art, images=folder, backends=("torch", "ort-cpu"))
    assert rep.passed and rep.inputs["count"] == 3


def test_bad_artifacts(exported, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ckpt, art = exported
    code, _, err = run_cli(["check", "-m", NAME, "-c", str(ckpt), "-a", str(tmp_path)], capsys, monkeypatch)
    assert code == 1 and "manifest.json" in err
    code, _, err = run_cli(["check", "-m", "test_slab_cswin", "-a", str(art)], capsys, monkeypatch)
    assert code == 1 and f"--model {NAME}" in err


@pytest.mark.parametrize("name", tiny_slab_models())
def test_check_tiny_variants(name: str, tmp_path: Path) -> None:
    ckpt = random_checkpoint(name, tmp_path / "c.pth", seed=4)
    rep = run_check(name, ckpt, inputs=3, backends=("torch", "onnx", "ort-cpu"))
    assert rep.passed, rep.verdict()


def test_top1_flips_at_near_ties_are_named() -> None:
    """A top-1 flip between nearly tied logits still fails the rung, and the message says so."""
    from slab_deploy.parity import compare, judge
    from slab_deploy.tolerances import Tolerance

    ref = np.array([[1.0, 0.9995, 0.1], [2.0, 0.5, 0.1], [0.3, 1.0, 0.2]])
    cand = ref.copy()
    cand[0, 1] += 1e-3  # flips sample 0, whose reference margin is 5e-4
    m = compare(ref, cand)
    assert (m.top1_flips, m.ref_margin_min, m.flip_margin_max) == (
        1, pytest.approx(5e-4), pytest.approx(5e-4))
    v = judge(m, Tolerance(min_top1=0.99))
    assert not v.passed and "all near-ties" in v.failures[0]
    cand[1, 1] += 2.0  # a flip far from a tie: no near-tie note
    v = judge(compare(ref, cand), Tolerance(min_top1=0.99))
    assert not v.passed and "near-ties" not in v.failures[0]
    assert compare(ref, ref).flip_margin_max is None


def test_own_export_that_fails_parity_is_laddered_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --artifacts, check exports itself; when that export fails parity (its set is kept in
    DIR.failed), the ladder still runs on the failed set and names where it broke (exit 3)."""
    from helpers import break_the_fold

    break_the_fold(monkeypatch)  # a fault in the deployed model
    ckpt = random_checkpoint("test_slab_swin", tmp_path / "c.pth", seed=1)
    rep = run_check("test_slab_swin", ckpt, backends=("torch", "onnx", "ort-cpu"), inputs=2)
    status = {r.rung: r.status for r in rep.rungs}
    assert status["fold"] == "fail" and status["onnx"] == "fail" and status["ort_cpu"] == "fail", status
    assert rep.outcome == "fail" and rep.exit_code == 3
