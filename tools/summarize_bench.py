"""Summarise `slab-deploy bench` and `slab-deploy check` JSON files into the Markdown tables of
docs/benchmarks.md.

Usage: python tools/summarize_bench.py docs/results/h200-2026-11-29/bench-*/bench.json
       python tools/summarize_bench.py --checks docs/results/h200-2026-11-29/check/*/report.json
       python tools/summarize_bench.py --cpu docs/results/cpu2-2026-11-29/bench-*/bench.json
Every figure printed comes from the JSON files; nothing is typed in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def label(r: dict) -> str:
    return r["model"] + (" (unfolded)" if r["variant"] == "unfolded" else "")


def main(paths: list[str]) -> None:
    for data in load(paths):
        res = [r for r in data["results"] if r["status"] == "ok"]
        slab = next(r["model"] for r in res if r["variant"] == "folded")
        models = list(dict.fromkeys(label(r) for r in res))
        print(f"\n### {slab}: best median latency (ms) per model, over backends\n")
        print("| batch | precision | " + " | ".join(models) + " |")
        print("|---|---|" + "---|" * len(models))
        for b in sorted({r["batch"] for r in res}):
            for p in ("fp32", "fp16"):
                cells = []
                for m in models:
                    rs = [r for r in res if label(r) == m and r["batch"] == b and r["precision"] == p]
                    best = min(rs, key=lambda r: r["median_ms"], default=None)
                    cells.append(f"{best['median_ms']:.2f} ({best['backend']})" if best else "-")
                print(f"| {b} | {p} | " + " | ".join(cells) + " |")
        print(f"\n{slab}: speed-up of the folded model, best backend each side (other / SLAB):\n")
        print("| batch | precision | vs | speed-up |")
        print("|---|---|---|---|")
        for b in sorted({r["batch"] for r in res}):
            for p in ("fp32", "fp16"):
                mine = min((r for r in res if r["variant"] == "folded" and r["batch"] == b and r["precision"] == p), key=lambda r: r["median_ms"])
                for m in models:
                    if m == slab:
                        continue
                    rs = [r for r in res if label(r) == m and r["batch"] == b and r["precision"] == p]
                    if rs:
                        other = min(rs, key=lambda r: r["median_ms"])
                        print(f"| {b} | {p} | {m} | {other['median_ms'] / mine['median_ms']:.2f}x |")
        eager = {r["batch"]: r["median_ms"] for r in res if r["model"] == slab and r["variant"] == "unfolded" and r["backend"] == "torch" and r["precision"] == "fp32"}
        if eager:
            print(f"\n{slab}: best deployed path vs torch eager fp32 of the unfolded checkpoint:\n")
            print("| batch | eager fp32 unfolded ms | best folded ms (backend, precision) | speed-up |")
            print("|---|---|---|---|")
            for b, e in sorted(eager.items()):
                best = min((r for r in res if r["variant"] == "folded" and r["batch"] == b), key=lambda r: r["median_ms"])
                print(f"| {b} | {e:.2f} | {best['median_ms']:.2f} ({best['backend']}, {best['precision']}) | {e / best['median_ms']:.1f}x |")
        big = [r for r in res if r["variant"] == "folded" and r["batch"] == max(x["batch"] for x in res) and r.get("mfu")]
        if big:
            best = max(big, key=lambda r: r["mfu"])
            print(f"\n{slab}: model FLOP utilisation at batch {best['batch']}: {best['tflops']:.1f} TFLOP/s = {best['mfu']:.1%} of "
                  f"{data['profile'].get('peak_tflops')} TFLOP/s ({best['backend']}, {best['precision']}; {best['gmacs']:.2f} GMACs/image)")


def checks(paths: list[str]) -> None:
    print("| model | precision | SLA policy | rung | status | max abs | max rel | cosine | SQNR dB | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in sorted(paths):
        r = json.loads(Path(p).read_text())
        cfg = Path(p).parent.name.removesuffix("-check").removeprefix(r["model"] + "-")
        prec, policy = cfg.split("-")
        for x in r["rungs"]:
            if x["rung"] in ("ort_cpu", "ort_cuda") and x["status"] != "skipped":
                m = x["metrics"]
                print(f"| {r['model']} | {prec} | {policy if prec == 'fp16' else '-'} | {x['rung']} | {x['status']} | {m['max_abs']:.2e} "
                      f"| {m['max_rel']:.2e} | {m['cosine']:.7f} | {m['sqnr_db']:.1f} | {m['top1']:.2f} |")


def cpu(paths: list[str]) -> None:
    """Per-thread latency and speed-up tables (CPU runs)."""
    print("| SLAB model | vs | threads | SLAB median ms | other median ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for data in load(paths):
        for sp in data["speedups"]:
            print(f"| {sp['slab']} | {sp['other']} | {sp['threads']} | {sp['slab_ms']:.1f} | {sp['other_ms']:.1f} | {sp['speedup']:.2f}x |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--checks"]:
        checks(sys.argv[2:])
    elif sys.argv[1:2] == ["--cpu"]:
        cpu(sys.argv[2:])
    else:
        main(sys.argv[1:])
