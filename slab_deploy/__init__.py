"""slab-deploy: SLAB vision transformers from checkpoint to production.

Importing this package is cheap: it pulls in neither torch nor any runtime.
The public API lives in the submodules; the most used names are re-exported
lazily here.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "load_checkpoint",
    "fold_model",
]

_LAZY = {
    "create_model": ("slab_deploy.models", "create_model"),
    "list_models": ("slab_deploy.models", "list_models"),
    "load_checkpoint": ("slab_deploy.models.checkpoint", "load_checkpoint"),
    "fold_model": ("slab_deploy.passes", "fold_model"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'slab_deploy' has no attribute {name!r}")
