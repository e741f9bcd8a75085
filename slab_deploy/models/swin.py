"""Swin family: SLAB-Swin, Swin with RepBN, the LayerNorm Swin baselines and FLatten-Swin.

One class, `SwinTransformer`, covers every variant; the norm kind and the attention of each
stage are constructor arguments:

- `"window"`: Swin's (shifted) window softmax attention with relative position bias.
- `"sla"`: SLAB's simplified linear attention (ReLU kernel, depthwise-conv term).
- `"flatten"`: FLatten's focused linear attention.

Linear stages use windows of `linear_window` tokens per side (None: the whole stage-1 map,
i.e. global attention, as the authors configure it with `WINDOW_SIZE: 56` at 224x224);
window stages use `window_size`. As in the authors' code, a block whose map is not larger
than its window uses one window covering the map and no shift; shifted blocks are the odd
ones of a stage. Keys follow the SLAB repository's `slab_swin.py` / `swin_transformer.py`
(= microsoft/Swin-Transformer for the LayerNorm baselines) and FLatten's `flatten_swin.py`,
including the persistent `relative_position_index` and `attn_mask` buffers.

Other input sizes (`img_size=`): when a stage's map is not a multiple of its window, the block
zero-pads the normalised tokens on the right/bottom before windowing and crops after, and the
shift mask is built on the padded grid, as the authors' detection backbones do (their
classification code cannot run such sizes). Padding is decided statically, see
`SwinBlock.needs_padding`; it does not commute with folding `norm1` into `attn.qkv`. The SLA
positional encodings are sized by the linear window, so with the default (global) linear
window a 224x224 checkpoint only loads at 224; `linear_window=(56, 28)` keeps the 224 shapes at
larger inputs (windows padded and shifted, as in the authors' detection backbone).
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
    "FocusedLinearAttention",
    "PatchEmbed",
    "PatchMerging",
    "SimplifiedLinearAttention",
    "SwinBlock",
    "SwinStage",
    "SwinTransformer",
    "WindowAttention",
]

LINEAR_ATTENTIONS = ("sla", "flatten")
ATTENTIONS = ("window", *LINEAR_ATTENTIONS)


# ----------------------------------------------------------------------------------------------
# Window helpers (static sizes, batch inferred)


def window_partition(x: torch.Tensor, window: int, h: int, w: int, c: int) -> torch.Tensor:
    """(B, h, w, c) -> (B * nW, window * window, c); h and w must be multiples of `window`.

    Sizes are passed as static ints (Swin's spatial sizes are fixed), so exported graphs carry
    constants instead of shape arithmetic; the batch stays -1."""
    x = x.reshape(-1, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int, c: int) -> torch.Tensor:
    """(B * nW, window * window, c) -> (B, h, w, c)."""
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 relative position bias table, N = window^2."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (rel[..., 0] + window - 1) * (2 * window - 1) + (rel[..., 1] + window - 1)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask (0 / -100) that keeps shifted windows from mixing regions."""
    img = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for hs in cuts:
        for ws in cuts:
            img[:, hs, ws, :] = region
            region += 1
    ids = window_partition(img, window, h, w, 1).squeeze(-1)  # nW, N
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


# ----------------------------------------------------------------------------------------------
# Attention modules; all take windows (B * nW, N, C)


class WindowAttention(nn.Module):
    """Swin's window softmax attention with a learned relative position bias.

    `num_windows` (windows per image) is only used to broadcast a shift mask over the batch.
    """

    relative_position_index: torch.Tensor

    def __init__(
        self, dim: int, window: int, num_heads: int, qkv_bias: bool = True, num_windows: int = 1
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.num_windows = num_windows
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, c = self.window * self.window, self.dim
        heads = self.num_heads
        qkv = self.qkv(x).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1))  # (B nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            attn = attn.reshape(-1, self.num_windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.reshape(-1, heads, n, n)
        attn = attn.softmax(dim=-1)
        x = torch.matmul(attn, v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}"


