"""Test configuration: markers that skip when hardware or extras are missing.

Set SLAB_DEPLOY_REQUIRE_GPU=1 on a GPU host to turn the `cuda`/`gpu_ort` skips into failures,
and SLAB_DEPLOY_REQUIRE_TENSORRT=1 likewise for `tensorrt`.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a core dependency
        return False


def _ort_cuda_available() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime as ort  # noqa: TID251 - test-time probe

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _tensorrt_available() -> bool:
    # find_spec only: importing tensorrt at collection time would initialise CUDA.
    return any(importlib.util.find_spec(n) is not None
               for n in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"))


_REQUIRED_MISSING = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = item.stash.get(_REQUIRED_MISSING, None)
    if missing:
        pytest.fail(missing)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require_gpu = os.environ.get("SLAB_DEPLOY_REQUIRE_GPU") == "1"
    require_trt = os.environ.get("SLAB_DEPLOY_REQUIRE_TENSORRT") == "1"
    checks = {
        "cuda": (_cuda_available, "no CUDA device", require_gpu),
        "gpu_ort": (_ort_cuda_available, "onnxruntime-gpu with CUDAExecutionProvider not installed",
                    require_gpu),
        "tensorrt": (_tensorrt_available, "TensorRT not installed", require_trt),
    }
    cache: dict[str, bool] = {}
    for item in items:
        for marker, (probe, reason, required) in checks.items():
            if marker not in item.keywords:
                continue
            if marker not in cache:
                cache[marker] = probe()
            if not cache[marker]:
                if required:
                    item.stash[_REQUIRED_MISSING] = f"{reason}, but SLAB_DEPLOY_REQUIRE_* asks for it"
                else:
                    item.add_marker(pytest.mark.skip(reason=reason))
