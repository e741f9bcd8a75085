"""move_biases: after a fold, move constant bias adds to where a deployed graph gets them for free.

A folded SLAB model still adds two kinds of per-channel constants that no kernel needs to add on
its own:

- **The DWC's bias** (and CSWin's LePE bias), added to SLA's output just before the output
  projection: proj(y + b) = proj(y) + W b, so it moves into proj's bias. The conv then has no bias:
  ONNX Runtime CUDA adds a Conv's bias in a cuDNN kernel of its own (`op_generic_tensor_kernel`: 13
  calls, the graph's Conv count, and 0.22 ms of SLAB-DeiT-S at batch 64 on an H200).
- **The residual writers' biases** (each block's attention `proj` and `mlp.fc2`). Once the norms
  are folded, every layer that reads the residual stream inside a stage is a Linear (the block's
  qkv, or q and kv, and `fc1`) behind at most a per-channel affine, so a constant C carried by the
  stream can be left out of it and added to those readers' biases instead (W a (x - C) + b + W a C
  = W a x + b). So within a stage the stream carries x - C, where C is the sum of the biases
  written so far, and the stage's last writer adds the whole sum: every stage's output is exact.
  An exported graph then has one bias Add per stage instead of two per block (ONNX Runtime does not
  fuse a MatMul's bias Add for 3-D activations; the 36 per-channel Adds of SLAB-DeiT-S at batch 64
  took 0.46 ms on an H200, where the LayerNorm baselines' SkipLayerNorm absorbs theirs).

Exact in real arithmetic; `fold_model` checks the result on its probe as it checks every fold.
What changes is inside a stage only: a block's output there is offset by that stage's running C.
Blocks whose structure is not one of the zoo's (an unknown attention, a LayerNorm left in, Swin's
padded windows, PVT's strided spatial reduction) end their stage's run early, and nothing moves
past them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slab_deploy.models import cswin, deit, pvt, swin
from slab_deploy.models.layers import ChannelAffine, dwc_weights

__all__ = ["MovedBiases", "move_biases"]


@dataclass
class MovedBiases:
    """What `move_biases` did: the biases it removed (module names) and those it created; `undo` puts
    every bias back as it was (only the biases are kept for that, not a copy of the model)."""

    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    _saved: dict[int, tuple[nn.Module, torch.Tensor | None]] = field(default_factory=dict, repr=False)

    def save(self, m: nn.Module) -> None:
        """Keep m's bias as it is now, the first time m is about to change."""
        if id(m) not in self._saved:
            self._saved[id(m)] = (m, None if m.bias is None else m.bias.detach().clone())

    @torch.no_grad()
    def undo(self) -> None:
        for m, bias in self._saved.values():
            if bias is None:
                m.bias = None
            elif m.bias is None:
                m.bias = nn.Parameter(bias)
            else:
                m.bias.data.copy_(bias)
        self.removed, self.added, self._saved = [], [], {}


@dataclass
class _Block:
    """One residual block as the pass sees it: the stream is read through `norm1` by `attn_in`,
    written by `attn_out`, read through `norm2` by `mlp_in` and written by `mlp_out`."""

    norm1: nn.Module
    attn_in: list[nn.Linear]
    attn_out: nn.Linear
    norm2: nn.Module
    mlp_in: list[nn.Linear]
    mlp_out: nn.Linear


_BLOCKS = (deit.Block, swin.SwinBlock, pvt.Block, cswin.CSWinBlock)
_SLA = (deit.SimplifiedLinearAttention, pvt.SimplifiedLinearAttention, swin.SimplifiedLinearAttention)


@torch.no_grad()
def move_biases(model: nn.Module) -> MovedBiases:
    """Move the DWC biases into the output projections and the residual writers' biases to the end of
    their stage, in place (see the module docstring). Returns what was removed and created."""
    names = {id(m): n for n, m in model.named_modules()}
    moved = MovedBiases()
    for m in list(model.modules()):
        if isinstance(m, _SLA):
            _dwc_into(m.proj, [(0, m.dwc, None, m.num_heads)], names, moved)
        elif isinstance(m, cswin.CSWinBlock) and m.attention == "sla":
            branches, offset = [], 0
            for a in m.attns:
                branches.append((offset, a.dwc, a.get_v, a.num_heads))
                offset += a.dwc.out_channels * a.num_heads
            _dwc_into(m.proj, branches, names, moved)
    for run in _runs(model):
        _move_stream(run, names, moved)
    return moved


