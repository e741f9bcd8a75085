"""export_llm: a (folded) LLaMA to one ONNX graph with a key/value cache.

The graph serves both phases of generation: prefill is a call with an empty cache (past length 0),
each decode step a call with the cache the previous call returned.

  inputs   input_ids             int64      (batch, sequence)
           past_key_{i}          fp32/fp16  (batch, heads, past, head_dim)   for each layer i
           past_value_{i}        fp32/fp16  (batch, heads, past, head_dim)
  outputs  logits                float32    (batch, vocab)  of the last position
           present_key_{i}       fp32/fp16  (batch, heads, past + sequence, head_dim)
           present_value_{i}

Batch, sequence and past length are dynamic (torch.export dims). Positions run from `past` (the
prompts of one batch share their length: no padding mask). fp16 graphs keep the attention softmax
and the RMSNorm statistic (RMSNorm twins) in fp32; logits are fp32 in every precision.

The directory written holds `model.onnx` and `manifest.json` (io names and shapes, architecture,
precision, the fold report, versions); it is written beside the target and renamed into place, so
an interrupted export leaves the target as it was.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from slab_deploy.errors import ExportError, UnsupportedInputError
from slab_deploy.models.folded import FoldReport
from slab_deploy.models.llama import LlamaForCausalLM

LLM_PRECISIONS = ("fp32", "fp16")
LLM_OPSET = 18
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a 350M export's manifest is about 22 kB
ONNX_FILE = "model.onnx"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the graph, in order."""
    past = [n for i in range(num_layers) for n in (f"past_key_{i}", f"past_value_{i}")]
    present = [n for i in range(num_layers) for n in (f"present_key_{i}", f"present_value_{i}")]
    return ["input_ids", *past], ["logits", *present]


