"""The memory a case will need, estimated before any case runs, and what the host and GPU have."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slab_deploy.bench.cases import Target, reason
from slab_deploy.errors import ConfigError
from slab_deploy.utils import available_memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one case, estimated: the weights once more (the case's copy of the model or
    the runtime's session), the input batch (twice on CUDA: the device buffer and the pinned host
    copy the transfer timing uses) and the activations, measured as the peak of live tensors in
    one eager fp32 forward of batch 1 on the CPU and scaled linearly to the batch."""

    batch: int
    weights: int
    input_per_image: int
    activations_per_image: int

    def device_bytes(self, cuda: bool) -> int:
        return self.weights + self.batch * (
            self.input_per_image * (2 if cuda else 1) + self.activations_per_image)

    def host_bytes(self, cuda: bool) -> int:
        return self.batch * self.input_per_image * 2 if cuda else self.device_bytes(False)

    def describe(self, cuda: bool) -> str:
        batch_in = _size(self.batch * self.input_per_image)
        return (f"weights {_size(self.weights)} + input {'2 x ' if cuda else ''}{batch_in} + activations "
                f"{_size(self.activations_per_image)}/image x {self.batch}, "
                "the peak of live tensors in an eager fp32 batch-1 forward")


def estimate_memory(model: Any, input_size: Sequence[int], batch: int) -> MemoryEstimate:
    """Measure the activation peak of batch 1 (see MemoryEstimate) and scale it to `batch`."""
    import torch

    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    x = torch.zeros(1, *input_size)
    ignore = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    model = model.eval()
    with torch.inference_mode(), _live_bytes(ignore) as live:
        model(x)
    per_image_in = int(np.prod(input_size)) * 4
    return MemoryEstimate(batch, weights, per_image_in, live.peak)


def _live_bytes(ignore: set[int]) -> Any:
    """A dispatch mode recording the peak bytes of tensor storages alive at once during the ops
    run under it (the outputs of every op, less the storages in `ignore`: weights and input).
    Frees are seen through weak references; views and in-place results share their storage and
    are counted once. (Defined in a function: torch is imported only when bench runs.)"""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Mode(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count: dict[int, int] = {}
            self.size: dict[int, int] = {}
            self.current = 0
            self.peak = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self._track(t)
            return out

        def _track(self, t: Any) -> None:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in ignore:
                return
            if key not in self.count:
                self.count[key] = 0
                self.size[key] = st.nbytes()
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
            self.count[key] += 1
            weakref.finalize(t, self._release, key)

        def _release(self, key: int) -> None:
            self.count[key] -= 1
            if not self.count[key]:
                del self.count[key]
                self.current -= self.size.pop(key)

    return Mode()


def check_memory(model: Any, t: Target, batch: int, device: str, notes: list[str]) -> MemoryEstimate | None:
    """Refuse (ConfigError) a batch whose estimated peak exceeds the memory available to it."""
    from slab_deploy.models import get_spec

    try:
        est = estimate_memory(model, get_spec(t.model).input_size, batch)
    except Exception as exc:  # the cases of this target will fail and say why; do not guess here
        notes.append(f"memory estimate of {t.model} [{t.variant}] unavailable ({reason(exc)})")
        return None
    cuda = device == "cuda"
    checks = [("the host", est.host_bytes(cuda), available_memory())]
    if cuda:
        import torch

        checks.insert(0, ("the GPU", est.device_bytes(True), int(torch.cuda.mem_get_info()[0])))
    for where, need, have in checks:
        if have is not None and need > have:
            raise ConfigError(
                f"batch {batch} of {t.model} [{t.variant}] needs an estimated {_size(need)} on {where} "
                f"({est.describe(cuda)}) but {_size(have)} is available; pass a smaller --batch"
            )
    return est


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"

