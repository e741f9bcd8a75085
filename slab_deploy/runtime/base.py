"""One Runner interface for every backend: numpy float32 images in, float32 logits out.

A runner is called (`runner(images) -> logits`) by `check`; `bench` and `trace` time the same
runner through `prepare(images)`, which puts one batch on the runner's device and returns a
`Prepared` step: a no-argument callable that runs that batch with no host<->device copy, and how
to time it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class RunnerInfo:
    """What a runner ran: backend, device, precision and versions, for reports."""

    backend: str
    device: str
    precision: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """One batch bound to a runner, ready to time.

    `step()` runs it once (inputs already on the device, outputs left there). `timer` says how to
    time it: "cuda-events" recorded on `stream` (None: the current stream), or "perf_counter"
    after `sync` (None: `step` returns when the work is done). `output_elems` is the size of one
    batch of logits on the device (0: inputs and outputs live on the host, no copy to time apart).
    `details` holds what setup measured (compile_s); `peak_memory` reads the device's peak MiB
    since `prepare`, where the runner's allocator reports it; `keep` holds the device buffers
    `step` uses."""

    step: Callable[[], Any]
    timer: str
    sync: Callable[[], None] | None = None
    stream: Any = None
    output_elems: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    peak_memory: Callable[[], float] | None = None
    keep: tuple[Any, ...] = ()


class Runner(Protocol):
    info: RunnerInfo

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Run on host images (N, 3, H, W) float32; returns host logits float32."""
        ...


class TimedRunner(Runner, Protocol):
    def prepare(self, images: np.ndarray) -> Prepared:
        """Bind `images` (host, float32) on the runner's device for timing."""
        ...


class UnsupportedBackend(Exception):
    """A backend cannot run this model/precision here; the message says why (reports show it as skipped)."""
