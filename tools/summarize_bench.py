"""Summarise `slab-deploy bench` and `slab-deploy check` JSON files into the Markdown tables of
docs/benchmarks.md.

Usage:
  python tools/summarize_bench.py docs/results/h200-2026-11-29/bench-*/bench.json
  python tools/summarize_bench.py --merge docs/results/h200-2026-11-29-r2/*-{graph,eager,ort}/bench.json
  python tools/summarize_bench.py --policy docs/results/h200-2026-11-29-r2/{policy-fp32,*-graph}/bench.json
  python tools/summarize_bench.py --traces docs/results/h200-2026-11-29-r2/trace-*/trace.json
  python tools/summarize_bench.py --checks docs/results/h200-2026-11-29/check/*/report.json
  python tools/summarize_bench.py --cpu docs/results/cpu2-2026-11-29/bench-*/bench.json
  python tools/summarize_bench.py --before-after BEFORE.json[,BEFORE2.json] AFTER.json[,AFTER2.json]
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
        summarize(data)


def merge(paths: list[str]) -> None:
    """One summary per SLAB model over several bench.json files (split runs of the same
    comparison: per backend, per precision, eager reference, torch.compile)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from slab_deploy.models import get_spec

    groups: dict[str, dict] = {}
    loose: list[dict] = []
    for data in load(paths):
        ok = [r for r in data["results"] if r["status"] == "ok"]
        slabs = {r["model"] for r in ok if r["variant"] == "folded"}
        if not slabs:
            loose += ok
            continue
        for slab in slabs:
            g = groups.setdefault(slab, {"profile": data["profile"], "results": []})
            members = {slab, *get_spec(slab).compare_with}
            g["results"] += [r for r in ok if r["model"] in members]
    for r in loose:
        for slab, g in groups.items():
            if r["model"] in get_spec(slab).compare_with:
                g["results"].append(r)
    for slab, g in groups.items():
        # the SLAB model first, then its baselines in the order of the files
        g["results"].sort(key=lambda r: r["model"] != slab)
        summarize(g)


def policy(paths: list[str]) -> None:
    """fp16 latency of the folded SLAB models under each SLA policy (same backend and batch)."""
    rows: dict[tuple, dict[str, float]] = {}
    for data in load(paths):
        pol = data["profile"].get("sla_policy", "fp32")
        for r in data["results"]:
            if r["status"] == "ok" and r["variant"] == "folded" and r["precision"] == "fp16":
                rows.setdefault((r["model"], r["backend"], r["batch"]), {})[pol] = r["median_ms"]
    print("| model | backend | batch | SLA fp32 ms | SLA mixed ms | fp32 / mixed |")
    print("|---|---|---|---|---|---|")
    for (m, b, bs), v in sorted(rows.items()):
        if "fp32" in v and "mixed" in v:
            print(f"| {m} | {b} | {bs} | {v['fp32']:.2f} | {v['mixed']:.2f} "
                  f"| {v['fp32'] / v['mixed']:.2f}x |")


