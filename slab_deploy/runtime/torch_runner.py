"""torch runner: eager (fp32/fp16/bf16), optionally CUDA graphs or torch.compile."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slab_deploy.runtime.base import RunnerInfo, UnsupportedBackend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRunner:
    def __init__(self, model: nn.Module, device: str = "cpu", precision: str = "fp32", sla_policy: str = "fp32") -> None:
        from slab_deploy.models.layers import set_sla_policy

        if precision not in DTYPES:
            raise UnsupportedBackend(f"torch runner has no precision {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UnsupportedBackend("torch sees no CUDA device")
        self.dtype = DTYPES[precision]
        self.device = torch.device(device)
        self.model = model.to(self.device, self.dtype).eval()
        set_sla_policy(self.model, sla_policy if self.dtype != torch.float32 else "native")
        self.info = RunnerInfo("torch", str(self.device), precision, {"torch": torch.__version__})

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, self.dtype)
        return self.model(x).float().cpu().numpy()
