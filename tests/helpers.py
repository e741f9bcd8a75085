"""Shared test utilities."""

from __future__ import annotations

import functools

import pytest
import torch

from slab_deploy.models import get_spec, list_models
from slab_deploy.models.layers import LinearNorm, RepBN
from slab_deploy.passes.fold import FoldReport
from slab_deploy.tolerances import tolerance_for


def tiny_models() -> list[str]:
    return [n for n in list_models(include_test=True) if get_spec(n).test]


def tiny_slab_models() -> list[str]:
    return [n for n in tiny_models() if get_spec(n).is_slab]


# Full-size baselines whose export alone takes minutes on a 2-core CPU (cswin_tiny 148 s,
# flatten_cswin_tiny 88 s in CI on 2026-12-03); test_cswin and test_flatten_cswin run the same export
# code at tiny size in every run, and slab_cswin_tiny (SLA and LePE stages) stays at full size.
SLOW_BASELINES = ("cswin_tiny", "flatten_cswin_tiny")


def full_models() -> list:  # type: ignore[type-arg]
    """Every zoo model; the hierarchical families' small/medium/base variants (40-210 s each for a
    full-size export + check on a 2-core CPU; the tiny ones run the same code) and SLOW_BASELINES carry
    the `zoo_large` mark, which `make test` leaves to `make test-zoo` to keep CI short."""
    out = []
    for n in list_models():
        large = n in SLOW_BASELINES or (
            get_spec(n).family != "deit"
            and n.removesuffix("_prepbn").split("_")[-1] in ("small", "medium", "base"))
        out.append(pytest.param(n, marks=pytest.mark.zoo_large) if large else n)
    return out


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


def import_tool(name: str):  # type: ignore[no-untyped-def]
    """tools/NAME.py of the project as a module (the tools are scripts, not a package)."""
    import importlib
    import sys
    from pathlib import Path

    tools = str(Path(__file__).resolve().parent.parent / "tools")
    sys.path.insert(0, tools)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tools)


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


# ---------------------------------------------------------------------------------- the zoo, cached
# Building, randomising and folding a tiny variant once per run serves every contract of
# tests/test_zoo.py and the family files. The cached objects are shared: never mutate them
# (build your own with `build_model` + `randomize_weights` for a test that edits weights).


@functools.cache
def tiny_model(name: str) -> torch.nn.Module:
    """`name` built at its spec's size, with seeded random weights and BN statistics, in eval mode."""
    from slab_deploy.models import build_model
    from slab_deploy.weights import randomize_weights

    return randomize_weights(build_model(name), seed=0)


@functools.cache
def tiny_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, logits): a seeded batch of 3 at the spec's input size and `tiny_model(name)`'s output."""
    model = tiny_model(name)
    x = images(model, 3, 1)
    with torch.no_grad():
        return x, model(x)


@functools.cache
def tiny_fold(name: str) -> tuple[torch.nn.Module, FoldReport]:
    """`fold_model` of `tiny_model(name)` (a copy: the cached model keeps its norms)."""
    from slab_deploy.passes.fold import fold_model

    return fold_model(tiny_model(name))


def fingerprint(model: torch.nn.Module) -> list[str]:
    """`<key> <AxBxC|scalar>` per state_dict entry, in order: the format of tests/data/keys/*.txt."""
    return [f"{k} {'x'.join(str(d) for d in v.shape) or 'scalar'}" for k, v in model.state_dict().items()]


def read_keys(name: str) -> dict[str, str]:
    """tests/data/keys/<name>.txt as {key: shape}, in file order."""
    from pathlib import Path

    lines = (Path(__file__).parent / "data" / "keys" / f"{name}.txt").read_text().splitlines()
    return dict(line.rsplit(" ", 1) for line in lines if line)


def break_the_fold(monkeypatch, fault=None) -> None:  # type: ignore[no-untyped-def]
    """Make every `slab_deploy.passes.fold_model` call return a folded model with a fault, as a
    wrong fold formula would: the parity gates downstream must catch it. `fault(folded)` edits
    the folded model under no_grad (default: head bias + 0.5)."""
    import slab_deploy.passes as passes

    real = passes.fold_model

    def wrong_fold(model, **kw):  # type: ignore[no-untyped-def]
        folded, rep = real(model, **kw)
        with torch.no_grad():
            if fault is None:
                folded.head.bias.add_(0.5)
            else:
                fault(folded)
        return folded, rep

    monkeypatch.setattr(passes, "fold_model", wrong_fold)


def digit_folder(folder, count: int | None = None):  # type: ignore[no-untyped-def]
    """The demo models' held-out digits written by PIL as PNG files, one folder per class (the
    first `count` images): real images to calibrate INT8 on, at any model's input size (the
    preprocessing resizes them)."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from slab_deploy.datasets import DATA, DEMO_SUMMARY

    folder = Path(folder)
    with np.load(DATA / json.loads(DEMO_SUMMARY.read_text())["heldout"]["file"], allow_pickle=False) as f:
        images, labels = f["images"][:count], f["labels"][:count]
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / str(int(label)) / f"{i:03d}.png")
    return folder
