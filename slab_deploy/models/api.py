"""`create_model`: a registered variant, optionally with a checkpoint loaded strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from torch import nn

from slab_deploy.errors import CheckpointError, UnsupportedInputError
from slab_deploy.models.checkpoint import (
    CheckpointInfo,
    check_prepbn_finished,
    read_checkpoint,
    remap_layout,
    strict_load,
)
from slab_deploy.models.folded import restore_folded_structure
from slab_deploy.models.registry import build_model, get_spec


def checkpoint_info(model: nn.Module) -> CheckpointInfo | None:
    """The `CheckpointInfo` that `create_model` attached to `model` as `.checkpoint_info`
    (None: no checkpoint)."""
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
                    f"{checkpoint} has a {info.num_classes}-class head "
                    f"but num_classes={num_classes} was asked for"
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
        if img_size is not None:
            _refuse_img_size_misfit(name, img_size, sd, model, kwargs)
        strict_load(model, sd, source=str(checkpoint), model_name=name)
    model.checkpoint_info = info  # type: ignore[assignment]
    model.spec = spec if num_classes in (None, spec.num_classes) else model.spec  # type: ignore[assignment]
    return model.eval()


def _refuse_img_size_misfit(name: str, img_size: int, sd: Any, model: nn.Module,
                            kwargs: dict[str, Any]) -> None:
    """Blame `--img-size`, not the checkpoint, when the two differ only in tensors sized by the
    token count (position embeddings, SLA's positional encodings: one entry per token of the
    size the model was trained at)."""
    import math

    import torch


    own = model.state_dict()
    if set(own) != set(sd):
        return
    mis = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if not mis:
        return
    candidates = [get_spec(name).input_size[1]]
    for k in mis:
        if own[k].numel():
            candidates.append(round(img_size * math.sqrt(sd[k].numel() / own[k].numel())))
    fits = None
    for c in dict.fromkeys(candidates):
        if c < 1 or c == img_size:
            continue
        try:
            with torch.device("meta"):
                shapes = {k: tuple(v.shape)
                          for k, v in build_model(name, **{**kwargs, "img_size": c}).state_dict().items()}
        except Exception:  # a size this model cannot be built at is simply not the answer
            continue
        if all(shapes.get(k) == tuple(sd[k].shape) for k in own):
            fits = c
            break
    token_sized = all("pos" in k.rsplit(".", 1)[-1] or "relative_position" in k for k in mis)
    if fits is None and not token_sized:
        return  # not (only) a size question: strict_load says what does not fit
    enc = [k for k in mis if "positional_encoding" in k]
    k = (enc or mis)[0]
    what = "its linear attention's positional encodings" if enc else "its position embeddings"
    raise UnsupportedInputError(
        f"--img-size {img_size} does not fit {name} ({what} have one entry per token: "
        f"{k} is {list(sd[k].shape)} in the checkpoint, {list(own[k].shape)} at {img_size} px"
        + (f", {len(mis)} such tensors" if len(mis) > 1 else "")
        + (f"); this checkpoint fits --img-size {fits}" if fits is not None
           else "); export at the size the checkpoint was trained at")
    )
