"""INT8: the Q/DQ graph export writes (structure TensorRT builds as explicit precision, what stays
float), its manifest, its refusals, the demo model's accuracy, and check on good and broken INT8 sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import digit_folder, run_cli
from onnx import numpy_helper

from slab_deploy.datasets import DATA, demo_heldout
from slab_deploy.export.api import ExportOptions, export_model
from slab_deploy.runtime.ort import run_onnx
from slab_deploy.tolerances import tolerance_for
from slab_deploy.weights import random_checkpoint

DEMO = "slab_deit_demo"


def _demo_ckpt(name: str = DEMO) -> Path:
    return DATA / f"{name}.pth"


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "demo"
    export_model(DEMO, _demo_ckpt(), out, ExportOptions(precision="int8"))
    return out


def _linear_attentions(name: str) -> int:
    """Linear-attention modules (SLA or FLatten) of the model: one normaliser each."""
    from slab_deploy.models import build_model

    kinds = ("SimplifiedLinearAttention", "FocusedLinearAttention")
    return sum(type(m).__name__ in kinds for m in build_model(name).modules())


def _maps(
    g: onnx.ModelProto,
) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]], dict[str, onnx.TensorProto]]:
    prod = {o: n for n in g.graph.node for o in n.output}
    cons: dict[str, list[onnx.NodeProto]] = {}
    for n in g.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return prod, cons, {t.name: t for t in g.graph.initializer}


def _assert_explicit_precision(g: onnx.ModelProto, float_nodes: set[str], activations: str = "int8") -> None:
    """What TensorRT needs of a Q/DQ graph, read off the graph itself: QuantizeLinear/DequantizeLinear
    with constant positive scales and int8 zero points of 0; INT8 weights dequantised per output
    channel; float biases; every Conv/MatMul/Gemm fed by DequantizeLinear unless listed as float.
    `activations="uint8"`: the same but for the activations' Q/DQ, uint8 with a zero point of any value."""
    prod, _, inits = _maps(g)
    qdq = [n for n in g.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert (
        sum(n.op_type == "QuantizeLinear" for n in qdq) > 0
        and sum(n.op_type == "DequantizeLinear" for n in qdq) > 0
    )
    for n in qdq:
        scale, zp = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]])
        assert (scale > 0).all() and np.isfinite(scale).all(), n.name
        if n.input[0] in inits or activations == "int8":
            assert zp.dtype == np.int8 and not zp.any(), n.name
        else:
            assert zp.dtype == np.uint8, n.name
    for n in g.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        fed = [prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in n.input[:2]]
        assert all(fed) == (n.name not in float_nodes), (n.name, fed)
        if not all(fed):
            continue
        w = prod[n.input[1]]
        if w.input[0] in inits:  # a weight: INT8, one scale per output channel
            assert inits[w.input[0]].data_type == onnx.TensorProto.INT8
            scale = numpy_helper.to_array(inits[w.input[1]])
            axis = next((a.i for a in w.attribute if a.name == "axis"), 1) % len(inits[w.input[0]].dims)
            out_axis = {"Conv": 0, "MatMul": len(inits[w.input[0]].dims) - 1}.get(n.op_type, 0)
            assert scale.size == inits[w.input[0]].dims[out_axis] and axis == out_axis, n.name
        if len(n.input) > 2 and n.input[2]:
            assert n.input[2] in inits and inits[n.input[2]].data_type == onnx.TensorProto.FLOAT, (
                n.name
            )  # float bias


