"""FoldAffine: fold every per-channel affine (an eval-mode RepBN) into its neighbouring Linear/Conv.

The fold is found from the model's structure, not from class or attribute names: one probe
forward pass with autograd recording gives the dataflow graph; for each affine we follow its
output through operations that commute with a per-channel affine (reshapes, permutes, rolls,
slices, token means) to the Linear/Conv modules that consume it (input-side fold), or its input
back to the single Linear/Conv that produces it (output-side fold). Anything else on the way
(zero padding, an add, a second consumer) keeps an explicit affine (one Mul + Add) and says why.
Each fold is then applied one at a time and checked on the probe batch; a fold that moves the
outputs beyond the `fold` tolerance is reverted (defence in depth for channel-mixing reshapes).

Fold math (a, b = affine weight, bias; y = a*x + b per channel):
  input side,  Linear W, c:  W' = W diag(a),   c' = W b + c
  input side,  Conv   W, c:  W'[o,i] = W[o,i] a[i],  c'[o] = c[o] + sum_{i,k} W[o,i,k] b[i]
                             (no zero padding)
  output side, Linear/Conv:  W'[o] = a[o] W[o],  c' = a * c + b
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from slab_deploy.models.layers import ChannelAffine
from slab_deploy.passes.base import set_submodule

# Autograd node names of operations that commute with a per-channel affine on the channel axis
# (when they keep that axis intact, which the per-fold numeric check confirms).
_TRANSPARENT = (
    "ViewBackward",
    "UnsafeViewBackward",
    "ReshapeAliasBackward",
    "TransposeBackward",
    "PermuteBackward",
    "RollBackward",
    "CloneBackward",
    "SelectBackward",
    "SliceBackward",
    "MeanBackward1",
    "UnsqueezeBackward",
    "SqueezeBackward",
    "AdaptiveAvgPool1DBackward",
    "AdaptiveAvgPool2DBackward",
    "AsStridedBackward",
    "ToCopyBackward",
)

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
_Foldable = nn.Linear | _Conv


def _is_transparent(node: Any) -> bool:
    return node.name().startswith(_TRANSPARENT)


def _op(node: Any) -> str:
    return node.name().replace("Backward0", "").replace("Backward1", "").replace("torch::autograd::", "")


@dataclass
class Fold:
    """A planned fold of affine `norm` into `modules` on `side` ("input" or "output")."""

    norm: str
    side: str
    modules: list[str]
    path: list[str] = field(default_factory=list)


@dataclass
class Refusal:
    norm: str
    reason: str


def _call_records(model: nn.Module, probe: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """One probe forward with hooks recording, per module call, its input and output graph nodes."""
    rec: dict[str, Any] = {"aff_in": defaultdict(list), "aff_out": defaultdict(list),
                           "mod_in": defaultdict(list), "mod_out": defaultdict(list)}
    handles = []

    def pre(name: str, kind: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                rec[kind][name].append(args[0].grad_fn)

        return hook

    def post(name: str, kind: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                rec[kind][name].append(out.grad_fn)

        return hook

    for name, m in model.named_modules():
        if isinstance(m, ChannelAffine):
            handles += [m.register_forward_pre_hook(pre(name, "aff_in")),
                        m.register_forward_hook(post(name, "aff_out"))]
        elif isinstance(m, _FOLDABLE):
            handles += [m.register_forward_pre_hook(pre(name, "mod_in")),
                        m.register_forward_hook(post(name, "mod_out"))]
    try:
        with torch.enable_grad():
            out = model(probe)
    finally:
        for h in handles:
            h.remove()
    return out, rec


def _users(root: Any) -> dict[Any, list[Any]]:
    users: dict[Any, list[Any]] = defaultdict(list)
    seen: set[Any] = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        for m, _ in n.next_functions:
            if m is not None:
                users[m].append(n)
                stack.append(m)
    return users


def _internal(out_node: Any, in_node: Any) -> set[Any]:
    """Graph nodes of one module call: backward from its output, stopping at its input."""
    seen: set[Any] = set()
    stack = [out_node]
    while stack:
        n = stack.pop()
        if n is None or n is in_node or n in seen:
            continue
        seen.add(n)
        stack.extend(m for m, _ in n.next_functions)
    return seen


def plan_folds(model: nn.Module, probe: torch.Tensor) -> tuple[list[Fold], list[Refusal]]:
    """Find, for each ChannelAffine in `model`, where it can fold (or why it cannot)."""
    out, rec = _call_records(model, probe)
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        raise RuntimeError("fold planning needs a model whose output depends on its parameters")
    users = _users(out.grad_fn)
    # node -> (module name, call index) for the nodes inside each foldable module call
    inside: dict[Any, tuple[str, int]] = {}
    call_inputs: dict[str, list[Any]] = {}
    for name, outs in rec["mod_out"].items():
        ins = rec["mod_in"][name]
        call_inputs[name] = ins
        for i, (o, t) in enumerate(zip(outs, ins, strict=True)):
            for n in _internal(o, t):
                inside[n] = (name, i)
    producer_of: dict[Any, tuple[str, int]] = {
        o: (name, i) for name, outs in rec["mod_out"].items() for i, o in enumerate(outs) if o is not None}

    folds: list[Fold] = []
    refusals: list[Refusal] = []
    claimed: set[str] = set()
    for aff_name, aff_outs in rec["aff_out"].items():
        aff = cast(ChannelAffine, model.get_submodule(aff_name))
        c = aff.weight.numel()
        # -------- input side: every use of the affine's output must reach a foldable consumer
        consumers: dict[str, set[int]] = defaultdict(set)
        blocked: list[str] = []
        ops: list[str] = []
        for a_node in aff_outs:
            frontier = [a_node]
            seen: set[Any] = set()
            while frontier:
                n = frontier.pop()
                if n in seen:
                    continue
                seen.add(n)
                for u in users.get(n, []):
                    hit = inside.get(u)
                    if hit is not None and call_inputs[hit[0]][hit[1]] is n:
                        consumers[hit[0]].add(hit[1])
                    elif _is_transparent(u):
                        ops.append(_op(u))
                        frontier.append(u)
                    else:
                        blocked.append(_op(u))
        reason_in = ""
        if blocked:
            reason_in = f"its output reaches {', '.join(sorted(set(blocked)))} before any Linear/Conv"
        elif not consumers:
            reason_in = "its output reaches no Linear/Conv"
        else:
            for mname, calls in consumers.items():
                m = cast(_Foldable, model.get_submodule(mname))  # hooked in _call_records: a _FOLDABLE
                if len(calls) != len(call_inputs[mname]):
                    reason_in = f"{mname} is also called on other inputs"
                elif mname in claimed:
                    reason_in = f"{mname} already absorbs another norm"
                elif isinstance(m, nn.Linear) and m.in_features != c:
                    reason_in = f"{mname} has {m.in_features} inputs, the norm {c} channels"
                elif not isinstance(m, nn.Linear):
                    if m.groups != 1:
                        reason_in = f"{mname} is a grouped convolution"
                    elif m.in_channels != c:
                        reason_in = f"{mname} has {m.in_channels} input channels, the norm {c}"
                    elif any(p != 0 for p in _padding(m)):
                        reason_in = (f"{mname} zero-pads its input (padding {m.padding}); "
                                     "padding does not commute with the affine")
                if reason_in:
                    break
        if not reason_in:
            folds.append(Fold(aff_name, "input", sorted(consumers), sorted(set(ops))))
            claimed.update(consumers)
            continue
        # -------- output side: the affine's input must come from one Linear/Conv used nowhere else
        reason_out = ""
        producer = None
        path: list[str] = []
        for t in rec["aff_in"][aff_name]:
            n = t
            while n is not None:
                if len(users.get(n, [])) != 1:
                    reason_out = "the tensor it normalises is also used elsewhere (e.g. a residual)"
                    break
                if n in producer_of:
                    producer = producer_of[n][0]
                    break
                if not _is_transparent(n):
                    reason_out = f"its input comes from {_op(n)}, not a Linear/Conv"
                    break
                path.append(_op(n))
                nxt = [m for m, _ in n.next_functions if m is not None]
                n = nxt[0] if len(nxt) == 1 else None
            if reason_out or producer is None:
                reason_out = reason_out or "no Linear/Conv produces its input"
                break
        if not reason_out and producer is not None:
            pm = cast(_Foldable, model.get_submodule(producer))
            out_ch = pm.out_features if isinstance(pm, nn.Linear) else pm.out_channels
            if producer in claimed:
                reason_out = f"{producer} already absorbs another norm"
            elif out_ch != c:
                reason_out = f"{producer} has {out_ch} outputs, the norm {c} channels"
            elif len(call_inputs[producer]) != 1:
                reason_out = f"{producer} is called more than once"
        if not reason_out and producer is not None:
            folds.append(Fold(aff_name, "output", [producer], sorted(set(path))))
            claimed.add(producer)
            continue
        refusals.append(Refusal(aff_name, f"cannot fold forward ({reason_in}) nor backward ({reason_out})"))
    return folds, refusals


def _padding(m: _Conv) -> tuple[int, ...]:
    pad = m.padding
    if isinstance(pad, str):
        return (0,) if pad == "valid" else (1,)
    return tuple(pad)


# ------------------------------------------------------------------------------------------------
# The math: one small pure function per pattern, in float64.


def fold_input_side(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consumer y = W (a*x + b) + c  ->  W' = W diag(a) (per input channel), c' = c + W b."""
    w = weight.double()
    shape = [1, -1] + [1] * (w.dim() - 2)
    new_w = w * a.double().view(shape)
    wb = (w * b.double().view(shape)).sum(dim=tuple(range(1, w.dim())))
    new_b = wb + (bias.double() if bias is not None else 0.0)
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def fold_output_side(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                     b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Producer z = W x + c, then a*z + b  ->  W' = diag(a) W (per output channel), c' = a*c + b."""
    w = weight.double()
    shape = [-1] + [1] * (w.dim() - 1)
    new_w = w * a.double().view(shape)
    c = bias.double() if bias is not None else torch.zeros_like(a, dtype=torch.float64)
    new_b = a.double() * c + b.double()
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def apply_fold(model: nn.Module, fold: Fold) -> list[str]:
    """Apply `fold` in place; returns the names of modules that received a new bias."""
    aff = cast(ChannelAffine, model.get_submodule(fold.norm))
    a, b = aff.weight.detach(), aff.bias.detach()
    added: list[str] = []
    for name in fold.modules:
        m = cast(_Foldable, model.get_submodule(name))
        fn = fold_input_side if fold.side == "input" else fold_output_side
        w, c = fn(m.weight.detach(), None if m.bias is None else m.bias.detach(), a, b)
        m.weight.data.copy_(w)
        if m.bias is None:
            m.bias = nn.Parameter(c)
            added.append(name)
        else:
            m.bias.data.copy_(c)
    set_submodule(model, fold.norm, nn.Identity())
    return added
