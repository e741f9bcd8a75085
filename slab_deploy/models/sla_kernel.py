"""SLA's attention as fused Triton kernels: the torch path of the `mixed` policy on CUDA.

`SLACore.attend` runs them when they can (a CUDA fp16/bf16 model under `mixed`, Triton importable, head
sizes 16-128 and a power of two, the DWC an odd square kernel of at most 7 on the token grid; not
while traced for export) and are not turned off (`mode`), in eager, CUDA-graph and compiled torch
alike; the reference graph otherwise. An exported ONNX graph is always the reference.

What they compute is the whole of SLA between the qkv projection and `proj`, for every head at once,
on the token layout (B, N, heads*c) the projection wrote, with no head split or merge copies:
    out = q' (k'^T v / (N s)) / (q' . (mean(k') / s) + eps / (N s)) + DWC(v) + bias
with q' = relu(q) and k' = relu(k + pe) (optional: `relu`, `pe`), s = sum_c mean(k')_c per head as the
reference `mixed` path normalises (with s >= 2^-14 every fp16 value stored is bounded by max|v|), and
DWC the depthwise conv of v on the (grid_h, grid_w) token grid, its kernel shared by all heads or one
per channel. k'^T v and the token mean of k' accumulate in fp32, the normaliser and the DWC are fp32,
q' . (k'^T v) runs on the tensor cores from fp16 with fp32 accumulation, and the sum is rounded once.

Two shapes of work: one kernel that does everything (each program, one tile of queries of one image
and head, recomputes its head's k'^T v), or three: partial k'^T v sums over chunks of blocks, their
reduction with the normaliser into an fp16 (c, d) matrix per head, and the queries. Which one, the
query tile, the chunk and how the DWC's taps are issued are chosen per shape (`launch_config`, from a
sweep of the zoo's shapes: tools/sweep_sla_launch.py).

`sla_mixed` is registered as the torch custom op `slab_deploy::sla_mixed` (one named call in profiles;
opaque to torch.compile, which can still fuse what surrounds it), and CUDA graphs capture its launches.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from slab_deploy.errors import ConfigError

try:  # Triton comes with the CUDA wheels of torch; CPU-only installs run the reference path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 64  # tokens per tile (queries per program; keys per step of the k^T v loop)
HEAD_SIZES = (16, 32, 64, 128)  # tl.dot needs powers of two >= 16; 128 bounds the fp32 (c, d) tile
INLINE_BLOCKS = 4  # heads of at most this many blocks may take the one-kernel path
CHUNK_BLOCKS = 4  # blocks per partial k^T v sum of the three-kernel path, unless the launch says
MAX_DWC = 7  # largest DWC kernel side the fused path takes (SLAB's is 5)
# The launch's keys (`launch_config` picks them per shape; `launch(config=...)` overrides them):
# BLOCK_Q queries per program of the query kernel, its taps unrolled or a loop, Triton's num_warps
# (None: its default), the one-kernel path or the three-kernel one, that path's chunk size, and the
# query tile's width on the token grid (0: BLOCK_Q consecutive tokens; w > 0: BLOCK_Q / w rows of w
# tokens, so the DWC's taps of one tile read fewer distinct tokens; only where there is a DWC).
LAUNCH: dict[str, Any] = {"block_q": BLOCK, "unroll": True, "num_warps": None, "inline": True,
                          "chunk_blocks": CHUNK_BLOCKS, "tile_w": 0}
FEW_HEADS = 32  # b * heads below this: batch-1 launches (the sweep measured 1-8 and 64-512)

# SLAB_DEPLOY_SLA_KERNEL: "auto" (the default: every supported shape, in eager, CUDA-graph and compiled
# torch) or "never" (the reference graph everywhere). Measured on an H200 (fp16, 2026-12-03,
# docs/benchmarks.md): per call the kernels beat the reference graph at every SLA shape of the zoo,
# batch 1 to 256, 1.7x to 7x under CUDA graphs; under torch.compile they beat Inductor's own fusion of the
# reference graph too (SLAB-Swin-T 4.08 against 4.45 ms at batch 64, SLAB-DeiT-S 0.55 against 0.80 ms at
# batch 1). So there is no shape rule: where `supports` says yes, they run.
MODES = ("auto", "never")
ENV = "SLAB_DEPLOY_SLA_KERNEL"


def mode() -> str:
    """The fused kernels' mode from SLAB_DEPLOY_SLA_KERNEL; one line naming the choices if unknown."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{ENV}={value!r} is not a mode of the fused SLA kernels; "
                          f"use one of {', '.join(MODES)}")
    return value


