"""Parameter and MAC counts, measured on the meta device (no memory, no compute), and the zoo
listing built from them."""

from __future__ import annotations

from functools import cache
from typing import Any

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


def zoo_rows(pattern: str = "*", *, include_test: bool = False, measure: bool = True) -> list[dict[str, Any]]:
    """One row per registered model matching `pattern` (shell-style): family, norm, attention per
    stage, measured params (M) and GMACs (None unless `measure`), the paper's figures, released
    weights and checkpoint layout. Plain JSON values, in `list_models` order."""
    from slab_deploy.models.registry import get_spec, list_models

    rows: list[dict[str, Any]] = []
    for name in list_models(pattern, include_test=include_test):
        s = get_spec(name)
        params, gmacs = model_stats(name) if measure else (None, None)
        rows.append({
            "name": name,
            "family": s.family,
            "norm": s.norm,
            "attention": list(s.attention),
            "params_m": None if params is None else round(params / 1e6, 2),
            "gmacs": None if gmacs is None else round(gmacs, 2),
            "paper_params_m": s.paper_params_m,
            "paper_gmacs": s.paper_gmacs,
            "paper_top1": s.paper_top1,
            "released": s.released,
            "layout": s.layout,
        })
    return rows
