"""PVT family: SLAB-PVT, PVT with PRepBN, the LayerNorm PVT v1 baselines and FLatten-PVT.

One class, `PyramidVisionTransformer`, covers every variant; the norm kind, the attention of
each stage and the head are constructor arguments:

- `"softmax"`: PVT's spatial-reduction attention: `q` on every token, `kv` on the tokens
  after a strided conv `sr` + `norm` when the stage's sr_ratio > 1.
- `"sla"`: SLAB's simplified linear attention (`q`, `kv`, 5x5 depthwise `dwc` shared by all
  heads, `positional_encoding` added to k before its ReLU); no spatial reduction.
- `"flatten"`: FLatten's focused linear attention (`q`, `kv`, `dwc`, `scale`,
  `positional_encoding`); no spatial reduction.

Heads: SLAB-PVT and FLatten-PVT read the mean of the last stage's tokens (FLatten also owns an
unused final `norm`, kept so its checkpoints load strictly: `final_norm="unused"`). The
original PVT v1 (whai362/PVT) adds a class token to the last stage (`cls_token`, one more
`pos_embed4` entry) and reads it after a final `norm`: `cls_token=True, final_norm="apply"`.

Keys follow the SLAB repository's `slab_pvt.py` (SLAB-PVT, PVT with PRepBN; every norm is
the PRepBN `LinearNorm` there, patch-embedding and spatial-reduction norms included), whai362/PVT
`pvt.py` (LayerNorm baselines) and FLatten's `flatten_pvt.py`. In the last two the
patch-embedding and spatial-reduction norms are `nn.LayerNorm(dim)` with eps 1e-5 while the
block and final norms use eps 1e-6: see `aux_ln_eps`.

Position embeddings and input sizes: spatial sizes are static, computed from `img_size`.
The authors' helper resizes the position embeddings of stages 2-4 bilinearly to the size they
already have; that is an exact no-op and is skipped here, so exports carry no Resize node.
A real resize is kept for one case only: a softmax model built with `img_size` different
from `pos_embed_img_size` (the size its position embeddings were trained at, e.g. 224
weights evaluated at 256) resizes them bilinearly (align_corners=False), as the authors'
code does when fed such an input. SLA and FLatten stages cannot do this (their
positional encoding has one entry per token of the trained size, as in the authors' code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
    "Block",
    "FocusedLinearAttention",
    "PatchEmbed",
    "PyramidVisionTransformer",
    "SimplifiedLinearAttention",
    "SpatialReductionAttention",
]

LINEAR_ATTENTIONS = ("sla", "flatten")
ATTENTIONS = ("softmax", *LINEAR_ATTENTIONS)
FINAL_NORMS = ("none", "apply", "unused")


# ----------------------------------------------------------------------------------------------
# Attention modules; all take tokens (B, N, C) of a static (h, w) grid


class SpatialReductionAttention(nn.Module):
    """PVT's softmax attention; keys/values come from a `sr_ratio`-strided conv of the tokens
    (`sr`) followed by `norm`, when sr_ratio > 1."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        sr_ratio: int,
        norm_layer: NormFactory,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.sr_ratio = sr_ratio
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr: nn.Conv2d | None = None
        self.norm: nn.Module | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[1], x.shape[2]
        heads = self.num_heads
        q = self.q(x).reshape(-1, n, heads, c // heads).permute(0, 2, 1, 3)
        if self.sr is not None and self.norm is not None:
            h, w = self.resolution
            x = self.sr(x.transpose(1, 2).reshape(-1, c, h, w))
            x = self.norm(x.flatten(2).transpose(1, 2))
        m = x.shape[1]
        kv = self.kv(x).reshape(-1, m, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = torch.matmul(attn, v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, resolution={self.resolution}, "
                f"sr_ratio={self.sr_ratio}")


class SimplifiedLinearAttention(nn.Module):
    """SLAB's SLA: relu(q), relu(k + positional_encoding), the normalised linear product
    (`core`), + a depthwise conv of v on the grid (shared by all heads), then `proj`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        qkv_bias: bool = True,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], dim))
        self.core = SLACore()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[2]
        k, v = self.kv(x).split(c, dim=-1)
        out = self.core.attend(self.q(x), k, v, self.num_heads, self.positional_encoding, self.dwc,
                               self.resolution)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, resolution={self.resolution}"


class FocusedLinearAttention(nn.Module):
    """FLatten's focused linear attention: k += positional_encoding, focused ReLU kernel
    (norms over all C), linear product with a mean normaliser, + a shared depthwise conv of v."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        qkv_bias: bool = True,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.focusing_factor = focusing_factor
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[1], x.shape[2]
        q = self.q(x)
        k, v = self.kv(x).split(c, dim=-1)
        k = k + self.positional_encoding
        q = focused_kernel(q, self.scale, self.focusing_factor)
        k = focused_kernel(k, self.scale, self.focusing_factor)
        dwc = shared_dwc(v, self.dwc, self.resolution, self.num_heads)
        q, k, v = (head_split(t, self.num_heads) for t in (q, k, v))
        z = 1.0 / (torch.matmul(q, k.mean(dim=-2, keepdim=True).transpose(-2, -1)) + 1e-6)
        s = n**-0.5
        out = torch.matmul(q, torch.matmul(k.transpose(-2, -1) * s, v * s)) * z
        return self.proj(head_merge(out, self.num_heads) + dwc)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, resolution={self.resolution}"


# ----------------------------------------------------------------------------------------------
# Blocks and patch embeddings


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    `aux_norm_layer` builds the spatial-reduction norm of a softmax attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        attention: str,
        norm_layer: NormFactory,
        aux_norm_layer: NormFactory,
        mlp_ratio: float = 4.0,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
        self.norm1 = norm_layer(dim)
        self.attn: nn.Module
        if attention == "softmax":
            self.attn = SpatialReductionAttention(
                dim, num_heads, resolution, sr_ratio, aux_norm_layer, qkv_bias
            )
        elif attention == "sla":
            self.attn = SimplifiedLinearAttention(dim, num_heads, resolution, qkv_bias, kernel_size)
        else:
            self.attn = FocusedLinearAttention(
                dim, num_heads, resolution, qkv_bias, kernel_size, focusing_factor
            )
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv `proj` (kernel = stride = patch) -> tokens (B, N, C) -> `norm`."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_tokens(self.proj(x)))


def _grids(img_size: tuple[int, int], patch_size: int, num_stages: int) -> list[tuple[int, int]]:
    """Token grid of each stage: the stem divides by `patch_size`, each later stage by 2."""
    h, w = img_size[0] // patch_size, img_size[1] // patch_size
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = h // 2, w // 2
        grids.append((h, w))
    return grids


def _resize_pos_embed(pos_embed: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(1, src_h*src_w, C) -> (1, dst_h*dst_w, C), bilinear, align_corners=False."""
    c = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, src[0], src[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return grid.reshape(1, c, dst[0] * dst[1]).permute(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# Model


class PyramidVisionTransformer(nn.Module):
    """PVT v1 hierarchy (4 stages of patch embedding + blocks) with a configurable norm and
    attention per stage.

    Args:
        norm: "layernorm" or "prepbn" (LinearNorm keys) for every norm; "repbn" is accepted too.
        attention: one of "softmax", "sla", "flatten" per stage.
        sr_ratios: spatial-reduction ratio of each softmax stage (linear stages use none).
        cls_token: PVT v1's class token, joined to the last stage; the head then reads it.
        final_norm: "none" (SLAB-PVT), "apply" (PVT v1) or "unused" (FLatten-PVT: the module
            exists, so its checkpoints load, but the forward never calls it).
        ln_eps: LayerNorm eps of the block and final norms (or of PRepBN's LayerNorm branch).
        aux_ln_eps: the same for the patch-embedding and spatial-reduction norms (None = ln_eps).
        pos_embed_img_size: the image size the position embeddings are sized for (None =
            img_size); if it differs, softmax models resize them bilinearly in the forward.
        prepbn_steps: T of the PRepBN schedule (only for norm="prepbn").
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        attention: Sequence[str] = ("softmax", "softmax", "softmax", "softmax"),
        norm: str = "layernorm",
        qkv_bias: bool = True,
        cls_token: bool = False,
        final_norm: str = "none",
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
        ln_eps: float = 1e-6,
        aux_ln_eps: float | None = None,
        pos_embed_img_size: int | tuple[int, int] | None = None,
        prepbn_steps: int = 300000,
    ) -> None:
        super().__init__()
        size = _pair(img_size)
        trained = _pair(pos_embed_img_size) if pos_embed_img_size is not None else size
        num_stages = len(depths)
        if (
            not len(embed_dims)
            == len(num_heads)
            == len(mlp_ratios)
            == len(sr_ratios)
            == len(attention)
            == num_stages
        ):
            raise ValueError(
                "embed_dims, depths, num_heads, mlp_ratios, sr_ratios and attention need one entry per stage"
            )
        if final_norm not in FINAL_NORMS:
            raise ValueError(f"unknown final_norm {final_norm!r}; expected one of {FINAL_NORMS}")
        grids = _grids(size, patch_size, num_stages)
        trained_grids = _grids(trained, patch_size, num_stages)
        if min(min(g) for g in grids) < 1:
            raise UnsupportedInputError(f"img_size {size} is too small for {num_stages} stages")
        for i, att in enumerate(attention):
            if att in LINEAR_ATTENTIONS and grids[i] != trained_grids[i]:
                raise UnsupportedInputError(
                    f"stage {i + 1} uses {att!r} attention, "
                    "whose positional encoding has one entry per token "
                    f"of the {trained} input: it cannot run at {size}"
                )
        if cls_token and (attention[-1] != "softmax" or sr_ratios[-1] > 1):
            raise ValueError(
                "a class token needs softmax attention without spatial reduction in the last stage"
            )
        norm_layer = norm_factory(norm, ln_eps=ln_eps, step=prepbn_steps)
        aux_norm_layer = norm_factory(
            norm, ln_eps=ln_eps if aux_ln_eps is None else aux_ln_eps, step=prepbn_steps
        )

        self.img_size = size
        self.num_classes = num_classes
        self.num_stages = num_stages
        self.norm_kind = norm
        self.attention = tuple(attention)
        self.grids = grids
        self.pos_embed_grids = trained_grids
        self.final_norm = final_norm
        self.use_cls_token = cls_token
        self.num_features = embed_dims[-1]

        for i in range(num_stages):
            patch_embed = PatchEmbed(
                patch_size if i == 0 else 2,
                in_chans if i == 0 else embed_dims[i - 1],
                embed_dims[i],
                aux_norm_layer,
            )
            th, tw = trained_grids[i]
            num_pos = th * tw + (1 if cls_token and i == num_stages - 1 else 0)
            stage_attn = attention[i]
            blocks = nn.ModuleList(
                Block(
                    embed_dims[i],
                    num_heads[i],
                    grids[i],
                    stage_attn,
                    norm_layer,
                    aux_norm_layer,
                    mlp_ratio=mlp_ratios[i],
                    sr_ratio=sr_ratios[i] if stage_attn == "softmax" else 1,
                    qkv_bias=qkv_bias,
                    kernel_size=kernel_size,
                    focusing_factor=focusing_factor,
                )
                for _ in range(depths[i])
            )
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, num_pos, embed_dims[i])))
            setattr(self, f"block{i + 1}", blocks)
        self.norm = norm_layer(embed_dims[-1]) if final_norm != "none" else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1])) if cls_token else None
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(num_stages):
            nn.init.trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def _pos_embed(self, i: int) -> torch.Tensor:
        """Stage i's position embedding at the stage's grid; resized only when the grid differs
        from the one it was sized for (a static decision: no Resize node otherwise)."""
        pos: torch.Tensor = getattr(self, f"pos_embed{i + 1}")
        src, dst = self.pos_embed_grids[i], self.grids[i]
        if src == dst:
            return pos
        if self.cls_token is not None and i == self.num_stages - 1:
            return torch.cat((pos[:, :1], _resize_pos_embed(pos[:, 1:], src, dst)), dim=1)
        return _resize_pos_embed(pos, src, dst)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled features (B, num_features)."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise UnsupportedInputError(
                f"input is {tuple(x.shape[-2:])} but the model was built for {self.img_size}: "
                "build it with img_size=... (PVT has fixed spatial sizes)"
            )
        last = self.num_stages - 1
        for i in range(self.num_stages):
            x = getattr(self, f"patch_embed{i + 1}")(x)
            if i == last and self.cls_token is not None:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = x + self._pos_embed(i)
            for block in getattr(self, f"block{i + 1}"):
                x = block(x)
            if i != last:
                h, w = self.grids[i]
                x = x.reshape(-1, h, w, x.shape[-1]).permute(0, 3, 1, 2)
        if self.final_norm == "apply" and self.norm is not None:
            x = self.norm(x)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ----------------------------------------------------------------------------------------------
