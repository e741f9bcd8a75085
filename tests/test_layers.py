"""Shared layers: RepBN's eval affine, SLA's core against a direct formula, its half-precision policies,
the shared DWC of all heads against the per-head conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slab_deploy.models.layers import RepBN, SLACore, head_merge, head_split, repbn_affine, shared_dwc


def _direct_sla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    z = 1.0 / ((q * k.sum(1, keepdim=True)).sum(-1, keepdim=True) + eps)
    return (q @ (k.transpose(1, 2) @ v)) * z


@pytest.mark.parametrize("n, d", [(196, 64), (8, 64)])  # both association orders
def test_sla_core_matches_formula(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, n, d, generator=g).relu() for _ in range(3))
    core = SLACore()
    assert core.kv_first(n, d, d) == (n > d)
    torch.testing.assert_close(core(q, k, v).double(), _direct_sla(q, k, v), rtol=1e-5, atol=1e-6)


def test_sla_half_policies() -> None:
    """With large keys (the output is invariant to their scale), fp16 without fp32 islands overflows;
    the fp32 and mixed policies stay close to the fp64 result."""
    g = torch.Generator().manual_seed(1)
    n, d = 3136, 32
    q = torch.randn(4, n, d, generator=g).relu()
    k = torch.randn(4, n, d, generator=g).relu() * 300
    v = torch.randn(4, n, d, generator=g)
    ref = _direct_sla(q, k, v)
    core = SLACore()
    results = {}
    for policy in ("native", "fp32", "mixed"):
        core.policy = policy
        results[policy] = core(q.half(), k.half(), v.half()).double()
    assert not torch.isfinite(results["native"]).all() or (results["native"] - ref).abs().max() > 0.1
    for policy in ("fp32", "mixed"):
        out = results[policy]
        assert torch.isfinite(out).all(), policy
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
        assert cos > 0.9999, (policy, float(cos))


def test_mixed_normaliser_cannot_overflow() -> None:
    """q . mean(k) far beyond the fp16 range (here ~1e6) with a small v, so the output is in range:
    the mixed policy's normaliser runs on mean(k) scaled to sum 1 and stays exact, where an fp16
    q . mean(k) would be inf and zero the output."""
    g = torch.Generator().manual_seed(5)
    n, d = 196, 64
    q = torch.rand(4, n, d, generator=g) * 300
    k = torch.rand(4, n, d, generator=g) * 300
    v = torch.rand(4, n, d, generator=g) * 0.01
    assert float((q.double() @ k.double().mean(1, keepdim=True).transpose(1, 2)).min()) > 65504
    ref = _direct_sla(q, k, v)
    core = SLACore()
    core.policy = "mixed"
    out = core(q.half(), k.half(), v.half()).double()
    assert torch.isfinite(out).all()
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.9999, float(cos)


def test_policy_does_not_touch_fp32() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 49, 16, generator=g).relu() for _ in range(3))
    core = SLACore()
    base = core(q, k, v)
    for policy in ("fp32", "mixed"):
        core.policy = policy
        torch.testing.assert_close(core(q, k, v), base, rtol=0, atol=0)


def test_head_split_roundtrip_is_batch_major() -> None:
    x = torch.arange(2 * 5 * 12, dtype=torch.float32).reshape(2, 5, 12)
    h = head_split(x, 3)
    assert h.shape == (6, 5, 4)
    torch.testing.assert_close(h[1], x[0, :, 4:8])  # (b=0, head=1)
    torch.testing.assert_close(head_merge(h, 3), x)


def test_repbn_eval_is_the_affine() -> None:
    torch.manual_seed(0)
    m = RepBN(8)
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2)
    m.bn.weight.data.uniform_(0.5, 1.5)
    m.bn.bias.data.normal_()
    m.alpha.data.fill_(0.3)
    m.eval()
    x = torch.randn(3, 7, 8)
    a, b = repbn_affine(m)
    torch.testing.assert_close(m(x).double(), x.double() * a + b, rtol=1e-6, atol=1e-6)


def test_mixed_policy_keeps_tokens_with_no_query_finite() -> None:
    """A token whose relu(q) is all zero has z = N/eps, beyond fp16: the mixed policy's fp16 scaling
    caps z, so the token's output is 0, not 0 * inf = NaN."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 49, 16, generator=g).relu() for _ in range(3))
    q[:, 5] = 0.0
    q[:, 6] = 1e-7  # q.mean(k) far below 1/65504: the capped product stays below max|v|
    core = SLACore()
    core.policy = "mixed"
    out = core(q.half(), k.half(), v.half())
    assert torch.isfinite(out).all()
    assert (out[:, 5] == 0).all() and out[:, 6].abs().max() <= v.abs().max()
    ref = _direct_sla(q, k, v)
    ok = torch.ones(49, dtype=torch.bool)
    ok[5:7] = False
    cos = F.cosine_similarity(out[:, ok].double().flatten(), ref[:, ok].flatten(), dim=0)
    assert cos > 0.9999, float(cos)


@pytest.mark.parametrize("with_lepe", [False, True])
def test_shared_dwc_is_the_per_head_conv(with_lepe: bool) -> None:
    """One depthwise conv over all heads (kernel tiled per head, CSWin's 3x3 LePE added into it)
    equals the authors' conv of each head's v, plus the LePE conv of the whole map."""
    torch.manual_seed(4)
    b, heads, d, (h, w) = 3, 3, 4, (4, 5)
    dwc = nn.Conv2d(d, d, 5, padding=2, groups=d)
    lepe = nn.Conv2d(heads * d, heads * d, 3, padding=1, groups=heads * d) if with_lepe else None
    for m in (dwc, lepe):
        if m is not None:
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    v = torch.randn(b, h * w, heads * d)
    vh = head_split(v, heads)  # (B heads, N, d)
    ref = head_merge(dwc(vh.transpose(1, 2).reshape(-1, d, h, w)).flatten(2).transpose(1, 2), heads)
    if lepe is not None:
        ref = ref + lepe(v.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = shared_dwc(v, dwc, (h, w), heads, extra=lepe)
    assert got.shape == v.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