def test_demo_int8_graph_and_manifest(demo_int8: Path) -> None:
    m = json.loads((demo_int8 / "manifest.json").read_text())
    assert m["status"] == "ok" and m["precision"]["mode"] == "int8" and m["norm_free"]
    i8 = m["precision"]["int8"]
    assert (i8["method"], i8["per_channel"]) == ("minmax", True)
    cal = i8["calibration"]
    assert (
        cal["kind"] == "demo-heldout"
        and cal["count"] == 128
        and not cal["latency_only"]
        and len(cal["sha256"]) == 64
    )
    from slab_deploy._deps import require

    assert i8["onnxruntime"] == require("onnxruntime").__version__
    g = onnx.load(str(demo_int8 / "model.onnx"))
    float_nodes = {f["name"] for f in i8["float_nodes"]}
    assert all(f["reason"] for f in i8["float_nodes"])
    _assert_explicit_precision(g, float_nodes)
    # what stays float is SLA's core and nothing else: per block the normaliser's reduction, its
    # denominator, eps, reciprocal and scaling, and the two activation products
    blocks = _linear_attentions(DEMO)
    ops = [n.op_type for n in g.graph.node if n.name in float_nodes]
    from slab_deploy.export.onnx_passes import token_sums

    sums = [n for n in token_sums(g.graph) if n.name in float_nodes]
    assert [n.op_type for n in sums] == ["MatMul"] * blocks  # the token sum of k: a MatMul by ones
    assert ops.count("Reciprocal") == blocks and ops.count("MatMul") == 4 * blocks
    assert {n.op_type for n in g.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert not [n for n in g.graph.node if n.op_type in ("LayerNormalization", "BatchNormalization")]
    meta = {p.key: p.value for p in g.metadata_props}
    assert (
        meta["slab_deploy.precision"] == "int8"
        and json.loads(meta["slab_deploy.calibration"])["sha256"] == cal["sha256"]
    )
    # the export's own INT8 rung ran on held-out images the scales were not fitted to, with the table's row
    p = m["parity"]["ort_cpu"]
    assert (
        p["passed"]
        and p["tolerance"] == tolerance_for("ort_cpu", "int8").to_dict()
        and "max_rel" not in p["tolerance"]
    )
    assert "not used for calibration" in p["inputs"] and p["samples"] == cal["parity_images"]
    assert (
        m["parity"]["onnx"]["passed"] and m["parity"]["onnx"]["max_rel"] < 1e-4
    )  # the fp32 graph it came from


def test_demo_int8_accuracy_within_one_point(demo_int8: Path) -> None:
    """Held-out top-1 of the INT8 graph against the fp32 checkpoint model, on all 360 digits and on the
    ones calibration never saw."""
    import torch

    from slab_deploy.weights import load_model

    m = json.loads((demo_int8 / "manifest.json").read_text())
    data = demo_heldout(DEMO, m["preprocessing"])
    with torch.no_grad():
        fp32 = load_model(DEMO, _demo_ckpt())(torch.from_numpy(data.x)).numpy().argmax(1)
    int8 = run_onnx(demo_int8 / "model.onnx", data.x).argmax(1)
    unseen = np.array(
        [n not in set(m["precision"]["int8"]["calibration"]["first_images"]) for n in data.names]
    )
    for keep in (np.ones_like(unseen), unseen):
        acc32, acc8 = (fp32[keep] == data.labels[keep]).mean(), (int8[keep] == data.labels[keep]).mean()
        assert acc32 > 0.95 and acc8 >= acc32 - 0.01, (acc32, acc8)


def test_layernorm_twin_keeps_its_norms_float(tmp_path: Path) -> None:
    """The LayerNorm baseline is quantised the same way: its LayerNorms stay float, their outputs are
    quantised again for the next MatMul (LayerNorm -> Q -> DQ -> MatMul), and nothing is listed float."""
    export_model(
        "deit_demo",
        _demo_ckpt("deit_demo"),
        tmp_path / "o",
        ExportOptions(precision="int8", calibration_samples=32),
    )
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["precision"]["int8"]["float_nodes"] == []
    g = onnx.load(str(tmp_path / "o" / "model.onnx"))
    _assert_explicit_precision(g, set())
    _, cons, _ = _maps(g)
    norms = [n for n in g.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(any(c.op_type == "QuantizeLinear" for c in cons[n.output[0]]) for n in norms[:-1])


@pytest.mark.parametrize(
    "name",
    [
        "test_slab_swin",
        pytest.param("test_flatten_swin"),
        pytest.param("test_slab_pvt", marks=pytest.mark.slow),
        pytest.param("test_slab_cswin", marks=pytest.mark.slow),
    ],
)
def test_tiny_models_int8(name: str, tmp_path: Path) -> None:
    """Randomised weights and BN statistics, calibrated on real images from a folder: every linear
    attention's normaliser is found (SLA's and FLatten's) and kept float, the rest is INT8."""
    ckpt = random_checkpoint(name, tmp_path / "c.pth", seed=3)
    folder = digit_folder(tmp_path / "digits", 120)
    res = export_model(
        name,
        ckpt,
        tmp_path / "o",
        ExportOptions(precision="int8", calibration=folder, calibration_samples=32),
    )
    i8 = res.manifest["precision"]["int8"]
    assert i8["calibration"]["kind"] == "folder" and i8["calibration"]["count"] == 32
    g = onnx.load(str(res.onnx_path))
    float_nodes = {f["name"] for f in i8["float_nodes"]}
    _assert_explicit_precision(g, float_nodes)
    linear = _linear_attentions(name)
    assert sum(n.op_type == "Reciprocal" and n.name in float_nodes for n in g.graph.node) == linear > 0
    assert res.manifest["parity"]["ort_cpu"]["passed"]


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["-m", DEMO, "--calibration-method", "entropy"],
            "--calibration-method applies to --precision int8 only",
        ),
        (["-m", DEMO, "--per-tensor"], "--per-channel/--per-tensor applies to --precision int8 only"),
        (
            ["-m", DEMO, "--precision", "fp16", "--calibration-samples", "8"],
            "--calibration-samples applies to --precision int8",
        ),
        (
            ["-m", DEMO, "--precision", "int8", "--calibration-method", "kl"],
            "unsupported --calibration-method 'kl'; use one of minmax",
        ),
        (
            ["-m", DEMO, "--precision", "int8", "--calibration-samples", "0"],
            "--calibration-samples must be between 1 and 1024, not 0",
        ),
        (
            ["-m", DEMO, "--precision", "int8", "--calibration-samples", "5000"],
            "--calibration-samples must be between 1 and 1024",
        ),
        (
            ["-m", DEMO, "--precision", "int8", "--calibration-samples", "many"],
            "--calibration-samples must be a whole number",
        ),
        (
            ["-m", DEMO, "--precision", "int8", "--calibration-samples", "500"],
            "--calibration-samples 500, but the held-out digits shipped with slab_deit_demo are 360 images",
        ),
        (
            ["-m", DEMO, "--precision", "int8", "--calibration", "no/such/dir"],
            "--calibration no/such/dir is not a directory",
        ),
        (
            ["-m", "test_slab_deit", "--precision", "int8"],
            "needs calibration images for test_slab_deit: pass --calibration DIR",
        ),
    ],
)
def test_bad_int8_options_refused_in_one_line(
    args: list[str],
    match: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["export", *args, "-o", str(out)], capsys, monkeypatch)
    assert code == 1, err
    line = " ".join(err.split())
    assert match in line and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "out.failed").exists()  # nothing half-written


