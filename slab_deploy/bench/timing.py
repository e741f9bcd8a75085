"""Timers and statistics: perf_counter after a synchronisation, or CUDA events on the stream
that does the work; warm-up first, then at least `iters` runs for at least `min_seconds`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from slab_deploy.runtime.base import Prepared


def stats(samples_ms: list[float]) -> dict[str, float]:
    """median, p90, p95, p99, mean, min (ms) and the coefficient of variation of timed samples."""
    a = np.asarray(samples_ms, dtype=np.float64)
    mean = float(a.mean())
    return {
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": mean,
        "min_ms": float(a.min()),
        "cv": float(a.std(ddof=1) / mean) if len(a) > 1 and mean > 0 else 0.0,
    }


def time_host(fn: Callable[[], Any], warmup: int, iters: int, min_seconds: float,
              sync: Callable[[], None] | None = None) -> list[float]:
    """perf_counter timing (after `sync` when given) of `fn`."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(out) < iters or (time.perf_counter() < t_end and len(out) < iters * 20):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_cuda_events(fn: Callable[[], Any], warmup: int, iters: int, min_seconds: float,
                     stream: Any = None) -> list[float]:
    """CUDA-event timing of `fn` on `stream` (default: the current stream)."""
    import torch

    stream = stream or torch.cuda.current_stream()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(out) < iters or (time.perf_counter() < t_end and len(out) < iters * 20):
        n = max(iters - len(out), 10)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for s, e in events:
            s.record(stream)
            fn()
            e.record(stream)
        torch.cuda.synchronize()
        out += [s.elapsed_time(e) for s, e in events]
    return out


def copy_times(x_np: np.ndarray, model_out_elems: int) -> dict[str, float]:
    """Median host->device time of one input batch and device->host time of its logits (pinned memory)."""
    import torch

    host = torch.from_numpy(x_np).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    out_dev = torch.empty(model_out_elems, device="cuda")
    out_host = torch.empty(model_out_elems).pin_memory()
    h2d = time_cuda_events(lambda: dev.copy_(host, non_blocking=True), 3, 20, 0.0)
    d2h = time_cuda_events(lambda: out_host.copy_(out_dev, non_blocking=True), 3, 20, 0.0)
    return {"h2d_ms": statistics.median(h2d), "d2h_ms": statistics.median(d2h)}



def time_prepared(p: Prepared, warmup: int, iters: int, min_seconds: float) -> list[float]:
    """Time a runner's prepared step with the timer it names (see runtime.base.Prepared)."""
    if p.timer == "cuda-events":
        return time_cuda_events(p.step, warmup, iters, min_seconds, stream=p.stream)
    return time_host(p.step, warmup, iters, min_seconds, sync=p.sync)