def available() -> bool:
    """Whether the fused kernels can run here at all (Triton importable)."""
    return triton is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, pe: torch.Tensor | None = None,
             weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             grid: tuple[int, int] | None = None) -> bool:
    """Whether `sla_mixed` takes these tensors: q, k (B, N, heads*c), v (B, N, heads*d) with unit stride
    along channels, head sizes in HEAD_SIZES, fp16/bf16 on one CUDA device; `pe` (1, N, heads*c);
    `weight` a DWC kernel (d or heads*d, 1, K, K), K odd <= MAX_DWC, with `bias` (same channels) on a
    `grid` of N tokens."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        return False
    if q.shape[-1] % heads or v.shape[-1] % heads:
        return False
    c, d = q.shape[-1] // heads, v.shape[-1] // heads
    if c not in HEAD_SIZES or d not in HEAD_SIZES or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    tensors = [q, k, v]
    if pe is not None:
        if pe.shape != (1, *q.shape[1:]):
            return False
        tensors.append(pe)
    if weight is not None:
        side = weight.shape[-1]
        if (grid is None or grid[0] * grid[1] != q.shape[1] or weight.dim() != 4 or weight.shape[1] != 1
                or weight.shape[0] not in (d, heads * d) or weight.shape[-2] != side or side % 2 == 0
                or side > MAX_DWC or not weight.is_contiguous()):
            return False
        tensors.append(weight)
        if bias is not None:
            if bias.shape != (weight.shape[0],) or not bias.is_contiguous():
                return False
            tensors.append(bias)
    return all(t.is_cuda and t.dtype == q.dtype and t.stride(-1) == 1 and t.device == q.device
               for t in tensors)


if triton is not None:

    @triton.jit
    def _keys(k_base, pe_base, offs_n, m, offs_c, s_kn, s_pn, HAS_PE: tl.constexpr, RELU: tl.constexpr):
        """k' = relu(k + pe) of one block of tokens (rows past N are zero)."""
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_c[None, :], mask=m[:, None], other=0.0)
        if HAS_PE:
            pe = tl.load(pe_base + offs_n[:, None] * s_pn + offs_c[None, :], mask=m[:, None], other=0.0)
            k = (k.to(tl.float32) + pe.to(tl.float32)).to(k.dtype)
        if RELU:
            k = tl.where(k > 0, k, 0.0).to(k.dtype)
        return k

    @triton.jit
    def _kv_sums(k_base, v_base, pe_base, start, s_kn, s_vn, s_pn, N: tl.constexpr, C: tl.constexpr,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, HAS_PE: tl.constexpr,
                 RELU: tl.constexpr):
        """k'^T v (C, D) and the token sum of k' (C,) over BLOCKS blocks from token `start`, fp32."""
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        kv = tl.zeros((C, D), dtype=tl.float32)
        ksum = tl.zeros((C,), dtype=tl.float32)
        for i in range(BLOCKS):
            offs_n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            m = offs_n < N
            k = _keys(k_base, pe_base, offs_n, m, offs_c, s_kn, s_pn, HAS_PE, RELU)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=m[:, None], other=0.0)
            kv += tl.dot(tl.trans(k), v)
            ksum += tl.sum(k.to(tl.float32), axis=0)
        return kv, ksum

    @triton.jit
    def _sla_kv_kernel(
        K, V, PE, PKV, PKS,
        s_kb, s_kn, s_vb, s_vn, s_pn,
        N: tl.constexpr, HEADS: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        CHUNK: tl.constexpr, HAS_PE: tl.constexpr, RELU: tl.constexpr,
    ):
        # partial k'^T v and token sums of one chunk of CHUNK blocks of one image and head
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // HEADS
        h = bh % HEADS
        kv, ksum = _kv_sums(K + b * s_kb + h * C, V + b * s_vb + h * D, PE + h * C, sp * CHUNK * BLOCK_N,
                            s_kn, s_vn, s_pn, N, C, D, BLOCK_N, CHUNK, HAS_PE, RELU)
        row = bh * tl.num_programs(1) + sp
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        tl.store(PKV + (row * C + offs_c[:, None]) * D + offs_d[None, :], kv)
        tl.store(PKS + row * C + offs_c, ksum)

    @triton.jit
    def _sla_norm_kernel(PKV, PKS, KVS, WN, SN, N: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                         SPLIT: tl.constexpr):
        # the partial sums of one head reduced and normalised: k'^T v / (N s) in the model's dtype,
        # mean(k') / s and s in fp32
        bh = tl.program_id(0)
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        kv = tl.zeros((C, D), dtype=tl.float32)
        ksum = tl.zeros((C,), dtype=tl.float32)
        for sp in range(SPLIT):
            row = bh * SPLIT + sp
            kv += tl.load(PKV + (row * C + offs_c[:, None]) * D + offs_d[None, :])
            ksum += tl.load(PKS + row * C + offs_c)
        kmean = ksum * (1.0 / N)
        s = tl.maximum(tl.sum(kmean, axis=0), 6.103515625e-05)  # 2^-14, as the reference clamps it
        tl.store(KVS + (bh * C + offs_c[:, None]) * D + offs_d[None, :],
                 (kv * ((1.0 / N) / s)).to(KVS.dtype.element_ty))
        tl.store(WN + bh * C + offs_c, kmean / s)
        tl.store(SN + bh, s)

    @triton.jit
    def _sla_mixed_kernel(
        Q, K, V, PE, WT, BIAS, KVS, WN, SN, Out, eps,
        s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_pn, s_ob, s_on, w_hs, b_hs,
        N: tl.constexpr, HEADS: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        GW: tl.constexpr, GH: tl.constexpr, KS: tl.constexpr, PAD: tl.constexpr,
        HAS_PE: tl.constexpr, HAS_DWC: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
        INLINE: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_Q: tl.constexpr, S_VN: tl.constexpr,
        UNROLL: tl.constexpr, TILE_W: tl.constexpr,
    ):
        # one program: BLOCK_Q queries of one image and head. N, the grid and v's token stride S_VN
        # are compile-time constants: static in these models (one kernel per stage)
        inv_n = 1.0 / N
        bh = tl.program_id(0)
        b = bh // HEADS
        h = bh % HEADS
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        v_base = V + b * s_vb + h * D
        if INLINE:
            kv, ksum = _kv_sums(K + b * s_kb + h * C, v_base, PE + h * C, 0, s_kn, s_vn, s_pn,
                                N, C, D, BLOCK_N, BLOCKS, HAS_PE, RELU)
            kmean = ksum * inv_n
            s = tl.maximum(tl.sum(kmean, axis=0), 6.103515625e-05)  # 2^-14, as the reference clamps it
            w = kmean / s
            kvs = (kv * (inv_n / s)).to(Q.dtype.element_ty)
        else:
            kvs = tl.load(KVS + (bh * C + offs_c[:, None]) * D + offs_d[None, :])
            w = tl.load(WN + bh * C + offs_c)
            s = tl.load(SN + bh)
        if TILE_W > 0:
            # a tile of BLOCK_Q // TILE_W grid rows of TILE_W tokens (columns past the grid masked)
            tiles_x: tl.constexpr = (GW + TILE_W - 1) // TILE_W
            loc = tl.arange(0, BLOCK_Q)
            ty = (tl.program_id(1) // tiles_x) * (BLOCK_Q // TILE_W) + loc // TILE_W
            tx = (tl.program_id(1) % tiles_x) * TILE_W + loc % TILE_W
            mq = (ty < GH) & (tx < GW)
            offs_q = tl.where(mq, ty * GW + tx, 0)
        else:
            offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
            mq = offs_q < N
            ty = offs_q // GW
            tx = offs_q % GW
        q = tl.load(Q + b * s_qb + h * C + offs_q[:, None] * s_qn + offs_c[None, :], mask=mq[:, None],
                    other=0.0)
        if RELU:
            q = tl.where(q > 0, q, 0.0).to(kvs.dtype)
        num = tl.dot(q, kvs)
        den = tl.sum(q.to(tl.float32) * w[None, :], axis=1) + eps * inv_n / s
        out = num / den[:, None]
        if HAS_DWC:
            # tap (i, j) of query t reads token t + (i - PAD) * GW + (j - PAD) where that stays on the
            # grid: one pointer tile for every tap, each tap's offset a compile-time constant. UNROLL
            # unrolls the taps (faster for small tiles); a loop keeps the registers of big tiles
            # from spilling (the unrolled taps of a 64-token tile at head size 64 spill, ptxas -v)
            v_rows = v_base + offs_q[:, None] * S_VN + offs_d[None, :]
            w_base = WT + h * w_hs + offs_d * (KS * KS)
            if UNROLL:
                for i in tl.static_range(KS):
                    my = mq & (ty + (i - PAD) >= 0) & (ty + (i - PAD) < GH)
                    for j in tl.static_range(KS):
                        mt = my & (tx + (j - PAD) >= 0) & (tx + (j - PAD) < GW)
                        vt = tl.load(v_rows + ((i - PAD) * GW + (j - PAD)) * S_VN, mask=mt[:, None],
                                     other=0.0)
                        out += vt.to(tl.float32) * tl.load(w_base + (i * KS + j)).to(tl.float32)[None, :]
            else:
                for i in range(KS):
                    my = mq & (ty + (i - PAD) >= 0) & (ty + (i - PAD) < GH)
                    for j in range(KS):
                        mt = my & (tx + (j - PAD) >= 0) & (tx + (j - PAD) < GW)
                        vt = tl.load(v_rows + ((i - PAD) * GW + (j - PAD)) * S_VN, mask=mt[:, None],
                                     other=0.0)
                        out += vt.to(tl.float32) * tl.load(w_base + (i * KS + j)).to(tl.float32)[None, :]
            if HAS_BIAS:
                out += tl.load(BIAS + h * b_hs + offs_d).to(tl.float32)[None, :]
        tl.store(Out + b * s_ob + h * D + offs_q[:, None] * s_on + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mq[:, None])


def launch_config(b: int, n: int, heads: int, c: int) -> dict[str, Any]:
    """The launch `launch` uses for B = b images of n tokens, `heads` heads of size c (see LAUNCH).

    Chosen from a sweep of launch configurations at every SLA shape of the zoo, batch 1 and 64
    (NVIDIA H100, 2026-12-07, docs/benchmarks.md; batches in between were not swept):
      - few heads in flight (b * heads < FEW_HEADS: batch 1): 32-query tiles, taps unrolled: more
        programs for a GPU that is mostly idle (PVT-T's 49-token stage 8.8 -> 6.1 us, the others 7-12%);
      - many: heads of 2-4 blocks split the k'^T v sums over one-block chunks instead of recomputing
        them in every program (SLAB-DeiT-S's blocks 118 -> 86 us at batch 64); long heads keep the
        three kernels with 32-query tiles, the taps a loop at head size 32 (with 2 warps) and unrolled
        at 64 (PVT-T's 3136-token stage 184 -> 164 us); one-block heads (49 tokens) a 64-query tile.
    """
    blocks = -(-n // BLOCK)
    if b * heads < FEW_HEADS:
        return {"block_q": 32, "unroll": True, "inline": blocks <= INLINE_BLOCKS}
    if blocks == 1:
        return {"block_q": BLOCK, "unroll": False, "inline": True}
    if blocks <= INLINE_BLOCKS:
        return {"block_q": BLOCK, "unroll": False, "inline": False, "chunk_blocks": 1}
    if c <= 32:
        return {"block_q": 32, "unroll": False, "num_warps": 2, "inline": False}
    return {"block_q": 32, "unroll": True, "inline": False}


def plan(b: int, n: int, heads: int, c: int, d: int, *, side: int, grid_h: int, grid_w: int,
         v_stride: int, has_pe: bool, has_dwc: bool, has_bias: bool, relu: bool,
         config: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The launch of the query kernel: (the LAUNCH keys, its compile-time constants, Triton's options),
    `launch_config`'s choice with `config` over it."""
    cfg = {**LAUNCH, **launch_config(b, n, heads, c), **(config or {})}
    unknown = set(cfg) - set(LAUNCH)
    if unknown:
        raise ValueError(f"unknown launch keys {sorted(unknown)}; known: {', '.join(LAUNCH)}")
    tile_w = int(cfg["tile_w"]) if has_dwc and grid_w > 1 else 0
    if tile_w and (tile_w & (tile_w - 1) or int(cfg["block_q"]) % tile_w):
        raise ValueError(f"tile_w={tile_w} must be a power of two dividing block_q={cfg['block_q']}")
    consts = dict(N=n, HEADS=heads, C=c, D=d, BLOCK_N=BLOCK, GW=max(grid_w, 1), GH=max(grid_h, 1), KS=side,
                  PAD=side // 2, HAS_PE=has_pe, HAS_DWC=has_dwc, HAS_BIAS=has_bias, RELU=relu,
                  INLINE=bool(cfg["inline"]), BLOCKS=-(-n // BLOCK), BLOCK_Q=int(cfg["block_q"]),
                  S_VN=v_stride, UNROLL=bool(cfg["unroll"]), TILE_W=tile_w)
    options = {} if cfg["num_warps"] is None else {"num_warps": int(cfg["num_warps"])}
    return cfg, consts, options


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float,
           pe: torch.Tensor | None = None, weight: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, grid_h: int = 0, grid_w: int = 0,
           relu: bool = False, config: dict[str, Any] | None = None) -> torch.Tensor:
    """Run the kernels on q, k (B, N, heads*c), v (B, N, heads*d) and the optional pe, DWC weight and
    bias (see `supports`); returns (B, N, heads*d). Needs Triton; on CPU tensors only under Triton's
    interpreter (TRITON_INTERPRET=1, for tests). The launch is `launch_config`'s; `config` overrides
    any of its keys (LAUNCH), for tuning and tests."""
    if triton is None:
        raise RuntimeError("the fused SLA kernel needs Triton (pip install triton)")
    b, n, cq = q.shape
    cv = v.shape[-1]
    c, d = cq // heads, cv // heads
    side = weight.shape[-1] if weight is not None else 1
    cfg, consts, options = plan(b, n, heads, c, d, side=side, grid_h=grid_h, grid_w=grid_w,
                                v_stride=v.stride(1), has_pe=pe is not None, has_dwc=weight is not None,
                                has_bias=bias is not None, relu=relu, config=config)
    blocks = consts["BLOCKS"]
    out = torch.empty(b, n, cv, device=q.device, dtype=q.dtype)
    dummy = q  # a pointer for absent tensors; the kernels never read it
    pe_t = pe if pe is not None else dummy
    w_t = weight if weight is not None else dummy
    b_t = bias if bias is not None else dummy
    w_hs = 0 if weight is None or weight.shape[0] == d else d * side * side
    b_hs = 0 if bias is None or bias.shape[0] == d else d
    if consts["INLINE"]:
        kvs, wn, sn = dummy, dummy, dummy
    else:
        chunk = int(cfg["chunk_blocks"])
        split = triton.cdiv(blocks, chunk)
        pkv = torch.empty(b * heads * split, c, d, device=q.device, dtype=torch.float32)
        pks = torch.empty(b * heads * split, c, device=q.device, dtype=torch.float32)
        _sla_kv_kernel[(b * heads, split)](
            k, v, pe_t, pkv, pks, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            pe_t.stride(1) if pe is not None else 0,
            N=n, HEADS=heads, C=c, D=d, BLOCK_N=BLOCK, CHUNK=chunk, HAS_PE=pe is not None, RELU=relu,
        )
        kvs = torch.empty(b * heads, c, d, device=q.device, dtype=q.dtype)
        wn = torch.empty(b * heads, c, device=q.device, dtype=torch.float32)
        sn = torch.empty(b * heads, device=q.device, dtype=torch.float32)
        _sla_norm_kernel[(b * heads,)](pkv, pks, kvs, wn, sn, N=n, C=c, D=d, SPLIT=split)
    tile_w, block_q = consts["TILE_W"], consts["BLOCK_Q"]
    tiles = (triton.cdiv(consts["GH"], block_q // tile_w) * triton.cdiv(consts["GW"], tile_w) if tile_w
             else triton.cdiv(n, block_q))
    _sla_mixed_kernel[(b * heads, tiles)](
        q, k, v, pe_t, w_t, b_t, kvs, wn, sn, out, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        pe_t.stride(1) if pe is not None else 0, out.stride(0), out.stride(1), w_hs, b_hs,
        **consts, **options,
    )
    return out


@torch.library.custom_op("slab_deploy::sla_mixed", mutates_args=())
def sla_mixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float,
              pe: torch.Tensor | None = None, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, grid_h: int = 0, grid_w: int = 0,
              relu: bool = False) -> torch.Tensor:
    """SLA's `mixed` attention on the token layout, fused (see the module docstring)."""
    return launch(q, k, v, heads, eps, pe, weight, bias, grid_h, grid_w, relu)


@sla_mixed.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float,
      pe: torch.Tensor | None = None, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
      grid_h: int = 0, grid_w: int = 0, relu: bool = False) -> Any:
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