def test_calibration_folder_with_fewer_images_than_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = digit_folder(tmp_path / "digits", 12)
    code, _, err = run_cli(
        [
            "export",
            "-m",
            DEMO,
            "--precision",
            "int8",
            "--calibration",
            str(folder),
            "--calibration-samples",
            "40",
            "-o",
            str(tmp_path / "out"),
        ],
        capsys,
        monkeypatch,
    )
    assert (
        code == 1
        and "--calibration-samples 40, but" in " ".join(err.split())
        and "holds 12 images; pass at most 12" in " ".join(err.split())
    )
    assert not (tmp_path / "out").exists()


def test_check_int8_passes_fresh_and_fails_tampered(
    demo_int8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        "check",
        "-m",
        DEMO,
        "-c",
        str(_demo_ckpt()),
        "--backends",
        "torch,onnx,ort-cpu",
        "--inputs",
        "64",
        "--json",
    ]
    code, out, err = run_cli([*args, "-a", str(demo_int8)], capsys, monkeypatch)
    assert code == 0, out + err
    rep = json.loads(out)
    ran = {r["rung"]: r for r in rep["rungs"]}
    assert "held-out digits" in rep["inputs"]["source"] and rep["inputs"]["count"] == 64
    for rung in ("simplified", "ort_cpu"):
        assert (
            ran[rung]["status"] == "pass" and ran[rung]["tolerance"] == tolerance_for(rung, "int8").to_dict()
        )
    # scales tampered: the activation scales feeding every weight MatMul cut to a quarter, as a range
    # calibrated on the wrong images would be (values beyond a quarter of the true range clip).
    # Halving them passes (SQNR 21.3 dB against the table's 20: clipping the top half of the range
    # costs the demo model about 12 dB and no prediction), so a quarter is the fault to show.
    bad = tmp_path / "bad"
    shutil.copytree(demo_int8, bad)
    g = onnx.load(str(bad / "model.onnx"))
    prod, _, inits = _maps(g)
    scales = {
        q.input[1]
        for n in g.graph.node
        if n.op_type == "MatMul" and prod[n.input[1]].input[0] in inits
        for q in (prod[n.input[0]], prod.get(prod[n.input[0]].input[0]))
        if q is not None
    }
    for name in scales:
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(0.25), name))
    onnx.save(g, str(bad / "model.onnx"))
    code, out, err = run_cli([*args, "-a", str(bad)], capsys, monkeypatch)
    assert code == 3, out + err
    assert json.loads(out)["first_failure"] == "simplified"


