"""SLA's normalised product as one fused Triton kernel: the torch path of the `mixed` policy on CUDA.

`SLACore.tokens` runs it when it can and pays off (a CUDA fp16/bf16 model under `mixed`, Triton
importable, head sizes 16-128 and a power of two, shapes within `pays_off`, not being traced, exported
or compiled: torch.compile fuses the reference itself, and measured slightly faster so) and the
reference graph of `SLACore.forward` otherwise; an exported ONNX graph is always the reference.
One program per (image, head, block of 64 queries) reads its head's k and v in the token layout
(B, N, heads*c) the qkv projection wrote: k^T v and the token mean of k accumulate in fp32 registers,
the normaliser is fp32, and q . (k^T v) runs on the tensor cores from fp16 with fp32 accumulation. It
writes the output in the token layout too, so the head split and merge copies of the reference path and
its dozen small normaliser kernels are gone.

The function is the reference's, normalised per head as `mixed` is (s = sum_c mean(k)_c):
    out = q (k^T v / (N s)) / (q . (mean(k) / s) + eps / (N s))
With s >= 2^-14 every fp16 value it stores is bounded by max|v|: k^T v / (N s) row c is at most
(mean(k)_c / s) max|v|.

`sla_mixed` is registered as the torch custom op `slab_deploy::sla_mixed` (one named call in profiles;
torch.compile would keep it opaque), and CUDA graphs capture its launch.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # Triton comes with the CUDA wheels of torch; CPU-only installs run the reference path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 64  # tokens per tile (queries per program; keys per step of the k^T v loop)
HEAD_SIZES = (16, 32, 64, 128)  # tl.dot needs powers of two >= 16; 128 bounds the fp32 (c, d) tile


# Where the kernel pays off (H200, torch CUDA graphs, fp16, 2026-12-03; docs/benchmarks.md): every
# program recomputes its head's k^T v over all N tokens, and each is a small latency-bound unit. Measured
# with every layer fused, it won for SLAB-DeiT-S at batch 1 and 64 (at most 1536 programs of 4 query
# blocks) and for SLAB-Swin-T and SLAB-PVT-T at batch 1 (a few hundred programs at most; PVT-T's first
# stage 49 programs of 49 blocks), and lost at batch 64 for SLAB-Swin-T (3072-12288 small programs in
# stages 1-3) and SLAB-PVT-T (its 3136-token stage: 3136 programs each recomputing k^T v over 49
# blocks). So it runs where the programs are at most MAX_PROGRAMS and programs x query blocks (the
# k^T v work) at most MAX_WORK, the reference path elsewhere.
MAX_PROGRAMS = 1536
MAX_WORK = 6144


def pays_off(batch: int, n: int, heads: int) -> bool:
    """Whether the fused kernel is chosen for `batch` images of `heads` heads over `n` tokens."""
    blocks = -(-n // BLOCK)
    programs = batch * heads * blocks
    return programs <= MAX_PROGRAMS and programs * blocks <= MAX_WORK


def available() -> bool:
    """Whether the fused kernel can run here at all (Triton importable)."""
    return triton is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether `sla_mixed` takes these (B, N, heads*c) tensors: same B and N, head sizes in
    HEAD_SIZES, unit stride along channels, fp16/bf16 on one CUDA device, and shapes where it pays
    off (`pays_off`)."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        return False
    if q.shape[-1] % heads or v.shape[-1] % heads:
        return False
    c, d = q.shape[-1] // heads, v.shape[-1] // heads
    return (
        c in HEAD_SIZES and d in HEAD_SIZES and pays_off(q.shape[0], q.shape[1], heads)
        and all(t.is_cuda and t.dtype == q.dtype and t.stride(-1) == 1 for t in (q, k, v))
        and q.dtype in (torch.float16, torch.bfloat16)
    )


if triton is not None:

    @triton.jit
    def _sla_mixed_kernel(
        Q, K, V, Out, eps,
        s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on,
        N: tl.constexpr, HEADS: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # N is a compile-time constant: static in these models (one kernel per stage's token count)
        inv_n = 1.0 / N
        bh = tl.program_id(0)
        b = bh // HEADS
        h = bh % HEADS
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        k_base = K + b * s_kb + h * C
        v_base = V + b * s_vb + h * D
        kv = tl.zeros((C, D), dtype=tl.float32)
        ksum = tl.zeros((C,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            m = offs_n < N
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_c[None, :], mask=m[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=m[:, None], other=0.0)
            kv += tl.dot(tl.trans(k), v)
            ksum += tl.sum(k.to(tl.float32), axis=0)
        kmean = ksum * inv_n
        s = tl.maximum(tl.sum(kmean, axis=0), 6.103515625e-05)  # 2^-14, as the reference clamps it
        w = kmean / s
        kvs = (kv * (inv_n / s)).to(Q.dtype.element_ty)
        offs_q = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mq = offs_q < N
        q = tl.load(Q + b * s_qb + h * C + offs_q[:, None] * s_qn + offs_c[None, :], mask=mq[:, None],
                    other=0.0)
        num = tl.dot(q, kvs)
        den = tl.sum(q.to(tl.float32) * w[None, :], axis=1) + eps * inv_n / s
        out = num / den[:, None]
        tl.store(Out + b * s_ob + h * D + offs_q[:, None] * s_on + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mq[:, None])


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """Run the kernel on (B, N, heads*c) q, k and (B, N, heads*d) v; returns (B, N, heads*d).
    Needs Triton; on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if triton is None:
        raise RuntimeError("the fused SLA kernel needs Triton (pip install triton)")
    b, n, cq = q.shape
    cv = v.shape[-1]
    out = torch.empty(b, n, cv, device=q.device, dtype=q.dtype)
    grid = (b * heads, triton.cdiv(n, BLOCK))
    _sla_mixed_kernel[grid](
        q, k, v, out, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        N=n, HEADS=heads, C=cq // heads, D=cv // heads, BLOCK_N=BLOCK,
    )
    return out


@torch.library.custom_op("slab_deploy::sla_mixed", mutates_args=())
def sla_mixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """SLA's `mixed` product per head on the token layout, fused (see the module docstring)."""
    return launch(q, k, v, heads, eps)


@sla_mixed.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float) -> Any:
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
