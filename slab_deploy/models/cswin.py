"""CSwin family: SLAB-CSwin, the LayerNorm CSWin baseline and FLatten-CSwin.

One class, `CSWinTransformer`, covers every variant; the norm kind and the attention of each
stage are constructor arguments:

- `"lepe"`: CSWin's cross-shaped window softmax attention with LePE (locally-enhanced
  positional encoding: a 3x3 depthwise conv on v, added to the output).
- `"sla"`: SLAB's simplified linear attention, + DWC(v) + LePE.
- `"flatten"`: FLatten's focused linear attention, + DWC(v) + LePE.

A block splits its channels in two halves after `qkv`: the first half attends within
vertical stripes (full height, `split` columns), the second within horizontal stripes
(`split` rows, full width), each with half the heads and its own LePE conv; the halves are
concatenated before `proj`. A block whose stripes cover the whole map (split >= map side)
and every block of the last stage use one branch with all channels and heads over the whole
map. Softmax stages use `split_size`, linear stages `linear_split` (None = the whole map,
i.e. global attention, which is what the authors' `CSWIN_LA_SPLIT_SIZE: 56-28-14-7` means
at 224x224).

Keys follow the SLAB repository's `slab_cswin.py` (= microsoft/CSWin-Transformer's
`models/cswin.py` for the LayerNorm baseline) and FLatten's `flatten_cswin.py`, including the
SLA modules' unused `scale` parameter. Spatial sizes are static: the model is built for one
square `img_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slab_deploy.errors import UnsupportedInputError
from slab_deploy.models.layers import (
    Mlp,
    NormFactory,
    SLACore,
    focused_kernel,
    head_merge,
    head_split,
    init_weights,
    norm_factory,
    shared_dwc,
    to_tokens,
)
from slab_deploy.models.registry import register_model

__all__ = [
    "CSWinBlock",
    "CSWinTransformer",
    "FocusedLinearAttention",
    "LePEAttention",
    "MergeBlock",
    "SimplifiedLinearAttention",
]

LINEAR_ATTENTIONS = ("sla", "flatten")
ATTENTIONS = ("lepe", *LINEAR_ATTENTIONS)


# ----------------------------------------------------------------------------------------------
# Stripe helpers (static sizes, batch inferred)


def stripe_partition(x: torch.Tensor, resolution: int, h_sp: int, w_sp: int) -> torch.Tensor:
    """Tokens (B, H*W, C) -> stripes (B * nS, h_sp * w_sp, C), stripes in row-major order."""
    c = x.shape[-1]
    r = resolution
    x = x.reshape(-1, r // h_sp, h_sp, r // w_sp, w_sp, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h_sp * w_sp, c)


def stripe_reverse(x: torch.Tensor, resolution: int, h_sp: int, w_sp: int) -> torch.Tensor:
    """Stripes (B * nS, h_sp * w_sp, C) -> tokens (B, H*W, C)."""
    c = x.shape[-1]
    r = resolution
    x = x.reshape(-1, r // h_sp, r // w_sp, h_sp, w_sp, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, r * r, c)


def _tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B', h*w, C) -> (B', C, h, w)."""
    return x.transpose(1, 2).reshape(-1, x.shape[-1], h, w)


# ----------------------------------------------------------------------------------------------
# Attention branches: each takes q, k, v (B, H*W, C_branch) sliced from the block's qkv and
# returns (B, H*W, C_branch). `get_v` is the LePE conv over all C_branch channels.


