"""fold_model: PRepBN -> RepBN -> per-channel affine -> folded into Linear/Conv, with a report.

The result has no BatchNorm, RepBN, LinearNorm or LayerNorm left in a SLAB model; norms that cannot
be folded exactly stay as one explicit `ChannelAffine` (Mul + Add) with the reason in the report.
LayerNorm baselines are left as they are: LayerNorm's statistics depend on the input, so it has no
fixed affine to fold.

The verification is NaN-safe: a model whose probe logits are already NaN/Inf cannot verify a fold
and raises `FoldError`; a fold whose logits become NaN/Inf is reverted like any other that moves
them beyond the budget (each test is written `not delta <= budget`, which NaN fails).

The report (`FoldReport`) and the folded-checkpoint format that stores it live in `models.folded`.
"""

from __future__ import annotations

import copy
import time
from typing import Any, cast

import torch
from torch import nn

from slab_deploy.errors import FoldError
from slab_deploy.models.folded import FoldReport, NormFold
from slab_deploy.models.layers import ChannelAffine, LinearNorm, RepBN
from slab_deploy.passes.base import prepare, set_submodule
from slab_deploy.passes.fold_affine import Fold, _Foldable, apply_fold, plan_folds
from slab_deploy.passes.move_biases import move_biases
from slab_deploy.passes.repbn_to_affine import RepBNToAffine
from slab_deploy.passes.unwrap_prepbn import UnwrapPRepBN
from slab_deploy.tolerances import tolerance_for

__all__ = ["FoldReport", "NormFold", "default_probe", "fold_model", "norm_kinds"]


def norm_kinds(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Every norm of `model` by name: (kind, channels), kind one of prepbn, repbn, affine, layernorm,
    batchnorm."""
    kinds: dict[str, tuple[str, int]] = {}
    skip: tuple[str, ...] = ()
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(m, LinearNorm):
            kinds[name] = ("prepbn", cast(RepBN, m.norm2).bn.num_features)
            skip = (name + ".",)
        elif isinstance(m, RepBN):
            kinds[name] = ("repbn", m.bn.num_features)
        elif isinstance(m, ChannelAffine):
            kinds[name] = ("affine", m.weight.numel())
        elif isinstance(m, nn.LayerNorm):
            kinds[name] = ("layernorm", int(m.normalized_shape[-1]))
        elif isinstance(m, nn.RMSNorm):  # the LLaMA baselines' norm
            kinds[name] = ("rmsnorm", int(m.normalized_shape[-1]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            kinds[name] = ("batchnorm", m.num_features)
    return kinds


def default_probe(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded random images of the model's input size."""
    size = getattr(model, "img_size", None)
    if size is None:
        spec = getattr(model, "spec", None)
        size = spec.input_size[1:] if spec is not None else (224, 224)
    if isinstance(size, int):
        size = (size, size)
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.randn(batch, 3, *size, generator=g).to(device)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def fold_model(
    model: nn.Module,
    *,
    probe: torch.Tensor | None = None,
    inplace: bool = False,
    verify: bool = True,
    keep_biases: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every PRepBN/RepBN of `model` into its neighbours; returns (folded model, report).

    Each fold is checked on `probe` (seeded random images by default); one that moves the logits
    beyond the `fold` tolerance is reverted and kept as an explicit affine. Then, unless
    `keep_biases`, the constant bias adds a deployed graph would run on their own are moved into other
    layers' biases (`passes.move_biases`), checked the same way (and undone if they moved the
    logits). The input model is not changed unless `inplace`.
    """
    t0 = time.perf_counter()
    model = prepare(model, inplace)
    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    kinds = norm_kinds(model)
    params_before = _count(model)
    probe = default_probe(model) if probe is None else probe
    reference = model(probe).detach()
    if verify and not bool(torch.isfinite(reference).all()):
        raise FoldError(
            f"{name} gives NaN/Inf logits on the fold probe before any fold: a fold cannot be verified; "
            "check the checkpoint's weights (inspect it with `slab-deploy inspect`)"
        )
    UnwrapPRepBN(model, inplace=True)
    RepBNToAffine(model, inplace=True)
    folds, refusals = plan_folds(model, probe)
    tol = tolerance_for("fold", "fp32").max_rel or 1e-4
    scale = float(reference.abs().max())
    budget = tol * max(scale, 1e-12)
    entries: dict[str, NormFold] = {}
    biases_added: list[str] = []
    captured = _capture(model, folds, probe)
    affines = {f.norm: cast(ChannelAffine, model.get_submodule(f.norm)) for f in folds}
    pristine = copy.deepcopy(model) if verify and folds else None
    for fold in folds:
        biases_added += apply_fold(model, fold)
    final = model(probe).detach()
    if verify and not float((final - reference).abs().max()) <= budget:  # `not <=`: NaN takes the slow path
        # Some path mixes channels: undo everything and re-apply one fold at a time, keeping the good ones.
        assert pristine is not None
        model = pristine
        entries, biases_added = _fold_one_by_one(model, folds, probe, reference, budget, kinds)
        final = model(probe).detach()
    else:
        for fold in folds:
            kind, ch = kinds.get(fold.norm, ("affine", 0))
            delta = _local_delta(model, fold, affines[fold.norm], captured) if verify else None
            entries[fold.norm] = NormFold(fold.norm, kind, ch, "folded", fold.side, fold.modules, fold.path,
                                          max_abs_delta=delta)
    for r in refusals:
        kind, ch = kinds.get(r.norm, ("affine", 0))
        entries[r.norm] = NormFold(r.norm, kind, ch, "kept-affine", reason=r.reason)
    for n, (kind, ch) in kinds.items():
        if kind in ("layernorm", "rmsnorm") and n not in entries:
            what = "LayerNorm" if kind == "layernorm" else "RMSNorm"
            entries[n] = NormFold(n, kind, ch, "kept-layernorm",
                                  reason=f"{what} statistics depend on the input: nothing fixed to fold")
        elif n not in entries and kind in ("prepbn", "repbn", "affine"):
            entries[n] = NormFold(n, kind, ch, "kept-affine", reason="not reached by the probe forward pass")
    biases_removed: list[str] = []
    if not keep_biases:
        moved = move_biases(model)
        if moved.removed or moved.added:
            moved_final = model(probe).detach()
            if verify and not float((moved_final - reference).abs().max()) <= budget:
                moved.undo()  # a block the pass misread: keep the folded model as it was
            else:
                final, biases_removed = moved_final, moved.removed
                biases_added += [n for n in moved.added if n not in biases_added]
    order = list(kinds)
    max_abs_delta = float((final - reference).abs().max())
    # The one-by-one path keeps only verified folds: a bug if reached.
    if verify and not max_abs_delta <= budget:
        raise FoldError(f"folding {name} moved the probe logits by {max_abs_delta} (> {budget:.1e}) "
                        "after reverting every bad fold")
    report = FoldReport(
        model=name,
        norms=[entries[n] for n in order if n in entries],
        params_before=params_before,
        params_after=_count(model),
        probe_shape=list(probe.shape),
        max_abs_logit=scale,
        max_abs_delta=max_abs_delta,
        tolerance_max_rel=tol,
        seconds=time.perf_counter() - t0,
        biases_added=biases_added,
        biases_removed=biases_removed,
    )
    model.fold_report = report  # type: ignore[assignment]
    return model, report


def _capture(model: nn.Module, folds: list[Fold],
             probe: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every fold target on the probe, before folding."""
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for f in folds:
        for n in f.modules:
            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, n: str = n) -> None:
                got.setdefault(n, (args[0].detach(), out.detach()))
            handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
    return got