def traces(paths: list[str]) -> None:
    """Category and component tables of `slab-deploy trace` reports, side by side."""
    for data in load(paths):
        ok = [r for r in data["results"] if r["status"] == "ok"]
        labels = [r["model"] + ("" if r["variant"] in ("folded", "baseline") else f" ({r['variant']})")
                  for r in ok]
        r0 = ok[0]
        print(f"\n`{data['command']}` ({r0['backend']}, {r0['precision']}, batch {r0['batch']}; "
              "ms per iteration)\n")
        print("| kernel time by category | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(ok))
        cats = list(dict.fromkeys(c for r in ok for c in r["categories"]))
        for c in cats:
            print(f"| {c} | " + " | ".join(f"{r['categories'].get(c, 0.0):.2f}" for r in ok) + " |")
        print("| **sum of kernels** | " + " | ".join(f"**{r['traced_total_ms']:.2f}**" for r in ok) + " |")
        print("| by component: | " + " | ".join("" for _ in ok) + " |")
        comps = list(dict.fromkeys(c for r in ok for c in r["components"]))
        for c in comps:
            print(f"| {c} | " + " | ".join(f"{r['components'].get(c, 0.0):.2f}" for r in ok) + " |")


def best_speedups(res: list[dict]) -> list[dict]:
    """`slab_deploy.bench.best_speedups` (best backend each side, over backends measured for both)
    on results read back from JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from slab_deploy.bench import Case, Result
    from slab_deploy.bench import best_speedups as best

    return best([Result(Case(r["model"], r["variant"], r["backend"], r["precision"], r["batch"],
                             r["threads"]),
                        r["status"], median_ms=r["median_ms"]) for r in res])


def summarize(data: dict) -> None:
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
    print(f"\n{slab}: speed-up of the folded model (other / SLAB), best of the backends measured for both:\n")
    print("| batch | precision | vs | speed-up | SLAB ms | other ms | backends compared |")
    print("|---|---|---|---|---|---|---|")
    rows = {(x["batch"], x["precision"], x["other"]): x for x in best_speedups(res)}
    for b in sorted({r["batch"] for r in res}):
        for p in ("fp32", "fp16"):
            for m in models:
                x = rows.get((b, p, m))
                if x:
                    print(f"| {b} | {p} | {m} | {x['speedup']:.2f}x | {x['slab_ms']:.2f} "
                          f"| {x['other_ms']:.2f} | {', '.join(x['backends'])} |")
    eager = {r["batch"]: r["median_ms"] for r in res
             if r["model"] == slab and r["variant"] == "unfolded" and r["backend"] == "torch"
             and r["precision"] == "fp32"}
    if eager:
        print(f"\n{slab}: best deployed path vs torch eager fp32 of the unfolded checkpoint:\n")
        print("| batch | eager fp32 unfolded ms | best folded ms (backend, precision) | speed-up |")
        print("|---|---|---|---|")
        for b, e in sorted(eager.items()):
            best = min((r for r in res if r["variant"] == "folded" and r["batch"] == b),
                       key=lambda r: r["median_ms"])
            print(f"| {b} | {e:.2f} | {best['median_ms']:.2f} ({best['backend']}, {best['precision']}) "
                  f"| {e / best['median_ms']:.1f}x |")
    big = [r for r in res
           if r["variant"] == "folded" and r["batch"] == max(x["batch"] for x in res) and r.get("mfu")]
    if big:
        best = max(big, key=lambda r: r["mfu"])
        print(f"\n{slab}: model FLOP utilisation at batch {best['batch']}: {best['tflops']:.1f} TFLOP/s "
              f"= {best['mfu']:.1%} of "
              f"{data['profile'].get('peak_tflops')} TFLOP/s ({best['backend']}, {best['precision']}; "
              f"{best['gmacs']:.2f} GMACs/image)")


def checks(paths: list[str], extra_policy: str | None = None) -> None:
    print("| model | precision | SLA policy | rung | status | max abs | max rel | cosine | SQNR dB | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in sorted(paths):
        r = json.loads(Path(p).read_text())
        cfg = Path(p).parent.name.removesuffix("-check").removeprefix(r["model"] + "-")
        if "-" in cfg and not cfg.startswith("check"):  # <model>-<precision>-<policy>-check directories
            prec, policy = cfg.split("-")
        else:
            # the policy from a policy argument of the run: the report has no manifest block before
            # 2026-11-29
            art = r.get("artifacts_precision") or {}
            prec, policy = art.get("mode", "?"), art.get("sla_policy", extra_policy or "?")
        for x in r["rungs"]:
            # skipped and errored rungs have no metrics
            if x["rung"] in ("ort_cpu", "ort_cuda") and x.get("metrics"):
                m = x["metrics"]
                pr = prec if prec != "?" else x.get("precision", "?")
                print(f"| {r['model']} | {pr} | {policy if pr == 'fp16' else '-'} | {x['rung']} "
                      f"| {x['status']} | {m['max_abs']:.2e} "
                      f"| {m['max_rel']:.2e} | {m['cosine']:.7f} | {m['sqnr_db']:.1f} | {m['top1']:.2f} |")


def margins(paths: list[str]) -> None:
    """Smallest reference top-1 margin (top-1 minus top-2 logit) over a check run's inputs."""
    print("| model | inputs | smallest reference top-1 margin | max abs reference logit |")
    print("|---|---|---|---|")
    for p in sorted(paths):
        r = json.loads(Path(p).read_text())
        m = next(x["metrics"] for x in r["rungs"] if x.get("metrics"))
        print(f"| {r['model']} | {r['inputs']['count']} "
              f"({r['inputs']['source']}, seed {r['inputs']['seed']}) | "
              f"{m['ref_margin_min']:.1e} | {m['max_abs_reference']:.2f} |")


def before_after(before: list[str], after: list[str]) -> None:
    """Median latency of the cases measured both before and after a change (same case key)."""
    def medians(paths: list[str]) -> dict[tuple, float]:
        return {(r["model"], r["backend"], r["precision"], r["batch"]): r["median_ms"]
                for data in load(paths) for r in data["results"] if r["status"] == "ok"}

    old, new = medians(before), medians(after)
    print("| model | backend | precision | batch | before ms | after ms | after / before |")
    print("|---|---|---|---|---|---|---|")
    for k in sorted(old.keys() & new.keys(), key=lambda k: (k[1], k[3], k[0])):
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {old[k]:.3f} | {new[k]:.3f} | {new[k] / old[k]:.3f} |")


def cpu(paths: list[str]) -> None:
    """Per-thread latency and speed-up tables (CPU runs)."""
    print("| SLAB model | vs | threads | SLAB median ms | other median ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for data in load(paths):
        for sp in data["speedups"]:
            print(f"| {sp['slab']} | {sp['other']} | {sp['threads']} | {sp['slab_ms']:.1f} "
                  f"| {sp['other_ms']:.1f} | {sp['speedup']:.2f}x |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--checks"]:
        if sys.argv[2:3] == ["--policy"]:
            checks(sys.argv[4:], sys.argv[3])
        else:
            checks(sys.argv[2:])
    elif sys.argv[1:2] == ["--before-after"]:
        before_after(sys.argv[2].split(","), sys.argv[3].split(","))
    elif sys.argv[1:2] == ["--cpu"]:
        cpu(sys.argv[2:])
    elif sys.argv[1:2] == ["--margins"]:
        margins(sys.argv[2:])
    elif sys.argv[1:2] == ["--merge"]:
        merge(sys.argv[2:])
    elif sys.argv[1:2] == ["--policy"]:
        policy(sys.argv[2:])
    elif sys.argv[1:2] == ["--traces"]:
        traces(sys.argv[2:])
    else:
        main(sys.argv[1:])
