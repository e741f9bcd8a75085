"""The fused SLA kernel (models.sla_kernel): the same function as SLACore's `mixed` reference, judged
against fp64 by the tolerance table's half-precision row, at least as accurate as the reference path;
run through Triton's interpreter on the CPU (where Triton is installed) and on CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slab_deploy.models import sla_kernel
from slab_deploy.models.layers import SLACore, head_merge, head_split
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import tolerance_for

ROOT = Path(__file__).resolve().parent.parent
# (B, N, heads, head size, key scale): DeiT-S, a Swin-T window, a PVT-T stage-1 map, large keys
# (the output is invariant to their scale; the reference's fp16 reciprocal once went subnormal there)
SHAPES = [(2, 197, 6, 64, 1.0), (8, 49, 3, 32, 1.0), (1, 3136, 1, 64, 1.0), (2, 70, 2, 16, 300.0)]


def _fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    q, k, v = (head_split(t.double().cpu(), heads) for t in (q, k, v))
    den = q @ k.sum(-2, keepdim=True).transpose(-2, -1) + eps
    return head_merge((q @ (k.transpose(-2, -1) @ v)) / den, heads)


def _inputs(b: int, n: int, heads: int, c: int, scale: float, device: str) -> tuple[torch.Tensor, ...]:
    """q, relu'd k and v as the models pass them: q and k contiguous, v a view of the qkv output."""
    g = torch.Generator().manual_seed(n + c)
    qkv = torch.randn(b, n, 3 * heads * c, generator=g)
    q, k, v = qkv.to(device, torch.float16).split(heads * c, dim=-1)
    return q.relu(), (k.float().relu() * scale).half(), v


def _metrics(shape: tuple, device: str) -> dict[str, dict]:
    """fp64 reference vs the fused kernel and vs SLACore's `mixed` reference path."""
    b, n, heads, c, scale = shape
    q, k, v = _inputs(b, n, heads, c, scale, device)
    core = SLACore()
    core.policy, core.fused = "mixed", False
    ref = _fp64(q, k, v, heads, core.eps).numpy().reshape(b * n, -1)
    fused = sla_kernel.launch(q, k, v, heads, core.eps).double().cpu().numpy().reshape(b * n, -1)
    mixed = core.tokens(q, k, v, heads).double().cpu().numpy().reshape(b * n, -1)
    out = {}
    for name, cand in (("fused", fused), ("mixed", mixed)):
        m = compare(ref, cand)
        out[name] = {"sqnr_db": m.sqnr_db, "passed": judge(m, tolerance_for("torch_cuda", "fp16")).passed}
    return out


def _check(results: dict[str, dict]) -> None:
    for shape, r in results.items():
        assert r["fused"]["passed"], (shape, r)
        # the fused kernel keeps its normaliser and the division in fp32: no less accurate
        assert r["fused"]["sqnr_db"] >= r["mixed"]["sqnr_db"], (shape, r)


def test_fused_kernel_in_triton_interpreter() -> None:
    """The kernel's code through Triton's interpreter on CPU tensors (a fresh process: the interpreter
    is chosen when the kernel is defined)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (the fused SLA kernel is a CUDA path; CUDA torch wheels bring it)")
    script = (
        "import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import test_sla_kernel as t\n"
        "print(json.dumps({str(s): t._metrics(s, 'cpu') for s in t.SHAPES[:2] + t.SHAPES[3:]}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT), str(ROOT / "tests")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.cuda
def test_fused_kernel_on_cuda() -> None:
    if not sla_kernel.available():
        pytest.fail("CUDA is here but Triton is not: the fused SLA kernel cannot run")
    _check({str(s): _metrics(s, "cuda") for s in SHAPES})


@pytest.mark.cuda
def test_models_take_the_fused_path_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folded fp16 `mixed` SLAB-DeiT-T on CUDA runs the kernel (the op is called) and gives the
    logits of the reference path within the tolerance table's torch_cuda fp16 row."""
    from slab_deploy.export.steps import prepare_precision
    from slab_deploy.models import create_model
    from slab_deploy.passes.fold import fold_model
    from slab_deploy.weights import random_checkpoint

    ckpt = random_checkpoint("slab_deit_tiny", tmp_path / "c.pth", seed=5)
    model, _ = fold_model(create_model("slab_deit_tiny", ckpt))
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
        deploy = prepare_precision(model, "fp16", "mixed").cuda()
        calls = []
        real = sla_kernel.sla_mixed
        monkeypatch.setattr(sla_kernel, "sla_mixed", lambda *a: calls.append(1) or real(*a))
        fused = deploy(x.cuda()).float().cpu().numpy()
        monkeypatch.undo()
        for m in deploy.modules():
            if isinstance(m, SLACore):
                m.fused = False
        unfused = deploy(x.cuda()).float().cpu().numpy()
    assert len(calls) == 12
    for cand in (fused, unfused):
        v = judge(compare(ref, cand), tolerance_for("torch_cuda", "fp16"))
        assert v.passed, v


def test_kernel_is_chosen_where_it_was_measured_to_pay_off() -> None:
    """`pays_off` picks the fused kernel for the shapes it won on (SLAB-DeiT-S at batch 1 and 64, every
    stage of SLAB-Swin-T and SLAB-PVT-T at batch 1) and leaves the reference for those it lost on
    (SLAB-Swin-T's stages 1-3 and SLAB-PVT-T's stages 1-2 at batch 64)."""
    swin = [(64, 49, 3), (16, 49, 6), (4, 49, 12), (1, 49, 24)]  # windows per image, tokens, heads
    pvt = [(1, 3136, 1), (1, 784, 2), (1, 196, 5), (1, 49, 8)]
    assert sla_kernel.pays_off(1, 197, 6) and sla_kernel.pays_off(64, 197, 6)
    assert all(sla_kernel.pays_off(w, n, h) for w, n, h in swin + pvt)
    assert not any(sla_kernel.pays_off(64 * w, n, h) for w, n, h in swin[:3] + pvt[:2])


def test_trace_counts_the_kernel_as_fused_attention() -> None:
    """`trace` files the kernel (Triton names it after its function) and the op with fused attention."""
    from slab_deploy.bench.categories import ATEN_CATEGORIES, categorize

    assert "def _sla_mixed_kernel(" in Path(sla_kernel.__file__).read_text()
    assert categorize("_sla_mixed_kernel") == "fused attention"
    assert categorize("slab_deploy::sla_mixed", ATEN_CATEGORIES) == "fused attention"