class DecoderWithCache(nn.Module):
    """Flat-signature wrapper: (input_ids, *past) -> (last-position fp32 logits, *present)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, present = cast(
            tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]],
            self.model(input_ids, past, use_cache=True, last_only=True),
        )
        return (logits[:, -1].float(), *[t for kv in present for t in kv])


def empty_cache(
    model: LlamaForCausalLM,
    batch: int,
    dtype: torch.dtype,
    past: int = 0,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> list[torch.Tensor]:
    """A flat cache (key, value per layer) of `past` positions: zeros, or seeded noise."""
    cfg = model.config
    shape = (batch, cfg.num_heads, past, cfg.head_dim)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return [
        (torch.randn(shape, generator=g) if g is not None else torch.zeros(shape)).to(device, dtype)
        for _ in range(2 * cfg.num_layers)
    ]


@dataclass
class LLMExportResult:
    directory: Path
    onnx_path: Path
    manifest: dict[str, Any]
    seconds: float
    ops: dict[str, int] = field(default_factory=dict)


def _export_graph(model: LlamaForCausalLM, path: Path, opset: int) -> None:
    from slab_deploy._deps import require
    from slab_deploy.export.onnx_export import quiet_exporters

    require("onnxscript", "the torch.export-based ONNX exporter")
    cfg = model.config
    dtype = next(model.parameters()).dtype
    wrapper = DecoderWithCache(model).eval()
    # Sizes > 1 and distinct, so that torch.export keeps every dim symbolic.
    ids = torch.zeros(2, 3, dtype=torch.int64)
    past = empty_cache(model, 2, dtype, past=4, seed=0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=cfg.max_position_embeddings)
    plen = torch.export.Dim("past", min=0, max=cfg.max_position_embeddings)
    names_in, names_out = io_names(cfg.num_layers)
    # The varargs of DecoderWithCache.forward are one (nested) entry of the dynamic shapes.
    dyn: tuple[Any, ...] = ({0: batch, 1: seq}, tuple({0: batch, 2: plen} for _ in past))
    with quiet_exporters(), torch.no_grad():
        prog = torch.onnx.export(
            wrapper,
            (ids, *past),
            dynamo=True,
            opset_version=opset,
            input_names=names_in,
            output_names=names_out,
            dynamic_shapes=dyn,
            optimize=True,
            verify=False,
            external_data=False,
        )
        if prog is None:  # pragma: no cover - defensive: older torch returned None
            raise RuntimeError("torch.onnx.export returned no program")
        prog.save(str(path), external_data=False)


def export_llm(
    model: LlamaForCausalLM,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    opset: int = LLM_OPSET,
    fold_report: FoldReport | None = None,
    checkpoint_sha256: str | None = None,
    force: bool = False,
) -> LLMExportResult:
    """Export `model` (folded or not, fp32 weights) to `out_dir`/model.onnx at `precision`."""
    import onnx

    from slab_deploy.export.manifest import tool_versions
    from slab_deploy.export.onnx_passes import norm_statistic_reductions, op_counts
    from slab_deploy.utils import make_staging, swap_in

    if precision not in LLM_PRECISIONS:
        raise UnsupportedInputError(
            f"--precision {precision} is not available for language models; use {' or '.join(LLM_PRECISIONS)}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; pass --force to replace it, or choose another --output")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import copy

    # fp32 exports the model as it is (eval mode); other precisions convert a copy
    m = model.eval() if precision == "fp32" else copy.deepcopy(model).eval().to(_DTYPES[precision])
    staging = make_staging(out)
    try:
        path = staging / ONNX_FILE
        try:
            _export_graph(m, path, opset)
        except Exception as exc:
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            raise ExportError(
                f"ONNX export of the language model failed ({exc.__class__.__name__}: {text}); "
                "report it with the model name and precision"
            ) from None
        graph = onnx.load(str(path), load_external_data=False)
        ops = op_counts(graph)
        cfg = model.config
        names_in, names_out = io_names(cfg.num_layers)
        spec = getattr(model, "spec", None)
        manifest = {
            "kind": "causal-lm",
            "model": getattr(spec, "name", type(model).__name__),
            "precision": precision,
            "checkpoint_sha256": checkpoint_sha256,  # None: the seeded random weights of `create_llm`
            "opset": opset,
            "exporter": "dynamo",
            "inputs": names_in,
            "outputs": names_out,
            "cache_dtype": precision,
            "architecture": {
                "hidden_size": cfg.hidden_size,
                "num_layers": cfg.num_layers,
                "num_heads": cfg.num_heads,
                "head_dim": cfg.head_dim,
                "intermediate_size": cfg.intermediate_size,
                "vocab_size": cfg.vocab_size,
                "norm": cfg.norm,
                "max_position_embeddings": cfg.max_position_embeddings,
            },
            "io": {
                "input_ids": "int64 (batch, sequence)",
                "past_{key,value}_{i}": f"{precision} (batch, heads, past, head_dim); past 0: prefill",
                "logits": "float32 (batch, vocab), last position",
                "present_{key,value}_{i}": f"{precision} (batch, heads, past + sequence, head_dim)",
            },
            "folded": fold_report.to_dict() if fold_report is not None else None,
            "norm_nodes": {
                k: ops.get(k, 0)
                for k in ("BatchNormalization", "LayerNormalization", "RMSNormalization", "ReduceMean")
            },
            "norm_statistic_reductions": len(norm_statistic_reductions(graph)),
            "ops": ops,
            "versions": tool_versions(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return LLMExportResult(out, out / ONNX_FILE, manifest, time.perf_counter() - t0, ops)


def read_llm_export(directory: str | Path) -> dict[str, Any]:
    """The manifest of an `export_llm` directory, checked to be one."""
    from slab_deploy.errors import ArtifactError

    d = Path(directory)
    mp = d / MANIFEST
    if not (d / ONNX_FILE).is_file() or not mp.is_file():
        raise ArtifactError(
            f"{d} is not a language-model export (no {ONNX_FILE} and {MANIFEST}); "
            "run `slab-deploy llm export` first"
        )
    if mp.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{mp} is {mp.stat().st_size} bytes, more than any manifest `llm export` writes; export again"
        )
    try:
        man = json.loads(mp.read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        raise ArtifactError(f"{mp} is not valid JSON; export again") from None
    if not isinstance(man, dict) or man.get("kind") != "causal-lm" or not isinstance(man.get("inputs"), list):
        raise ArtifactError(
            f"{mp} does not describe a language-model export; export again with `slab-deploy llm export`"
        )
    return man


def export_llm_model(
    name: str,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    fold: bool = True,
    allow_unfinished_prepbn: bool = False,
    force: bool = False,
) -> LLMExportResult:
    """`slab-deploy llm export`: load `name` (its checkpoint, or the seeded random weights), fold it
    (SLAB models; the twin's RMSNorms stay and are reported as kept), export it to `out_dir`."""
    from slab_deploy.models.llm import create_llm
    from slab_deploy.passes.fold_llm import fold_llm

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not force:  # before any work
        raise ExportError(f"{out} is not empty; pass --force to replace it, or choose another --output")
    model = create_llm(name, checkpoint, allow_unfinished_prepbn=allow_unfinished_prepbn)
    info = getattr(model, "checkpoint_info", None)
    report = None
    if fold:
        model, report = fold_llm(model, inplace=True)  # the model is ours: no second copy
        if not report.verified:
            raise ExportError(
                f"folding {name} is not verified ({report.summary()}); export with --no-fold "
                "to keep the norms, and report it"
            )
    return export_llm(
        model,
        out,
        precision=precision,
        fold_report=report,
        checkpoint_sha256=info.sha256 if info else None,
        force=force,
    )