# Registered variants

_SLAB_SRC = "SLAB classification/models/slab_pvt.py"
_PVT_SRC = "whai362/PVT classification/pvt.py (v1)"
_FLATTEN_SRC = "LeapLabTHU/FLatten-Transformer models/flatten_pvt.py"
_SLA_ATTN = ("sla", "sla", "sla", "sla")
_SOFTMAX_ATTN = ("softmax", "softmax", "softmax", "softmax")
_FLATTEN_ATTN = ("flatten", "flatten", "flatten", "flatten")
_PVT_ARCH: dict[str, Any] = dict(
    patch_size=4,
    embed_dims=(64, 128, 320, 512),
    num_heads=(1, 2, 5, 8),
    mlp_ratios=(8, 8, 4, 4),
    sr_ratios=(8, 4, 2, 1),
    qkv_bias=True,
)


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SLA_ATTN,
    released=True,
    paper_params_m=12.2,
    paper_gmacs=2.0,
    paper_top1=76.5,
    prepbn_steps=300000,
    source=_SLAB_SRC + " (cfgs/slab_pvt_t.yaml)",
    compare_with=("pvt_tiny", "flatten_pvt_tiny"),
)
def slab_pvt_tiny(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(2, 2, 2, 2),
        attention=_SLA_ATTN,
        norm="prepbn",
        prepbn_steps=300000,
        final_norm="none",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SLA_ATTN,
    released=False,
    prepbn_steps=300000,
    source=_SLAB_SRC + " (cfgs/slab_pvt_s.yaml)",
    compare_with=("pvt_small",),
)
def slab_pvt_small(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(3, 4, 6, 3),
        attention=_SLA_ATTN,
        norm="prepbn",
        prepbn_steps=300000,
        final_norm="none",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SLA_ATTN,
    released=False,
    prepbn_steps=300000,
    source=_SLAB_SRC + " (cfgs/slab_pvt_m.yaml)",
    compare_with=("pvt_medium",),
)
def slab_pvt_medium(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(3, 4, 18, 3),
        attention=_SLA_ATTN,
        norm="prepbn",
        prepbn_steps=300000,
        final_norm="none",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SOFTMAX_ATTN,
    released=True,
    paper_params_m=13.2,
    paper_gmacs=1.9,
    paper_top1=76.0,
    prepbn_steps=300000,
    source=_SLAB_SRC + " (cfgs/pvt_t_prepbn.yaml)",
    compare_with=("pvt_tiny",),
)
def pvt_tiny_prepbn(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(2, 2, 2, 2),
        attention=_SOFTMAX_ATTN,
        norm="prepbn",
        prepbn_steps=300000,
        final_norm="none",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SOFTMAX_ATTN,
    released=True,
    paper_params_m=24.5,
    paper_gmacs=3.8,
    paper_top1=80.1,
    prepbn_steps=300000,
    source=_SLAB_SRC + " (cfgs/pvt_s_prepbn.yaml)",
    compare_with=("pvt_small",),
)
def pvt_small_prepbn(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(3, 4, 6, 3),
        attention=_SOFTMAX_ATTN,
        norm="prepbn",
        prepbn_steps=300000,
        final_norm="none",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SOFTMAX_ATTN,
    released=True,
    paper_params_m=44.3,
    paper_gmacs=6.7,
    paper_top1=81.7,
    prepbn_steps=300000,
    source=_SLAB_SRC + " (cfgs/pvt_m_prepbn.yaml)",
    compare_with=("pvt_medium",),
)
def pvt_medium_prepbn(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(3, 4, 18, 3),
        attention=_SOFTMAX_ATTN,
        norm="prepbn",
        prepbn_steps=300000,
        final_norm="none",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="layernorm",
    attention=_SOFTMAX_ATTN,
    baseline_of="layernorm",
    paper_params_m=13.2,
    paper_gmacs=1.9,
    paper_top1=75.1,
    source=_PVT_SRC,
)
def pvt_tiny(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(2, 2, 2, 2),
        attention=_SOFTMAX_ATTN,
        norm="layernorm",
        ln_eps=1e-6,
        aux_ln_eps=1e-5,
        cls_token=True,
        final_norm="apply",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="layernorm",
    attention=_SOFTMAX_ATTN,
    baseline_of="layernorm",
    paper_params_m=24.5,
    paper_gmacs=3.8,
    paper_top1=79.8,
    source=_PVT_SRC,
)
def pvt_small(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(3, 4, 6, 3),
        attention=_SOFTMAX_ATTN,
        norm="layernorm",
        ln_eps=1e-6,
        aux_ln_eps=1e-5,
        cls_token=True,
        final_norm="apply",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="layernorm",
    attention=_SOFTMAX_ATTN,
    baseline_of="layernorm",
    paper_params_m=44.2,
    paper_gmacs=6.7,
    paper_top1=81.2,
    source=_PVT_SRC,
)
def pvt_medium(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(3, 4, 18, 3),
        attention=_SOFTMAX_ATTN,
        norm="layernorm",
        ln_eps=1e-6,
        aux_ln_eps=1e-5,
        cls_token=True,
        final_norm="apply",
        **kwargs,
    )


