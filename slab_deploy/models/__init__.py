"""Model zoo: every SLAB family and its LayerNorm and FLatten baselines."""

from __future__ import annotations

from slab_deploy.models.api import create_model
from slab_deploy.models.registry import ModelSpec, build_model, get_spec, list_models, register_model

__all__ = ["ModelSpec", "build_model", "create_model", "get_spec", "list_models", "register_model"]
