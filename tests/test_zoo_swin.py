"""Swin family: the window schedule, static window padding and odd-map patch merging, and numeric
checks of each attention kind, the shifted-window mask and window padding against naive
references. The contracts every model meets (build, forward, key fingerprints from the authors'
code, paper figures, fold) are in tests/test_zoo.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slab_deploy.errors import UnsupportedInputError
from slab_deploy.models.layers import LinearNorm, RepBN, norm_factory
from slab_deploy.models.registry import build_model, get_spec, list_models
from slab_deploy.models.swin import (
    FocusedLinearAttention,
    SimplifiedLinearAttention,
    SwinBlock,
    window_partition,
    window_reverse,
)

FULL_SIZE = [
    "slab_swin_tiny",
    "slab_swin_small",
    "slab_swin_base",
    "swin_tiny_prepbn",
    "swin_tiny",
    "swin_small",
    "swin_base",
    "flatten_swin_tiny",
    "flatten_swin_small",
]
TINY = ["test_slab_swin", "test_swin_prepbn", "test_swin", "test_flatten_swin"]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics, affine params, alphas, position encodings and bias tables, so
    that norms and position terms are far from identities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearNorm):
                m.iter.zero_()
                m.warm.zero_()
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, nn.BatchNorm1d | nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, RepBN):
                m.alpha.copy_(0.05 + 0.25 * torch.rand(1, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(("positional_encoding", "relative_position_bias_table", ".scale")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Registry, window schedule, padding


def test_all_variants_registered() -> None:
    names = set(list_models("*swin*", include_test=True))
    assert set(FULL_SIZE) | set(TINY) <= names
    for name in FULL_SIZE + TINY:
        spec = get_spec(name)
        assert spec.family == "swin"
        assert len(spec.attention) == 4
    assert get_spec("slab_swin_tiny").layout == "prepbn"
    assert get_spec("swin_tiny_prepbn").layout == "repbn"
    assert get_spec("swin_tiny").baseline_of == "layernorm"
    assert get_spec("flatten_swin_tiny").baseline_of == "flatten"
    assert get_spec("slab_swin_tiny").compare_with == ("swin_tiny", "flatten_swin_tiny")
    assert not get_spec("slab_swin_base").released


def test_window_schedule_matches_authors() -> None:
    """SLAB-Swin-T at 224: global SLA (56, 28), then window 7 shifted on odd blocks of stage 3;
    stage 4 (7x7) is one window without shift."""
    with torch.device("meta"):
        model = build_model("slab_swin_tiny")
    schedule = [[(b.attention, b.window, b.shift, b.needs_padding) for b in s.blocks] for s in model.layers]
    assert schedule[0] == [("sla", 56, 0, False)] * 2
    assert schedule[1] == [("sla", 28, 0, False)] * 2
    assert schedule[2] == [("window", 7, 0, False), ("window", 7, 3, False)] * 3
    assert schedule[3] == [("window", 7, 0, False)] * 2
    assert model.layers[2].blocks[1].attn_mask.shape == (4, 49, 49)


def test_padding_is_static_and_only_where_needed() -> None:
    with torch.device("meta"):
        model = build_model("slab_swin_tiny", img_size=256)
    pads = [[(b.pad_bottom, b.pad_right) for b in s.blocks] for s in model.layers]
    assert pads[0] == pads[1] == [(0, 0)] * 2  # global SLA windows cover the map
    assert pads[2] == [(5, 5)] * 6  # 16 -> 21
    assert pads[3] == [(6, 6)] * 2  # 8 -> 14
    assert [b.shift for b in model.layers[3].blocks] == [0, 3]
    assert model.layers[3].blocks[1].attn_mask.shape == (4, 49, 49)


def test_padded_model_runs_and_keeps_batch_independence() -> None:
    # 48x48, patch 2: maps 24/12/6/3; stage 3 (6x6, window 4) pads to 8 and shifts by 2.
    model = randomise(build_model("test_slab_swin", img_size=48, num_classes=10))
    blocks = list(model.layers[2].blocks)
    assert [b.needs_padding for b in blocks] == [True, True]
    assert not any(
        b.needs_padding for s in (model.layers[0], model.layers[1], model.layers[3]) for b in s.blocks
    )
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        y = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(2)])
    assert y.shape == (2, 10)
    torch.testing.assert_close(y, alone, rtol=1e-4, atol=1e-5)


def test_odd_map_patch_merging() -> None:
    # 40x40, patch 2: maps 20/10/5/3 -> the 5x5 merge pads one row and column.
    model = randomise(build_model("test_swin", img_size=40, num_classes=10))
    assert model.layers[2].downsample.out_resolution == (3, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 40, 40)).shape == (2, 10)


def test_img_size_must_be_a_patch_multiple() -> None:
    with pytest.raises(UnsupportedInputError, match="patch size"):
        build_model("test_swin", img_size=63)


# ----------------------------------------------------------------------------------------------
# Numeric references, written independently of the module code


def test_window_partition_roundtrip() -> None:
    x = torch.randn(2, 8, 12, 5)
    w = window_partition(x, 4, 8, 12, 5)
    assert w.shape == (2 * 2 * 3, 16, 5)
    torch.testing.assert_close(w[1].reshape(4, 4, 5), x[0, 0:4, 4:8])
    assert torch.equal(window_reverse(w, 4, 8, 12, 5), x)


def _reference_window_block(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Loop-over-windows Swin block: pad -> roll -> per-window softmax attention with the
    relative bias read from the table by coordinates, -100 between regions of the shifted
    grid -> roll back -> crop."""
    h, w = blk.resolution
    ws, sh = blk.window, blk.shift
    attn = blk.attn
    b, _, c = x.shape
    heads = attn.num_heads
    d = c // heads
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    y = torch.zeros(b, hp, wp, c)
    y[:, :h, :w] = blk.norm1(x).reshape(b, h, w, c)
    y = torch.roll(y, (-sh, -sh), (1, 2))

    def region(i: int, n: int) -> int:
        return 0 if i < n - ws else (1 if i < n - sh else 2)

    table = attn.relative_position_bias_table
    out = torch.zeros_like(y)
    coords = [(i, j) for i in range(ws) for j in range(ws)]
    for wi in range(0, hp, ws):
        for wj in range(0, wp, ws):
            tok = y[:, wi : wi + ws, wj : wj + ws].reshape(b, ws * ws, c)
            q, k, v = attn.qkv(tok).split(c, dim=-1)
            bias = torch.empty(heads, ws * ws, ws * ws)
            mask = torch.zeros(ws * ws, ws * ws)
            for p, (pi, pj) in enumerate(coords):
                for r, (ri, rj) in enumerate(coords):
                    bias[:, p, r] = table[(pi - ri + ws - 1) * (2 * ws - 1) + (pj - rj + ws - 1)]
                    if sh and (region(wi + pi, hp), region(wj + pj, wp)) != (
                        region(wi + ri, hp),
                        region(wj + rj, wp),
                    ):
                        mask[p, r] = -100.0
            heads_out = []
            for hh in range(heads):
                qh, kh, vh = (t[..., hh * d : (hh + 1) * d] for t in (q, k, v))
                logits = qh @ kh.transpose(-2, -1) * d**-0.5 + bias[hh] + mask
                heads_out.append(logits.softmax(-1) @ vh)
            out[:, wi : wi + ws, wj : wj + ws] = attn.proj(torch.cat(heads_out, -1)).reshape(b, ws, ws, c)
    out = torch.roll(out, (sh, sh), (1, 2))[:, :h, :w].reshape(b, h * w, c)
    x = x + out
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize(
    ("resolution", "window", "shift", "norm"),
    [
        ((8, 8), 4, 2, "layernorm"),  # shifted, no padding
        ((6, 6), 4, 2, "repbn"),  # shifted and padded (mask on the padded grid)
        ((5, 7), 4, 0, "prepbn"),  # padded, not shifted, non-square
        ((4, 4), 7, 3, "repbn"),  # clamped: one 4x4 window, no shift
    ],
)
def test_window_block_matches_reference(
    resolution: tuple[int, int], window: int, shift: int, norm: str
) -> None:
    torch.manual_seed(0)
    blk = SwinBlock(16, resolution, 2, window, shift, "window", norm_factory(norm, ln_eps=1e-5, step=10))
    randomise(blk)
    x = torch.randn(2, resolution[0] * resolution[1], 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_window_block(blk, x), rtol=1e-4, atol=1e-5)


