"""Export: clean graphs, manifest, dynamic batch, parity, atomic writes, simplifier rejection, fp16.

The transaction on the output directory, the lock, signals, the umask and option validation are
in test_export_transaction.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import full_models, tiny_models

from slab_deploy.errors import ArtifactError, ExportParityError, ParityError
from slab_deploy.export import onnx_passes
from slab_deploy.export.api import ExportOptions, export_model
from slab_deploy.models import get_spec
from slab_deploy.runtime.ort import run_onnx
from slab_deploy.utils import sha256_file
from slab_deploy.weights import random_checkpoint

MANIFEST_KEYS = {
    "status", "model", "checkpoint", "fold", "export", "simplify", "lint", "precision", "io", "preprocessing",
    "parity", "versions", "norm_free", "onnx", "opset", "files",
}


def _export(name: str, tmp: Path, **opts) -> dict:  # type: ignore[no-untyped-def]
    ckpt = random_checkpoint(name, tmp / "ckpt.pth", seed=3)
    res = export_model(name, ckpt, tmp / "out", ExportOptions(**opts))
    return res.manifest


def _assert_clean(m: dict, name: str, out: Path) -> None:
    spec = get_spec(name)
    assert MANIFEST_KEYS <= set(m), MANIFEST_KEYS - set(m)
    assert m["status"] == "ok"
    assert m["lint"]["einsum"] == 0 and m["lint"]["resize"] == 0
    if spec.is_slab:
        assert m["norm_free"] and m["lint"]["norm_nodes"] == {}
        assert m["fold"]["folded"] == len(m["fold"]["norms"])
        assert m["fold"]["biases_removed"]  # passes.move_biases ran in the export's fold
    else:
        assert (m["lint"]["norm_nodes"].get("LayerNormalization", 0) > 0
                or m["simplify"]["ops_after"].get("ReduceMean", 0) > 0)
    for rung in ("onnx", "ort_cpu"):
        assert m["parity"][rung]["passed"], m["parity"][rung]
    model = onnx.load(str(out / "model.onnx"))
    if spec.is_slab and spec.family != "cswin":  # (CSWin's LePE stages keep their conv biases)
        biased_dwc = [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2
                      and n.input[2] and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        assert biased_dwc == [], f"SLA's DWC should have no bias in the graph: {biased_dwc}"
    assert m["opset"] == m["export"]["opset"] == {o.domain: o.version for o in model.opset_import}[""]
    assert m["files"]["model.onnx"]["sha256"] == sha256_file(out / "model.onnx")
    props = onnx_passes.get_metadata(model)
    pre = json.loads(props["slab_deploy.preprocessing"])
    assert pre["mean"] == list(spec.mean) and pre["input_size"][0] == 3
    assert props["slab_deploy.checkpoint_sha256"] == m["checkpoint"]["sha256"]


@pytest.mark.parametrize("name", tiny_models())
def test_export_tiny(name: str, tmp_path: Path) -> None:
    m = _export(name, tmp_path)
    out = tmp_path / "out"
    _assert_clean(m, name, out)
    assert m["export"]["dynamic_batch"]
    # dynamic batch really works, and the unsimplified graph sits beside the deployed one
    size = m["preprocessing"]["input_size"]
    for b in (1, 5):
        y = run_onnx(out / "model.onnx",
                     np.random.default_rng(b).standard_normal((b, *size), dtype=np.float32))
        assert y.shape == (b, m["io"]["outputs"][0]["shape"][1])
    assert (out / "model.unsimplified.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", full_models())
def test_export_and_check_full_size(name: str, tmp_path: Path) -> None:
    """Every model of the zoo at full size: export (fold, torch.export, simplify, ORT CPU parity), and
    for SLAB models the CPU rungs of the parity ladder on the artefacts (the project's own `check`)."""
    import shutil

    from slab_deploy.check import run_check

    m = _export(name, tmp_path)
    out = tmp_path / "out"
    _assert_clean(m, name, out)
    if get_spec(name).is_slab:
        rep = run_check(name, tmp_path / "ckpt.pth", artifacts=out, inputs=2,
                        backends=("torch", "onnx", "ort-cpu"))
        assert rep.passed, rep.verdict()
        assert [r.rung for r in rep.rungs if r.status == "pass"] == ["fold", "onnx", "simplified", "ort_cpu"]
    shutil.rmtree(out)  # full-size graphs are large: free the disk as we go


def test_torchscript_exporter_and_static_batch(tmp_path: Path) -> None:
    name = "test_slab_swin"
    m = _export(name, tmp_path, exporter="torchscript", batch=2, simplifier="onnxslim")
    _assert_clean(m, name, tmp_path / "out")
    assert m["export"]["exporter"] == "torchscript" and not m["export"]["dynamic_batch"]
    g = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_no_overwrite_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "test_slab_swin"
    ckpt = random_checkpoint(name, tmp_path / "c.pth", seed=1)
    out = tmp_path / "out"
    export_model(name, ckpt, out)
    good = (out / "model.onnx").read_bytes()
    with pytest.raises(ArtifactError, match="--force"):
        export_model(name, ckpt, out)

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # an interrupted write

    monkeypatch.setattr(onnx, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        export_model(name, ckpt, out, force=True)
    assert (out / "model.onnx").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "c.pth", "out"]  # no staging left


def test_parity_failure_exits_3_and_keeps_marked_files_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import break_the_fold

    break_the_fold(monkeypatch)  # a fault in the deployed model
    ckpt = random_checkpoint("test_slab_swin", tmp_path / "c.pth", seed=1)
    with pytest.raises(ParityError) as ei:
        export_model("test_slab_swin", ckpt, tmp_path / "out")
    assert isinstance(ei.value, ExportParityError)
    assert ei.value.exit_code == 3 and "rung 'onnx'" in str(ei.value)
    failed = tmp_path / "out.failed"
    assert ei.value.failed_dir == failed and str(failed) in str(ei.value)
    assert not (tmp_path / "out").exists()  # never created: a failed set does not pose as an export
    assert sorted(p.name for p in failed.iterdir()) == [
        "manifest.json", "model.parity-failed.onnx", "model.unsimplified.onnx"]
    m = json.loads((failed / "manifest.json").read_text())
    assert m["status"] == "parity-failed" and not m["parity"]["onnx"]["passed"]
    assert m["onnx"] == "model.parity-failed.onnx"


def test_simplifier_that_changes_results_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_simplifier(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        init = max(out.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.flat[0] += 100.0
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return out

    monkeypatch.setattr(onnx_passes, "_run_simplifier", bad_simplifier)
    m = _export("test_slab_swin", tmp_path, simplifier="onnxslim")
    assert m["status"] == "ok"
    assert not m["simplify"]["accepted"] and "rejected" in m["simplify"]["note"]
    assert m["simplify"]["used"] == "none"


def test_fp16_export_keeps_fp32_islands(tmp_path: Path) -> None:
    name = "test_slab_swin"
    m = _export(name, tmp_path, precision="fp16", sla_policy="fp32")
    assert m["status"] == "ok" and m["precision"]["mode"] == "fp16"
    g = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert g.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    f16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in g.graph.initializer)
    assert f16 > 0.9 * len([t for t in g.graph.initializer
                            if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)])
    casts_to_f32 = [n for n in g.graph.node
                    if n.op_type == "Cast"
                    and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    n_sla = sum(1 for a in get_spec(name).attention if a == "sla")
    assert len(casts_to_f32) >= n_sla  # q, k, v of every SLA block go to fp32 for the normaliser and k^T v
    p = m["parity"]["ort_cpu"]
    assert p.get("skipped") or (p["passed"] and p["cosine"] > 0.999)


def test_fp16_mixed_sla_export_passes_parity(tmp_path: Path) -> None:
    """The mixed policy's graph keeps its normaliser's epsilon (an fp16 graph once rounded eps/N
    to zero and divided by zero) and runs every MatMul over tokens in fp16, and has no ReduceMax
    (ONNX Runtime CUDA runs reductions on cuDNN); the fp32 policy runs SLA's in fp32."""
    name = "test_slab_swin"
    fp32_matmuls = {}
    for policy in ("mixed", "fp32"):
        m = _export(name, tmp_path / policy, precision="fp16", sla_policy=policy)
        assert m["status"] == "ok"
        p = m["parity"]["ort_cpu"]
        assert p["passed"] and p["cosine"] > 0.999
        g = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / policy / "out" / "model.onnx")))
        if policy == "mixed":
            assert not {n.op_type for n in g.graph.node} & {"ReduceMax", "ReduceSum"}
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.graph.value_info, *g.graph.input]}
        types.update({t.name: t.data_type for t in g.graph.initializer})
        ones = onnx_passes.ones_constants(g.graph)
        f32 = onnx.TensorProto.FLOAT
        fp32 = [n for n in g.graph.node if n.op_type == "MatMul" and types.get(n.input[0]) == f32]
        # the only fp32 MatMuls `mixed` keeps: the normaliser's channel sums, (BH, 1, c) by a ones column
        fp32_matmuls[policy] = sum(n.input[1] not in ones for n in fp32)
    n_sla = sum(1 for a in get_spec(name).attention if a == "sla")
    assert fp32_matmuls["mixed"] == 0
    assert fp32_matmuls["fp32"] >= 2 * n_sla


