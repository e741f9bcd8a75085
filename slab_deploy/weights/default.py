"""The embedded default weights, and `load_model`, which every command uses to get a model with its
checkpoint or with these.

Commands run without `--checkpoint` use:

- for the demo models (`slab_deit_demo` and its LayerNorm twin `deit_demo`), their TRAINED weights,
  shipped in `slab_deploy/data/` in the SLAB authors' training-file format (see docs/demo-model.md)
  and read through exactly the path an authors' checkpoint takes; their sha256 is verified first;
- for every other model, deterministic, seeded, UNTRAINED checkpoints in the authors' format
  (randomised BN statistics), labelled untrained everywhere they appear: their logits mean nothing.
  These are written once into a cache directory (`SLAB_DEPLOY_CACHE`, else
  `$XDG_CACHE_HOME/slab-deploy`, else `~/.cache/slab-deploy`); when that cannot be written, into a
  per-user directory under the system's temporary directory.

`model.weights` says which: "checkpoint", "demo" or "untrained" (`model.untrained` is True for the last).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from slab_deploy.datasets import DATA, demo_models
from slab_deploy.errors import CheckpointError
from slab_deploy.models import create_model, get_spec
from slab_deploy.utils import sha256_file
from slab_deploy.weights.random import random_checkpoint

DEFAULT_MODEL = "slab_deit_demo"
DEFAULT_SEED = 20240516  # deterministic across machines and versions of slab-deploy
UNTRAINED_LABEL = "embedded default weights (seeded random, UNTRAINED: for pipeline demos, not accuracy)"
WEIGHTS_KINDS = ("checkpoint", "demo", "untrained")


def default_weights(model_name: str) -> str:
    """What a command without `--checkpoint` runs `model_name` with: "demo" or "untrained"."""
    return "demo" if model_name in demo_models() else "untrained"


def weights_label(model_name: str, weights: str) -> str:
    """One line for reports: which weights a result was measured with."""
    if weights == "demo":
        rec = demo_models()[model_name]
        return (f"embedded demo weights (trained on scikit-learn digits; held-out top-1 "
                f"{rec['heldout_top1']:.2f}%, {rec['file']})")
    if weights == "untrained":
        return UNTRAINED_LABEL
    return "from the checkpoint given"


def _demo_checkpoint(model_name: str) -> Path:
    rec = demo_models()[model_name]
    path = DATA / rec["file"]
    if not path.is_file() or sha256_file(path) != rec["sha256"]:
        raise CheckpointError(
            f"the shipped demo weights {path.name} are missing or damaged "
            "(sha256 differs from demo_models.json); "
            "reinstall slab-deploy (pip install --force-reinstall slab-deploy) or pass --checkpoint"
        )
    return path


def cache_dir() -> Path:
    root = os.environ.get("SLAB_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slab-deploy"
    )
    return Path(root)


def _fallback_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return Path(tempfile.gettempdir()) / f"slab-deploy-{uid}"


def default_checkpoint(model_name: str) -> Path:
    """Path of the embedded default checkpoint of `model_name`: the shipped trained file of a demo
    model, else the seeded untrained one, written on first use."""
    if default_weights(model_name) == "demo":
        return _demo_checkpoint(model_name)
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
    """`create_model` with the checkpoint, or with the embedded default weights when `checkpoint` is
    None. The model carries `.weights` ("checkpoint", "demo", "untrained") and `.untrained`."""
    get_spec(name)  # unknown names fail before anything is written
    weights = "checkpoint" if checkpoint is not None else default_weights(name)
    if checkpoint is None:
        checkpoint = default_checkpoint(name)
    model = create_model(
        name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn, img_size=img_size
    )
    model.weights = weights  # type: ignore[assignment]
    model.untrained = weights == "untrained"  # type: ignore[assignment]
    return model
