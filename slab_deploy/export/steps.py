"""The steps of an export, in order: load -> fold -> reference -> precision -> onnx -> check_model ->
parity (unsimplified) -> simplify -> [int8: calibrate and quantise the simplified fp32 graph] ->
parity (deployed) -> opset check. `export.api.export_model` runs them; the lint, the manifest and
the commit follow there."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from slab_deploy.choices import DEFAULT_SLA_POLICY
from slab_deploy.errors import ExportError, UnsupportedInputError
from slab_deploy.export.calibration import CalibrationSet
from slab_deploy.export.onnx_export import ExportInfo, ImageModel, file_opset, onnx_from_torch
from slab_deploy.export.onnx_passes import SimplifyResult, simplify
from slab_deploy.export.options import PRECISIONS, ExportOptions
from slab_deploy.export.quantize import QuantizeResult
from slab_deploy.models.folded import FoldReport
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import tolerance_for


def load(
    model_name: str, checkpoint: str | Path | None, opts: ExportOptions, *, ema: bool,
    allow_unfinished_prepbn: bool,
) -> nn.Module:
    """The checkpoint model (or the embedded untrained default), at the requested image size."""
    from slab_deploy.weights import load_model

    return load_model(model_name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
                      img_size=opts.img_size)


def fold(ref: nn.Module, opts: ExportOptions) -> tuple[nn.Module, FoldReport]:
    """The folded model and its report; with `opts.fold` off, a copy of `ref` and a report of kept norms."""
    from slab_deploy.passes import fold_model

    return fold_model(ref, verify=opts.fold) if opts.fold else _unfolded(ref)


def _unfolded(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """The checkpoint model as is, with an empty fold report (norms listed as not folded)."""
    from slab_deploy.passes.fold import NormFold, norm_kinds

    kinds = norm_kinds(model)
    n = sum(p.numel() for p in model.parameters())
    rep = FoldReport(
        getattr(model.spec, "name", "?"),
        [NormFold(k, kind, c, "kept-layernorm" if kind == "layernorm" else "kept-affine",
                  reason="fold disabled (--no-fold)") for k, (kind, c) in kinds.items()],
        n, n, [], 0.0, 0.0, 0.0, 0.0,
    )
    return copy.deepcopy(model), rep


@dataclass
class Reference:
    """The parity images (seeded), the checkpoint model's logits on them, and the generator the
    export's example batch is drawn from next."""

    inputs: torch.Tensor
    logits: np.ndarray
    generator: torch.Generator

    @property
    def images(self) -> np.ndarray:
        return self.inputs.numpy()


def reference(ref: nn.Module, opts: ExportOptions, input_size: list[int]) -> Reference:
    """Seeded random images (the static batch, or `parity_batch`) and the reference model's fp32 logits."""
    g = torch.Generator().manual_seed(opts.seed)
    inputs = torch.randn(opts.batch or opts.parity_batch, *input_size, generator=g)
    with torch.no_grad():
        logits = ref(inputs).float().numpy()
    return Reference(inputs, logits, g)


def reference_on(ref: nn.Module, images: np.ndarray, generator: torch.Generator,
                 batch: int = 8) -> Reference:
    """The reference model's fp32 logits on given images (in batches: bounded memory)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    with torch.no_grad():
        logits = np.concatenate([ref(x[i : i + batch]).float().numpy() for i in range(0, x.shape[0], batch)])
    return Reference(x, logits, generator)


def base_precision(precision: str) -> str:
    """The precision the graph is exported at: int8 quantises an fp32 export."""
    return "fp32" if precision == "int8" else precision


def prepare_precision(model: nn.Module, precision: str, sla_policy: str = DEFAULT_SLA_POLICY) -> nn.Module:
    """Wrap for deployment. fp16: half weights and activations, fp32 images in and logits out, and
    SLA's normaliser (and, with policy fp32, its k^T v product) in fp32: see `SLACore`."""
    from slab_deploy.models.layers import set_sla_policy

    if precision == "fp32":
        return ImageModel(model, torch.float32)
    if precision == "fp16":
        model = model.half()
        set_sla_policy(model, sla_policy)
        return ImageModel(model, torch.float16)
    raise UnsupportedInputError(f"unsupported precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def export_onnx(
    deploy: nn.Module, ref: Reference, opts: ExportOptions, input_size: list[int], stage: Path
) -> tuple[onnx.ModelProto, ExportInfo]:
    """Trace `deploy` to ONNX (through a scratch file in `stage`, removed again); returns the graph and
    how it was made."""
    example = torch.randn(opts.batch or 2, *input_size, generator=ref.generator)
    with torch.no_grad():
        # one eager call settles shape-derived choices (e.g. SLA's product order) before tracing
        deploy(example)
    scratch = stage / ".exporter-output.onnx"
    exp = onnx_from_torch(deploy, scratch, example, opset=opts.opset, dynamic_batch=opts.batch is None,
                          exporter=opts.exporter)
    raw = exp.model if exp.model is not None else onnx.load(str(scratch))
    scratch.unlink()
    return raw, exp


