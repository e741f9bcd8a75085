"""Shared test utilities."""

from __future__ import annotations

import torch

from slab_deploy.models import get_spec, list_models
from slab_deploy.models.layers import LinearNorm, RepBN
from slab_deploy.tolerances import tolerance_for


def tiny_models() -> list[str]:
    return [n for n in list_models(include_test=True) if get_spec(n).test]


def tiny_slab_models() -> list[str]:
    return [n for n in tiny_models() if get_spec(n).is_slab]


def full_models() -> list[str]:
    return list_models()


def slab_models() -> list[str]:
    return [n for n in list_models() if get_spec(n).is_slab]


def images(model: torch.nn.Module, batch: int, seed: int) -> torch.Tensor:
    size = getattr(model, "img_size", None) or model.spec.input_size[1]
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def fold_budget(reference: torch.Tensor) -> float:
    """The issue's bound for an exact fold: max |delta| <= tol x max |logit| (tol from the table)."""
    tol = tolerance_for("fold", "fp32").max_rel
    assert tol is not None
    return tol * float(reference.abs().max())


def norm_modules(model: torch.nn.Module) -> list[str]:
    kinds = (RepBN, LinearNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    """Run `slab-deploy ARGS` in-process through the console entry point; returns (code, out, err)."""
    import sys

    from slab_deploy.cli import main

    monkeypatch.setattr(sys, "argv", ["slab-deploy", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
