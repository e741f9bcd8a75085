"""DeiT family: SLAB-DeiT, DeiT with RepBN / PRepBN, and the LayerNorm DeiT baselines.

One class, `VisionTransformer`, covers every variant; the norm kind, the attention and the
pooling are constructor arguments:

- attention `"softmax"`: multi-head softmax attention (`qkv`, `proj`), as in timm/DeiT.
- attention `"sla"`: SLAB's simplified linear attention (`qkv`, `proj`, a 5x5 depthwise `dwc`
  shared by all heads, and a learned `positional_encoding` added to k before its ReLU).
- pooling `"token"`: a class token is prepended, `pos_embed` has N + 1 entries and the head
  reads the normalised class token (DeiT, DeiT with PRepBN).
- pooling `"avg"`: no class token in the sequence, `pos_embed` has N entries and the head
  reads the mean of the normalised tokens (SLAB-DeiT). The authors' model still owns an
  unused `cls_token` parameter; it is kept so their checkpoints load strictly.

Keys follow the SLAB repository's `deit.py` / `slab_deit.py`, which keep timm's
`VisionTransformer` layout (= facebookresearch/deit, the layout of the LayerNorm baselines).

Spatial sizes are fixed by `img_size` (the position embeddings and SLA's positional encoding
have one entry per token): a different input size raises `UnsupportedInputError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slab_deploy.errors import UnsupportedInputError
from slab_deploy.models.layers import (
    Mlp,
    NormFactory,
    SLACore,
    init_weights,
    norm_factory,
    to_tokens,
)
from slab_deploy.models.registry import register_model

__all__ = ["Attention", "Block", "PatchEmbed", "SimplifiedLinearAttention", "VisionTransformer"]

ATTENTIONS = ("softmax", "sla")
POOLS = ("token", "avg")


class Attention(nn.Module):
    """Multi-head softmax self-attention with a fused `qkv` projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[1], x.shape[2]
        heads = self.num_heads
        qkv = self.qkv(x).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = torch.matmul(attn, v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class SimplifiedLinearAttention(nn.Module):
    """SLAB's SLA over the patch grid: relu(q), relu(k + positional_encoding), the normalised
    linear product (`core`), + a depthwise conv of v on the grid, then `proj`."""

    def __init__(
        self, dim: int, num_heads: int, grid: tuple[int, int], qkv_bias: bool = True, kernel_size: int = 5
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.grid = grid
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.core = SLACore()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[2]
        q, k, v = self.qkv(x).split(c, dim=-1)
        out = self.core.attend(q, k, v, self.num_heads, self.positional_encoding, self.dwc, self.grid)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, grid={self.grid}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        attention: str,
        norm_layer: NormFactory,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
        self.norm1 = norm_layer(dim)
        self.attn: nn.Module
        if attention == "sla":
            self.attn = SimplifiedLinearAttention(dim, num_heads, grid, qkv_bias, kernel_size)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv `proj` (kernel = stride = patch) -> tokens (B, N, C). No norm (timm's Identity)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise UnsupportedInputError(
                f"input is {tuple(x.shape[-2:])} but the model was built for {self.img_size}: "
                "build it with img_size=... (DeiT's position embeddings fix the token count)"
            )
        return to_tokens(self.proj(x))


class VisionTransformer(nn.Module):
    """DeiT-style isotropic transformer with a configurable norm, attention and pooling.

    Args:
        norm: "layernorm", "repbn" (plain RepBN keys) or "prepbn" (LinearNorm keys).
        attention: "softmax" or "sla", for every block.
        global_pool: "token" (class token, DeiT) or "avg" (mean of tokens, SLAB-DeiT; the
            `cls_token` parameter then exists but is unused, as in the authors' model).
        ln_eps: LayerNorm eps (of the norms themselves, or of PRepBN's LayerNorm branch).
        prepbn_steps: T of the PRepBN schedule (only for norm="prepbn").
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attention: str = "softmax",
        norm: str = "layernorm",
        global_pool: str = "token",
        kernel_size: int = 5,
        ln_eps: float = 1e-6,
        prepbn_steps: int = 60000,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        if size[0] % patch_size or size[1] % patch_size:
            raise UnsupportedInputError(f"img_size {size} must be a multiple of the patch size {patch_size}")
        if global_pool not in POOLS:
            raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {POOLS}")
        norm_layer = norm_factory(norm, ln_eps=ln_eps, step=prepbn_steps)
        self.img_size = size
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.norm_kind = norm
        self.attention = attention
        self.global_pool = global_pool

        self.patch_embed = PatchEmbed(size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid
        num_prefix = 1 if global_pool == "token" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + num_prefix, embed_dim))
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, grid, attention, norm_layer, mlp_ratio, qkv_bias, kernel_size)
                for _ in range(depth)
            )
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled features (B, embed_dim)."""
        x = self.patch_embed(x)
        if self.global_pool == "token":
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x + self.pos_embed)
        x = self.norm(x)
        return x[:, 0] if self.global_pool == "token" else x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Registered variants

_SLAB_SRC = "SLAB classification/models/slab_deit.py"
_REPBN_SRC = "SLAB classification/models/deit.py"
_DEIT_SRC = "facebookresearch/deit models.py (timm VisionTransformer layout)"


@register_model(
    family="deit",
    norm="prepbn",
    attention=("sla",),
    released=True,
    paper_params_m=6.2,
    paper_gmacs=1.1,
    paper_top1=74.3,
    prepbn_steps=60000,
    source=_SLAB_SRC,
    compare_with=("deit_tiny",),
)
def slab_deit_tiny(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        attention="sla",
        norm="prepbn",
        global_pool="avg",
        prepbn_steps=60000,
        **kwargs,
    )


@register_model(
    family="deit",
    norm="prepbn",
    attention=("sla",),
    released=True,
    paper_params_m=23.0,
    paper_gmacs=4.4,
    paper_top1=80.0,
    prepbn_steps=60000,
    source=_SLAB_SRC,
    compare_with=("deit_small",),
)
def slab_deit_small(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        attention="sla",
        norm="prepbn",
        global_pool="avg",
        prepbn_steps=60000,
        **kwargs,
    )


@register_model(
    family="deit",
    norm="repbn",
    layout="repbn",
    attention=("softmax",),
    released=True,
    paper_params_m=5.7,
    paper_gmacs=1.3,
    paper_top1=73.6,
    source=_REPBN_SRC + " (deit_tiny_patch16_224_repbn)",
    compare_with=("deit_tiny",),
)
def deit_tiny_prepbn(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        attention="softmax",
        norm="repbn",
        global_pool="token",
        **kwargs,
    )


@register_model(
    family="deit",
    norm="prepbn",
    attention=("softmax",),
    released=True,
    paper_params_m=22.1,
    paper_gmacs=4.6,
    paper_top1=80.2,
    prepbn_steps=300000,
    source=_REPBN_SRC + " (deit_small_patch16_224_repbn)",
    compare_with=("deit_small",),
)
def deit_small_prepbn(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        attention="softmax",
        norm="prepbn",
        global_pool="token",
        prepbn_steps=300000,
        **kwargs,
    )


@register_model(
    family="deit",
    norm="layernorm",
    attention=("softmax",),
    baseline_of="layernorm",
    paper_params_m=5.7,
    paper_gmacs=1.3,
    paper_top1=72.2,
    source=_DEIT_SRC,
)
def deit_tiny(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        attention="softmax",
        norm="layernorm",
        global_pool="token",
        ln_eps=1e-6,
        **kwargs,
    )


@register_model(
    family="deit",
    norm="layernorm",
    attention=("softmax",),
    baseline_of="layernorm",
    paper_params_m=22.1,
    paper_gmacs=4.6,
    paper_top1=79.8,
    source=_DEIT_SRC,
)
def deit_small(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        attention="softmax",
        norm="layernorm",
        global_pool="token",
        ln_eps=1e-6,
        **kwargs,
    )


# Tiny test variants: 32x32 input, patch 8 (a 4x4 grid), width 32, two blocks.

_TEST_ARCH: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _test_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**_TEST_ARCH, **kwargs}