def _ort_fused_ops(model: onnx.ModelProto, tmp: Path) -> set[str]:
    """The op types ONNX Runtime's CPU provider runs after its graph optimisations."""
    from slab_deploy._deps import require

    ort = require("onnxruntime", "the test")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp / "optimised.onnx")).graph.node}


def test_exported_gelu_is_the_form_onnx_runtime_fuses(tmp_path: Path) -> None:
    """torch.export writes GELU as x * (0.5 * (1 + erf(x / sqrt 2))), which ONNX Runtime runs as five
    kernels; the export rewrites it to (x * 0.5) * (...), which it fuses into one Gelu (BiasGelu
    with a bias add before it), with the same output bits."""
    import torch

    from slab_deploy.export.onnx_export import _export_dynamo

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 5, 8)
    _export_dynamo(mlp, x, tmp_path / "raw.onnx", 18, False)  # the exporter alone, no rewrite
    raw = onnx.load(str(tmp_path / "raw.onnx"))
    assert "Erf" in _ort_fused_ops(raw, tmp_path)  # the premise: ORT leaves the exporter's form unfused
    fixed = onnx.load(str(tmp_path / "raw.onnx"))
    assert onnx_passes.canonical_gelu(fixed) == 1
    onnx.checker.check_model(fixed)
    ops = _ort_fused_ops(fixed, tmp_path)
    assert ops & {"Gelu", "BiasGelu"} and "Erf" not in ops, ops
    from slab_deploy.runtime.ort import session

    outs = []
    for m in (raw, fixed):
        sess = session(m, graph_opt="none")  # the graphs as written
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert np.array_equal(outs[0], outs[1])
    assert onnx_passes.canonical_gelu(fixed) == 0  # idempotent