class SimplifiedLinearAttention(nn.Module):
    """SLAB's SLA: relu(q), relu(k + positional_encoding), normalised linear product, + DWC(v).

    The depthwise conv (`dwc`, head_dim channels) is shared by all heads. The mask argument
    is accepted for a uniform call and ignored, as in the authors' code.
    """

    def __init__(
        self, dim: int, window: int, num_heads: int, qkv_bias: bool = True, kernel_size: int = 5
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, window * window, dim))
        self.core = SLACore()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c = self.dim
        q, k, v = self.qkv(x).split(c, dim=-1)
        grid = (self.window, self.window)
        return self.proj(self.core.attend(q, k, v, self.num_heads, self.positional_encoding, self.dwc, grid))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}"


class FocusedLinearAttention(nn.Module):
    """FLatten's focused linear attention: focused ReLU kernel (norms over all C), linear
    product with a mean-normaliser, + DWC(v) shared across heads."""

    def __init__(
        self,
        dim: int,
        window: int,
        num_heads: int,
        qkv_bias: bool = True,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.focusing_factor = focusing_factor
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, window * window, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, c = self.window * self.window, self.dim
        q, k, v = self.qkv(x).split(c, dim=-1)
        k = k + self.positional_encoding
        q = focused_kernel(q, self.scale, self.focusing_factor)
        k = focused_kernel(k, self.scale, self.focusing_factor)
        dwc = shared_dwc(v, self.dwc, (self.window, self.window), self.num_heads)
        q, k, v = (head_split(t, self.num_heads) for t in (q, k, v))
        z = 1.0 / (torch.matmul(q, k.mean(dim=-2, keepdim=True).transpose(-2, -1)) + 1e-6)
        s = n**-0.5
        kv = torch.matmul(k.transpose(-2, -1) * s, v * s)
        out = torch.matmul(q, kv) * z
        return self.proj(head_merge(out, self.num_heads) + dwc)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}"


# ----------------------------------------------------------------------------------------------
# Blocks and stages


