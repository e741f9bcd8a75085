"""ONNX Runtime helpers and runner (CPU and CUDA execution providers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx


def session(model: onnx.ModelProto | str | Path, providers: list[Any] | None = None, threads: int | None = None,
            graph_opt: str = "all", profile_prefix: str | None = None) -> Any:
    """An InferenceSession on `model` (a path or an in-memory ModelProto)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_opt]
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=so, providers=providers or ["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto | str | Path, inputs: np.ndarray, providers: list[Any] | None = None,
             threads: int | None = None) -> np.ndarray:
    """Run a single-input, single-output model; returns the output as float32 numpy."""
    sess = session(model, providers, threads)
    name = sess.get_inputs()[0].name
    out = sess.run(None, {name: inputs})[0]
    return np.asarray(out, dtype=np.float32)


def cuda_available() -> bool:
    from slab_deploy._deps import available

    if not available("onnxruntime"):
        return False
    from slab_deploy._deps import require

    return "CUDAExecutionProvider" in require("onnxruntime").get_available_providers()


class ORTRunner:
    """ONNX Runtime on CPU or CUDA. `graph_opt="none"` interprets the graph as written (the check
    ladder uses it to tell graph faults from optimiser faults).

    Raises `UnsupportedBackend` only for what the host lacks (no CUDA provider, no kernel for an op),
    and `ArtifactError` when the graph itself will not load."""

    def __init__(self, model_path: str | Path, provider: str = "cpu", *, threads: int | None = None,
                 graph_opt: str = "all", precision: str = "fp32") -> None:
        from slab_deploy.runtime.base import RunnerInfo, UnsupportedBackend

        ort = _ort()
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedBackend("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = session(model_path, providers, threads, graph_opt)
        except Exception as exc:
            text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
                # This runtime build lacks a kernel (e.g. an fp16 op on the CPU provider): the host, not the graph.
                raise UnsupportedBackend(f"ONNX Runtime {ort.__version__} ({provider}) has no kernel for this graph: {text}") from None
            # Anything else is the graph's fault (truncated, invalid, not ONNX): a broken artefact, never a skip.
            from slab_deploy.errors import ArtifactError

            raise ArtifactError(f"ONNX Runtime cannot load {model_path}: {text}") from None
        if provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise UnsupportedBackend("the CUDA execution provider failed to initialise (CUDA/cuDNN libraries?)")
        self.input = self.session.get_inputs()[0].name
        self.info = RunnerInfo(
            f"ort-{provider}", provider, precision,
            {"onnxruntime": ort.__version__, "graph_opt": graph_opt, "threads": threads, "providers": self.session.get_providers()},
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input: np.ascontiguousarray(images, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)


def _ort() -> Any:
    from slab_deploy._deps import require

    ort = require("onnxruntime", "running ONNX models")
    ort.set_default_logger_severity(3)  # errors only: provider-discovery warnings are noise in reports
    return ort
