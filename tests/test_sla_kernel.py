"""The fused SLA kernel (models.sla_kernel): the same function as SLACore's `mixed` reference, judged
against fp64 by the tolerance table's half-precision row, at least as accurate as the reference path;
run through Triton's interpreter on the CPU (where Triton is installed) and on CUDA."""

from __future__ import annotations

import copy
import functools
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import import_tool
from torch import nn

from slab_deploy.models import sla_kernel
from slab_deploy.models.layers import SLACore, dwc_weights
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import tolerance_for

ROOT = Path(__file__).resolve().parent.parent
# (B, N, heads, head size, grid, key scale, LePE kernel): DeiT-S; a window of 49 tokens; PVT-T's
# 3136-token stage 1 (the three-kernel path); a 400-token map on that path with CSWin's LePE in the
# conv; large keys on a grid that is not square (the output is invariant to their scale; the
# reference's fp16 reciprocal once went subnormal there)
# (batch, tokens, heads, head size, grid, scale of k, LePE kernel or 0[, folded]): a folded shape's convs
# have no bias, as `passes.move_biases` leaves them in every folded model
SHAPES = [(2, 196, 6, 64, (14, 14), 1.0, 0), (8, 49, 3, 32, (7, 7), 1.0, 0, True),
          (1, 3136, 1, 64, (56, 56), 1.0, 0), (1, 400, 2, 16, (20, 20), 1.0, 3),
          (2, 70, 2, 16, (7, 10), 300.0, 0, True)]
INTERPRETED = [0, 1, 3, 4]  # the 3136-token map takes minutes in Triton's interpreter


