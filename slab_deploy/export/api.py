"""`export`: checkpoint -> folded model -> ONNX (fp32 or fp16) -> simplified -> parity-checked, with a manifest."""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from slab_deploy import __version__
from slab_deploy.errors import ArtifactError, ExportError, ParityError, UnsupportedInputError
from slab_deploy.export.onnx_export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, ImageModel, onnx_from_torch
from slab_deploy.export.onnx_passes import get_metadata, lint, op_counts, set_metadata, simplify
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import tolerance_for
from slab_deploy.utils import atomic_write

PRECISIONS = ("fp32", "fp16")
UNSIMPLIFIED_NAME = "model.unsimplified.onnx"  # kept beside model.onnx so `check` can tell exporter from simplifier faults


@dataclass
class ExportOptions:
    batch: int | None = None  # None: dynamic batch
    opset: int = DEFAULT_OPSET
    precision: str = "fp32"
    simplifier: str = "auto"
    exporter: str = "auto"
    parity_batch: int = 3
    seed: int = 0
    img_size: int | None = None
    fold: bool = True  # False exports the checkpoint model as is (for unfolded benchmarks)
    sla_policy: str = "fp32"  # fp16 only: SLA's half-precision policy (fp32 island or mixed; see SLACore)


@dataclass
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    passed: bool
    steps: dict[str, float] = field(default_factory=dict)


def tool_versions() -> dict[str, str | None]:
    from slab_deploy._deps import module_version, version_of

    return {
        "slab-deploy": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": module_version("onnxruntime"),
        "onnxscript": version_of("onnxscript"),
        "onnxsim": version_of("onnxsim"),
        "onnxslim": version_of("onnxslim"),
    }


def prepare_precision(model: nn.Module, precision: str, sla_policy: str = "fp32") -> nn.Module:
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


def preprocessing(model: nn.Module) -> dict[str, Any]:
    from slab_deploy.models import model_spec

    spec = model_spec(model)
    size = getattr(model, "img_size", spec.input_size[1])
    size = list(size) if isinstance(size, (tuple, list)) else [size, size]
    return {
        "input_size": [3, *size],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
        "crop_pct": spec.crop_pct,
        "resize_shorter_to": int(round(size[0] / spec.crop_pct)),
        "layout": "NCHW, RGB, float32 in [0,1] then (x - mean) / std",
    }