class SwinBlock(nn.Module):
    """norm1 -> (pad) -> (roll) -> windows -> attn -> merge -> (roll back) -> (crop) -> + x;
    then x + mlp(norm2(x)).

    The window and shift are clamped as in the authors' code: when the map is not larger than
    the window, one window covers the map and there is no shift. Padding, when the map is not
    a multiple of the window, is static (`pad_right`, `pad_bottom`).
    """

    attn_mask: torch.Tensor | None

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window: int,
        shift: int,
        attention: str,
        norm_layer: NormFactory,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTIONS}")
        h, w = resolution
        if min(h, w) <= window:
            window, shift = min(h, w), 0
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window={window})")
        self.dim = dim
        self.resolution = (h, w)
        self.window = window
        self.shift = shift
        self.attention = attention
        self.pad_right = (window - w % window) % window
        self.pad_bottom = (window - h % window) % window
        num_windows = ((h + self.pad_bottom) // window) * ((w + self.pad_right) // window)

        self.norm1 = norm_layer(dim)
        self.attn: nn.Module
        if attention == "window":
            self.attn = WindowAttention(dim, window, num_heads, qkv_bias, num_windows)
        elif attention == "sla":
            self.attn = SimplifiedLinearAttention(dim, window, num_heads, qkv_bias, kernel_size)
        else:
            self.attn = FocusedLinearAttention(dim, window, num_heads, qkv_bias, kernel_size, focusing_factor)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

        mask = None
        if shift > 0:
            mask = shifted_window_mask(h + self.pad_bottom, w + self.pad_right, window, shift)
        # Persistent, as in the authors' code (their checkpoints carry it); only "window" uses it.
        self.register_buffer("attn_mask", mask)

    @property
    def needs_padding(self) -> bool:
        """True when the normalised tokens are zero-padded before windowing (folding `norm1`
        into `attn.qkv` would then change the padded tokens)."""
        return self.pad_right > 0 or self.pad_bottom > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        c = self.dim
        shortcut = x
        x = self.norm1(x).reshape(-1, h, w, c)
        if self.needs_padding:
            x = F.pad(x, (0, 0, 0, self.pad_right, 0, self.pad_bottom))
        hp, wp = h + self.pad_bottom, w + self.pad_right
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, self.window, hp, wp, c), mask=self.attn_mask)
        x = window_reverse(x, self.window, hp, wp, c)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        if self.needs_padding:
            x = x[:, :h, :w, :]
        x = shortcut + x.reshape(-1, h * w, c)
        return x + self.mlp(self.norm2(x))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, resolution={self.resolution}, attention={self.attention}, "
            f"window={self.window}, shift={self.shift}, pad=({self.pad_bottom}, {self.pad_right})"
        )


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> norm -> `reduction` (no bias). Odd maps are zero-padded
    first (before the norm, so folding the norm into `reduction` stays exact)."""

    def __init__(self, resolution: tuple[int, int], dim: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.resolution = resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    @property
    def out_resolution(self) -> tuple[int, int]:
        h, w = self.resolution
        return (h + 1) // 2, (w + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        c = self.dim
        x = x.reshape(-1, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], dim=-1).reshape(
            -1, self.out_resolution[0] * self.out_resolution[1], 4 * c
        )
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`blocks` (even: unshifted, odd: shifted) and an optional `downsample` (PatchMerging)."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window: int,
        attention: str,
        norm_layer: NormFactory,
        downsample: bool,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                resolution,
                num_heads,
                window=window,
                shift=0 if i % 2 == 0 else window // 2,
                attention=attention,
                norm_layer=norm_layer,
                **block_kwargs,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class PatchEmbed(nn.Module):
    """Conv `proj` (kernel = stride = patch) -> tokens (B, N, C) -> optional `norm`."""

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        norm_layer: NormFactory | None,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.resolution = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != self.img_size:
            raise UnsupportedInputError(
                f"input is {tuple(x.shape[-2:])} but the model was built for {self.img_size}: "
                "build it with img_size=... (Swin has fixed spatial sizes)"
            )
        x = to_tokens(self.proj(x))
        if self.norm is not None:
            x = self.norm(x)
        return x


# ----------------------------------------------------------------------------------------------
# Model


class SwinTransformer(nn.Module):
    """Swin-style hierarchy with a configurable norm and attention per stage.

    Args:
        norm: "layernorm", "repbn" (plain RepBN keys) or "prepbn" (LinearNorm keys).
        attention: one of "window", "sla", "flatten" per stage.
        window_size: window of the "window" stages.
        linear_window: window of the "sla"/"flatten" stages: None = the whole stage-1 map (global
            attention, clamped per stage), an int for every stage (the authors' `WINDOW_SIZE`),
            or one per stage. At img_size 224 all three of None, 56 and (56, 28, ...) agree.
        prepbn_steps: T of the PRepBN schedule (only for norm="prepbn").
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        attention: Sequence[str] = ("window", "window", "window", "window"),
        norm: str = "layernorm",
        window_size: int = 7,
        linear_window: int | Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_norm: bool = True,
        kernel_size: int = 5,
        focusing_factor: float = 3.0,
        ln_eps: float = 1e-5,
        prepbn_steps: int = 60000,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        if size[0] % patch_size or size[1] % patch_size:
            raise UnsupportedInputError(f"img_size {size} must be a multiple of the patch size {patch_size}")
        if not len(depths) == len(num_heads) == len(attention):
            raise ValueError("depths, num_heads and attention need one entry per stage")
        norm_layer = norm_factory(norm, ln_eps=ln_eps, step=prepbn_steps)
        num_stages = len(depths)
        self.img_size = size
        self.num_classes = num_classes
        self.norm_kind = norm
        self.attention = tuple(attention)
        self.num_features = embed_dim * 2 ** (num_stages - 1)

        self.patch_embed = PatchEmbed(
            size, patch_size, in_chans, embed_dim, norm_layer if patch_norm else None
        )
        resolution = self.patch_embed.resolution
        if linear_window is None:
            linear_windows = [max(resolution)] * num_stages
        elif isinstance(linear_window, int):
            linear_windows = [linear_window] * num_stages
        else:
            linear_windows = [int(w) for w in linear_window]
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            stage = SwinStage(
                dim=embed_dim * 2**i,
                resolution=resolution,
                depth=depths[i],
                num_heads=num_heads[i],
                window=linear_windows[i] if attention[i] in LINEAR_ATTENTIONS else window_size,
                attention=attention[i],
                norm_layer=norm_layer,
                downsample=i < num_stages - 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                kernel_size=kernel_size,
                focusing_factor=focusing_factor,
            )
            self.layers.append(stage)
            if stage.downsample is not None:
                resolution = stage.downsample.out_resolution
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled features (B, num_features)."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Registered variants

_SLAB_SRC = "SLAB classification/models/slab_swin.py"
_REPBN_SRC = "SLAB classification/models/swin_transformer.py"
_SWIN_SRC = "microsoft/Swin-Transformer models/swin_transformer.py"
_FLATTEN_SRC = "LeapLabTHU/FLatten-Transformer models/flatten_swin.py"
_SLAB_ATTN = ("sla", "sla", "window", "window")
_FLATTEN_ATTN = ("flatten", "flatten", "window", "window")
_WINDOW_ATTN = ("window", "window", "window", "window")


@register_model(
    family="swin",
    norm="prepbn",
    attention=_SLAB_ATTN,
    released=True,
    paper_params_m=29.2,
    paper_gmacs=4.5,
    paper_top1=81.8,
    prepbn_steps=60000,
    source=_SLAB_SRC,
    compare_with=("swin_tiny", "flatten_swin_tiny"),
)
def slab_swin_tiny(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        attention=_SLAB_ATTN,
        norm="prepbn",
        prepbn_steps=60000,
        window_size=kwargs.pop("window_size", 7),
        linear_window=kwargs.pop("linear_window", None),
        **kwargs,
    )


@register_model(
    family="swin",
    norm="prepbn",
    attention=_SLAB_ATTN,
    released=True,
    paper_params_m=50.6,
    paper_gmacs=8.8,
    paper_top1=83.6,
    prepbn_steps=60000,
    source=_SLAB_SRC,
    compare_with=("swin_small", "flatten_swin_small"),
)
def slab_swin_small(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
        attention=_SLAB_ATTN,
        norm="prepbn",
        prepbn_steps=60000,
        window_size=kwargs.pop("window_size", 7),
        linear_window=kwargs.pop("linear_window", None),
        **kwargs,
    )


@register_model(
    family="swin",
    norm="prepbn",
    attention=_SLAB_ATTN,
    released=False,
    prepbn_steps=60000,
    source=_SLAB_SRC + " (cfgs/slab_swin_b.yaml)",
    compare_with=("swin_base",),
)
def slab_swin_base(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        attention=_SLAB_ATTN,
        norm="prepbn",
        prepbn_steps=60000,
        window_size=kwargs.pop("window_size", 7),
        linear_window=kwargs.pop("linear_window", None),
        **kwargs,
    )


@register_model(
    family="swin",
    norm="repbn",
    layout="repbn",
    attention=_WINDOW_ATTN,
    released=True,
    paper_params_m=28.3,
    paper_gmacs=4.5,
    paper_top1=81.4,
    source=_REPBN_SRC,
    compare_with=("swin_tiny",),
)
def swin_tiny_prepbn(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        attention=_WINDOW_ATTN,
        norm="repbn",
        window_size=kwargs.pop("window_size", 7),
        **kwargs,
    )


# LayerNorm baselines. Paper figures are the Swin paper's (Liu et al., 2021, Table 1).


@register_model(
    family="swin",
    norm="layernorm",
    attention=_WINDOW_ATTN,
    baseline_of="layernorm",
    paper_params_m=28.0,
    paper_gmacs=4.5,
    paper_top1=81.3,
    source=_SWIN_SRC,
)
def swin_tiny(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        attention=_WINDOW_ATTN,
        norm="layernorm",
        window_size=kwargs.pop("window_size", 7),
        **kwargs,
    )


@register_model(
    family="swin",
    norm="layernorm",
    attention=_WINDOW_ATTN,
    baseline_of="layernorm",
    paper_params_m=50.0,
    paper_gmacs=8.7,
    paper_top1=83.0,
    source=_SWIN_SRC,
)
def swin_small(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
        attention=_WINDOW_ATTN,
        norm="layernorm",
        window_size=kwargs.pop("window_size", 7),
        **kwargs,
    )


@register_model(
    family="swin",
    norm="layernorm",
    attention=_WINDOW_ATTN,
    baseline_of="layernorm",
    paper_params_m=88.0,
    paper_gmacs=15.4,
    paper_top1=83.5,
    source=_SWIN_SRC,
)
def swin_base(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        attention=_WINDOW_ATTN,
        norm="layernorm",
        window_size=kwargs.pop("window_size", 7),
        **kwargs,
    )


# FLatten baselines (window 56 = global for the linear stages at 224x224).


@register_model(
    family="swin",
    norm="layernorm",
    attention=_FLATTEN_ATTN,
    baseline_of="flatten",
    paper_params_m=29.2,
    paper_gmacs=4.5,
    paper_top1=82.1,
    source=_FLATTEN_SRC,
)
def flatten_swin_tiny(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        attention=_FLATTEN_ATTN,
        norm="layernorm",
        window_size=kwargs.pop("window_size", 7),
        linear_window=kwargs.pop("linear_window", None),
        focusing_factor=3.0,
        kernel_size=5,
        **kwargs,
    )


@register_model(
    family="swin",
    norm="layernorm",
    attention=_FLATTEN_ATTN,
    baseline_of="flatten",
    paper_top1=83.5,
    source=_FLATTEN_SRC,
)
def flatten_swin_small(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
        attention=_FLATTEN_ATTN,
        norm="layernorm",
        window_size=kwargs.pop("window_size", 7),
        linear_window=kwargs.pop("linear_window", None),
        focusing_factor=3.0,
        kernel_size=5,
        **kwargs,
    )


# Tiny test variants: 64x64 input, patch 2 (maps 32/16/8/4), window 4, so stage 3 has a
# shifted block with a mask and stage 4 is clamped to one window, as in the full-size models.

_TEST_ARCH: dict[str, Any] = dict(
    img_size=64, patch_size=2, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), window_size=4
)


