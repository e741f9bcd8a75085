"""CSwin family: stripe geometry, input checks, LePE and SLA stripe attention numerics. The contracts
every model meets (build, forward, key layouts of the authors' checkpoints, paper figures, fold)
are in tests/test_zoo.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slab_deploy.errors import UnsupportedInputError
from slab_deploy.models.cswin import (
    CSWinBlock,
    CSWinTransformer,
    FocusedLinearAttention,
    LePEAttention,
    SimplifiedLinearAttention,
)
from slab_deploy.models.registry import build_model, get_spec, list_models
from slab_deploy.weights import randomize_weights

FULL = ["slab_cswin_tiny", "slab_cswin_small", "cswin_tiny", "flatten_cswin_tiny"]
TINY = ["test_slab_cswin", "test_cswin", "test_flatten_cswin"]


def test_registered_variants() -> None:
    assert set(list_models("*cswin*")) == set(FULL)
    assert set(list_models("test_*cswin*", include_test=True)) == set(TINY)
    for name in FULL + TINY:
        spec = get_spec(name)
        assert spec.family == "cswin" and len(spec.attention) == 4
        assert spec.prepbn_steps == (120000 if spec.norm == "prepbn" else None)


def test_slab_tiny_stripe_geometry() -> None:
    with torch.device("meta"):
        model = build_model("slab_cswin_tiny")
    # stages 1-2: one SLA branch over the whole 56x56 / 28x28 map
    for stage, r in (("stage1", 56), ("stage2", 28)):
        for block in getattr(model, stage):
            (attn,) = block.attns
            assert isinstance(attn, SimplifiedLinearAttention) and (attn.h_sp, attn.w_sp) == (r, r)
    # stage 3: two LePE branches, vertical (14x7) then horizontal (7x14) stripes, half the heads each
    for block in model.stage3:
        a, b = block.attns
        assert isinstance(a, LePEAttention) and (a.h_sp, a.w_sp, a.dim, a.num_heads) == (14, 7, 128, 4)
        assert (b.h_sp, b.w_sp, b.dim, b.num_heads) == (7, 14, 128, 4)
    # stage 4: one LePE branch over the whole 7x7 map
    (attn,) = model.stage4[0].attns
    assert isinstance(attn, LePEAttention) and (attn.h_sp, attn.w_sp, attn.num_heads) == (7, 7, 16)


def test_input_checks() -> None:
    with pytest.raises(UnsupportedInputError, match="stripes"):
        CSWinTransformer(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), split_size=(3, 2, 2, 2))
    with pytest.raises(ValueError, match="whole"):
        FocusedLinearAttention(16, 8, (8, 2), 2)
    with pytest.raises(UnsupportedInputError, match="square"):
        CSWinTransformer(img_size=(64, 96))


# ----------------------------------------------------------------------------------------------
# Numerics of one branch against loop-based references (explicit stripe gathering by index).


def _stripe_indices(r: int, h_sp: int, w_sp: int) -> list[torch.Tensor]:
    grid = torch.arange(r * r).reshape(r, r)
    return [
        grid[i : i + h_sp, j : j + w_sp].reshape(-1) for i in range(0, r, h_sp) for j in range(0, r, w_sp)
    ]


def _reference_branch(
    attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """One image at a time, one stripe at a time, one head at a time."""
    r, hs, ws, heads = attn.resolution, attn.h_sp, attn.w_sp, attn.num_heads
    b, _, c = q.shape
    d = c // heads
    out = torch.zeros_like(q)
    for n in range(b):
        for idx in _stripe_indices(r, hs, ws):
            qs, ks, vs = q[n, idx], k[n, idx], v[n, idx]  # (N, c)
            lepe = F.conv2d(
                vs.T.reshape(1, c, hs, ws), attn.get_v.weight, attn.get_v.bias, padding=1, groups=c
            )
            lepe = lepe.reshape(c, -1).T
            if isinstance(attn, SimplifiedLinearAttention):
                qs, ks = F.relu(qs), F.relu(ks + attn.positional_encoding[0])
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                qh, kh, vh = qs[:, sl], ks[:, sl], vs[:, sl]
                if isinstance(attn, LePEAttention):
                    o = torch.softmax(qh @ kh.T * d**-0.5, dim=-1) @ vh
                else:
                    num = (qh @ kh.T) @ vh  # the quadratic order; the model uses q (k^T v) here
                    den = qh @ kh.sum(0, keepdim=True).T + 1e-6
                    dwc = F.conv2d(
                        vh.T.reshape(1, d, hs, ws), attn.dwc.weight, attn.dwc.bias, padding=2, groups=d
                    )
                    o = num / den + dwc.reshape(d, -1).T
                out[n, idx, sl] = o + lepe[:, sl]
    return out


@pytest.mark.parametrize("kind", ["lepe", "sla"])
@pytest.mark.parametrize("stripe", [(8, 2), (2, 8), (8, 8)])
def test_branch_matches_loop_reference(kind: str, stripe: tuple[int, int]) -> None:
    torch.manual_seed(0)
    cls = LePEAttention if kind == "lepe" else SimplifiedLinearAttention
    attn = randomize_weights(cls(8, 8, stripe, 2), 3).eval()
    q, k, v = (torch.randn(2, 64, 8) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v), _reference_branch(attn, q, k, v), rtol=1e-4, atol=1e-5)


def test_block_splits_channels_into_vertical_then_horizontal_stripes() -> None:
    """Two-branch block = first channel half in vertical stripes, second half in horizontal ones."""
    torch.manual_seed(0)
    from slab_deploy.models.layers import norm_factory

    block = CSWinBlock(16, 8, 4, split=2, attention="lepe", norm_layer=norm_factory("layernorm", ln_eps=1e-5))
    block = randomize_weights(block, 5).eval()
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        qkv = block.qkv(block.norm1(x)).reshape(2, 64, 3, 16)
        q, k, v = qkv.unbind(2)
        a, b = block.attns
        halves = [
            _reference_branch(a, q[..., :8], k[..., :8], v[..., :8]),
            _reference_branch(b, q[..., 8:], k[..., 8:], v[..., 8:]),
        ]
        y = x + block.proj(torch.cat(halves, -1))
        y = y + block.mlp(block.norm2(y))
        assert (a.h_sp, a.w_sp, b.h_sp, b.w_sp) == (8, 2, 2, 8)
        torch.testing.assert_close(block(x), y, rtol=1e-4, atol=1e-5)
