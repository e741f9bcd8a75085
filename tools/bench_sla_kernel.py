"""Per-call time of SLA (`SLACore.attend`, fp16, `mixed`) with the fused kernels and with the reference
graph, at the SLA shapes of one SLAB model of each family (read off a forward of the real model), under
CUDA graphs (Triton's do_bench_cudagraph).

    PYTHONPATH=. python tools/bench_sla_kernel.py [OUT_DIR]

Prints one line per shape and batch and a per-model total (calls per model x time per call), and writes
OUT_DIR/micro.json (default: the current directory). The inputs are `tests/test_sla_kernel.py`'s
(randomised q, k, v, positional encoding and DWC, with CSWin's LePE where it has one). Whole-model
figures come from `slab-deploy bench`; this isolates the layer the kernels replace.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_sla_kernel import _inputs  # noqa: E402

from slab_deploy.models import sla_kernel  # noqa: E402
from slab_deploy.models.layers import SLACore  # noqa: E402

MODELS = ("slab_deit_small", "slab_swin_tiny", "slab_pvt_tiny", "slab_cswin_tiny")
BATCHES = (1, 64, 256)


def sla_calls(name: str) -> dict[tuple, int]:
    """The SLA calls of one forward of zoo model `name` (batch 1, CPU, seeded weights): (tokens, heads,
    head size, grid, LePE kernel or 0) -> how many times `SLACore.attend` runs with that shape."""
    import tempfile
    from collections import Counter

    from slab_deploy.models import create_model
    from slab_deploy.weights import random_checkpoint

    seen: Counter[tuple] = Counter()
    attend = SLACore.attend

    def spy(self: SLACore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
            pe: torch.Tensor, dwc: torch.nn.Conv2d, grid: tuple[int, int],
            extra: torch.nn.Conv2d | None = None) -> torch.Tensor:
        lepe = int(extra.kernel_size[0]) if extra is not None else 0
        seen[(int(q.shape[1]), heads, int(q.shape[-1]) // heads, tuple(grid), lepe)] += 1
        return attend(self, q, k, v, heads, pe, dwc, grid, extra)

    with tempfile.TemporaryDirectory() as tmp:
        model = create_model(name, random_checkpoint(name, Path(tmp) / "c.pth", seed=0)).eval()
    size = model.spec.input_size
    SLACore.attend = spy  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *size))
    finally:
        SLACore.attend = attend  # type: ignore[method-assign]
    return dict(seen)


def main() -> None:
    if not (torch.cuda.is_available() and sla_kernel.available()):
        raise SystemExit("bench_sla_kernel: needs a CUDA device and Triton (the fused kernels' own path)")
    from triton.testing import do_bench_cudagraph

    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
    core = SLACore()
    core.policy = "mixed"
    rows = []
    for model in MODELS:
        shapes = sla_calls(model).items()
        for b in BATCHES:
            total = {"auto": 0.0, "never": 0.0}
            for (n, h, c, grid, lepe), calls in shapes:
                q, k, v, pe, dwc, extra = _inputs((b, n, h, c, grid, 1.0, lepe, True), "cuda")  # as folded
                us = {}
                for mode in ("auto", "never"):  # fused kernels, reference graph
                    os.environ[sla_kernel.ENV] = mode
                    with torch.no_grad():
                        def call() -> torch.Tensor:
                            return core.attend(q, k, v, h, pe, dwc, grid, extra)  # noqa: B023
                        call()
                        torch.cuda.synchronize()
                        us[mode] = do_bench_cudagraph(call, rep=200) * 1000
                    total[mode] += us[mode] * calls
                print(f"{model:8s} b{b:<4d} N={n:5d} h={h} c={c}: fused {us['auto']:8.1f} us  "
                      f"ref {us['never']:8.1f} us  x{us['never'] / us['auto']:.2f}", flush=True)
                rows.append({"model": model, "b": b, "n": n, "heads": h, "c": c,
                             "fused_us": us["auto"], "ref_us": us["never"]})
            print(f"  == {model} b{b}: SLA total fused {total['auto'] / 1000:.3f} ms, "
                  f"ref {total['never'] / 1000:.3f} ms", flush=True)
    (out_dir / "micro.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
