"""Seeded random weights: every norm gets randomised BatchNorm statistics, gamma, beta and alpha != 1.

Default-initialised BN makes folding almost an identity and a wrong formula would pass unnoticed,
so these are the weights of the test fixtures and of the embedded default (untrained) checkpoints
(`weights.default`); `random_checkpoint` writes them in the authors' file format.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn

from slab_deploy.models.layers import LinearNorm
from slab_deploy.weights.authors_format import ema_state_dict, save_authors_checkpoint


@torch.no_grad()
def randomize_weights(
    model: nn.Module,
    seed: int = 0,
    *,
    prepbn_iter: int = 0,
    prepbn_warm: int = 0,
    calibrate: bool = True,
) -> nn.Module:
    """Give every parameter and norm statistic seeded random values (in place).

    Weights ~ N(0, 1/fan_in) / 2; then (with `calibrate`) BatchNorm running statistics are
    measured on one seeded random batch, so activations keep a realistic scale through depth,
    and perturbed: mean += N(0, 0.1 std), var *= U(0.7, 1.4). gamma ~ U(0.5, 1.5),
    beta ~ N(0, 0.2), RepBN alpha ~ U(0.05, 0.5) (never the default 1); positional encodings
    ~ N(0, 0.1); PRepBN counters set to `prepbn_iter` / `prepbn_warm`. The model ends in eval mode.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(rand(p.shape, 0.5 * p[0].numel() ** -0.5))
        elif name.endswith("alpha"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.45 + 0.05)
        elif name.endswith("weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        else:
            p.copy_(rand(p.shape, 0.1))
        if "positional_encoding" in name or "pos_embed" in name or "relative_position_bias_table" in name:
            p.copy_(rand(p.shape, 0.1))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if calibrate and bns:
        size = (getattr(model, "img_size", None)
                or getattr(getattr(model, "spec", None), "input_size", (3, 224, 224))[1])
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
            m.train()
        model(torch.randn(4, 3, *size, generator=g))
        for m in bns:
            m.momentum = 0.1
            m.eval()
    for m in bns:
        # every BatchNorm here tracks running statistics (the default), so they are tensors
        running_mean, running_var = cast(torch.Tensor, m.running_mean), cast(torch.Tensor, m.running_var)
        std = running_var.clamp_min(1e-6).sqrt()
        running_mean.add_(rand(running_mean.shape, 1.0) * 0.1 * std)
        running_var.mul_(torch.rand(running_var.shape, generator=g) * 0.7 + 0.7)
        if m.weight is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(rand(m.bias.shape, 0.2))
        cast(torch.Tensor, m.num_batches_tracked).fill_(1000)
    for mod in model.modules():
        if isinstance(mod, LinearNorm):
            mod.iter.fill_(prepbn_iter)
            mod.warm.fill_(prepbn_warm)
    return model


def random_checkpoint(
    model_name: str,
    path: str | Path,
    *,
    seed: int = 0,
    prepbn_iter: int = 0,
    prepbn_warm: int = 0,
    with_ema: bool = False,
    num_classes: int | None = None,
    pickle_protocol: int = 2,
    legacy: bool = False,
) -> Path:
    """An authors'-format checkpoint of `model_name` with seeded random weights and BN statistics."""
    from slab_deploy.models.registry import build_model

    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = randomize_weights(build_model(model_name, **kwargs), seed, prepbn_iter=prepbn_iter,
                              prepbn_warm=prepbn_warm)
    sd = model.state_dict()
    ema = ema_state_dict(sd, seed=seed + 1) if with_ema else None
    return save_authors_checkpoint(
        path, sd, model_name=model_name, ema=ema, pickle_protocol=pickle_protocol, legacy=legacy
    )
