"""The serve extra's optional modules (tritonclient, the Triton server of nvidia-pytriton), imported
only inside the functions that need them; a missing one names the install line."""

from __future__ import annotations

import importlib
from types import ModuleType

from slab_deploy.errors import MissingDependencyError

SERVE_INSTALL = "pip install 'slab-deploy[serve]'"


def require_serve(name: str, purpose: str) -> ModuleType:
    """Import `name` (a tritonclient module), or raise MissingDependencyError with the install line."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{name} is not installed (needed for {purpose}): install tritonclient[grpc,http], e.g. "
            f"`{SERVE_INSTALL}` ({exc.__class__.__name__}: {exc})"
        ) from None