def test_check_int8_of_a_model_without_images_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["check", "-m", "test_slab_deit", "--precision", "int8"], capsys, monkeypatch)
    assert code == 1 and "check exports INT8 itself only for the demo models" in " ".join(err.split())


# ------------------------------------------------------------------------------------------------
# --activation-type: the uint8 (CPU only) form, and what ONNX Runtime makes of either


@pytest.fixture(scope="module")
def demo_uint8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uint8") / "demo"
    export_model(DEMO, _demo_ckpt(), out, ExportOptions(precision="int8", activation_type="uint8"))
    return out


def _assert_compute_ops_own_their_pairs(g: onnx.ModelProto) -> None:
    """Only compute ops read the DequantizeLinear of an activation, each through a QuantizeLinear ->
    DequantizeLinear pair of its own (what ONNX Runtime needs to fuse them); everything else that reads
    the tensor (the residual Add) reads it in float."""
    prod, cons, inits = _maps(g)
    for dq in g.graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
            continue
        users = cons.get(dq.output[0], [])
        if any(u.op_type in ("Conv", "MatMul", "Gemm") for u in users):
            assert len(users) == 1, (dq.name, [u.op_type for u in users])
            assert len(cons[prod[dq.input[0]].output[0]]) == 1, dq.name


def test_demo_uint8_graph_manifest_and_accuracy(demo_uint8: Path) -> None:
    import torch

    from slab_deploy.weights import load_model

    m = json.loads((demo_uint8 / "manifest.json").read_text())
    i8 = m["precision"]["int8"]
    assert m["status"] == "ok" and i8["activation_type"] == "uint8"
    assert "uint8 asymmetric" in i8["activations"]
    assert i8["qdq"]["problems"] == [] and not i8["qdq"]["tensorrt_explicit_precision"]
    assert "TensorRT" in i8["qdq"]["tensorrt_refusal"]
    g = onnx.load(str(demo_uint8 / "model.onnx"))
    _assert_explicit_precision(g, {f["name"] for f in i8["float_nodes"]}, "uint8")
    _assert_compute_ops_own_their_pairs(g)
    _, _, inits = _maps(g)
    act_zps = {numpy_helper.to_array(inits[n.input[2]]).dtype for n in g.graph.node
               if n.op_type == "QuantizeLinear"}
    assert act_zps == {np.dtype(np.uint8)}  # every activation QuantizeLinear writes uint8
    meta = {p.key: p.value for p in g.metadata_props}
    assert "uint8" in meta["slab_deploy.int8_activations"] and "uint8 activations" in g.doc_string
    data = demo_heldout(DEMO, m["preprocessing"])
    with torch.no_grad():
        fp32 = load_model(DEMO, _demo_ckpt())(torch.from_numpy(data.x)).numpy().argmax(1)
    got = run_onnx(demo_uint8 / "model.onnx", data.x).argmax(1)
    acc32, acc8 = (fp32 == data.labels).mean(), (got == data.labels).mean()
    assert acc32 > 0.95 and acc8 >= acc32 - tolerance_for("ort_cpu", "int8").max_accuracy_drop, (acc32, acc8)


def test_demo_int8_manifest_names_its_activation_type(demo_int8: Path) -> None:
    m = json.loads((demo_int8 / "manifest.json").read_text())
    i8 = m["precision"]["int8"]
    assert i8["activation_type"] == "int8" and i8["qdq"]["tensorrt_explicit_precision"]
    assert i8["qdq"]["tensorrt_refusal"] is None
    g = onnx.load(str(demo_int8 / "model.onnx"))
    _assert_compute_ops_own_their_pairs(g)
    assert "int8 symmetric" in {p.key: p.value for p in g.metadata_props}["slab_deploy.int8_activations"]


