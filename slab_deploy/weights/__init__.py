"""Weights that slab-deploy makes itself: seeded random weights (`random`), checkpoints in the SLAB
authors' training-file format (`authors_format`), and the embedded default weights (trained demo
models, seeded untrained for the rest) with `load_model` (`default`). Above `models/` (they are built
from the registry), below `passes/`.
The folded-checkpoint format is `models.folded`: `create_model` reads it.
"""

from __future__ import annotations

from slab_deploy.weights.authors_format import (
    authors_checkpoint,
    authors_config,
    ema_state_dict,
    save_authors_checkpoint,
)
from slab_deploy.weights.default import (
    DEFAULT_MODEL,
    DEFAULT_SEED,
    UNTRAINED_LABEL,
    WEIGHTS_KINDS,
    default_checkpoint,
    default_weights,
    load_model,
    weights_label,
)
from slab_deploy.weights.random import random_checkpoint, randomize_weights

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SEED",
    "UNTRAINED_LABEL",
    "WEIGHTS_KINDS",
    "authors_checkpoint",
    "authors_config",
    "default_checkpoint",
    "default_weights",
    "ema_state_dict",
    "load_model",
    "random_checkpoint",
    "randomize_weights",
    "save_authors_checkpoint",
    "weights_label",
]