@register_model(
    family="pvt",
    norm="layernorm",
    attention=_FLATTEN_ATTN,
    baseline_of="flatten",
    paper_params_m=12.2,
    paper_gmacs=2.0,
    paper_top1=77.8,
    source=_FLATTEN_SRC + " (cfgs/flatten_pvt_t.yaml)",
)
def flatten_pvt_tiny(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        **_PVT_ARCH,
        depths=(2, 2, 2, 2),
        attention=_FLATTEN_ATTN,
        norm="layernorm",
        ln_eps=1e-6,
        aux_ln_eps=1e-5,
        final_norm="unused",
        focusing_factor=3.0,
        kernel_size=5,
        **kwargs,
    )


# Tiny test variants: 64x64 input, patch 4 (grids 16/8/4/2), sr_ratios (8, 4, 2, 1) so every
# softmax stage but the last reduces its keys to a 2x2 grid, as in the full-size models.

_TEST_ARCH: dict[str, Any] = dict(
    img_size=64,
    patch_size=4,
    embed_dims=(16, 16, 32, 32),
    depths=(1, 1, 1, 1),
    num_heads=(1, 2, 2, 4),
    mlp_ratios=(2, 2, 2, 2),
    sr_ratios=(8, 4, 2, 1),
)


def _test_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**_TEST_ARCH, **kwargs}


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SLA_ATTN,
    input_size=(3, 64, 64),
    prepbn_steps=300000,
    source=_SLAB_SRC,
    test=True,
    compare_with=("test_pvt", "test_flatten_pvt"),
)
def test_slab_pvt(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        attention=_SLA_ATTN, norm="prepbn", prepbn_steps=300000, **_test_kwargs(kwargs)
    )


