"""Model zoo: every SLAB family and its LayerNorm and FLatten baselines."""

from __future__ import annotations

from slab_deploy.models.api import checkpoint_info, create_model
from slab_deploy.models.registry import (
    ModelSpec,
    build_model,
    get_spec,
    list_models,
    model_spec,
    preprocessing,
    register_model,
)
from slab_deploy.models.stats import model_stats, zoo_rows

__all__ = [
    "ModelSpec",
    "build_model",
    "checkpoint_info",
    "create_model",
    "get_spec",
    "list_models",
    "model_spec",
    "model_stats",
    "preprocessing",
    "register_model",
    "zoo_rows",
]
