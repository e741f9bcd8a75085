"""Checkpoints in the SLAB authors' training-file format, written by the producers their code uses.

`torch.save` (protocol 2 by default, as theirs), a real `yacs.config.CfgNode` config built the way
their `config.py` builds it (defaults in a `CN()` tree, then a merge, then `freeze()`), a real
`torch.optim.AdamW` state after one step over the authors' two parameter groups, and the plain dict
that timm's `CosineLRScheduler.state_dict()` returns (timm is not a dependency, so that dict is
reproduced here key for key, from timm 1.0's `Scheduler.state_dict()`: everything but the optimizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# ImageNet-1k at the authors' batch size (1024 over 8 GPUs): iterations per epoch of their loader.
_ITERS_PER_EPOCH = 1251


def authors_config(model_name: str, *, num_classes: int = 1000, img_size: int = 224) -> Any:
    """A real `yacs.config.CfgNode` in the shape of the authors' training config.

    Defaults first (a `CN()` tree with nested nodes, tuples, None and `new_allowed` nodes), then
    the model's settings merged in and the node frozen, as their `get_config` does; so the pickle
    carries what a real one does (`__deprecated_keys__` as a set, `__renamed_keys__`,
    `__new_allowed__`, `__immutable__`)."""
    from yacs.config import CfgNode as CN

    c = CN()
    c.BASE = [""]
    c.DATA = CN()
    c.DATA.BATCH_SIZE = 128
    c.DATA.DATA_PATH = ""
    c.DATA.DATASET = "imagenet"
    c.DATA.IMG_SIZE = 224
    c.DATA.INTERPOLATION = "bicubic"
    c.DATA.NUM_WORKERS = 8
    c.MODEL = CN()
    c.MODEL.TYPE = "swin"
    c.MODEL.NAME = "swin_tiny_patch4_window7_224"
    c.MODEL.RESUME = ""
    c.MODEL.NUM_CLASSES = 1000
    c.MODEL.DROP_PATH_RATE = 0.1
    c.MODEL.SWIN = CN()
    c.MODEL.SWIN.EMBED_DIM = 96
    c.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    c.MODEL.SWIN.QK_SCALE = None
    c.MODEL.SWIN_HR = CN(new_allowed=True)
    c.MODEL.LA = CN()
    c.MODEL.LA.ATTN_TYPE = "LLLL"
    c.TRAIN = CN()
    c.TRAIN.EPOCHS = 300
    c.TRAIN.WARMUP_EPOCHS = 20
    c.TRAIN.WEIGHT_DECAY = 0.05
    c.TRAIN.BASE_LR = 5e-4
    c.TRAIN.WARMUP_LR = 5e-7
    c.TRAIN.MIN_LR = 5e-6
    c.TRAIN.CLIP_GRAD = 5.0
    c.TRAIN.LR_SCHEDULER = CN()
    c.TRAIN.LR_SCHEDULER.NAME = "cosine"
    c.TRAIN.OPTIMIZER = CN()
    c.TRAIN.OPTIMIZER.NAME = "adamw"
    c.TRAIN.OPTIMIZER.EPS = 1e-8
    c.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
    c.AMP = False
    c.OUTPUT = ""
    c.TAG = "default"
    c.SEED = 0
    c.EVAL_MODE = False

    cfg = c.clone()
    cfg.defrost()
    cfg.merge_from_other_cfg(
        CN({"MODEL": {"TYPE": model_name, "NAME": model_name, "NUM_CLASSES": num_classes},
            "DATA": {"IMG_SIZE": img_size}})
    )
    cfg.merge_from_list(["TRAIN.CLIP_GRAD", None, "OUTPUT", f"output/{model_name}/default"])
    cfg.freeze()
    return cfg


def _param_names(model_name: str, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], set[str]]:
    """(parameter names in model order, those without weight decay), as the authors' optimizer splits them."""
    from slab_deploy.models.registry import build_model

    with torch.device("meta"):
        model = (build_model(model_name, num_classes=state_dict["head.weight"].shape[0])
                 if "head.weight" in state_dict else build_model(model_name))
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    names = [n for n, _ in model.named_parameters() if n in state_dict]
    no_decay = {n for n in names if state_dict[n].dim() == 1 or n.endswith(".bias") or n in skip}
    return names, no_decay