def _reference_linear(attn: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-window, per-head linear attention written from the papers' formulas."""
    c = x.shape[-1]
    heads = attn.num_heads
    d = c // heads
    ws = attn.window
    n = ws * ws
    q, k, v = attn.qkv(x).split(c, dim=-1)
    k = k + attn.positional_encoding
    if kind == "sla":
        q, k = F.relu(q), F.relu(k)
    else:

        def phi(t: torch.Tensor) -> torch.Tensor:
            t = (F.relu(t) + 1e-6) / F.softplus(attn.scale)
            cube = t**3
            return cube / cube.norm(dim=-1, keepdim=True) * t.norm(dim=-1, keepdim=True)

        q, k = phi(q), phi(k)
    outs = []
    for bi in range(x.shape[0]):
        per_head = []
        for hh in range(heads):
            qh, kh, vh = (t[bi, :, hh * d : (hh + 1) * d] for t in (q, k, v))
            if kind == "sla":
                o = (qh @ (kh.T @ vh)) / (qh @ kh.sum(0) + 1e-6)[:, None]
            else:
                o = (qh @ ((kh.T / n**0.5) @ (vh / n**0.5))) / (qh @ kh.mean(0) + 1e-6)[:, None]
            img = vh.T.reshape(1, d, ws, ws)
            conv = F.conv2d(img, attn.dwc.weight, attn.dwc.bias, padding=attn.dwc.padding, groups=d)
            per_head.append(o + conv.reshape(d, n).T)
        outs.append(torch.cat(per_head, -1))
    return attn.proj(torch.stack(outs))


@pytest.mark.parametrize("kind", ["sla", "flatten"])
def test_linear_attention_matches_reference(kind: str) -> None:
    torch.manual_seed(0)
    cls = SimplifiedLinearAttention if kind == "sla" else FocusedLinearAttention
    attn = randomise(cls(24, 4, 3))
    x = torch.randn(3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_linear(attn, x, kind), rtol=1e-4, atol=1e-5)