def check_model(raw: onnx.ModelProto) -> None:
    """The ONNX checker on the exported graph: an invalid graph is an ExportError."""
    try:
        onnx.checker.check_model(raw)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {str(exc).splitlines()[0]}") from None


def parity(model: onnx.ModelProto, ref: Reference, rung: str, precision: str,
           static_batch: int | None = None, chunk: int | None = None) -> dict[str, Any]:
    """One parity rung: `model` on ONNX Runtime CPU against the reference logits, judged by the
    tolerance of (`rung`, `precision`). A graph this host's ORT has no kernel for is a skip; one
    ORT cannot run otherwise is an ExportError. The images run in feeds of the static batch (the
    last padded with repeated images whose outputs are dropped) or of `chunk` (bounded memory)."""
    from slab_deploy.runtime.ort import session

    tol = tolerance_for(rung, precision)
    n = ref.images.shape[0]
    step = static_batch or chunk or n
    try:
        sess = session(model)
        name = sess.get_inputs()[0].name
        xp = ref.images[np.arange(-(-n // step) * step) % n] if static_batch else ref.images
        parts = [sess.run(None, {name: xp[i : i + step]})[0] for i in range(0, xp.shape[0], step)]
        got = np.concatenate(parts)[:n].astype(np.float32)
    except Exception as exc:
        text = str(exc)
        if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
            return {"skipped": True, "passed": True,
                    "reason": f"ONNX Runtime CPU cannot run this graph: {text.splitlines()[0][:200]}"}
        raise ExportError(
            f"ONNX Runtime could not run the exported graph: {text.splitlines()[0][:300]}"
        ) from None
    m = compare(ref.logits, got)
    v = judge(m, tol)
    out = {"passed": v.passed, "failures": v.failures, "tolerance": tol.to_dict(), **m.to_dict()}
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        out["note"] = (
            "ONNX Runtime's CPU provider runs most fp16 nodes through fp32 kernels (it inserts casts), "
            "so this rung checks the fp16 weights, not fp16 arithmetic: verify on a GPU with "
            "`slab-deploy check --backends ort-cuda`"
        )
    return out


def simplify_checked(
    raw: onnx.ModelProto, ref: Reference, opts: ExportOptions, raw_rung: dict[str, Any]
) -> SimplifyResult:
    """The requested simplifier with its own parity re-check; none for an fp16 graph this host's
    ORT could not run at the unsimplified rung (nothing could re-check the simplifier)."""
    simp_tol = tolerance_for("simplified", base_precision(opts.precision))
    if opts.precision == "fp16" and raw_rung.get("skipped"):
        sres = simplify(raw, "none", ref.images, tolerance=simp_tol)
        sres.note = "skipped: ONNX Runtime on this host cannot run the fp16 graph to re-check a simplifier"
        return sres
    return simplify(raw, opts.simplifier, ref.images, tolerance=simp_tol)


@dataclass
class Int8Step:
    """What the INT8 step made: the quantised graph and its record, and the reference it is judged against."""

    result: QuantizeResult
    calibration: CalibrationSet
    reference: Reference
    audit: dict[str, Any]


def quantize(model_name: str, fp32: onnx.ModelProto, ref: nn.Module, opts: ExportOptions, pre: dict[str, Any],
             stage: Path, generator: torch.Generator, largest_activation: int,
             num_classes: int | None) -> Int8Step:
    """Calibrate on the export's calibration images and quantise the simplified fp32 graph; the
    result must pass the Q/DQ audit (else ExportError: nothing would judge it): TensorRT's
    explicit-precision rules for int8 activations, the same rules but the activation type for uint8."""
    from slab_deploy.export.calibration import INT8_PARITY_FEED, calibration_set
    from slab_deploy.export.quantize import audit, feed_size, quantize_int8

    cal = calibration_set(model_name, opts, pre, num_classes=num_classes)
    res = quantize_int8(fp32, cal.images, method=opts.method, per_channel=opts.channelwise, workdir=stage,
                        feed=feed_size(largest_activation, opts.batch), static_batch=opts.batch,
                        activation_type=opts.activations)
    report = audit(res.model, [f.name for f in res.float_nodes], opts.activations)
    if report["problems"]:
        raise ExportError(f"the INT8 graph breaks the Q/DQ rules of its form "
                          f"({opts.activations} activations): {report['problems'][0]}")
    return Int8Step(res, cal, reference_on(ref, cal.parity, generator, INT8_PARITY_FEED), report)


def check_opset(final: onnx.ModelProto, exp: ExportInfo, sres: SimplifyResult) -> None:
    """The deployed graph keeps the opset it was exported at."""
    if file_opset(final) != exp.opset:
        raise ExportError(
            f"the {sres.simplifier} simplifier changed the graph's opset from {exp.opset} to "
            f"{file_opset(final)}; pass --simplifier none or another simplifier"
        )
