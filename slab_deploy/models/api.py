"""`create_model`: a registered variant, optionally with a checkpoint loaded strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from torch import nn

from slab_deploy.errors import CheckpointError
from slab_deploy.models.checkpoint import (
    CheckpointInfo,
    check_prepbn_finished,
    read_checkpoint,
    remap_layout,
    strict_load,
)
from slab_deploy.models.registry import build_model, get_spec


def checkpoint_info(model: nn.Module) -> CheckpointInfo | None:
    """The `CheckpointInfo` that `create_model` attached to `model` as `.checkpoint_info` (None: no checkpoint)."""
    return cast("CheckpointInfo | None", model.checkpoint_info)


def create_model(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Build model `name` in eval mode; with `checkpoint`, load it strictly.

    The number of classes comes from the checkpoint's head unless given. A folded checkpoint
    (written by `slab-deploy fold`) is recognised and rebuilt as the folded architecture, not
    folded again. The returned module carries `.spec` (ModelSpec) and `.checkpoint_info`
    (CheckpointInfo or None).
    """
    spec = get_spec(name)
    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    info: CheckpointInfo | None = None
    sd = None
    if checkpoint is not None:
        sd, info = read_checkpoint(checkpoint, ema=ema)
        if info.num_classes is not None:
            if num_classes is not None and num_classes != info.num_classes:
                raise CheckpointError(
                    f"{checkpoint} has a {info.num_classes}-class head but num_classes={num_classes} was asked for"
                )
            num_classes = info.num_classes
        if info.folded is not None and info.folded.get("model") not in (None, name):
            raise CheckpointError(
                f"{checkpoint} is a folded {info.folded.get('model')} checkpoint, not {name}: "
                f"pass --model {info.folded.get('model')}"
            )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = build_model(name, **kwargs)
    if sd is not None and info is not None:
        if info.folded is not None:
            from slab_deploy.passes.fold import restore_folded_structure

            try:
                restore_folded_structure(model, info.folded)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"{checkpoint}: its fold metadata does not describe {name} ({exc.__class__.__name__}: "
                    f"{str(exc)[:120]}); fold the original checkpoint again"
                ) from None
        else:
            check_prepbn_finished(info, allow_unfinished=allow_unfinished_prepbn)
            sd, note = remap_layout(sd, model.state_dict(), source=str(checkpoint))
            info.remapped = "; ".join(n for n in (info.remapped, note) if n)
        strict_load(model, sd, source=str(checkpoint), model_name=name)
    model.checkpoint_info = info  # type: ignore[assignment]
    model.spec = spec if num_classes in (None, spec.num_classes) else model.spec  # type: ignore[assignment]
    return model.eval()