def _inputs(shape: tuple, device: str) -> tuple[torch.Tensor, ...]:
    """q, k, v as the models pass them (the projection's output, before the ReLUs: q and k views of
    it, v too), the positional encoding, the DWC (randomised weights and bias, shared by the heads)
    and CSWin's LePE (or None), in fp16 on `device`; without conv biases where the shape is folded."""
    b, n, heads, c, grid, scale, lepe, *folded = shape
    g = torch.Generator().manual_seed(n + c)
    qkv = torch.randn(b, n, 3 * heads * c, generator=g)
    qkv[..., heads * c:2 * heads * c] *= scale
    q, k, v = qkv.to(device, torch.float16).split(heads * c, dim=-1)
    pe = (0.5 * torch.randn(1, n, heads * c, generator=g)).to(device, torch.float16)
    dwc = nn.Conv2d(c, c, 5, padding=2, groups=c)
    extra = nn.Conv2d(heads * c, heads * c, lepe, padding=lepe // 2, groups=heads * c) if lepe else None
    with torch.no_grad():
        for conv in (dwc, extra):
            if conv is not None:
                conv.weight.normal_(generator=g)
                conv.bias.normal_(generator=g)
                if folded and folded[0]:
                    conv.bias = None
    return q, k, v, pe, dwc.to(device, torch.float16), extra.to(device, torch.float16) if extra else None


def _on_cpu(x: torch.Tensor | nn.Module | None) -> torch.Tensor | nn.Module | None:
    """A CPU copy (Module.cpu moves a module in place: the fused call below needs it where it was)."""
    if isinstance(x, nn.Module):
        return copy.deepcopy(x).cpu()
    return None if x is None else x.cpu()


def _attend(core: SLACore, shape: tuple, args: tuple, dtype: torch.dtype) -> torch.Tensor:
    """SLACore.attend of `args` in `dtype` (convs copied, so fp16 ones stay fp16)."""
    q, k, v, pe, dwc, extra = args
    convs = [None if m is None else copy.deepcopy(m).to(dtype) for m in (dwc, extra)]
    q, k, v, pe = (t.to(dtype) for t in (q, k, v, pe))
    return core.attend(q, k, v, shape[2], pe, convs[0], shape[4], convs[1])


def _metrics(shape: tuple, device: str, config: dict | None = None) -> dict[str, dict]:
    """fp64 reference (SLACore.attend on the fp16 inputs) vs the fused kernels (launched as
    `sla_kernel.launch_config` picks, or with `config` over it) and vs the `mixed` reference path."""
    b, n, heads = shape[:3]
    args = _inputs(shape, device)
    ref_core, core = SLACore(), SLACore()
    core.policy, core.fused = "mixed", False
    with torch.no_grad():
        ref = _attend(ref_core, shape, tuple(_on_cpu(a) for a in args), torch.float64)
        q, k, v, pe, dwc, extra = args
        weight, bias = dwc_weights(dwc, heads, extra)
        assert sla_kernel.supports(q, k, v, heads, pe, weight, bias, shape[4]) == (device == "cuda")
        if config is None:
            fused = sla_kernel.sla_mixed(q, k, v, heads, core.eps, pe, weight, bias, *shape[4], True)
        else:
            fused = sla_kernel.launch(q, k, v, heads, core.eps, pe, weight, bias, *shape[4], True,
                                      config=config)
        mixed = _attend(core, shape, args, torch.float16)
    out = {}
    for name, cand in (("fused", fused), ("mixed", mixed)):
        m = compare(ref.numpy().reshape(b * n, -1), cand.double().cpu().numpy().reshape(b * n, -1))
        out[name] = {"sqnr_db": m.sqnr_db, "passed": judge(m, tolerance_for("torch_cuda", "fp16")).passed}
    return out


def _check(results: dict[str, dict]) -> None:
    for shape, r in results.items():
        assert r["fused"]["passed"], (shape, r)
        # the fused kernels keep the normaliser, the division and the conv in fp32: no less accurate
        assert r["fused"]["sqnr_db"] >= r["mixed"]["sqnr_db"], (shape, r)


def test_shapes_cover_both_paths() -> None:
    """The shapes above take the one-kernel path and the three-kernel one, in the interpreter too."""
    blocks = [-(-SHAPES[i][1] // sla_kernel.BLOCK) for i in INTERPRETED]
    assert min(blocks) <= sla_kernel.INLINE_BLOCKS < max(blocks)


def _interpreted(code: str, *args: str, timeout: int = 600) -> dict:
    """Run `code` (test_sla_kernel imported as `t`, extra arguments from sys.argv[3]) in a fresh process
    under Triton's interpreter (chosen when the kernels are defined), on CPU tensors; its last line
    printed, as JSON."""
    script = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
              "import test_sla_kernel as t\n" + code)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT), str(ROOT / "tests"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fused_kernel_in_triton_interpreter() -> None:
    """The kernel's code through Triton's interpreter on CPU tensors (a fresh process: the interpreter
    is chosen when the kernel is defined)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (the fused SLA kernel is a CUDA path; CUDA torch wheels bring it)")
    _check(_interpreted(
        "print(json.dumps({str(t.SHAPES[i]): t._metrics(t.SHAPES[i], 'cpu') for i in t.INTERPRETED}))\n"))


@functools.lru_cache(maxsize=1)
def _zoo_launches() -> list[tuple[tuple, dict]]:
    """(B, N, heads, head size, grid) and the launch `launch_config` picks for it, at every SLA shape of a
    forward of each family's SLAB model (read off the model), batch 1 and 64."""
    bench_sla_kernel = import_tool("bench_sla_kernel")  # reads the SLA calls off a real forward
    shapes = {key[:4] for name in bench_sla_kernel.MODELS for key in bench_sla_kernel.sla_calls(name)}
    return [((b, n, heads, c, grid), sla_kernel.launch_config(b, n, heads, c))
            for n, heads, c, grid in sorted(shapes) for b in (1, 64)]


def test_every_launch_in_triton_interpreter() -> None:
    """Every launch `launch_config` picks for the zoo (tile size, taps unrolled or looped, warps, one
    kernel or three, chunk size) computes the same function: each, forced onto the interpreted shapes
    (the one-kernel path's and the three-kernel path's, with and without CSWin's LePE), passes the
    tolerance table's half-precision row against fp64 and is at least as accurate as the reference."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (the fused SLA kernel is a CUDA path; CUDA torch wheels bring it)")
    configs = {json.dumps(cfg, sort_keys=True) for _, cfg in _zoo_launches()}
    assert len(configs) >= 4  # batch 1 and 64, one-block, short and long heads pick different launches
    results = _interpreted(
        "out = {}\n"
        "for cfg in json.loads(sys.argv[3]):\n"
        "    for i in (3, 4):\n"
        "        for inline in (True, False):\n"
        "            c = dict(json.loads(cfg), inline=inline)\n"
        "            out[cfg + str(t.SHAPES[i]) + str(inline)] = t._metrics(t.SHAPES[i], 'cpu', c)\n"
        "print(json.dumps(out))\n", json.dumps(sorted(configs)), timeout=900)
    assert len(results) == 4 * len(configs)
    _check(results)


def test_grid_row_tiles_in_triton_interpreter() -> None:
    """Query tiles of several grid rows (`tile_w`) compute the same function as runs of consecutive
    tokens: on a grid that the tile width does not divide (20 x 20 with CSWin's LePE, 7 x 10 with large
    keys), one kernel and three, each passes the half-precision row against fp64 and is at least as
    accurate as the reference; a width that does not divide the tile is refused."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (the fused SLA kernel is a CUDA path; CUDA torch wheels bring it)")
    configs = [{"block_q": 32, "tile_w": 8, "unroll": False}, {"block_q": 64, "tile_w": 16, "inline": False},
               {"block_q": 16, "tile_w": 2, "inline": False, "chunk_blocks": 1}]
    # the tiles reach the kernel (a DWC on a grid), and only there
    for cfg in configs:
        for has_dwc, tile_w in ((True, cfg["tile_w"]), (False, 0)):
            _, consts, _ = sla_kernel.plan(2, 70, 2, 16, 16, side=5, grid_h=7, grid_w=10, v_stride=96,
                                           has_pe=True, has_dwc=has_dwc, has_bias=has_dwc, relu=True,
                                           config=cfg)
            assert consts["TILE_W"] == tile_w
    results = _interpreted(
        "print(json.dumps({json.dumps(c) + str(t.SHAPES[i]): t._metrics(t.SHAPES[i], 'cpu', c)\n"
        "                  for c in json.loads(sys.argv[3]) for i in (3, 4)}))\n", json.dumps(configs))
    assert len(results) == 2 * len(configs)
    _check(results)
    with pytest.raises(ValueError, match="tile_w=24"):
        sla_kernel.plan(1, 400, 2, 16, 16, side=5, grid_h=20, grid_w=20, v_stride=96, has_pe=True,
                        has_dwc=True, has_bias=True, relu=True, config={"block_q": 32, "tile_w": 24})


def _ptxas(consts: dict, options: dict, workdir: Path) -> tuple[int, int]:
    """(registers, spill-store bytes) of the query kernel compiled ahead of time for sm_90a (Hopper) by
    Triton, as ptxas -v reports them; no GPU needed."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = sla_kernel._sla_mixed_kernel
    fp32 = {"WN", "SN", "eps"}
    pointers = {"Q", "K", "V", "PE", "WT", "BIAS", "KVS", "WN", "SN", "Out"}
    signature = {a: "constexpr" if a in consts else ("*" if a in pointers else "") + ("fp32" if a in fp32 else
                 "fp16" if a in pointers else "i32") for a in fn.arg_names}
    # fp fusion on, as Triton has it by default when it compiles for a launch (said explicitly: Triton
    # 3.9 warns that its default will change)
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={**options, "enable_fp_fusion": True})
    ptx = workdir / "sla_query.ptx"
    ptx.write_text(kernel.asm["ptx"])
    cmd = [get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(workdir / "sla_query.o")]
    log = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stderr
    registers, spilled = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    assert registers and spilled, log
    return int(registers.group(1)), int(spilled.group(1))


def test_zoo_launches_do_not_spill_registers_on_hopper(tmp_path: Path) -> None:
    """The query kernel as launched at every SLA shape of the zoo keeps its tiles in registers on an
    H100/H200: compiled ahead of time for sm_90a, ptxas reports no spill stores. (The first launch, a
    64-query tile with every tap of the 5x5 DWC unrolled, used all 255 registers and spilled 1.8-2.9 KB
    per thread at head size 64.)"""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (the fused SLA kernel is a CUDA path; CUDA torch wheels bring it)")
    # folded models launch without the DWC bias (passes.move_biases moves it), unfolded ones with it
    for ((b, n, heads, c, grid), _), has_bias in itertools.product(_zoo_launches(), (False, True)):
        _, consts, options = sla_kernel.plan(b, n, heads, c, c, side=5, grid_h=grid[0], grid_w=grid[1],
                                             v_stride=3 * heads * c, has_pe=True, has_dwc=True,
                                             has_bias=has_bias, relu=True)
        registers, spilled = _ptxas(consts, options, tmp_path)
        assert spilled == 0, ((b, n, heads, c), consts, options, registers, spilled)


@pytest.mark.cuda
def test_fused_kernel_on_cuda() -> None:
    if not sla_kernel.available():
        pytest.fail("CUDA is here but Triton is not: the fused SLA kernel cannot run")
    _check({str(s): _metrics(s, "cuda") for s in SHAPES})


@pytest.mark.cuda
@pytest.mark.parametrize(("name", "blocks"), [("slab_deit_tiny", 12), ("slab_pvt_tiny", 8)])
def test_models_take_the_fused_path_on_cuda(name: str, blocks: int, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A folded fp16 `mixed` model on CUDA runs the kernels in every SLA block (PVT-T's first stage
    on the three-kernel path) and gives logits that pass the tolerance table's torch_cuda fp16 row
    against the fp32 model, as the reference path's do."""
    from slab_deploy.export.steps import prepare_precision
    from slab_deploy.models import create_model
    from slab_deploy.passes.fold import fold_model
    from slab_deploy.weights import random_checkpoint

    ckpt = random_checkpoint(name, tmp_path / "c.pth", seed=5)
    model, _ = fold_model(create_model(name, ckpt))
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
    assert len(calls) == blocks
    for cand in (fused, unfused):
        v = judge(compare(ref, cand), tolerance_for("torch_cuda", "fp16"))
        assert v.passed, v


class _Probe(nn.Module):
    """Returns 1 where SLACore would take the fused kernels, 0 where the reference graph."""

    def __init__(self) -> None:
        super().__init__()
        self.core = SLACore()
        self.core.policy = "mixed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0 + (1 if self.core._fused_here() else 0)


def test_kernel_mode_chooses_where_the_kernels_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLAB_DEPLOY_SLA_KERNEL: `auto` (or unset) runs the kernels eagerly and under a real torch.compile,
    `never` nowhere; a real torch.export (strict and not) and a TorchScript trace get the reference, as
    does another policy; a value that is not a mode is refused with one line naming the modes."""
    from slab_deploy.errors import ConfigError
    from slab_deploy.models import layers

    monkeypatch.setattr(sla_kernel, "available", lambda: True)
    probe, x = _Probe(), torch.ones(2)
    for kernel_mode, on in (("auto", 1.0), ("", 1.0), ("never", 0.0)):
        monkeypatch.setenv(sla_kernel.ENV, kernel_mode)
        torch._dynamo.reset()
        assert probe(x)[0].item() == on, kernel_mode
        assert torch.compile(probe, backend="eager")(x)[0].item() == on, kernel_mode
    monkeypatch.setenv(sla_kernel.ENV, "auto")
    if layers.EXPORT_FLAG_UNDER_DYNAMO:
        for strict in (False, True):
            assert torch.export.export(probe, (x,), strict=strict).module()(x)[0].item() == 0.0, strict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: the TorchScript exporter's
        assert torch.jit.trace(probe, (x,))(x)[0].item() == 0.0
    probe.core.policy = "fp32"
    assert probe(x)[0].item() == 0.0
    probe.core.policy = "mixed"
    monkeypatch.setenv(sla_kernel.ENV, "compile")  # a mode of an earlier version: refused, not guessed
    with pytest.raises(ConfigError, match="use one of auto, never$"):
        probe(x)


def test_trace_counts_the_kernels_as_fused_attention() -> None:
    """`trace` files the kernels (Triton names them after their functions) and the op with fused
    attention."""
    from slab_deploy.bench.categories import ATEN_CATEGORIES, categorize

    source = Path(sla_kernel.__file__).read_text()
    for name in ("_sla_mixed_kernel", "_sla_kv_kernel", "_sla_norm_kernel"):
        assert f"def {name}(" in source
        assert categorize(name) == "fused attention"
    assert categorize("slab_deploy::sla_mixed", ATEN_CATEGORIES) == "fused attention"


def test_onnx_exporter_refuses_the_op(tmp_path: Path) -> None:
    """Where a trace cannot be told from torch.compile (torch < 2.13), the op may reach an exporter: the
    ONNX one refuses it (the op has no ONNX translation) instead of writing a graph that needs it."""
    class Op(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return sla_kernel.sla_mixed(q, q, q, 1, 1e-6)

    with pytest.raises(torch.onnx.OnnxExporterError):
        torch.onnx.export(Op().eval(), (torch.ones(1, 64, 16, dtype=torch.float16),), tmp_path / "m.onnx",
                          dynamo=True)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name", ["test_slab_deit", "test_slab_pvt", "test_slab_cswin"])
def test_kernel_bench_reads_the_sla_calls_off_the_model(name: str, tmp_path: Path) -> None:
    """tools/bench_sla_kernel.py times the shapes a real forward calls SLA with: one call per SLA module
    (CSWin's two stripe branches included), each on its token grid."""
    bench_sla_kernel = import_tool("bench_sla_kernel")  # reads the SLA calls off a real forward
    from slab_deploy.models import create_model
    from slab_deploy.weights import random_checkpoint

    calls = bench_sla_kernel.sla_calls(name)
    model = create_model(name, random_checkpoint(name, tmp_path / "c.pth", seed=0))
    assert sum(calls.values()) == sum(isinstance(m, SLACore) for m in model.modules()) > 0
    for n, heads, c, grid, _ in calls:
        assert grid[0] * grid[1] == n and heads >= 1 and c >= 1
