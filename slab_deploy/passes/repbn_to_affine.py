"""RepBNToAffine: replace every eval-mode RepBN by the per-channel affine it computes."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from slab_deploy.models.layers import ChannelAffine, RepBN, repbn_affine
from slab_deploy.passes.base import PassResult, prepare, set_submodule


def affine_from_repbn(norm: RepBN) -> ChannelAffine:
    """`BN(x) + alpha*x` in eval mode == `a*x + b` with a = gamma/sqrt(var+eps) + alpha,
    b = beta - gamma*mean/sqrt(var+eps)."""
    a, b = repbn_affine(norm)
    running_var = cast(torch.Tensor, norm.bn.running_var)  # tracked: RepBN's BatchNorm1d keeps running stats
    dtype = running_var.dtype
    aff = ChannelAffine(a.numel()).to(device=running_var.device)
    aff.weight.data.copy_(a.to(dtype))
    aff.bias.data.copy_(b.to(dtype))
    return aff


@torch.no_grad()
def RepBNToAffine(model: nn.Module, *, inplace: bool = False) -> PassResult:
    model = prepare(model, inplace)
    names = [n for n, m in model.named_modules() if isinstance(m, RepBN)]
    for n in names:
        set_submodule(model, n, affine_from_repbn(cast(RepBN, model.get_submodule(n))))
    notes = [f"turned {len(names)} RepBN layers into per-channel affines"] if names else []
    return PassResult(model, bool(names), notes)
