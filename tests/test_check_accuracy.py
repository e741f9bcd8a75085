"""Accuracy against labels: the demo set and `--images` class folders, the `accuracy` metric per
rung, the accuracy-drop bound of the tolerance table, labels kept in io.npz for a replay, and the
demo weights as the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import break_the_fold, run_cli

from slab_deploy.check import run_check
from slab_deploy.datasets import DATA, demo_heldout, demo_models, image_folder
from slab_deploy.errors import CheckpointError, ConfigError
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import ACCURACY_DROP, Tolerance, tolerance_for
from slab_deploy.weights import load_model

DEMO = "slab_deit_demo"
FAST = ("torch", "onnx", "ort-cpu")


def _pre() -> dict:
    from slab_deploy.export.manifest import preprocessing

    return preprocessing(load_model(DEMO))


def _write_class_folders(root: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` held-out digits of every class as real PNG files, one folder per class."""
    from PIL import Image

    with np.load(DATA / "digits_heldout.npz") as f:
        images, labels = f["images"], f["labels"].astype(np.int64)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    for i in keep:
        d = root / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i:03d}.png")
    return images[keep], labels[keep]


def test_compare_reports_accuracy_and_judge_bounds_the_drop() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((200, 10))
    labels = ref.argmax(1).copy()
    labels[:20] = (labels[:20] + 1) % 10  # the reference is right on 180 of 200
    cand = ref.copy()
    m = compare(ref, cand, labels)
    assert m.accuracy == m.reference_accuracy == pytest.approx(0.9) and m.accuracy_drop == 0
    # flip 3 correct predictions (1.5 points) with a tiny change elsewhere: max_rel alone would pass
    for i in (50, 51, 52):
        cand[i, labels[i]] = cand[i].min() - 1
    m = compare(ref, cand, labels)
    assert m.accuracy_drop == pytest.approx(0.015)
    assert tolerance_for("ort_cuda", "int8").max_accuracy_drop == ACCURACY_DROP
    tol = Tolerance(min_top1=0.9)  # agreement 0.985 passes it: the accuracy bound decides
    v = judge(m, tol)
    assert not v.passed and any("points below the reference" in f for f in v.failures), v.failures
    assert v.needed["max_accuracy_drop"] == pytest.approx(0.015)
    # within the bound (one flip, half a point) it passes
    cand2 = ref.copy()
    cand2[50, labels[50]] = cand2[50].min() - 1
    assert judge(compare(ref, cand2, labels), tol).passed
    # without labels the criterion is not judged, and NaN rows count as wrong
    assert compare(ref, cand).accuracy is None
    nan = ref.copy()
    nan[0] = np.nan
    assert compare(ref, nan, labels).accuracy == pytest.approx((180 - (labels[0] == ref[0].argmax())) / 200)


def test_demo_model_is_checked_on_its_labelled_held_out_set() -> None:
    rec = demo_models()[DEMO]
    rep = run_check(DEMO, None, backends=FAST)
    assert rep.passed, rep.verdict()
    assert (rep.weights == "demo" and not rep.untrained
            and "trained on scikit-learn digits" in rep.weights_label)
    assert rep.inputs["labelled"] and rep.inputs["count"] == rec["heldout_count"]
    assert rep.reference_accuracy == pytest.approx(rec["heldout_top1"] / 100)
    ran = [r for r in rep.rungs if r.status == "pass"]
    assert [r.rung for r in ran] == ["fold", "onnx", "simplified", "ort_cpu"]
    for r in ran:  # the recorded accuracy, through every rung
        assert r.metrics is not None and r.metrics["accuracy"] == pytest.approx(rec["heldout_top1"] / 100)
        assert r.tolerance["max_accuracy_drop"] == ACCURACY_DROP
    d = rep.to_dict()
    assert d["weights"]["kind"] == "demo" and d["reference_accuracy"] == rep.reference_accuracy
    assert "| accuracy |" in rep.to_markdown() and "99.44%" in rep.to_markdown()


def test_images_in_class_folders_give_labels_and_the_same_accuracy(tmp_path: Path) -> None:
    images, labels = _write_class_folders(tmp_path / "digits", per_class=3)
    data = image_folder(tmp_path / "digits", _pre(), num_classes=10)
    assert data.labels is not None and sorted(data.labels.tolist()) == sorted(labels.tolist())
    assert data.classes == [str(c) for c in range(10)]
    rep = run_check(DEMO, None, images=tmp_path / "digits", backends=FAST)
    assert rep.passed and rep.inputs["labelled"] and rep.inputs["count"] == 30
    # the PNG round trip is lossless: same accuracy as the same images from the shipped array
    ref = load_model(DEMO)
    import torch

    from slab_deploy.datasets import normalise_uint8

    with torch.no_grad():
        direct = ref(torch.from_numpy(normalise_uint8(images, _pre()))).argmax(1).numpy()
    assert rep.reference_accuracy == pytest.approx(float((direct == labels).mean()))


