"""Sweep the fused SLA kernels' launch (`sla_kernel.LAUNCH` keys) at the SLA shapes of the zoo, on CUDA.

    PYTHONPATH=. python tools/sweep_sla_launch.py [OUT_DIR] [BATCHES] [MIN_TOKENS] [CANDIDATES]
    # BATCHES default 1,64; only the shapes of at least MIN_TOKENS tokens (default: all); CANDIDATES a
    # comma-separated subset of the names below (default: all)

For every SLA shape a forward of each family's SLAB model calls (`bench_sla_kernel.sla_calls`) and
every batch, times `launch_config`'s choice ("auto") and the candidates below under CUDA graphs
(Triton's do_bench_cudagraph), judges each one's output (the chosen launch's too) against the fp64
reference path by the tolerance table's torch_cuda fp16 row, as tests/test_sla_kernel.py does, and
prints the fastest of those that pass (and any that fail).
Writes OUT_DIR/sweep.json. `launch_config`'s rule comes from such a sweep; run it on another GPU to see
whether the rule holds there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

from bench_sla_kernel import MODELS, sla_calls  # noqa: E402
from test_sla_kernel import _attend, _inputs  # noqa: E402

from slab_deploy.models import sla_kernel  # noqa: E402
from slab_deploy.models.layers import SLACore, dwc_weights  # noqa: E402
from slab_deploy.parity import compare, judge  # noqa: E402
from slab_deploy.tolerances import tolerance_for  # noqa: E402

CANDIDATES: dict[str, dict] = {
    "q64_unrolled": {"block_q": 64, "unroll": True},
    "q64_loop": {"block_q": 64, "unroll": False},
    "q64_loop_8warps": {"block_q": 64, "unroll": False, "num_warps": 8},
    "q32_unrolled": {"block_q": 32, "unroll": True},
    "q32_loop": {"block_q": 32, "unroll": False},
    "q32_loop_2warps": {"block_q": 32, "unroll": False, "num_warps": 2},
    "q64_loop_split_chunk1": {"block_q": 64, "unroll": False, "inline": False, "chunk_blocks": 1},
    "q32_unrolled_split_chunk1": {"block_q": 32, "unroll": True, "inline": False, "chunk_blocks": 1},
    "q32_loop_chunk2": {"block_q": 32, "unroll": False, "inline": False, "chunk_blocks": 2},
    # query tiles of several grid rows (where there is a DWC; ignored without one)
    "q32_loop_2warps_w8": {"block_q": 32, "unroll": False, "num_warps": 2, "tile_w": 8},
    "q32_unrolled_w8": {"block_q": 32, "unroll": True, "tile_w": 8},
    "q64_loop_w8": {"block_q": 64, "unroll": False, "tile_w": 8},
    "q64_loop_w16": {"block_q": 64, "unroll": False, "tile_w": 16},
    "q64_loop_2warps_w8": {"block_q": 64, "unroll": False, "num_warps": 2, "tile_w": 8},
    "q128_loop_8warps_w16": {"block_q": 128, "unroll": False, "num_warps": 8, "tile_w": 16},
}


def main() -> None:
    if not (torch.cuda.is_available() and sla_kernel.available()):
        raise SystemExit("sweep_sla_launch: needs a CUDA device and Triton (the fused kernels' own path)")
    from triton.testing import do_bench_cudagraph

    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
    batches = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,64").split(",")]
    min_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    names = sys.argv[4].split(",") if len(sys.argv) > 4 else list(CANDIDATES)
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"sweep_sla_launch: unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    candidates = {name: CANDIDATES[name] for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, seen = [], set()
    for model in MODELS:
        for (n, h, c, grid, lepe), calls in sla_calls(model).items():
            if (n, h, c, grid, lepe) in seen or n < min_tokens:
                continue
            seen.add((n, h, c, grid, lepe))
            for b in batches:
                shape = (b, n, h, c, grid, 1.0, lepe, True)  # folded: no conv bias (move_biases)
                inputs = _inputs(shape, "cuda")
                q, k, v, pe, dwc, extra = inputs
                weight, bias = dwc_weights(dwc, h, extra)
                args = {"pe": pe, "weight": weight, "bias": bias, "grid_h": grid[0], "grid_w": grid[1],
                        "relu": True}
                with torch.no_grad():
                    # the reference path in fp64 on the same fp16 inputs (the kernels take no fp64)
                    ref = _attend(SLACore(), shape, inputs, torch.float64).cpu().numpy().reshape(b * n, -1)
                    us, err, failed = {}, {}, []
                    row = tolerance_for("torch_cuda", "fp16")
                    auto = None
                    for name, cfg in {"auto": {}, **candidates}.items():
                        def call(cfg: dict = cfg) -> torch.Tensor:
                            return sla_kernel.launch(q, k, v, h, 1e-6, config=cfg, **args)  # noqa: B023
                        out = call().float()
                        auto = out if auto is None else auto
                        err[name] = (out - auto).abs().max().item()
                        if not judge(compare(ref, out.double().cpu().numpy().reshape(b * n, -1)), row).passed:
                            failed.append(name)
                        us[name] = do_bench_cudagraph(call, rep=60) * 1000
                passing = [k_ for k_ in us if k_ not in failed]
                fastest = min(passing, key=us.__getitem__) if passing else None
                best = f"{fastest} {us[fastest]:7.1f} us" if fastest else "none passed"
                if failed:
                    print(f"  beyond the torch_cuda fp16 row: {', '.join(failed)}", flush=True)
                print(f"{model:16s} b{b:<4d} N={n:5d} h={h} c={c} x{calls}: auto {us['auto']:7.1f} us "
                      f"{sla_kernel.launch_config(b, n, h, c)}, best {best} | "
                      + " ".join(f"{k_}={u:.1f}" for k_, u in us.items()), flush=True)
                rows.append({"model": model, "b": b, "n": n, "heads": h, "c": c, "grid": list(grid),
                             "lepe": lepe, "calls": calls, "auto": sla_kernel.launch_config(b, n, h, c),
                             "us": us, "max_abs_vs_auto": err, "failed": failed})
                (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
