"""torch runner: eager (fp32/fp16/bf16), CUDA graph replay or torch.compile."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from slab_deploy.choices import DEFAULT_SLA_POLICY
from slab_deploy.runtime.base import Prepared, RunnerInfo, UnsupportedBackend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = {"eager": "torch", "cudagraph": "torch-cudagraph", "compile": "torch-compile"}  # mode -> backend name


class TorchRunner:
    """Moves `model` to `device` and `precision` (SLA in `sla_policy` at half precision). `mode`
    "cudagraph" replays a CUDA graph captured for the prepared batch; "compile" runs
    `torch.compile(model, mode=compile_mode)`; both need a CUDA device. `threads` sets torch's
    intra-op threads (process-wide) on the CPU when a batch is prepared. Prepare and time under
    `torch.inference_mode()`."""

    def __init__(self, model: nn.Module, device: str = "cpu", precision: str = "fp32",
                 sla_policy: str = DEFAULT_SLA_POLICY, *, mode: str = "eager",
                 compile_mode: str = "max-autotune-no-cudagraphs", threads: int | None = None) -> None:
        from slab_deploy.models.layers import set_sla_policy

        if mode not in MODES:
            raise ValueError(f"unknown torch runner mode {mode!r}; choose from {', '.join(MODES)}")
        if precision not in DTYPES:
            raise UnsupportedBackend(f"torch runner has no precision {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UnsupportedBackend("torch sees no CUDA device")
        if mode != "eager" and not device.startswith("cuda"):
            raise UnsupportedBackend(f"{MODES[mode]} needs a CUDA device")
        self.mode, self.compile_mode, self.threads = mode, compile_mode, threads
        self.dtype = DTYPES[precision]
        self.device = torch.device(device)
        self.model = model.to(self.device, self.dtype).eval()
        set_sla_policy(self.model, sla_policy if self.dtype != torch.float32 else "native")
        self.info = RunnerInfo(MODES[mode], str(self.device), precision, {"torch": torch.__version__})
        self._compiled: nn.Module | None = None

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, self.dtype)
        if self.mode == "cudagraph":
            p = self.prepare(np.ascontiguousarray(images, dtype=np.float32))
            p.step()
            torch.cuda.synchronize()
            return p.keep[1].float().cpu().numpy()
        fn = self._compile(x) if self.mode == "compile" else self.model
        return fn(x).float().cpu().numpy()

    def _compile(self, x: torch.Tensor) -> nn.Module:
        if self._compiled is None:
            self._compiled = torch.compile(self.model, mode=self.compile_mode)  # type: ignore[assignment]
            self._compiled(x)  # type: ignore[misc]
            torch.cuda.synchronize()
        return self._compiled  # type: ignore[return-value]

    def prepare(self, images: np.ndarray) -> Prepared:
        m, cuda = self.model, self.device.type == "cuda"
        if self.threads and not cuda:
            torch.set_num_threads(self.threads)
        x = torch.from_numpy(images).to(self.device, self.dtype)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        details: dict[str, float] = {}
        keep: tuple[torch.Tensor, ...] = (x,)
        if self.mode == "compile":
            t0 = time.perf_counter()
            fn_c = self._compile(x)
            details["compile_s"] = time.perf_counter() - t0

            def step() -> object:
                return fn_c(x)

        elif self.mode == "cudagraph":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    m(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = m(x)
            step, keep = g.replay, (x, out)
        else:

            def step() -> object:
                return m(x)

        n = images.shape[0]
        return Prepared(step, "cuda-events" if cuda else "perf_counter", output_elems=n * 1000 if cuda else 0,
                        details=details, keep=keep,
                        peak_memory=(lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else None)
