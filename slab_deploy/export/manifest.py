"""The export's record: the ONNX metadata, `manifest.json` (everything needed to reproduce and deploy
the graph: checkpoint, fold, exporter, simplifier, lint, precision, I/O, preprocessing, parity,
timings, tool versions, file hashes) and the writing of the artefact set into the staging directory."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from slab_deploy import __version__
from slab_deploy.export.calibration import CalibrationSet
from slab_deploy.export.onnx_export import INPUT_NAME, OUTPUT_NAME, ExportInfo, file_opset
from slab_deploy.export.onnx_passes import LintResult, SimplifyResult, op_counts, set_metadata
from slab_deploy.export.options import ExportOptions
from slab_deploy.export.quantize import activation_description
from slab_deploy.export.steps import Int8Step
from slab_deploy.export.target import FAILED_ONNX_NAME, MANIFEST_NAME, ONNX_NAME, UNSIMPLIFIED_NAME
from slab_deploy.models.checkpoint import CheckpointInfo
from slab_deploy.models.folded import FoldReport
from slab_deploy.models.registry import ModelSpec
from slab_deploy.models.registry import preprocessing as preprocessing  # re-exported: the manifest's block
from slab_deploy.utils import sha256_file
from slab_deploy.weights.default import weights_label


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


def onnx_metadata(model_name: str, opts: ExportOptions, pre: dict[str, Any], info: CheckpointInfo | None,
                  weights: str, calibration: CalibrationSet | None = None) -> dict[str, str]:
    """The `slab_deploy.*` metadata both ONNX files carry (the preprocessing among them; for INT8, the
    calibration, so a latency-only artefact says so wherever the graph goes)."""
    meta = {
        "slab_deploy.version": __version__,
        "slab_deploy.model": model_name,
        "slab_deploy.precision": opts.precision,
        "slab_deploy.preprocessing": json.dumps(pre),
        "slab_deploy.checkpoint_sha256": info.sha256 if info else "",
        "slab_deploy.untrained": str(weights == "untrained").lower(),
        "slab_deploy.weights": weights,
    }
    if calibration is not None:
        record = calibration.to_dict()
        meta["slab_deploy.calibration"] = json.dumps(
            {k: record[k] for k in ("kind", "source", "count", "sha256", "latency_only")})
        meta["slab_deploy.int8_activations"] = activation_description(opts.activations)
    return meta


def int8_block(opts: ExportOptions, step: Int8Step) -> dict[str, Any]:
    """The manifest's record of an INT8 quantisation: how, on what, with which tool, and what stayed
    float and why."""
    from slab_deploy._deps import module_version

    res = step.result
    return {
        "method": opts.method,
        "per_channel": opts.channelwise,
        "activation_type": opts.activations,
        "calibration": step.calibration.to_dict(),
        "onnxruntime": module_version("onnxruntime"),
        **res.settings,
        "calibration_feed_images": res.feed,
        "seconds": {"calibration": round(res.calibration_seconds, 3), "total": round(res.seconds, 3)},
        "float_nodes": [f.to_dict() for f in res.float_nodes],
        "qdq": step.audit,
    }


def build_manifest(
    *,
    status: str,
    model_name: str,
    spec: ModelSpec,
    weights: str,
    info: CheckpointInfo | None,
    ema: bool,
    report: FoldReport,
    exp: ExportInfo,
    sres: SimplifyResult,
    final: onnx.ModelProto,
    lint_res: LintResult,
    opts: ExportOptions,
    pre: dict[str, Any],
    parity: dict[str, Any],
    parity_batch: int,
    steps: dict[str, float],
    int8: Int8Step | None = None,
) -> dict[str, Any]:
    """The manifest of one export, without its file entries (`write_artifacts` adds them)."""
    fp16 = opts.precision == "fp16"
    batch_dim: int | str = "batch" if opts.batch is None else opts.batch
    return {
        "status": status,
        "model": model_name,
        "family": spec.family,
        "norm": spec.norm,
        "attention": list(spec.attention),
        "untrained": weights == "untrained",
        "weights": {"kind": weights, "label": weights_label(model_name, weights)},
        "opset": file_opset(final),  # as read from the deployed graph (default domain)
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
                "SLA normaliser, reciprocal and k^T v product (policy fp32); FLatten focused kernel"
                if opts.sla_policy == "fp32"
                else "SLA token mean of k, normaliser and reciprocal (policy mixed; matmuls fp16 with "
                "fp32 accumulation, final scaling fp16); FLatten focused kernel"
            ) if fp16 else (
                "linear-attention normaliser and products (see int8.float_nodes); everything but the inputs "
                "of Conv, MatMul and Gemm" if int8 is not None else ""),
            **({"int8": int8_block(opts, int8)} if int8 is not None else {}),
        },
        "io": {
            "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": [batch_dim, *pre["input_size"]]}],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [
                batch_dim,
                spec.num_classes if info is None or info.num_classes is None else info.num_classes,
            ]}],
        },
        "preprocessing": pre,
        "parity": {"seed": opts.seed, "batch": parity_batch,
                   "reference": "checkpoint model (unfolded), torch fp32 eval", **parity},
        "norm_free": lint_res.norm_free,
        "steps_seconds": {k: round(v, 3) for k, v in steps.items()},
        "versions": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_artifacts(
    stage: Path, manifest: dict[str, Any], raw: onnx.ModelProto, final: onnx.ModelProto, meta: dict[str, str],
    *, keep_unsimplified: bool,
) -> None:
    """Write the artefact set into `stage`: the unsimplified graph (if kept), the deployed graph
    (model.onnx, or model.parity-failed.onnx when the status is not ok) and the manifest with the
    sha256 and size of each file."""
    files: dict[str, dict[str, Any]] = {}
    if keep_unsimplified:
        set_metadata(raw, {**meta, "slab_deploy.stage": "unsimplified"})
        onnx.save(raw, str(stage / UNSIMPLIFIED_NAME))
        manifest["unsimplified_onnx"] = UNSIMPLIFIED_NAME
        files[UNSIMPLIFIED_NAME] = _file_entry(stage / UNSIMPLIFIED_NAME)
    onnx_name = ONNX_NAME if manifest["status"] == "ok" else FAILED_ONNX_NAME
    onnx.save(final, str(stage / onnx_name))
    files[onnx_name] = _file_entry(stage / onnx_name)
    manifest["onnx"] = onnx_name
    manifest["files"] = files
    (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
