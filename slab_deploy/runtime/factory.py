"""`make_runner`: the runner of each backend name (choices.BACKENDS), built one way for bench and trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slab_deploy.choices import BACKENDS, DEFAULT_SLA_POLICY
from slab_deploy.runtime.base import TimedRunner, UnsupportedBackend


def make_runner(backend: str, model_or_onnx: Any, device: str, precision: str, *,
                sla_policy: str = DEFAULT_SLA_POLICY, compile_mode: str = "max-autotune-no-cudagraphs",
                threads: int | None = None,
                max_batch: int = 64, profile_prefix: str | None = None,
                ort_cuda_layout: str = "nchw") -> TimedRunner:
    """The runner of `backend`: torch backends take an nn.Module (moved to `device` and
    `precision`), the others the path of an ONNX graph. Raises UnsupportedBackend for what this
    host or device cannot run (torch below fp32 on the CPU is not a deployment target), and
    ValueError for a name outside BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend.startswith("torch"):
        from slab_deploy.runtime.torch_runner import TorchRunner

        if device == "cpu" and precision != "fp32":
            raise UnsupportedBackend(f"torch {precision} on the CPU is not a deployment target")
        mode = {"torch": "eager", "torch-cudagraph": "cudagraph", "torch-compile": "compile"}[backend]
        return TorchRunner(model_or_onnx, device, precision, sla_policy, mode=mode, compile_mode=compile_mode,
                           threads=threads)
    path = Path(model_or_onnx)
    if backend == "tensorrt":
        from slab_deploy.runtime.tensorrt import TensorRTRunner

        return TensorRTRunner.from_onnx(path, precision=precision, max_batch=max_batch)
    from slab_deploy.runtime.ort import ORTRunner

    provider = "cpu" if backend == "ort-cpu" else "cuda"
    return ORTRunner(path, provider, threads=threads if provider == "cpu" else None, precision=precision,
                     cuda_graph=backend == "ort-cuda-graph", profile_prefix=profile_prefix,
                     layout=ort_cuda_layout)