@register_model(
    family="pvt",
    norm="prepbn",
    attention=_SOFTMAX_ATTN,
    input_size=(3, 64, 64),
    prepbn_steps=300000,
    source=_SLAB_SRC,
    test=True,
    compare_with=("test_pvt",),
)
def test_pvt_prepbn(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        attention=_SOFTMAX_ATTN, norm="prepbn", prepbn_steps=300000, **_test_kwargs(kwargs)
    )


@register_model(
    family="pvt",
    norm="layernorm",
    attention=_SOFTMAX_ATTN,
    baseline_of="layernorm",
    input_size=(3, 64, 64),
    source=_PVT_SRC,
    test=True,
)
def test_pvt(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        attention=_SOFTMAX_ATTN,
        norm="layernorm",
        aux_ln_eps=1e-5,
        cls_token=True,
        final_norm="apply",
        **_test_kwargs(kwargs),
    )


@register_model(
    family="pvt",
    norm="layernorm",
    attention=_FLATTEN_ATTN,
    baseline_of="flatten",
    input_size=(3, 64, 64),
    source=_FLATTEN_SRC,
    test=True,
)
def test_flatten_pvt(**kwargs: Any) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        attention=_FLATTEN_ATTN,
        norm="layernorm",
        aux_ln_eps=1e-5,
        final_norm="unused",
        **_test_kwargs(kwargs),
    )