def test_image_folder_layouts_and_refusals(tmp_path: Path) -> None:
    from PIL import Image

    pre = _pre()
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(flat / f"{i}.png")
    data = image_folder(flat, pre)
    assert data.labels is None and data.x.shape == (3, 3, 32, 32)
    named = tmp_path / "named"
    for c in ("cat", "dog"):
        (named / c).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(named / c / "a.png")
    assert image_folder(named, pre).labels.tolist() == [0, 1]  # type: ignore[union-attr]
    numbered = tmp_path / "numbered"
    for c in ("3", "7"):
        (numbered / c).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(numbered / c / "a.png")
    assert image_folder(numbered, pre).labels.tolist() == [3, 7]  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="the model has 5 classes"):
        image_folder(numbered, pre, num_classes=5)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(numbered / "loose.png")
    with pytest.raises(ConfigError, match="both images and sub-folders"):
        image_folder(numbered, pre)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot read image"):
        image_folder(tmp_path / "bad", pre)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        image_folder(tmp_path / "empty", pre)
    with pytest.raises(ConfigError, match="is not a directory"):
        image_folder(tmp_path / "missing", pre)


def test_an_accuracy_drop_fails_the_rung_with_exit_3(  # type: ignore[no-untyped-def]
        capsys, monkeypatch) -> None:
    """A fold that favours class 0 (its logit + 4, as a wrong bias fold would): predictions flip to 0,
    and the failure names the accuracy it cost beside the logit criteria."""
    def favour_class_0(folded):  # type: ignore[no-untyped-def]
        folded.head.bias[0] += 4.0

    break_the_fold(monkeypatch, favour_class_0)
    code, out, err = run_cli(["check", "-m", DEMO, "--backends", "torch,ort-cpu", "--json",
                              "--inputs", "120"],
                             capsys, monkeypatch)
    assert code == 3, err
    fold = json.loads(out)["rungs"][0]
    assert fold["rung"] == "fold" and fold["status"] == "fail"
    assert fold["metrics"]["accuracy_drop"] > ACCURACY_DROP
    assert any("points below the reference" in f for f in fold["failures"]), fold["failures"]


def test_accuracy_bound_alone_decides_through_the_tolerance_override(  # type: ignore[no-untyped-def]
        capsys, monkeypatch) -> None:
    code, out, err = run_cli(["check", "-m", DEMO, "--backends", "ort-cpu", "--inputs", "36",
                              "--tolerance", "ort_cpu:max_accuracy_drop=-0.5"], capsys, monkeypatch)
    assert (code == 3 and "FAIL at rung ort_cpu (fp32)" in out
            and "points below the reference" in out), (out, err)
    code, out, err = run_cli(["check", "-m", DEMO, "--backends", "ort-cpu", "--inputs", "36",
                              "--tolerance", "ort_cpu:max_accuracy_drop=nan"], capsys, monkeypatch)
    assert code == 1 and "finite number" in err and "Traceback" not in err


def test_replay_keeps_the_labels(tmp_path: Path) -> None:
    from slab_deploy.check import read_replay, read_replay_labels, replay_base, write_reports

    rep = run_check(DEMO, None, backends=("ort-cpu",), inputs=24)
    paths = write_reports(rep, tmp_path / "r", replay_base(DEMO, backends=("ort-cpu",)))
    x = read_replay(paths["npz"])
    y = read_replay_labels(paths["npz"], len(x))
    assert y is not None and (
        y.tolist() == demo_heldout(DEMO, _pre()).labels[:24].tolist())  # type: ignore[index]
    again = run_check(DEMO, None, backends=("ort-cpu",), replay=paths["npz"])
    assert again.inputs["labelled"] and again.reference_accuracy == rep.reference_accuracy


def test_a_seeded_check_of_a_zoo_model_has_no_labels() -> None:
    rep = run_check("test_slab_deit", None, backends=FAST)
    assert rep.passed and rep.untrained and rep.weights == "untrained" and rep.reference_accuracy is None
    assert not rep.inputs["labelled"] and all(r.metrics is None or r.metrics["accuracy"] is None
                                              for r in rep.rungs)


def test_damaged_demo_weights_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import slab_deploy.weights.default as default

    real = default.demo_models()
    fake = {k: dict(v, sha256="0" * 64) for k, v in real.items()}
    monkeypatch.setattr(default, "demo_models", lambda: fake)
    with pytest.raises(CheckpointError, match="missing or damaged") as info:
        load_model(DEMO)
    assert len(str(info.value).splitlines()) == 1
