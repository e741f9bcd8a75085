"""Parameter and MAC counts, measured on the meta device (no memory, no compute)."""

from __future__ import annotations

from functools import cache

import torch


@cache
def model_stats(name: str) -> tuple[int, float]:
    """(parameters, GMACs per 224x224 image) of registered model `name`, as built (unfolded)."""
    from torch.utils.flop_counter import FlopCounterMode

    from slab_deploy.models.registry import build_model, get_spec

    spec = get_spec(name)
    with torch.device("meta"):
        model = build_model(name)
        x = torch.empty(1, *spec.input_size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    params = sum(p.numel() for p in model.parameters())
    return params, counter.get_total_flops() / 2e9
