"""The embedded default weights: deterministic, seeded, UNTRAINED checkpoints in the authors' format.

Until trained demo weights ship, commands run without `--checkpoint` use these. They exercise the
real loading path (authors' training-file layout, pickled config, randomised BN statistics) and
are labelled untrained everywhere they appear: their logits mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "slab_deit_tiny"
DEFAULT_SEED = 20240516  # deterministic across machines and versions of slab-deploy
UNTRAINED_LABEL = "embedded default weights (seeded random, UNTRAINED: for pipeline demos, not accuracy)"


def cache_dir() -> Path:
    root = os.environ.get("SLAB_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slab-deploy"
    )
    return Path(root)


def default_checkpoint(model_name: str) -> Path:
    """Path of the embedded default checkpoint of `model_name`, written on first use."""
    from slab_deploy.testing import random_checkpoint

    path = cache_dir() / f"untrained-{model_name}-seed{DEFAULT_SEED}.pth"
    if not path.exists():
        random_checkpoint(model_name, path, seed=DEFAULT_SEED)
    return path
