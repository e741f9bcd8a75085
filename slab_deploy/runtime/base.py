"""One Runner interface for every backend: numpy float32 images in, float32 logits out."""

from __future__ import annotations

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


class Runner(Protocol):
    info: RunnerInfo

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Run on host images (N, 3, H, W) float32; returns host logits float32."""
        ...


class UnsupportedBackend(Exception):
    """A backend cannot run this model/precision here; the message says why (reports show it as skipped)."""
