"""UnwrapPRepBN: replace every PRepBN (LinearNorm) by the RepBN it evaluates with."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from slab_deploy.models.layers import LinearNorm
from slab_deploy.passes.base import PassResult, prepare, set_submodule


@torch.no_grad()
def UnwrapPRepBN(model: nn.Module, *, inplace: bool = False) -> PassResult:
    """Eval-mode LinearNorm is exactly its `norm2` (RepBN); the LayerNorm branch is dead weight."""
    model = prepare(model, inplace)
    names = [n for n, m in model.named_modules() if isinstance(m, LinearNorm)]
    for n in names:
        set_submodule(model, n, cast(LinearNorm, model.get_submodule(n)).norm2)
    notes = [f"unwrapped {len(names)} PRepBN layers to RepBN"] if names else []
    return PassResult(model, bool(names), notes)
