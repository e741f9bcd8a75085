"""The environment of a run (host, GPU, driver, runtime versions), recorded in every report."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def environment(device: str) -> dict[str, Any]:
    """Versions of slab-deploy, Python, torch, Triton, ONNX Runtime and TensorRT, the fused SLA kernels'
    mode (SLAB_DEPLOY_SLA_KERNEL; a value that is not a mode is refused here, before any case), the
    CPU and, on CUDA, the GPU and driver."""
    import torch

    from slab_deploy import __version__
    from slab_deploy._deps import version_of
    from slab_deploy.models import sla_kernel

    env: dict[str, Any] = {
        "slab-deploy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": version_of("triton"),
        "sla_kernel": sla_kernel.mode(),
        **_ort_environment(),
        "tensorrt": (version_of("tensorrt") or version_of("tensorrt-rtx")
                     or version_of("tensorrt-rtx-cu13-bindings") or version_of("tensorrt-rtx-cu12-bindings")),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            compute_capability=f"{p.major}.{p.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
    return env


def _ort_environment() -> dict[str, Any]:
    """The ONNX Runtime that will actually be imported (not just the installed distribution's
    metadata: a CPU and a GPU build can sit side by side on a host)."""
    from slab_deploy._deps import available, require

    if not available("onnxruntime"):
        return {"onnxruntime": None, "onnxruntime_providers": []}
    ort = require("onnxruntime")
    return {"onnxruntime": ort.__version__, "onnxruntime_providers": list(ort.get_available_providers())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None

