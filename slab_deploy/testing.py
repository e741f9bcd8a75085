"""Seeded random weights and checkpoints in the SLAB authors' file format.

Used by the test suite and as the embedded default (untrained) weights: every norm gets
randomised BatchNorm statistics, gamma, beta and alpha != 1, because default-initialised BN
makes folding almost an identity and a wrong formula would pass unnoticed.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slab_deploy.models.layers import LinearNorm, RepBN


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0, *, prepbn_iter: int = 0, prepbn_warm: int = 0) -> nn.Module:
    """Give every parameter and norm statistic seeded random values (in place).

    Weights ~ N(0, 0.02)-ish scaled by fan-in so activations stay O(1); BN running mean ~ N(0, 0.5),
    running var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2), RepBN alpha ~ U(0.2, 1.2);
    positional encodings ~ N(0, 0.1); PRepBN counters set to `prepbn_iter` / `prepbn_warm`.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(rand(p.shape, fan_in**-0.5))
        elif name.endswith("alpha"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.2)
        elif name.endswith("weight"):
            p.copy_(1.0 + rand(p.shape, 0.2))
        else:
            p.copy_(rand(p.shape, 0.1))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(rand(m.running_mean.shape, 0.5))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(rand(m.bias.shape, 0.2))
            m.num_batches_tracked.fill_(1000)
        if isinstance(m, RepBN):
            m.alpha.copy_(torch.rand(1, generator=g) + 0.2)
        if isinstance(m, LinearNorm):
            m.iter.fill_(prepbn_iter)
            m.warm.fill_(prepbn_warm)
    for name, p in model.named_parameters():
        if "positional_encoding" in name or "pos_embed" in name or "relative_position_bias_table" in name:
            p.copy_(rand(p.shape, 0.1))
    return model


@contextlib.contextmanager
def _yacs_like() -> Iterator[type]:
    """A stand-in class pickled as `yacs.config.CfgNode`, as the authors' training files carry."""
    created = []
    for mod in ("yacs", "yacs.config"):
        if mod not in sys.modules:
            sys.modules[mod] = types.ModuleType(mod)
            created.append(mod)
    cfg_mod = sys.modules["yacs.config"]
    cls = getattr(cfg_mod, "CfgNode", None)
    fake = cls is None
    if fake:

        class CfgNode(dict):
            def __init__(self, init: dict[str, Any] | None = None) -> None:
                super().__init__(init or {})
                self.__dict__["__immutable__"] = False

        CfgNode.__module__ = "yacs.config"
        cfg_mod.CfgNode = CfgNode  # type: ignore[attr-defined]
        cls = CfgNode
    try:
        yield cls
    finally:
        if fake:
            delattr(cfg_mod, "CfgNode")
        for mod in created:
            sys.modules.pop(mod, None)


def authors_checkpoint(state_dict: dict[str, torch.Tensor], *, model_name: str, ema: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    return {
        "model": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.05, "params": list(range(4))}]},
        "lr_scheduler": {"t_initial": 300, "last_epoch": 299},
        "max_accuracy": 0.0,
        "epoch": 299,
        **({"state_dict_ema": ema} if ema is not None else {}),
    }


def save_authors_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    model_name: str,
    ema: dict[str, torch.Tensor] | None = None,
    with_config: bool = True,
) -> Path:
    """Write `state_dict` as the authors' training script does: a dict with model, optimizer,
    lr_scheduler, max_accuracy, epoch, optional state_dict_ema, and a pickled yacs CfgNode config."""
    from slab_deploy.utils import atomic_write

    ckpt = authors_checkpoint(state_dict, model_name=model_name, ema=ema)
    path = Path(path)
    with _yacs_like() as CfgNode, atomic_write(path) as tmp:
        if with_config:
            cfg = CfgNode({"MODEL": CfgNode({"NAME": model_name, "NUM_CLASSES": 1000}), "DATA": CfgNode({"IMG_SIZE": 224})})
            ckpt["config"] = cfg
        torch.save(ckpt, tmp)
    return path


def random_checkpoint(
    model_name: str,
    path: str | Path,
    *,
    seed: int = 0,
    prepbn_iter: int = 0,
    prepbn_warm: int = 0,
    with_ema: bool = False,
    num_classes: int | None = None,
) -> Path:
    """An authors'-format checkpoint of `model_name` with seeded random weights and BN statistics."""
    from slab_deploy.models.registry import build_model

    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = randomize_weights(build_model(model_name, **kwargs), seed, prepbn_iter=prepbn_iter, prepbn_warm=prepbn_warm)
    sd = model.state_dict()
    ema = None
    if with_ema:
        ema = {k: (v + 0.01 if v.is_floating_point() and "running_var" not in k else v.clone()) for k, v in sd.items()}
    return save_authors_checkpoint(path, sd, model_name=model_name, ema=ema)
