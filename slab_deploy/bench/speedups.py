"""Speed-ups of the folded SLAB model over its baselines and its unfolded self."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slab_deploy.bench.results import Result


def speedups(results: Sequence[Result]) -> list[dict[str, Any]]:
    """For each (backend, precision, batch, threads): SLAB folded vs each baseline and vs unfolded.
    An int8 SLAB case is also set against the fp32 cases of its baselines and of itself, on the same
    backend, batch and threads (precision "int8 vs fp32"): what deploying INT8 buys over fp32."""
    ok = [r for r in results if r.status == "ok" and r.median_ms]
    out = []
    for r in ok:
        if r.case.variant != "folded":
            continue
        for o in ok:
            c, d = r.case, o.case
            if o is r or (d.backend, d.batch, d.threads) != (c.backend, c.batch, c.threads):
                continue
            if d.precision == c.precision and d.variant in ("baseline", "unfolded"):
                other = d.model if d.variant == "baseline" else f"{d.model} (unfolded)"
                precision = c.precision
            elif (c.precision, d.precision) == ("int8", "fp32") and (
                    d.variant == "baseline" or d.model == c.model):
                other, precision = f"{d.model} ({d.variant}, fp32)", "int8 vs fp32"
            else:
                continue
            out.append({
                "slab": c.model, "other": other, "backend": c.backend, "precision": precision,
                "batch": c.batch, "threads": c.threads, "slab_ms": r.median_ms, "other_ms": o.median_ms,
                "speedup": o.median_ms / r.median_ms,  # type: ignore[operator]
            })
    return out


def best_speedups(results: Sequence[Result]) -> list[dict[str, Any]]:
    """For each (precision, batch, threads) and each other model: the folded SLAB model's best
    median over the backends measured for both, against the other's best over those backends
    (a backend run for one side only does not count)."""
    ok = [r for r in results if r.status == "ok" and r.median_ms]
    out = []
    for slab in dict.fromkeys(r.case.model for r in ok if r.case.variant == "folded"):
        others = dict.fromkeys(
            (r.case.model, r.case.variant) for r in ok if r.case.variant in ("baseline", "unfolded"))
        for prec, batch, threads in dict.fromkeys(
                (r.case.precision, r.case.batch, r.case.threads) for r in ok):
            mine = [r for r in ok
                    if (r.case.model, r.case.variant, r.case.precision, r.case.batch, r.case.threads)
                    == (slab, "folded", prec, batch, threads)]
            for model, variant in others:
                if variant == "unfolded" and model != slab:
                    continue
                theirs = [r for r in ok
                          if (r.case.model, r.case.variant, r.case.precision, r.case.batch, r.case.threads)
                          == (model, variant, prec, batch, threads)]
                common = {r.case.backend for r in mine} & {r.case.backend for r in theirs}
                if not common:
                    continue
                a = min((r for r in mine if r.case.backend in common), key=lambda r: r.median_ms or 0.0)
                b = min((r for r in theirs if r.case.backend in common), key=lambda r: r.median_ms or 0.0)
                out.append({
                    "slab": slab, "other": model if variant == "baseline" else f"{model} (unfolded)",
                    "precision": prec, "batch": batch, "threads": threads,
                    "slab_ms": a.median_ms, "slab_backend": a.case.backend,
                    "other_ms": b.median_ms, "other_backend": b.case.backend,
                    "speedup": (b.median_ms or 0.0) / (a.median_ms or 1.0), "backends": sorted(common),
                })
    return out