def test_check_of_a_uint8_export_passes_with_the_int8_rows(
    demo_uint8: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["check", "-m", DEMO, "-c", str(_demo_ckpt()), "--backends", "torch,onnx,ort-cpu", "--json"]
    code, out, err = run_cli([*args, "-a", str(demo_uint8)], capsys, monkeypatch)
    assert code == 0, out + err
    ran = {r["rung"]: r for r in json.loads(out)["rungs"]}
    for rung in ("simplified", "ort_cpu"):
        assert ran[rung]["status"] == "pass"
        assert ran[rung]["tolerance"] == tolerance_for(rung, "int8").to_dict()


@pytest.mark.parametrize("activations", ["int8", "uint8"])
def test_onnx_runtime_fuses_every_quantised_op_of_a_folded_swin(activations: str, tmp_path: Path) -> None:
    """In a folded SLAB-Swin the qkv and fc1 Linears read the residual stream itself. quantize_static
    had the residual Add read the same DequantizeLinear, and ONNX Runtime then left those Linears as
    float MatMuls behind a dequantisation of their weights on every run (int8 activations; it converts
    an int8 Q/DQ pair to uint8 on x86 only when the QuantizeLinear feeds one DequantizeLinear). Now no
    weight is dequantised at run time: every quantised MatMul, Conv and Gemm is fused."""
    from slab_deploy._deps import require

    ort = require("onnxruntime", "this test")
    ckpt = random_checkpoint("test_slab_swin", tmp_path / "c.pth", seed=5)
    folder = digit_folder(tmp_path / "digits", 40)
    res = export_model("test_slab_swin", ckpt, tmp_path / "o", ExportOptions(
        precision="int8", calibration=folder, calibration_samples=16, activation_type=activations))
    i8 = res.manifest["precision"]["int8"]
    assert i8["compute_op_inputs"]["inputs_rewired_to_float"] > 0  # the residual Adds
    g = onnx.load(str(res.onnx_path))
    _assert_explicit_precision(g, {f["name"] for f in i8["float_nodes"]}, activations)
    _assert_compute_ops_own_their_pairs(g)
    prod, _, inits = _maps(g)
    def dequantised(t: str) -> bool:
        return t in prod and prod[t].op_type == "DequantizeLinear"

    quantised = sum(n.op_type == "MatMul" and all(map(dequantised, n.input)) for n in g.graph.node)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(res.onnx_path), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "ort.onnx"))
    opt_inits = {t.name for t in opt.graph.initializer}
    weight_dq = [n.name for n in opt.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in opt_inits]
    assert weight_dq == [], weight_dq
    assert sum(n.op_type == "QLinearMatMul" for n in opt.graph.node) == quantised > 0
    assert res.manifest["parity"]["ort_cpu"]["passed"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--activation-type", "uint8"], "--activation-type applies to --precision int8 only"),
        (["--precision", "int8", "--activation-type", "int16"],
         "unsupported --activation-type 'int16'; use one of int8, uint8"),
        (["--precision", "int8", "--activation-type", "uint8", "--format", "engine"],
         "--format engine needs --activation-type int8 (TensorRT builds signed int8 Q/DQ only), not uint8"),
    ],
)
def test_bad_activation_type_refused_in_one_line(
    args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["export", "-m", DEMO, *args, "-o", str(out)], capsys, monkeypatch)
    assert code == 1, err
    assert match in " ".join(err.split()) and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "out.failed").exists()


def test_build_and_tensorrt_serving_refuse_a_uint8_export(
    demo_uint8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused from the manifest's quantisation record, before TensorRT is looked for and before
    anything is written."""
    d = tmp_path / "u8"
    shutil.copytree(demo_uint8, d)
    before = sorted(p.name for p in d.iterdir())
    code, _, err = run_cli(["build", str(d)], capsys, monkeypatch)
    line = " ".join(err.split())
    assert code == 1 and "Traceback" not in err, err
    assert ("slab-deploy build needs an INT8 export with signed int8 activations, and this one has uint8 "
            "activations (CPU only): export again with --activation-type int8") in line, err
    assert sorted(p.name for p in d.iterdir()) == before  # no model.plan, no engine.json
    repo = tmp_path / "repo"
    code, _, err = run_cli(["serve-repo", str(d), "-o", str(repo), "--flavour", "tensorrt"],
                           capsys, monkeypatch)
    assert code == 1 and "--flavour tensorrt needs an INT8 export with signed int8 activations" in " ".join(
        err.split()), err
    assert not repo.exists() or not any(repo.iterdir())
