"""Tables of the measuring commands: bench, profiles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.markup import escape

if TYPE_CHECKING:
    from slab_deploy.profiles import Profile


from slab_deploy.render.base import table


def profiles_table(profiles: Sequence[Profile]) -> Any:
    """The device profiles (benchmark targets)."""
    t = table("device profiles",
               ("name", "device", "backends", "precisions", "batches", "threads", "description"),
               overflow="fold")
    for p in profiles:
        t.add_row(p.name, p.device, ",".join(p.backends), ",".join(p.precisions),
                  ",".join(map(str, p.batches)),
                  ",".join("default" if x is None else str(x) for x in p.threads),
                  p.description + (" (emulated)" if p.emulated else ""))
    return t


# ------------------------------------------------------------------------------------------------ fold


def bench_tables(report: Any) -> list[Any]:
    from rich.table import Table

    kinds = set(getattr(report, "weights", {}).values())
    tag = " (untrained weights)" if report.untrained else " (demo weights)" if kinds == {"demo"} else ""
    t = Table(title=f"bench on {report.environment.get('gpu') or report.environment.get('cpu')}{tag}")
    for col in ("model", "variant", "backend", "prec", "batch", "thr", "median ms", "p90", "p99", "CV",
                "img/s", "note"):
        t.add_column(col, justify=(
            "right" if col in ("batch", "thr", "median ms", "p90", "p99", "CV", "img/s") else "left"
        ), overflow="fold")
    for r in report.results:
        c = r.case
        note = (("[yellow]unstable[/yellow]" if r.unstable else "") if r.status == "ok"
                else f"[dim]{escape(r.status + ': ' + r.reason[:90])}[/dim]")
        fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        t.add_row(c.model, c.variant, c.backend, c.precision, str(c.batch), str(c.threads or "-"),
                  fmt(r.median_ms, ".3f"), fmt(r.p90_ms, ".3f"), fmt(r.p99_ms, ".3f"), fmt(r.cv, ".1%"),
                  fmt(r.throughput, ",.0f"), note)
    out = [t]
    if report.speedups:
        s = Table(title="speed-up of the folded SLAB model")
        for col in ("SLAB", "vs", "backend", "prec", "batch", "thr", "speed-up"):
            s.add_column(col, justify="right" if col in ("batch", "thr", "speed-up") else "left")
        for x in report.speedups:
            colour = "green" if x["speedup"] >= 1 else "red"
            s.add_row(x["slab"], x["other"], x["backend"], x["precision"], str(x["batch"]),
                      str(x["threads"] or "-"), f"[{colour}]{x['speedup']:.2f}x[/{colour}]")
        out.append(s)
    if report.best_speedups and len({b for x in report.best_speedups for b in x["backends"]}) > 1:
        s = Table(title="speed-up, best backend each side (over the backends measured for both)")
        for col in ("SLAB", "vs", "prec", "batch", "thr", "SLAB ms", "other ms", "speed-up"):
            s.add_column(col, justify="left" if col in ("SLAB", "vs", "prec") else "right")
        for x in report.best_speedups:
            colour = "green" if x["speedup"] >= 1 else "red"
            s.add_row(x["slab"], x["other"], x["precision"], str(x["batch"]), str(x["threads"] or "-"),
                      f"{x['slab_ms']:.3f} ({x['slab_backend']})",
                      f"{x['other_ms']:.3f} ({x['other_backend']})",
                      f"[{colour}]{x['speedup']:.2f}x[/{colour}]")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------------ reference


# ------------------------------------------------------------------------------------------------ serve


