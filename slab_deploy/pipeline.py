"""Stage orchestration used by the CLI: load -> fold -> export -> check -> bench."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slab_deploy.models import create_model, get_spec


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
        from slab_deploy.defaults import default_checkpoint

        checkpoint = default_checkpoint(name)
    model = create_model(
        name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn, img_size=img_size
    )
    model.untrained = untrained  # type: ignore[assignment]
    return model
