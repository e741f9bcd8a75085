"""onnx_from_torch: export a (folded) model to ONNX with either torch exporter.

`exporter="auto"` tries the torch.export-based exporter first (clean graphs, real dynamic batch)
and falls back to the TorchScript exporter when it fails, recording why. An opset neither
exporter writes is refused before any work (`exporter_plan`), and the opset of the written file
is read back and must be the one asked for.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slab_deploy.choices import EXPORTERS
from slab_deploy.errors import ExportError, UnsupportedInputError
from slab_deploy.export.onnx_passes import canonical_gelu

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Opset 18: the torch.export-based exporter's native opset (no version-conversion pass), with
# ReduceSum/ReduceMean taking axes as inputs; run by ONNX Runtime >= 1.14 and TensorRT >= 10.
DEFAULT_OPSET = 18
# The opsets each exporter really writes (inclusive ranges), measured with torch 2.13 and
# onnxscript 0.7 by reading the default-domain opset back from the file: the torch.export-based
# exporter writes 18-25 as asked; below 18 it runs onnx's version converter, which is model
# dependent (a plain DeiT converts to 17; the SLAB graphs and a DeiT at 13 silently stay at 18),
# and above 25 it writes 18. The TorchScript exporter writes 7-20 (above 20 it warns "not
# supported" and stamps the file with the asked opset over opset-20 node definitions). Whether a
# given model exports at an opset also depends on its ops (SLA's unflatten needs 13): that fails
# at export time. The opset read back from the file is checked against the request either way.
OPSETS: dict[str, tuple[int, int]] = {"dynamo": (18, 25), "torchscript": (7, 20)}


@dataclass
class ExportInfo:
    exporter: str  # "dynamo" (torch.export-based) | "torchscript"
    opset: int  # as read from the written file
    dynamic_batch: bool
    seconds: float
    fallback_reason: str = ""
    model: Any = field(default=None, repr=False)  # the written graph, loaded (onnx.ModelProto)


def _span(exporter: str) -> str:
    lo, hi = OPSETS[exporter]
    return f"{lo}-{hi}"


def exporter_plan(exporter: str, opset: int) -> tuple[list[str], str]:
    """The exporters to try, in order, for `opset`, and why `auto` skips the torch.export-based one
    (or ""). Raises UnsupportedInputError when none of the allowed exporters writes that opset."""
    if exporter not in EXPORTERS:
        raise UnsupportedInputError(f"unknown exporter {exporter!r}; use {', '.join(EXPORTERS)}")
    fits = [e for e in ("dynamo", "torchscript") if OPSETS[e][0] <= opset <= OPSETS[e][1]]
    ranges = (f"the torch.export-based exporter writes opsets {_span('dynamo')}, "
              f"the TorchScript exporter {_span('torchscript')}")
    if exporter != "auto":
        if exporter not in fits:
            other = f"; use --exporter {fits[0]}" if fits else ""
            raise UnsupportedInputError(f"--exporter {exporter} cannot write opset {opset} ({ranges}){other}")
        return [exporter], ""
    if not fits:
        raise UnsupportedInputError(f"--opset {opset} cannot be written: {ranges}")
    reason = ("" if "dynamo" in fits
              else f"opset {opset} is outside the torch.export-based exporter's {_span('dynamo')}")
    return fits, reason


def file_opset(model: Any) -> int | None:
    """The default-domain (ai.onnx) opset an ONNX model imports, or None."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


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
def _native_stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to a scratch file: the TorchScript exporter prints the whole Torch
    IR graph from C++ when it fails, which Python's redirect_stdout cannot catch (and which would
    land in `--json` output)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter (progress prints, advisory warnings, C++ graph dumps)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _native_stdout_silenced():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


quiet_exporters = _quiet  # public name for the other exporters of the package (export/llm.py)


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
    """Export `model` (taking `example`-shaped images) to ONNX at `path`, at exactly `opset`."""
    import onnx

    path = Path(path)
    plan, reason = exporter_plan(exporter, opset)
    runs = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
    names = {"dynamo": "torch.export-based", "torchscript": "TorchScript"}
    model = model.eval()
    t0 = time.perf_counter()
    # A three-operand einsum path makes torch.export's dynamic-batch constraints fail; the zoo
    # uses MatMuls, but user models may not.
    prev = torch.backends.opt_einsum.enabled
    torch.backends.opt_einsum.enabled = False
    try:
        for i, name in enumerate(plan):
            last = i == len(plan) - 1
            try:
                runs[name](model, example, path, opset, dynamic_batch)
            except Exception as exc:
                why = f"{names[name]} ONNX export failed: {_first_line(exc)}"
                if last:
                    hint = ""
                    if name == "dynamo" and "torchscript" not in plan:
                        lo, hi = OPSETS["torchscript"]
                        hint = ("; try --exporter torchscript" if lo <= opset <= hi
                                else f"; the TorchScript exporter cannot take over at opset {opset} "
                                f"(it writes {lo}-{hi})")
                    raise ExportError(f"{reason + '; ' if reason else ''}{why}{hint}") from None
                reason = f"{names[name]} exporter failed ({_first_line(exc)})"
                continue
            graph = onnx.load(str(path))
            got = file_opset(graph)
            if got != opset:
                why = f"the {names[name]} exporter wrote opset {got}, not the requested {opset}"
                if last:
                    raise ExportError(f"{why}; choose --opset {got} or another --exporter")
                reason = why
                continue
            if canonical_gelu(graph):  # the GELU form ONNX Runtime fuses (same outputs, bit for bit)
                onnx.save(graph, str(path))
            return ExportInfo(name, got, dynamic_batch, time.perf_counter() - t0, reason, graph)
        raise AssertionError("unreachable: exporter_plan returns at least one exporter")  # pragma: no cover
    finally:
        torch.backends.opt_einsum.enabled = prev


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:300]}" if text else exc.__class__.__name__