def _test_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**_TEST_ARCH, **kwargs}


@register_model(
    family="swin",
    norm="prepbn",
    attention=_SLAB_ATTN,
    input_size=(3, 64, 64),
    prepbn_steps=60000,
    source=_SLAB_SRC,
    test=True,
    compare_with=("test_swin", "test_flatten_swin"),
)
def test_slab_swin(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(attention=_SLAB_ATTN, norm="prepbn", prepbn_steps=60000, **_test_kwargs(kwargs))


@register_model(
    family="swin",
    norm="repbn",
    layout="repbn",
    attention=_WINDOW_ATTN,
    input_size=(3, 64, 64),
    source=_REPBN_SRC,
    test=True,
    compare_with=("test_swin",),
)
def test_swin_prepbn(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(attention=_WINDOW_ATTN, norm="repbn", **_test_kwargs(kwargs))


@register_model(
    family="swin",
    norm="layernorm",
    attention=_WINDOW_ATTN,
    baseline_of="layernorm",
    input_size=(3, 64, 64),
    source=_SWIN_SRC,
    test=True,
)
def test_swin(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(attention=_WINDOW_ATTN, norm="layernorm", **_test_kwargs(kwargs))


@register_model(
    family="swin",
    norm="layernorm",
    attention=_FLATTEN_ATTN,
    baseline_of="flatten",
    input_size=(3, 64, 64),
    source=_FLATTEN_SRC,
    test=True,
)
def test_flatten_swin(**kwargs: Any) -> SwinTransformer:
    return SwinTransformer(attention=_FLATTEN_ATTN, norm="layernorm", **_test_kwargs(kwargs))
