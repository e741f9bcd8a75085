"""onnx_from_torch: export a (folded) model to ONNX with either torch exporter.

`exporter="auto"` tries the torch.export-based exporter first (clean graphs, real dynamic batch)
and falls back to the TorchScript exporter when it fails, recording why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slab_deploy.errors import ExportError

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Opset 18: the torch.export-based exporter's native opset (no version-conversion pass), with
# ReduceSum/ReduceMean taking axes as inputs; run by ONNX Runtime >= 1.14 and TensorRT >= 10.
DEFAULT_OPSET = 18


@dataclass
class ExportInfo:
    exporter: str  # "dynamo" (torch.export-based) | "torchscript"
    opset: int
    dynamic_batch: bool
    seconds: float
    fallback_reason: str = ""


class ImageModel(nn.Module):
    """Wraps a model for deployment: fp32 images in, fp32 logits out, whatever the compute dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.dtype != torch.float32:
            images = images.to(self.dtype)
        out = self.model(images)
        return out.float() if out.dtype != torch.float32 else out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter (progress prints, advisory warnings)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    from slab_deploy._deps import require

    require("onnxscript", "the torch.export-based ONNX exporter")
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = {"images": {0: batch}}
    with _quiet():
        prog = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verify=False,
            external_data=False,
        )
        if prog is None:  # pragma: no cover - defensive: older torch returned None
            raise RuntimeError("torch.onnx.export returned no program")
        prog.save(str(path), external_data=False)


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with _quiet():
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


@torch.no_grad()
def onnx_from_torch(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> ExportInfo:
    """Export `model` (taking `example`-shaped images) to ONNX at `path`."""
    path = Path(path)
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}; use dynamo, torchscript or auto")
    model = model.eval()
    t0 = time.perf_counter()
    # A three-operand einsum path makes torch.export's dynamic-batch constraints fail; the zoo
    # uses MatMuls, but user models may not.
    prev = torch.backends.opt_einsum.enabled
    torch.backends.opt_einsum.enabled = False
    try:
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(model, example, path, opset, dynamic_batch)
                return ExportInfo("dynamo", opset, dynamic_batch, time.perf_counter() - t0)
            except Exception as exc:
                if exporter == "dynamo":
                    raise ExportError(f"torch.export-based ONNX export failed: {_first_line(exc)}; try --exporter torchscript") from None
                reason = f"torch.export-based exporter failed ({_first_line(exc)})"
        else:
            reason = ""
        try:
            _export_torchscript(model, example, path, opset, dynamic_batch)
        except Exception as exc:
            raise ExportError(f"TorchScript ONNX export failed: {_first_line(exc)}") from None
        return ExportInfo("torchscript", opset, dynamic_batch, time.perf_counter() - t0, reason)
    finally:
        torch.backends.opt_einsum.enabled = prev


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:300]}" if text else exc.__class__.__name__