class _StripeAttention(nn.Module):
    """Geometry shared by the branch attentions: stripe shape and the LePE conv."""

    def __init__(self, dim: int, resolution: int, stripe: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.resolution = resolution
        self.h_sp, self.w_sp = stripe
        self.num_heads = num_heads
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def stripes(self, x: torch.Tensor) -> torch.Tensor:
        return stripe_partition(x, self.resolution, self.h_sp, self.w_sp)

    def unstripes(self, x: torch.Tensor) -> torch.Tensor:
        return stripe_reverse(x, self.resolution, self.h_sp, self.w_sp)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stripe={self.h_sp}x{self.w_sp}, num_heads={self.num_heads}"


class LePEAttention(_StripeAttention):
    """CSWin's softmax attention within stripes, + LePE (per-stripe 3x3 depthwise conv on v)."""

    def __init__(self, dim: int, resolution: int, stripe: tuple[int, int], num_heads: int) -> None:
        super().__init__(dim, resolution, stripe, num_heads)
        self.scale = (dim // num_heads) ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = self.num_heads
        n = self.h_sp * self.w_sp
        c = q.shape[-1]
        q, k, v = self.stripes(q), self.stripes(k), self.stripes(v)
        lepe = self.get_v(_tokens_to_map(v, self.h_sp, self.w_sp))
        lepe = lepe.reshape(-1, heads, c // heads, n).transpose(-2, -1)  # (B', heads, N, d)
        q, k, v = (t.reshape(-1, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
        x = torch.matmul(attn, v) + lepe
        return self.unstripes(x.transpose(1, 2).reshape(-1, n, c))


class SimplifiedLinearAttention(_StripeAttention):
    """SLAB's SLA within stripes: relu(q), relu(k + positional_encoding), normalised linear
    product (`core`), + DWC(v) (`dwc`, head_dim channels shared by all heads), + LePE.

    `scale` is a parameter the authors keep but do not use; it stays for strict loading.
    """

    def __init__(
        self, dim: int, resolution: int, stripe: tuple[int, int], num_heads: int, kernel_size: int = 5
    ) -> None:
        super().__init__(dim, resolution, stripe, num_heads)
        head_dim = dim // num_heads
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.h_sp * self.w_sp, dim))
        self.core = SLACore()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = self.num_heads
        q, k, v = self.stripes(q), self.stripes(k), self.stripes(v)
        # DWC(v) + LePE(v): one depthwise conv (the LePE kernel added into the tiled DWC kernel)
        x = self.core.attend(q, k, v, heads, self.positional_encoding, self.dwc, (self.h_sp, self.w_sp),
                             extra=self.get_v)
        return self.unstripes(x)


class FocusedLinearAttention(_StripeAttention):
    """FLatten's focused linear attention over the whole map (norms over all branch channels),
    mean-normaliser, + DWC(v) shared by all heads, + LePE.

    The FLatten code handles only one stripe covering the map (global attention); narrower
    stripes are refused.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        stripe: tuple[int, int],
        num_heads: int,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
    ) -> None:
        super().__init__(dim, resolution, stripe, num_heads)
        if stripe != (resolution, resolution):
            raise ValueError(
                f"FLatten attention needs the whole {resolution}x{resolution} map, got stripes {stripe}"
            )
        head_dim = dim // num_heads
        self.focusing_factor = focusing_factor
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.h_sp * self.w_sp, dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = self.num_heads
        n = self.h_sp * self.w_sp
        r = self.resolution
        # DWC(v) + LePE(v): one depthwise conv (the LePE kernel added into the tiled DWC kernel)
        convs = shared_dwc(v, self.dwc, (r, r), heads, extra=self.get_v)
        k = k + self.positional_encoding
        q = focused_kernel(q, self.scale, self.focusing_factor)
        k = focused_kernel(k, self.scale, self.focusing_factor)
        q, k, v = (head_split(t, heads) for t in (q, k, v))
        z = 1.0 / (torch.matmul(q, k.mean(dim=-2, keepdim=True).transpose(-2, -1)) + 1e-6)
        s = n**-0.5
        kv = torch.matmul(k.transpose(-2, -1) * s, v * s)
        return head_merge(torch.matmul(q, kv) * z, heads) + convs


# ----------------------------------------------------------------------------------------------
# Blocks, merging, stem


class CSWinBlock(nn.Module):
    """x + proj(branches(qkv(norm1(x)))), then x + mlp(norm2(x)).

    Two branches (vertical and horizontal stripes over the two channel halves) unless
    `single_branch`: then one branch over all channels attends to the whole map.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        split: int,
        attention: str,
        norm_layer: NormFactory,
        single_branch: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
        r = resolution
        single_branch = single_branch or split >= r
        if not single_branch:
            if r % split:
                raise UnsupportedInputError(
                    f"a {r}x{r} map cannot be cut into stripes of {split}: choose img_size so that "
                    "every stage's map is a multiple of its split size"
                )
            if num_heads % 2 or dim % 2:
                raise ValueError(
                    f"two-branch blocks need an even dim and head count, got {dim} / {num_heads}"
                )
        self.dim = dim
        self.resolution = r
        self.attention = attention
        self.split = r if single_branch else split
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = norm_layer(dim)
        self.proj = nn.Linear(dim, dim)
        if single_branch:
            geometry = [(dim, (r, r), num_heads)]
        else:
            geometry = [(dim // 2, (r, split), num_heads // 2), (dim // 2, (split, r), num_heads // 2)]
        branches: list[nn.Module] = []
        for branch_dim, stripe, heads in geometry:
            if attention == "lepe":
                branches.append(LePEAttention(branch_dim, r, stripe, heads))
            elif attention == "sla":
                branches.append(SimplifiedLinearAttention(branch_dim, r, stripe, heads, kernel_size))
            else:
                branches.append(
                    FocusedLinearAttention(branch_dim, r, stripe, heads, kernel_size, focusing_factor)
                )
        self.attns = nn.ModuleList(branches)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = norm_layer(dim)

    @property
    def num_branches(self) -> int:
        return len(self.attns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.dim
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        if self.num_branches == 1:
            out = self.attns[0](q, k, v)
        else:
            h = c // 2
            out = torch.cat(
                [
                    self.attns[0](q[..., :h], k[..., :h], v[..., :h]),
                    self.attns[1](q[..., h:], k[..., h:], v[..., h:]),
                ],
                dim=-1,
            )
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))

    def extra_repr(self) -> str:
        stripes = "whole map" if self.num_branches == 1 else f"{self.split}-wide stripes"
        return f"dim={self.dim}, resolution={self.resolution}, attention={self.attention}, {stripes}"


class MergeBlock(nn.Module):
    """Tokens -> 3x3 stride-2 `conv` -> tokens -> `norm` (the norm reads the conv output only)."""

    def __init__(self, dim: int, dim_out: int, resolution: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv = nn.Conv2d(dim, dim_out, kernel_size=3, stride=2, padding=1)
        self.norm = norm_layer(dim_out)

    @property
    def out_resolution(self) -> int:
        return (self.resolution + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        x = self.conv(_tokens_to_map(x, r, r))
        return self.norm(to_tokens(x))


class ToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C); a parameter-free slot, like the authors' einops Rearrange."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(x)


# ----------------------------------------------------------------------------------------------
# Model


class CSWinTransformer(nn.Module):
    """CSWin hierarchy with a configurable norm and attention per stage.

    Args:
        norm: "layernorm", "repbn" (plain RepBN keys) or "prepbn" (LinearNorm keys).
        attention: one of "lepe", "sla", "flatten" per stage.
        split_size: stripe width of the "lepe" stages (the authors' `split_size`).
        linear_split: stripe width of the "sla"/"flatten" stages: None = the whole map of each
            stage (global attention; the authors' `la_split_size` "56-28-14-7" at 224x224), an
            int for every stage, or one per stage.
        stem_norm: "model" (the stem and merge norms use `norm`, as in SLAB) or "layernorm"
            (always LayerNorm there, as in FLatten's code).
        prepbn_steps: T of the PRepBN schedule (only for norm="prepbn").
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 2, 21, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        attention: Sequence[str] = ("lepe", "lepe", "lepe", "lepe"),
        norm: str = "layernorm",
        split_size: Sequence[int] = (1, 2, 7, 7),
        linear_split: int | Sequence[int] | None = None,
        stem_norm: str = "model",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
        ln_eps: float = 1e-5,
        prepbn_steps: int = 120000,
    ) -> None:
        super().__init__()
        if isinstance(img_size, int):
            size = img_size
        elif int(img_size[0]) == int(img_size[1]):
            size = int(img_size[0])
        else:
            raise UnsupportedInputError(f"CSWin needs a square input, got img_size {tuple(img_size)}")
        num_stages = len(depths)
        if not len(num_heads) == len(attention) == len(split_size) == num_stages:
            raise ValueError("depths, num_heads, attention and split_size need one entry per stage")
        if stem_norm not in ("model", "layernorm"):
            raise ValueError(f"stem_norm must be 'model' or 'layernorm', got {stem_norm!r}")
        norm_layer = norm_factory(norm, ln_eps=ln_eps, step=prepbn_steps)
        edge_norm = norm_layer if stem_norm == "model" else norm_factory("layernorm", ln_eps=ln_eps)
        if linear_split is None or isinstance(linear_split, int):
            linear_splits: list[int | None] = [linear_split] * num_stages
        else:
            linear_splits = [int(s) for s in linear_split]
        self.img_size = (size, size)
        self.num_classes = num_classes
        self.norm_kind = norm
        self.attention = tuple(attention)

        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=2),
            ToTokens(),
            edge_norm(embed_dim),
        )
        resolution = (size + 2 * 2 - 7) // 4 + 1
        if resolution < 1:
            raise UnsupportedInputError(f"img_size {size} is too small for the 7x7 stride-4 stem")
        dim = embed_dim
        for i in range(num_stages):
            if i > 0:
                merge = MergeBlock(dim, dim * 2, resolution, edge_norm)
                setattr(self, f"merge{i}", merge)
                dim, resolution = dim * 2, merge.out_resolution
            linear = attention[i] in LINEAR_ATTENTIONS
            split = (linear_splits[i] or resolution) if linear else int(split_size[i])
            blocks = nn.ModuleList(
                CSWinBlock(
                    dim,
                    resolution,
                    num_heads[i],
                    split=split,
                    attention=attention[i],
                    norm_layer=norm_layer,
                    single_branch=i == num_stages - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    kernel_size=kernel_size,
                    focusing_factor=focusing_factor,
                )
                for _ in range(depths[i])
            )
            setattr(self, f"stage{i + 1}", blocks)
        self.num_stages = num_stages
        self.num_features = dim
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled features (B, num_features)."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise UnsupportedInputError(
                f"input is {tuple(x.shape[-2:])} but the model was built for {self.img_size}: "
                "build it with img_size=... (CSWin has fixed spatial sizes)"
            )
        x = self.stage1_conv_embed(x)
        for i in range(self.num_stages):
            if i > 0:
                x = getattr(self, f"merge{i}")(x)
            for block in getattr(self, f"stage{i + 1}"):
                x = block(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Registered variants

_SLAB_SRC = "SLAB classification/models/slab_cswin.py"
_CSWIN_SRC = "microsoft/CSWin-Transformer models/cswin.py"
_FLATTEN_SRC = "LeapLabTHU/FLatten-Transformer models/flatten_cswin.py"
_SLAB_ATTN = ("sla", "sla", "lepe", "lepe")
_FLATTEN_ATTN = ("flatten", "flatten", "lepe", "lepe")
_LEPE_ATTN = ("lepe", "lepe", "lepe", "lepe")


@register_model(
    family="cswin",
    norm="prepbn",
    attention=_SLAB_ATTN,
    released=True,
    paper_params_m=21.2,
    paper_gmacs=4.3,
    paper_top1=82.8,
    prepbn_steps=120000,
    source=_SLAB_SRC + " (SLAB_CSWin_64_24181_tiny_224, attn_type LLSS)",
    compare_with=("cswin_tiny", "flatten_cswin_tiny"),
)
def slab_cswin_tiny(**kwargs: Any) -> CSWinTransformer:
    return CSWinTransformer(
        embed_dim=64,
        depths=(2, 4, 18, 1),
        num_heads=(2, 4, 8, 16),
        attention=_SLAB_ATTN,
        norm="prepbn",
        prepbn_steps=120000,
        split_size=(1, 2, 7, 7),
        linear_split=None,
        kernel_size=5,
        **kwargs,
    )


@register_model(
    family="cswin",
    norm="prepbn",
    attention=_SLAB_ATTN,
    released=False,
    prepbn_steps=120000,
    source=_SLAB_SRC + " (SLAB_CSWin_64_24322_small_224, attn_type LLSS)",
)
def slab_cswin_small(**kwargs: Any) -> CSWinTransformer:
    return CSWinTransformer(
        embed_dim=64,
        depths=(2, 4, 32, 2),
        num_heads=(2, 4, 8, 16),
        attention=_SLAB_ATTN,
        norm="prepbn",
        prepbn_steps=120000,
        split_size=(1, 2, 7, 7),
        linear_split=None,
        kernel_size=5,
        **kwargs,
    )


# LayerNorm baseline: CSWin-T as released by Microsoft (CSWin_64_12211_tiny_224; depths 1-2-21-1,
# not SLAB's 2-4-18-1). Paper figures are the CSWin paper's (Dong et al., 2022, Table 2).
# Microsoft evaluates through timm's default_cfg (crop 0.9); the SLAB and FLatten code bases use
# the Swin pipeline (resize 256/224, crop 0.875).


@register_model(
    family="cswin",
    norm="layernorm",
    attention=_LEPE_ATTN,
    baseline_of="layernorm",
    paper_params_m=23.0,
    paper_gmacs=4.3,
    paper_top1=82.7,
    crop_pct=0.9,
    source=_CSWIN_SRC + " (CSWin_64_12211_tiny_224)",
)
def cswin_tiny(**kwargs: Any) -> CSWinTransformer:
    return CSWinTransformer(
        embed_dim=64,
        depths=(1, 2, 21, 1),
        num_heads=(2, 4, 8, 16),
        attention=_LEPE_ATTN,
        norm="layernorm",
        split_size=(1, 2, 7, 7),
        **kwargs,
    )


# FLatten baseline (global linear attention in stages 1-2: CSWIN_LA_SPLIT_SIZE 56-28-14-7).


@register_model(
    family="cswin",
    norm="layernorm",
    attention=_FLATTEN_ATTN,
    baseline_of="flatten",
    paper_params_m=21.2,
    paper_gmacs=4.3,
    paper_top1=83.1,
    source=_FLATTEN_SRC + " (FLatten_CSWin_64_24181_tiny_224, attn_type LLSS)",
)
def flatten_cswin_tiny(**kwargs: Any) -> CSWinTransformer:
    return CSWinTransformer(
        embed_dim=64,
        depths=(2, 4, 18, 1),
        num_heads=(2, 4, 8, 16),
        attention=_FLATTEN_ATTN,
        norm="layernorm",
        stem_norm="layernorm",
        split_size=(1, 2, 7, 7),
        linear_split=None,
        focusing_factor=3.0,
        kernel_size=5,
        **kwargs,
    )


# Tiny test variants: 64x64 input (maps 16/8/4/2), stripes of 1/2/2 in the softmax stages so
# stage 3 has real two-branch stripes and stage 4 is a single whole-map branch, as full size.

_TEST_ARCH: dict[str, Any] = dict(
    img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), split_size=(1, 2, 2, 2)
)


def _test_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**_TEST_ARCH, **kwargs}


@register_model(
    family="cswin",
    norm="prepbn",
    attention=_SLAB_ATTN,
    input_size=(3, 64, 64),
    prepbn_steps=120000,
    source=_SLAB_SRC,
    test=True,
    compare_with=("test_cswin", "test_flatten_cswin"),
)
def test_slab_cswin(**kwargs: Any) -> CSWinTransformer:
    return CSWinTransformer(attention=_SLAB_ATTN, norm="prepbn", prepbn_steps=120000, **_test_kwargs(kwargs))


@register_model(
    family="cswin",
    norm="layernorm",
    attention=_LEPE_ATTN,
    baseline_of="layernorm",
    input_size=(3, 64, 64),
    crop_pct=0.9,
    source=_CSWIN_SRC,
    test=True,
)
def test_cswin(**kwargs: Any) -> CSWinTransformer:
    return CSWinTransformer(attention=_LEPE_ATTN, norm="layernorm", **_test_kwargs(kwargs))


@register_model(
    family="cswin",
    norm="layernorm",
    attention=_FLATTEN_ATTN,
    baseline_of="flatten",
    input_size=(3, 64, 64),
    source=_FLATTEN_SRC,
    test=True,
)
def test_flatten_cswin(**kwargs: Any) -> CSWinTransformer:
    return CSWinTransformer(
        attention=_FLATTEN_ATTN, norm="layernorm", stem_norm="layernorm", **_test_kwargs(kwargs)
    )