def _adamw_state(model_name: str, state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    """A real AdamW state_dict after one step (seeded gradients) over copies of the weights."""
    names, no_decay = _param_names(model_name, state_dict)
    params = {n: nn.Parameter(state_dict[n].detach().clone().float()) for n in names}
    groups: list[dict[str, Any]] = [
        {"params": [params[n] for n in names if n not in no_decay]},
        {"params": [params[n] for n in names if n in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=5e-4,
        eps=1e-8,
        betas=(0.9, 0.999),
        weight_decay=0.05,
    )
    g = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt.step()
    return opt.state_dict()


def _cosine_scheduler_state(num_groups: int, *, epochs: int = 300, warmup_epochs: int = 20) -> dict[str, Any]:
    """What timm's `CosineLRScheduler(...).state_dict()` returns for the authors' settings
    (t_in_epochs=False, cycle_limit=1): a plain dict, reproduced key for key."""
    base_lr, warmup_lr, min_lr = 5e-4, 5e-7, 5e-6
    warmup_t = warmup_epochs * _ITERS_PER_EPOCH
    base = [base_lr] * num_groups
    return {
        "param_group_field": "lr",
        "_initial_param_group_field": "initial_lr",
        "base_values": base,
        "metric": None,
        "t_in_epochs": False,
        "noise_range_t": None,
        "noise_pct": 0.67,
        "noise_type": "normal",
        "noise_std": 1.0,
        "noise_seed": 42,
        "t_initial": epochs * _ITERS_PER_EPOCH,
        "lr_min": min_lr,
        "cycle_mul": 1.0,
        "cycle_decay": 1.0,
        "cycle_limit": 1,
        "warmup_t": warmup_t,
        "warmup_lr_init": warmup_lr,
        "warmup_prefix": False,
        "k_decay": 1.0,
        "warmup_steps": [(v - warmup_lr) / warmup_t for v in base],
    }


def ema_state_dict(state_dict: dict[str, torch.Tensor], *, seed: int = 0,
                   decay: float = 0.99996) -> dict[str, torch.Tensor]:
    """EMA weights as timm 0.4.12's `ModelEma.update` (the authors' timm) leaves them after one update
    from an earlier state: `ema = ema * decay + (1 - decay) * model` for every entry, buffers and
    integer counters included (copy_ casts back to each entry's dtype)."""
    g = torch.Generator().manual_seed(seed)
    ema = {}
    for k, v in state_dict.items():
        e = v.detach().clone()
        if (v.is_floating_point() and "running_var" not in k
                and not k.endswith(("attn_mask", "relative_position_index"))):
            e += torch.randn(v.shape, generator=g) * 0.05  # the earlier weights the average still remembers
        e.copy_(e * decay + (1.0 - decay) * v)
        ema[k] = e
    return ema


def authors_checkpoint(
    state_dict: dict[str, torch.Tensor],
    *,
    model_name: str,
    ema: dict[str, torch.Tensor] | None = None,
    scaler: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The dict the authors' `save_checkpoint` (or, with `ema`, `save_checkpoint_ema`) saves, without
    its 'config' (see `save_authors_checkpoint`). `scaler` adds the AMP GradScaler state that
    Microsoft's Swin training code (which the authors' code derives from) also saves."""
    optimizer = _adamw_state(model_name, state_dict, seed)
    ckpt: dict[str, Any] = {
        "model": state_dict,
        "optimizer": optimizer,
        "lr_scheduler": _cosine_scheduler_state(len(optimizer["param_groups"])),
        "max_accuracy": 0.0,
        "epoch": 300,
    }
    if ema is not None:
        ckpt["max_accuracy_e"] = 0.0
        ckpt["state_dict_ema"] = ema
    if scaler:
        ckpt["scaler"] = torch.amp.GradScaler("cpu").state_dict()
    return ckpt


def save_authors_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    model_name: str,
    ema: dict[str, torch.Tensor] | None = None,
    with_config: bool = True,
    scaler: bool = False,
    pickle_protocol: int = 2,
    legacy: bool = False,
) -> Path:
    """Write `state_dict` as the authors' training script does: `torch.save` of a dict with model,
    optimizer, lr_scheduler, max_accuracy, epoch, a yacs CfgNode config, and with `ema` also
    state_dict_ema and max_accuracy_e. `pickle_protocol` and `legacy` (the pre-1.6 non-zip format,
    `_use_new_zipfile_serialization=False`) choose torch.save's settings; the defaults are torch's."""
    from slab_deploy.utils import atomic_write

    ckpt = authors_checkpoint(state_dict, model_name=model_name, ema=ema, scaler=scaler)
    if with_config:
        head = state_dict.get("head.weight")
        ckpt["config"] = authors_config(model_name,
                                        num_classes=int(head.shape[0]) if head is not None else 1000)
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp, pickle_protocol=pickle_protocol, _use_new_zipfile_serialization=not legacy)
    return path
