"""Common shape of a pass: takes a model, returns `PassResult(model, changed, notes)`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn


@dataclass
class PassResult:
    model: nn.Module
    changed: bool
    notes: list[str] = field(default_factory=list)


def prepare(model: nn.Module, inplace: bool) -> nn.Module:
    """Copy unless `inplace`; passes work on eval-mode models only."""
    if model.training:
        raise ValueError("passes need an eval-mode model: call model.eval() first")
    return model if inplace else copy.deepcopy(model)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
