"""Launch-config sweep of the fused SLA kernels at the zoo's SLA shapes (b1, b64)."""
import json, os, sys, time
from pathlib import Path
import torch
sys.path[:0] = [os.getcwd(), os.getcwd() + "/tests", os.getcwd() + "/tools"]
from test_sla_kernel import _inputs
from bench_sla_kernel import sla_calls
from slab_deploy.models import sla_kernel
from slab_deploy.models.layers import dwc_weights
from triton.testing import do_bench_cudagraph

D = {"dwc_gather": False, "dwc_unroll": False}  # shift form, dynamic tap loops
U = {"dwc_gather": False, "dwc_unroll": True}  # shift form, unrolled taps
CONFIGS = {
    "base": {}, "dyn": D, "dyn_nw8": {**D, "num_warps": 8},
    "dyn_bq32": {**D, "block_q": 32}, "dyn_bq32nw2": {**D, "block_q": 32, "num_warps": 2},
    "dyn_ds2": {**D, "d_split": 2}, "dyn_qt2": {**D, "q_tiles": 2},
    "dyn_split_c1": {**D, "inline": False, "chunk_blocks": 1},
    "dyn_c2": {**D, "chunk_blocks": 2}, "dyn_kvw8": {**D, "kv_warps": 8},
    "unr_nw8": {**U, "num_warps": 8}, "unr_bq32": {**U, "block_q": 32}, "unr_ds2": {**U, "d_split": 2},
}
INLINE_ONLY = {"dyn_split_c1", "dyn_qt2"}
SPLIT_ONLY = {"dyn_c2", "dyn_kvw8"}
DEV = os.environ.get("DEV", "cuda")
out_dir = Path(sys.argv[1]); out_dir.mkdir(parents=True, exist_ok=True)
batches = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,64").split(",")]
rows = []
seen = set()
t0 = time.time()
for model in os.environ.get("MODELS", "slab_deit_small,slab_swin_tiny,slab_pvt_tiny,slab_cswin_tiny").split(","):
    for (n, h, c, grid, lepe), calls in sla_calls(model).items():
        if (n, h, c, grid, lepe) in seen:
            continue
        seen.add((n, h, c, grid, lepe))
        for b in batches:
            q, k, v, pe, dwc, extra = _inputs((b, n, h, c, grid, 1.0, lepe), DEV)
            weight, bias = dwc_weights(dwc, h, extra)
            args = dict(pe=pe, weight=weight, bias=bias, grid_h=grid[0], grid_w=grid[1], relu=True)
            ref = sla_kernel.launch(q, k, v, h, 1e-6, **args)
            res = {}
            cfgs = dict(CONFIGS, nodwc=None)
            inline = -(-n // sla_kernel.BLOCK) <= sla_kernel.INLINE_BLOCKS
            for name, cfg in cfgs.items():
                if (name in INLINE_ONLY and not inline) or (name in SPLIT_ONLY and inline):
                    continue
                if cfg and c // cfg.get("d_split", 1) < 16:
                    continue
                a = dict(args)
                if name == "nodwc":
                    a.update(weight=None, bias=None); cfg = {}
                elif name == "nope":
                    a.update(pe=None); cfg = {}
                try:
                    fn = lambda: sla_kernel.launch(q, k, v, h, 1e-6, config=cfg, **a)
                    o = fn()
                    err = (o.float() - ref.float()).abs().max().item() if name not in ("nodwc", "nope") else 0.0
                    us = do_bench_cudagraph(fn, rep=60) * 1000
                    res[name] = (round(us, 2), err)
                except Exception as e:  # noqa: BLE001
                    res[name] = (None, str(e).splitlines()[0][:80])
            base = res["base"][0]
            best = min((v[0], k_) for k_, v in res.items() if v[0] and k_ not in ("nodwc", "nope"))
            print(f"{model[5:]:11s} b{b:<3d} N={n:5d} h={h} c={c} calls={calls}: base {base:7.1f}us best {best[1]} "
                  f"{best[0]:7.1f}us | " + " ".join(f"{k_}={v[0]}" for k_, v in res.items()), flush=True)
            bad = {k_: v[1] for k_, v in res.items() if isinstance(v[1], str) or (v[1] and v[1] > 0.05)}
            if bad:
                print("   errors/mismatch:", bad, flush=True)
            rows.append({"model": model, "b": b, "n": n, "heads": h, "c": c, "grid": grid, "lepe": lepe,
                         "calls": calls, "us": {k_: v[0] for k_, v in res.items()},
                         "err": {k_: v[1] for k_, v in res.items()}})
            (out_dir / "sweep.json").write_text(json.dumps(rows, indent=0))
print(f"sweep {time.time() - t0:.0f}s")
