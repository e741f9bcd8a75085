"""The files of a run: bench.json, bench.csv, bench.md and the plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from slab_deploy.bench.results import BenchReport

COLUMNS = ("model", "variant", "backend", "precision", "batch", "threads", "status", "median_ms", "p90_ms",
           "p95_ms", "p99_ms", "mean_ms", "cv", "throughput", "h2d_ms", "d2h_ms", "peak_mem_mib", "compile_s",
           "tflops", "mfu",
           "samples", "unstable", "timer", "reason", "note")


def write_outputs(report: BenchReport, out: Path) -> dict[str, Path]:
    from slab_deploy.utils import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "markdown": out / "bench.md"}
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in report.results:
        w.writerow(r.flat())
    with atomic_write(paths["csv"]) as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(report))
    try:
        paths.update(plot(report, out))
    except Exception as exc:  # plots are a convenience; the numbers are in the files above
        if exc.__class__.__name__ != "MissingDependencyError":
            raise
    return paths


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def to_markdown(report: BenchReport) -> str:
    env = report.environment
    lines = [
        "# slab-deploy bench",
        "",
        f"- date: {report.created}",
        f"- command: `{report.command}`",
        f"- device: {env.get('gpu') or env.get('cpu')} ({env.get('device')}); "
        f"driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')}",
        f"- versions: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')} "
        f"({', '.join(env.get('onnxruntime_providers') or [])}), TensorRT {env.get('tensorrt') or '-'}, "
        f"slab-deploy {env.get('slab-deploy')}",
        f"- profile: {report.profile.get('name')} (warm-up {report.profile.get('warmup')}, "
        f">= {report.profile.get('iters')} timed runs, >= {report.profile.get('min_seconds')} s)",
        f"- weights: {weights_line(report.weights)} (latency does not depend on the weights' values)",
        "- latency: compute only, inputs already on the device; "
        "host<->device copies of one batch in their own columns",
    ]
    if report.verdict:
        v = report.verdict
        lines.append(f"- verdict: {'passed' if v.get('passed') else 'FAILED'} (exit {v.get('exit_code')}): "
                     f"{v.get('message')}")
    lines += [
        "",
        "| model | variant | backend | prec | batch | thr | median ms | p90 | p99 | CV | img/s "
        "| H2D ms | D2H ms | peak MiB | MFU | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        c = r.case
        note = r.reason if r.status != "ok" else ("unstable (CV > 10%)" if r.unstable else "")
        if r.note:
            note = (note + "; " + r.note).strip("; ")
        if r.compile_s:
            note = (note + f"; compile {r.compile_s:.0f} s").strip("; ")
        lines.append(
            f"| {c.model} | {c.variant} | {c.backend} | {c.precision} | {c.batch} | {c.threads or '-'} "
            f"| {_fmt(r.median_ms, '.3f')} | {_fmt(r.p90_ms, '.3f')} | {_fmt(r.p99_ms, '.3f')} "
            f"| {_fmt(r.cv, '.1%')} | {_fmt(r.throughput, ',.0f')} "
            f"| {_fmt(r.h2d_ms, '.3f')} | {_fmt(r.d2h_ms, '.3f')} | {_fmt(r.peak_mem_mib, ',.0f')} "
            f"| {_fmt(r.mfu, '.1%')} | {note} |"
        )
    if report.speedups:
        lines += ["", "## Speed-up of the folded SLAB model (other median / SLAB median)", "",
                  "| SLAB | vs | backend | prec | batch | SLAB ms | other ms | speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in report.speedups:
            lines.append(f"| {s['slab']} | {s['other']} | {s['backend']} | {s['precision']} | {s['batch']} "
                         f"| {s['slab_ms']:.3f} | {s['other_ms']:.3f} | {s['speedup']:.2f}x |")
    if report.best_speedups:
        lines += ["", "## Speed-up, best backend each side (over the backends measured for both)", "",
                  "| SLAB | vs | prec | batch | thr | SLAB ms (backend) | other ms (backend) | speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in report.best_speedups:
            lines.append(f"| {s['slab']} | {s['other']} | {s['precision']} | {s['batch']} "
                         f"| {s['threads'] or '-'} | {s['slab_ms']:.3f} ({s['slab_backend']}) "
                         f"| {s['other_ms']:.3f} ({s['other_backend']}) | {s['speedup']:.2f}x |")
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, out: Path) -> dict[str, Path]:
    from slab_deploy._deps import require

    mpl = require("matplotlib", "benchmark plots")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "benchmark plots")
    ok = [r for r in report.results if r.status == "ok"]
    paths: dict[str, Path] = {}
    if not ok:
        return paths
    series: dict[tuple[str, str, str, str], list[tuple[int, float]]] = {}
    for r in ok:
        c = r.case
        series.setdefault(
            (c.model, c.variant, c.backend, f"{c.precision}{'/t' + str(c.threads) if c.threads else ''}"), []
        ).append((c.batch, r.median_ms or 0))
    backends = sorted({k[2] for k in series})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, b in zip(axes[0], backends, strict=True):
        for (model, variant, backend, prec), pts in sorted(series.items()):
            if backend != b:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} [{variant}] {prec}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(b)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["latency_plot"] = out / "latency_vs_batch.png"
    fig.savefig(paths["latency_plot"], dpi=110)
    plt.close(fig)
    if report.speedups:
        # Grouped bars: one group per (backend, precision, batch, threads), one bar per baseline.
        groups = list(dict.fromkeys(
            (s["backend"], s["precision"], s["batch"], s["threads"]) for s in report.speedups))
        others = list(dict.fromkeys(s["other"] for s in report.speedups))
        width = 0.8 / len(others)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.5))
        for i, other in enumerate(others):
            ups = {(s["backend"], s["precision"], s["batch"], s["threads"]): s["speedup"]
                   for s in report.speedups if s["other"] == other}
            xs = [g for g in range(len(groups)) if groups[g] in ups]
            ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], [ups[groups[x]] for x in xs], width,
                   label=f"vs {other}")
        ax.axhline(1.0, color="k", lw=0.8)
        labels = [f"{b}\n{p} b{bs}" + (f" t{th}" if th else "") for b, p, bs, th in groups]
        ax.set_xticks(range(len(groups)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speed-up of folded SLAB (x)")
        ax.set_title(f"{report.speedups[0]['slab']}: other median / SLAB median")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["speedup_plot"] = out / "speedup.png"
        fig.savefig(paths["speedup_plot"], dpi=110)
        plt.close(fig)
    return paths


def weights_line(weights: dict[str, str]) -> str:
    """Which weights each model of a bench ran with, in one line."""
    from slab_deploy.weights.default import weights_label

    if not weights:
        return "-"
    return "; ".join(f"{m}: {weights_label(m, w)}" for m, w in weights.items())
