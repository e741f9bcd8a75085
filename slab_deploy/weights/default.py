"""The embedded default weights: deterministic, seeded, UNTRAINED checkpoints in the authors' format,
and `load_model`, which every command uses to get a model with its checkpoint or with these.

Until trained demo weights ship, commands run without `--checkpoint` use these. They exercise the
real loading path (authors' training-file layout written by torch.save, a real yacs config,
randomised BN statistics) and are labelled untrained everywhere they appear: their logits mean
nothing. They are written once into a cache directory (`SLAB_DEPLOY_CACHE`, else
`$XDG_CACHE_HOME/slab-deploy`, else `~/.cache/slab-deploy`); when that cannot be written, into a
per-user directory under the system's temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from slab_deploy.errors import CheckpointError
from slab_deploy.models import create_model, get_spec
from slab_deploy.weights.random import random_checkpoint

DEFAULT_MODEL = "slab_deit_tiny"
DEFAULT_SEED = 20240516  # deterministic across machines and versions of slab-deploy
UNTRAINED_LABEL = "embedded default weights (seeded random, UNTRAINED: for pipeline demos, not accuracy)"


def cache_dir() -> Path:
    root = os.environ.get("SLAB_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slab-deploy"
    )
    return Path(root)


def _fallback_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return Path(tempfile.gettempdir()) / f"slab-deploy-{uid}"


def default_checkpoint(model_name: str) -> Path:
    """Path of the embedded default checkpoint of `model_name`, written on first use."""
    name = f"untrained-{model_name}-seed{DEFAULT_SEED}.pth"
    tried: list[str] = []
    for root in (cache_dir(), _fallback_dir()):
        path = root / name
        if path.is_file():
            return path
        try:
            return random_checkpoint(model_name, path, seed=DEFAULT_SEED)
        except OSError as exc:
            tried.append(f"{root} ({exc.strerror or exc.__class__.__name__})")
    raise CheckpointError(
        f"cannot write the embedded default weights of {model_name}: {'; '.join(tried)} are not writable; "
        "set SLAB_DEPLOY_CACHE to a writable directory, or pass --checkpoint"
    )


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    img_size: int | None = None,
) -> nn.Module:
    """`create_model` with the checkpoint, or with the embedded untrained default weights when
    `checkpoint` is None (the model then carries `.untrained = True`)."""
    get_spec(name)  # unknown names fail before anything is written
    untrained = checkpoint is None
    if checkpoint is None:
        checkpoint = default_checkpoint(name)
    model = create_model(
        name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn, img_size=img_size
    )
    model.untrained = untrained  # type: ignore[assignment]
    return model
