"""Per call: fused DWC (default and best sweep config) vs cuDNN DWC + kernel adding it (hybrid)."""
import json, os, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path[:0] = [os.getcwd(), os.getcwd() + "/tests", os.getcwd() + "/tools"]
from test_sla_kernel import _inputs
from bench_sla_kernel import sla_calls
from slab_deploy.models import sla_kernel
from slab_deploy.models.layers import dwc_weights
from triton.testing import do_bench_cudagraph
out_dir = Path(sys.argv[1]); out_dir.mkdir(parents=True, exist_ok=True)
sweep = {(r["model"], r["b"], r["n"]): r for r in json.load(open(sys.argv[2]))}
D = {"dwc_gather": False, "dwc_unroll": False}
U = {"dwc_gather": False, "dwc_unroll": True}
SW = {"base": {}, "dyn": D, "dyn_nw8": {**D, "num_warps": 8}, "dyn_bq32": {**D, "block_q": 32},
      "dyn_bq32nw2": {**D, "block_q": 32, "num_warps": 2}, "dyn_ds2": {**D, "d_split": 2}, "dyn_qt2": {**D, "q_tiles": 2},
      "dyn_split_c1": {**D, "inline": False, "chunk_blocks": 1}, "dyn_c2": {**D, "chunk_blocks": 2},
      "dyn_kvw8": {**D, "kv_warps": 8}, "unr_nw8": {**U, "num_warps": 8}, "unr_bq32": {**U, "block_q": 32},
      "unr_ds2": {**U, "d_split": 2}}
HY = {"h_base": {}, "h_split_c1": {"inline": False, "chunk_blocks": 1}, "h_bq32": {"block_q": 32},
      "h_nw8": {"num_warps": 8}, "h_bq32nw2": {"block_q": 32, "num_warps": 2}, "h_ds2": {"d_split": 2},
      "h_split_c1_bq32": {"inline": False, "chunk_blocks": 1, "block_q": 32}}
rows = []
seen = set()
for model in ("slab_deit_small", "slab_swin_tiny", "slab_pvt_tiny", "slab_cswin_tiny"):
    for (n, h, c, grid, lepe), calls in sla_calls(model).items():
        if (n, h, c, grid, lepe) in seen:
            continue
        seen.add((n, h, c, grid, lepe))
        for b in (1, 64):
            q, k, v, pe, dwc, extra = _inputs((b, n, h, c, grid, 1.0, lepe), "cuda")
            weight, bias = dwc_weights(dwc, h, extra)
            wt, bt = dwc_weights(dwc, h, extra, tiled=True)
            C = v.shape[-1]
            args = dict(pe=pe, weight=weight, bias=bias, grid_h=grid[0], grid_w=grid[1], relu=True)
            ref = sla_kernel.launch(q, k, v, h, 1e-6, **args)
            sw = sweep.get((model, b, n))
            best = min((u, nm) for nm, u in sw["us"].items() if u and nm != "nodwc")[1] if sw else "base"
            def conv(v=v):
                x = v.reshape(b, grid[0], grid[1], C).permute(0, 3, 1, 2)
                y = F.conv2d(x, wt, bt, padding=wt.shape[-1] // 2, groups=C)
                return y.permute(0, 2, 3, 1).reshape(b, n, C)
            def conv_cl(v=v):
                x = v.reshape(b, grid[0], grid[1], C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
                y = F.conv2d(x, wt, bt, padding=wt.shape[-1] // 2, groups=C)
                return y.permute(0, 2, 3, 1).reshape(b, n, C)
            res = {}
            with torch.no_grad():
                res["fused_base"] = do_bench_cudagraph(lambda: sla_kernel.launch(q, k, v, h, 1e-6, **args), rep=60) * 1e3
                res["fused_best=" + best] = do_bench_cudagraph(lambda: sla_kernel.launch(q, k, v, h, 1e-6, config=SW[best], **args), rep=60) * 1e3
                res["conv"] = do_bench_cudagraph(conv, rep=60) * 1e3
                res["conv_cl"] = do_bench_cudagraph(conv_cl, rep=60) * 1e3
                y = conv()
                print("   conv out strides", tuple(y.stride()), "contig", y.is_contiguous(), flush=True)
                a2 = dict(args, weight=None, bias=None)
                inline = -(-n // 64) <= 4
                errs = {}
                for nm, cfg in HY.items():
                    if nm.startswith("h_split") and not inline:
                        continue
                    if c // cfg.get("d_split", 1) < 16:
                        continue
                    fn = lambda cfg=cfg: sla_kernel.launch(q, k, v, h, 1e-6, config=cfg, add=conv(), **a2)
                    errs[nm] = (fn().float() - ref.float()).abs().max().item()
                    res[nm] = do_bench_cudagraph(fn, rep=60) * 1e3
            line = " ".join(f"{k_}={u:.1f}" for k_, u in res.items())
            print(f"{model[5:]:11s} b{b:<3d} N={n:5d} h={h} c={c} calls={calls}: {line} maxerr={max(errs.values()):.2e}", flush=True)
            rows.append({"model": model, "b": b, "n": n, "heads": h, "c": c, "calls": calls, "us": res, "err": errs})
            (out_dir / "hybrid.json").write_text(json.dumps(rows, indent=0))