def _dwc_into(proj: nn.Linear, branches: list[tuple[int, nn.Conv2d, nn.Conv2d | None, int]],
              names: dict[int, str], moved: MovedBiases) -> None:
    """proj's bias += proj.weight[:, offset:] @ (the conv bias of each branch starting at `offset`);
    the convs lose their biases."""
    shift = torch.zeros(proj.out_features, dtype=torch.float64, device=proj.weight.device)
    convs = []
    for offset, dwc, extra, heads in branches:
        _, bias = dwc_weights(dwc, heads, extra, tiled=True)
        if bias is None:
            continue
        w = proj.weight[:, offset:offset + bias.numel()].double()
        if w.shape[1] != bias.numel():
            return  # not the layout this pass knows: leave the block as it is
        shift += w @ bias.double()
        convs += [c for c in (dwc, extra) if c is not None and c.bias is not None]
    if not convs:
        return
    _add_bias(proj, shift, names, moved)
    for c in convs:
        moved.save(c)
        c.bias = None
        moved.removed.append(names[id(c)])


def _add_bias(m: nn.Linear, shift: torch.Tensor, names: dict[int, str], moved: MovedBiases) -> None:
    moved.save(m)
    if m.bias is None:
        if not shift.any():
            return  # a zero bias would only add an Add
        m.bias = nn.Parameter(shift.to(m.weight.dtype))
        moved.added.append(names[id(m)])
    else:
        m.bias.data.copy_((m.bias.double() + shift).to(m.bias.dtype))


def _block(b: nn.Module) -> _Block | None:
    """The pass's view of a zoo block, or None where the stream reaches something other than
    per-channel affines and Linears (or the block is not one of the zoo's)."""
    if isinstance(b, cswin.CSWinBlock):
        attn_in, attn_out = [b.qkv], b.proj
    elif isinstance(b, (deit.Block, swin.SwinBlock, pvt.Block)):
        a = b.attn
        if isinstance(b, swin.SwinBlock) and b.needs_padding:
            return None  # zero padding after norm1: the padded tokens would read -C
        if isinstance(a, (deit.SimplifiedLinearAttention, deit.Attention,
                          swin.SimplifiedLinearAttention, swin.WindowAttention)):
            attn_in = [a.qkv]
        elif isinstance(a, pvt.SimplifiedLinearAttention) or (
                isinstance(a, pvt.SpatialReductionAttention) and a.sr is None):
            attn_in = [a.q, a.kv]
        else:
            return None
        attn_out = a.proj
    else:
        return None
    norms = (b.norm1, b.norm2)
    if not all(isinstance(n, (nn.Identity, ChannelAffine)) for n in norms):
        return None
    return _Block(b.norm1, attn_in, attn_out, b.norm2, [b.mlp.fc1], b.mlp.fc2)


def _runs(model: nn.Module) -> list[list[_Block]]:
    """Each stage's blocks, as maximal runs of blocks the pass understands, in forward order (a stage
    is a ModuleList or Sequential of blocks that its owner calls one after the other)."""
    runs: list[list[_Block]] = []
    for m in model.modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or not len(m):
            continue
        if not all(isinstance(b, _BLOCKS) for b in m):
            continue
        run: list[_Block] = []
        for b in m:
            view = _block(b)
            if view is None:
                runs.append(run)
                run = []
            else:
                run.append(view)
        runs.append(run)
    return [r for r in runs if r]


def _move_stream(run: list[_Block], names: dict[int, str], moved: MovedBiases) -> None:
    """Leave the run's writer biases out of the stream (the readers' biases take them instead), and
    let the run's last writer add their sum."""
    last = run[-1].mlp_out
    width = last.out_features
    if any(r.in_features != width for b in run for r in (*b.attn_in, *b.mlp_in)) or any(
            w.out_features != width for b in run for w in (b.attn_out, b.mlp_out)):
        return  # a stage whose blocks disagree on the stream's width: not one of the zoo's
    carried = torch.zeros(width, dtype=torch.float64, device=last.weight.device)
    writers = []
    for blk in run:
        for norm, readers, writer in ((blk.norm1, blk.attn_in, blk.attn_out),
                                      (blk.norm2, blk.mlp_in, blk.mlp_out)):
            if carried.any():
                seen = carried * _scale(norm, carried)
                for r in readers:
                    _add_bias(r, r.weight.double() @ seen, names, moved)
            if writer.bias is not None:
                carried = carried + writer.bias.double()
            writers.append(writer)
    for w in writers[:-1]:
        if w.bias is not None:
            moved.save(w)
            w.bias = None
            moved.removed.append(names[id(w)])
    if last.bias is None and carried.any():
        _add_bias(last, carried, names, moved)
    elif last.bias is not None:
        moved.save(last)
        last.bias.data.copy_(carried.to(last.bias.dtype))


def _scale(norm: nn.Module, like: torch.Tensor) -> torch.Tensor | float:
    """How a per-channel affine scales a constant: its weight (Identity: 1)."""
    if isinstance(norm, ChannelAffine):
        return norm.weight.detach().to(like)
    return 1.0