def export_model(
    model_name: str,
    checkpoint: str | Path | None,
    output_dir: str | Path | None,
    options: ExportOptions | None = None,
    *,
    force: bool = False,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    keep_unsimplified: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Fold, export, simplify and parity-check `model_name`; writes DIR/model.onnx and DIR/manifest.json.

    Raises ParityError (exit 3) when the deployed graph does not match the checkpoint model; the
    files are then kept for inspection as DIR/model.parity-failed.onnx and DIR/manifest.json.
    """
    from slab_deploy.models import checkpoint_info, model_spec
    from slab_deploy.passes import fold_model
    from slab_deploy.pipeline import load_model

    opts = options or ExportOptions()
    say = progress or (lambda _s: None)
    if opts.precision not in PRECISIONS:
        raise UnsupportedInputError(f"unsupported precision {opts.precision!r}; use one of {', '.join(PRECISIONS)}")
    if opts.batch is not None and opts.batch < 1:
        raise UnsupportedInputError(f"--batch must be >= 1, got {opts.batch}")
    out_dir = Path(output_dir) if output_dir is not None else Path(model_name)
    onnx_path = out_dir / "model.onnx"
    manifest_path = out_dir / "manifest.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--output {out_dir} is a file; pass a directory")
    if onnx_path.exists() and not force:
        raise ArtifactError(f"{onnx_path} exists; pass --force to overwrite it or choose another --output")
    steps: dict[str, float] = {}
    t = time.perf_counter()

    say("loading checkpoint")
    ref = load_model(model_name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn, img_size=opts.img_size)
    info = checkpoint_info(ref)
    steps["load"] = time.perf_counter() - t

    t = time.perf_counter()
    say("folding norms")
    folded, report = fold_model(ref, verify=opts.fold) if opts.fold else _unfolded(ref)
    steps["fold"] = time.perf_counter() - t

    pre = preprocessing(ref)
    g = torch.Generator().manual_seed(opts.seed)
    pbatch = opts.batch or opts.parity_batch
    inputs = torch.randn(pbatch, *pre["input_size"], generator=g)
    with torch.no_grad():
        reference = ref(inputs).float().numpy()

    t = time.perf_counter()
    say(f"exporting ONNX ({opts.precision})")
    deploy = prepare_precision(folded, opts.precision, opts.sla_policy)
    example = torch.randn(opts.batch or 2, *pre["input_size"], generator=g)
    with torch.no_grad():
        deploy(example)  # one eager call settles shape-derived choices (e.g. SLA's product order) before tracing
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slab-deploy-export-") as td:
        tmp = Path(td) / "raw.onnx"
        exp = onnx_from_torch(deploy, tmp, example, opset=opts.opset, dynamic_batch=opts.batch is None, exporter=opts.exporter)
        raw = onnx.load(str(tmp))
    steps["export"] = time.perf_counter() - t
    try:
        onnx.checker.check_model(raw)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {str(exc).splitlines()[0]}") from None

    x_np = inputs.numpy()
    fp16 = opts.precision == "fp16"
    tol_onnx = tolerance_for("onnx", opts.precision)
    t = time.perf_counter()
    say("checking ONNX Runtime parity (unsimplified)")
    parity: dict[str, Any] = {}
    rung_raw = _ort_parity(raw, x_np, reference, tol_onnx)
    parity["onnx"] = rung_raw

    say("simplifying")
    simp_tol = tolerance_for("simplified", opts.precision)
    if fp16 and rung_raw.get("skipped"):
        sres = simplify(raw, "none", x_np, tolerance=simp_tol)  # cannot re-check fp16 on this host's ORT
        sres.note = "skipped: ONNX Runtime on this host cannot run the fp16 graph to re-check a simplifier"
    else:
        sres = simplify(raw, opts.simplifier, x_np, tolerance=simp_tol)
    final = sres.model
    steps["simplify"] = sres.seconds
    say("checking ONNX Runtime parity (deployed graph)")
    parity["ort_cpu"] = _ort_parity(final, x_np, reference, tolerance_for("ort_cpu", opts.precision))
    steps["parity"] = time.perf_counter() - t - sres.seconds

    lint_res = lint(final)
    meta = {
        "slab_deploy.version": __version__,
        "slab_deploy.model": model_name,
        "slab_deploy.precision": opts.precision,
        "slab_deploy.preprocessing": json.dumps(pre),
        "slab_deploy.checkpoint_sha256": info.sha256 if info else "",
        "slab_deploy.untrained": str(bool(getattr(ref, "untrained", False))).lower(),
    }
    set_metadata(final, meta)
    final.doc_string = f"{model_name} exported by slab-deploy {__version__} ({opts.precision}, folded)"

    passed = all(r.get("passed", True) for r in parity.values())
    spec = model_spec(ref)
    norm_ok = lint_res.norm_free or not spec.is_slab or report.kept > 0 or not opts.fold
    status = "ok" if passed else "parity-failed"
    manifest = {
        "status": status,
        "model": model_name,
        "family": spec.family,
        "norm": spec.norm,
        "attention": list(spec.attention),
        "untrained": bool(getattr(ref, "untrained", False)),
        "checkpoint": {
            "path": info.path if info else None,
            "sha256": info.sha256 if info else None,
            "format": info.format if info else None,
            "entry": info.entry if info else None,
            "ema": ema,
            "layout": info.layout if info else None,
            "remapped": info.remapped if info else "",
        },
        "fold": report.to_dict(),
        "export": {
            "exporter": exp.exporter,
            "fallback_reason": exp.fallback_reason,
            "opset": exp.opset,
            "dynamic_batch": exp.dynamic_batch,
            "batch": opts.batch,
            "seconds": round(exp.seconds, 3),
        },
        "simplify": {
            "requested": opts.simplifier,
            "used": sres.simplifier,
            "accepted": sres.accepted,
            "note": sres.note,
            "seconds": round(sres.seconds, 3),
            "nodes_before": sres.nodes_before,
            "nodes_after": sres.nodes_after,
            "max_abs_delta_vs_unsimplified": sres.max_abs_delta,
            "ops_before": sres.ops_before,
            "ops_after": op_counts(final),
        },
        "lint": lint_res.to_dict(),
        "precision": {
            "mode": opts.precision,
            "io": "float32 images in, float32 logits out",
            "sla_policy": opts.sla_policy if fp16 else "native",
            "fp32_islands": (
                "SLA normaliser, reciprocal and k^T v product (policy fp32); FLatten focused kernel" if opts.sla_policy == "fp32"
                else "SLA token mean of k, normaliser and reciprocal, final scaling (policy mixed; matmuls fp16 with fp32 accumulation); FLatten focused kernel"
            ) if fp16 else "",
        },
        "io": {
            "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch" if opts.batch is None else opts.batch, *pre["input_size"]]}],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch" if opts.batch is None else opts.batch, spec.num_classes if info is None or info.num_classes is None else info.num_classes]}],
        },
        "preprocessing": pre,
        "parity": {"seed": opts.seed, "batch": pbatch, "reference": "checkpoint model (unfolded), torch fp32 eval", **parity},
        "norm_free": lint_res.norm_free,
        "steps_seconds": {k: round(v, 3) for k, v in steps.items()},
        "versions": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not norm_ok:
        manifest["status"] = status = "lint-failed"
    if keep_unsimplified:
        set_metadata(raw, {**meta, "slab_deploy.stage": "unsimplified"})
        with atomic_write(out_dir / UNSIMPLIFIED_NAME) as tmp:
            onnx.save(raw, str(tmp))
        manifest["unsimplified_onnx"] = UNSIMPLIFIED_NAME
    target = onnx_path if status == "ok" else out_dir / "model.parity-failed.onnx"
    with atomic_write(target) as tmp:
        onnx.save(final, str(tmp))
    manifest["onnx"] = target.name
    with atomic_write(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    result = ExportResult(target, manifest_path, manifest, status == "ok", steps)
    if status == "lint-failed":
        raise ExportError(
            f"the folded {model_name} graph still has norm nodes {lint_res.norm_nodes} or statistic reductions; "
            f"kept for inspection as {target}"
        )
    if not passed:
        first = next(k for k, r in parity.items() if not r.get("passed", True))
        raise ParityError(
            f"exported graph does not match the checkpoint model at rung '{first}' "
            f"({'; '.join(parity[first]['failures'])}); kept for inspection as {target} with {manifest_path}"
        )
    assert get_metadata(final)["slab_deploy.model"] == model_name
    return result


def _unfolded(model: nn.Module) -> tuple[nn.Module, Any]:
    """The checkpoint model as is, with an empty fold report (norms listed as not folded)."""
    import copy

    from slab_deploy.passes.fold import FoldReport, NormFold, _norm_kinds

    kinds = _norm_kinds(model)
    n = sum(p.numel() for p in model.parameters())
    rep = FoldReport(
        getattr(model.spec, "name", "?"),
        [NormFold(k, kind, c, "kept-layernorm" if kind == "layernorm" else "kept-affine", reason="fold disabled (--no-fold)") for k, (kind, c) in kinds.items()],
        n, n, [], 0.0, 0.0, 0.0, 0.0,
    )
    return copy.deepcopy(model), rep


def _ort_parity(model: onnx.ModelProto, x: np.ndarray, reference: np.ndarray, tol: Any) -> dict[str, Any]:
    from slab_deploy.runtime.ort import run_onnx

    try:
        got = run_onnx(model, x)
    except Exception as exc:
        text = str(exc)
        if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
            return {"skipped": True, "passed": True, "reason": f"ONNX Runtime CPU cannot run this graph: {text.splitlines()[0][:200]}"}
        raise ExportError(f"ONNX Runtime could not run the exported graph: {text.splitlines()[0][:300]}") from None
    m = compare(reference, got)
    v = judge(m, tol)
    out = {"passed": v.passed, "failures": v.failures, "tolerance": tol.to_dict(), **m.to_dict()}
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        out["note"] = (
            "ONNX Runtime's CPU provider runs most fp16 nodes through fp32 kernels (it inserts casts), so this "
            "rung checks the fp16 weights, not fp16 arithmetic: verify on a GPU with "
            "`slab-deploy check --backends ort-cuda`"
        )
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