def _channel_view(v: torch.Tensor, m: nn.Module, ndim: int) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return v
    return v.view([1, -1] + [1] * (ndim - 2))


def _local_delta(model: nn.Module, fold: Fold, aff: ChannelAffine, captured: dict[str, Any]) -> float:
    """Max |delta| at the output of each folded layer on the captured probe activations:
    input side  W'((x_in - b)/a) vs W x_in;  output side  W' x vs a * (W x) + b."""
    a, b = aff.weight.detach(), aff.bias.detach()
    worst = 0.0
    for n in fold.modules:
        m = model.get_submodule(n)
        inp, out = captured[n]
        if fold.side == "input":
            # Channels with a == 0 carry nothing: the folded layer's column there is zero, so any
            # finite value stands in (dividing by zero would make the check NaN).
            av = _channel_view(a, m, inp.dim())
            z = torch.where(av != 0, (inp - _channel_view(b, m, inp.dim())) / torch.where(av != 0, av, 1), 0)
            want = out
        else:
            z = inp
            want = out * _channel_view(a, m, out.dim()) + _channel_view(b, m, out.dim())
        worst = max(worst, float((m(z) - want).abs().max()))
    return worst


def _fold_one_by_one(
    model: nn.Module,
    folds: list[Fold],
    probe: torch.Tensor,
    reference: torch.Tensor,
    budget: float,
    kinds: dict[str, tuple[str, int]],
) -> tuple[dict[str, NormFold], list[str]]:
    """Slow path: apply folds one at a time with a probe forward after each; revert the ones that
    move the logits beyond the budget (their path mixes channels) and keep them as affines."""
    entries: dict[str, NormFold] = {}
    added_all: list[str] = []
    prev = model(probe).detach()
    for fold in folds:
        kind, ch = kinds.get(fold.norm, ("affine", 0))
        saved = _snapshot(model, fold)
        added = apply_fold(model, fold)
        cur = model(probe).detach()
        total = float((cur - reference).abs().max())
        if not total <= budget:  # NaN reverts too
            _restore(model, fold, saved, added)
            entries[fold.norm] = NormFold(
                fold.norm, kind, ch, "kept-affine",
                reason=f"folding into {', '.join(fold.modules)} moved the logits by {total:.2e} "
                f"(> {budget:.1e}): the path between norm and layer mixes channels",
            )
            continue
        entries[fold.norm] = NormFold(
            fold.norm, kind, ch, "folded", fold.side, fold.modules, fold.path,
            max_abs_delta=float((cur - prev).abs().max()),
        )
        added_all += added
        prev = cur
    return entries, added_all


def _snapshot(model: nn.Module, fold: Fold) -> dict[str, tuple[Any, ...]]:
    """Per folded layer (weight, bias or None); under "__norm__", (the affine module,)."""
    out: dict[str, tuple[Any, ...]] = {}
    for n in fold.modules:
        m = cast(_Foldable, model.get_submodule(n))
        out[n] = (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
    out["__norm__"] = (model.get_submodule(fold.norm),)
    return out


def _restore(model: nn.Module, fold: Fold, saved: dict[str, Any], added: list[str]) -> None:
    for n in fold.modules:
        m = cast(_Foldable, model.get_submodule(n))
        w, b = saved[n]
        m.weight.data.copy_(w)
        if n in added:
            m.bias = None
        elif b is not None:  # the layer had this bias before the fold, so it still has one
            cast(torch.Tensor, m.bias).data.copy_(b)
    set_submodule(model, fold.norm, saved["__norm__"][0])