@register_model(
    family="deit",
    norm="prepbn",
    attention=("sla",),
    input_size=(3, 32, 32),
    prepbn_steps=60000,
    source=_SLAB_SRC,
    test=True,
    compare_with=("test_deit",),
)
def test_slab_deit(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        attention="sla", norm="prepbn", global_pool="avg", prepbn_steps=60000, **_test_kwargs(kwargs)
    )


@register_model(
    family="deit",
    norm="repbn",
    layout="repbn",
    attention=("softmax",),
    input_size=(3, 32, 32),
    source=_REPBN_SRC,
    test=True,
    compare_with=("test_deit",),
)
def test_deit_prepbn(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(attention="softmax", norm="repbn", global_pool="token", **_test_kwargs(kwargs))


@register_model(
    family="deit",
    norm="prepbn",
    attention=("softmax",),
    input_size=(3, 32, 32),
    prepbn_steps=300000,
    source=_REPBN_SRC,
    test=True,
    compare_with=("test_deit",),
)
def test_deit_linearnorm(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        attention="softmax", norm="prepbn", global_pool="token", prepbn_steps=300000, **_test_kwargs(kwargs)
    )


@register_model(
    family="deit",
    norm="layernorm",
    attention=("softmax",),
    baseline_of="layernorm",
    input_size=(3, 32, 32),
    source=_DEIT_SRC,
    test=True,
)
def test_deit(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        attention="softmax", norm="layernorm", global_pool="token", **_test_kwargs(kwargs)
    )


# Demo variants: small enough to train on a 2-core CPU in minutes, trained on scikit-learn's
# handwritten digits (8x8 grey images, bilinearly upsampled to 32x32 and replicated to 3 channels;
# see docs/demo-model.md). Their trained weights ship in slab_deploy/data/. 32x32 input, patch 4
# (an 8x8 grid: one token per original pixel), width 64, four blocks, two heads, 10 classes.

_DEMO_SRC = "slab-deploy demo (SLAB classification/models/slab_deit.py layout, DeiT-demo size)"
# Per-channel mean and std of the demo training split (uint8 32x32 images scaled to [0, 1]).
DEMO_MEAN = (0.3054, 0.3054, 0.3054)
DEMO_STD = (0.3237, 0.3237, 0.3237)
DEMO_PREPBN_STEPS = 660  # T: half of the 1,320 training iterations (60 epochs x 22 batches of 64)
_DEMO_SPEC: dict[str, Any] = dict(
    family="deit",
    input_size=(3, 32, 32),
    num_classes=10,
    mean=DEMO_MEAN,
    std=DEMO_STD,
    interpolation="bilinear",
    crop_pct=1.0,
)


@register_model(
    norm="prepbn",
    attention=("sla",),
    prepbn_steps=DEMO_PREPBN_STEPS,
    source=_DEMO_SRC,
    compare_with=("deit_demo",),
    **_DEMO_SPEC,
)
def slab_deit_demo(**kwargs: Any) -> VisionTransformer:
    kwargs = {"img_size": 32, "num_classes": 10, **kwargs}
    return VisionTransformer(
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=2,
        mlp_ratio=4.0,
        attention="sla",
        norm="prepbn",
        global_pool="avg",
        prepbn_steps=DEMO_PREPBN_STEPS,
        **kwargs,
    )


@register_model(
    norm="layernorm",
    attention=("softmax",),
    baseline_of="layernorm",
    source=_DEMO_SRC.replace("slab_deit.py", "deit.py") + ", LayerNorm and softmax attention",
    **_DEMO_SPEC,
)
def deit_demo(**kwargs: Any) -> VisionTransformer:
    kwargs = {"img_size": 32, "num_classes": 10, **kwargs}
    return VisionTransformer(
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=2,
        mlp_ratio=4.0,
        attention="softmax",
        norm="layernorm",
        global_pool="token",
        ln_eps=1e-6,
        **kwargs,
    )
