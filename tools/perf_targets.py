"""The performance targets of the GPU work, judged from `slab-deploy bench` JSON files.

    python tools/perf_targets.py BENCH.json [BENCH.json ...]
    python tools/perf_targets.py --plan        # the bench commands that measure every target
    python tools/perf_targets.py --run DIR     # run them on this GPU into DIR, then judge them

Prints one Markdown table: each target, what the files measured for it, and `met`, `missed` or
`not established` (a model, batch or backend the target needs is missing: the row says which).
Every figure comes from the files; nothing is typed in. The files must come from one GPU (their
`environment.gpu`): a speed-up across two machines means nothing, and the tool refuses it (exit 1).

"Best backend each side" is each model's fastest median over the backends the files measured for
it, fp16; a latency target counts as established only when torch.compile was measured for both
sides, as a careful user runs it. The ONNX Runtime targets compare the exported artefact's best of
`ort-cuda` and `ort-cuda-graph`. MFU is bench's own (the profile's `peak_tflops`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BATCH = 64
MFU_BATCH = 256
COMPILED = "torch-compile"
ORT = ("ort-cuda", "ort-cuda-graph")


@dataclass(frozen=True)
class Ratio:
    """SLAB model `slab` at least `at_least` times faster than `other` at `batch`."""
    slab: str
    other: str
    at_least: float
    batch: int = BATCH
    backends: tuple[str, ...] | None = None  # None: every backend measured, torch.compile required


RATIOS = (
    Ratio("slab_swin_tiny", "swin_tiny", 1.4),
    Ratio("slab_swin_tiny", "flatten_swin_tiny", 1.5),
    Ratio("slab_swin_small", "swin_small", 1.15),
    Ratio("slab_swin_small", "flatten_swin_small", 1.3),
    Ratio("slab_deit_small", "deit_small", 1.15),
    Ratio("slab_pvt_tiny", "pvt_tiny", 1.15),
    Ratio("slab_pvt_tiny", "flatten_pvt_tiny", 1.3),
    Ratio("slab_cswin_tiny", "cswin_tiny", 1.15),
    Ratio("slab_cswin_tiny", "flatten_cswin_tiny", 1.3),
    Ratio("slab_swin_tiny", "swin_tiny", 1.25, backends=ORT),
    Ratio("slab_deit_small", "deit_small", 1.1, backends=ORT),
)
BATCH1 = (("slab_swin_tiny", "swin_tiny"), ("slab_swin_small", "swin_small"),
          ("slab_deit_small", "deit_small"), ("slab_pvt_tiny", "pvt_tiny"), ("slab_cswin_tiny", "cswin_tiny"))
MFU = ("slab_swin_tiny", 0.25)


class TargetsError(Exception):
    """Files that cannot be judged together."""


def load(paths: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The GPU of the files and their measured fp16 cases; TargetsError if they are not of one GPU."""
    gpus: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
            gpu = data["environment"].get("gpu")
            measured = [r for r in data["results"] if r.get("status") == "ok" and r.get("precision") == "fp16"
                        and r.get("variant") in ("folded", "baseline") and r.get("median_ms")]
            for r in measured:
                r["model"], r["batch"], r["backend"], r["median_ms"] = (
                    str(r["model"]), int(r["batch"]), str(r["backend"]), float(r["median_ms"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TargetsError(f"{p} is not a bench.json ({type(e).__name__}: {e}); pass the bench.json "
                               "files that `slab-deploy bench --output DIR` wrote") from None
        if not gpu:
            raise TargetsError(f"{p} was not measured on a GPU; pass the bench.json of GPU runs")
        gpus[p] = gpu
        rows += measured
    if len(set(gpus.values())) > 1:
        each = "; ".join(f"{p}: {g}" for p, g in gpus.items())
        raise TargetsError(f"the files come from different GPUs ({each}); judge each machine's files apart")
    return next(iter(gpus.values()), ""), rows


def best(rows: list[dict[str, Any]], model: str, batch: int,
         backends: tuple[str, ...] | None) -> tuple[dict[str, Any] | None, set[str]]:
    """The fastest case of `model` at `batch` (among `backends` if given) and the backends measured."""
    mine = [r for r in rows if r["model"] == model and r["batch"] == batch
            and (backends is None or r["backend"] in backends)]
    return min(mine, key=lambda r: r["median_ms"], default=None), {r["backend"] for r in mine}


def judge_ratio(rows: list[dict[str, Any]], slab: str, other: str, at_least: float, batch: int,
                backends: tuple[str, ...] | None) -> tuple[str, str]:
    """(measured, status) of one speed-up target."""
    a, mine = best(rows, slab, batch, backends)
    b, theirs = best(rows, other, batch, backends)
    missing = [m for m, r in ((slab, a), (other, b)) if r is None]
    if missing:
        on = f" on {', '.join(backends)}" if backends else ""
        return "-", f"not established: {', '.join(missing)} not measured at batch {batch}{on}"
    assert a is not None and b is not None
    ratio = b["median_ms"] / a["median_ms"]
    measured = (f"{ratio:.3f}x ({a['median_ms']:.3f} ms {a['backend']} vs {b['median_ms']:.3f} ms "
                f"{b['backend']})")
    if backends is None:
        uncompiled = [m for m, seen in ((slab, mine), (other, theirs)) if COMPILED not in seen]
        if uncompiled:
            return measured, f"not established: {COMPILED} not measured for {', '.join(uncompiled)}"
    return measured, "met" if ratio >= at_least else "missed"


def table(paths: list[str]) -> str:
    gpu, rows = load(paths)
    out = [f"Performance targets on {gpu or 'no GPU'} (fp16; {len(paths)} bench.json file(s))", "",
           "| target | measured | status |", "|---|---|---|"]
    for t in RATIOS:
        where = "ONNX artefact in ONNX Runtime CUDA" if t.backends == ORT else "best backend each side"
        name = f"{t.slab} >= {t.at_least}x {t.other}, batch {t.batch}, {where}"
        measured, status = judge_ratio(rows, t.slab, t.other, t.at_least, t.batch, t.backends)
        out.append(f"| {name} | {measured} | {status} |")
    for slab, other in BATCH1:
        measured, status = judge_ratio(rows, slab, other, 1.0, 1, None)
        out.append(f"| batch 1: {slab} not slower than {other} | {measured} | {status} |")
    model, floor = MFU
    cases = [r for r in rows if r["model"] == model and r["batch"] == MFU_BATCH and r.get("mfu")]
    top = max(cases, key=lambda r: r["mfu"], default=None)
    if top is None:
        out.append(f"| MFU >= {floor:.0%}, {model}, batch {MFU_BATCH} | - | not established: not measured |")
    else:
        status = "met" if top["mfu"] >= floor else "missed"
        out.append(f"| MFU >= {floor:.0%}, {model}, batch {MFU_BATCH} | {top['mfu']:.1%} "
                   f"({top['median_ms']:.3f} ms {top['backend']}) | {status} |")
    return "\n".join(out)


def plan() -> list[str]:
    """The `slab-deploy bench` commands that measure every target, one output folder each (run them
    on one GPU, then pass their bench.json files here)."""
    common = ("slab-deploy bench --device cuda --profile h200 --iters 30 --warmup 10 --min-seconds 0.3 "
              "--precision fp16 --sla-policy mixed")
    families: dict[str, list[str]] = {}
    for t in RATIOS:
        if t.backends is None:
            families.setdefault(t.slab, [t.slab]).append(t.other)
    for slab, other in BATCH1:
        families.setdefault(slab, [slab]).append(other)
    out = []
    for slab, models in families.items():
        names = ",".join(dict.fromkeys(models))
        out.append(f"{common} --backends torch-cudagraph,{COMPILED} --models {names} --batch 1,{BATCH} "
                   f"--output targets-{slab}")
    ort = [t for t in RATIOS if t.backends == ORT]
    names = ",".join(dict.fromkeys(m for t in ort for m in (t.slab, t.other)))
    out.append(f"{common} --backends {','.join(ORT)} --models {names} --batch {BATCH} --output targets-ort")
    out.append(f"{common} --backends torch-cudagraph,{COMPILED} --models {MFU[0]} --batch {MFU_BATCH} "
               "--output targets-mfu")
    return out


def run(out_dir: Path) -> int:
    """Run every planned command (`python -m slab_deploy.cli`, from the project root) into `out_dir`,
    one folder each, going on after a failed one; then print the table of what they measured.
    Exit 1 if any run failed or wrote no bench.json (a run's case that failed makes bench exit 5)."""
    import shlex
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out_dir = out_dir.resolve()
    commands = [shlex.split(command) for command in plan()]
    for args in commands:
        args[-1] = str(out_dir / args[-1])  # the --output folder
    taken = [a[-1] for a in commands if Path(a[-1]).exists()]
    if taken:  # an earlier run's bench.json there would be judged as this run's
        raise TargetsError(f"{taken[0]} exists (from an earlier run?); pass a new folder to --run")
    out_dir.mkdir(parents=True, exist_ok=True)
    failed, written = [], []
    for args in commands:
        print("+ " + shlex.join(args), flush=True)
        code = subprocess.call([sys.executable, "-m", "slab_deploy.cli", *args[1:]], cwd=root)
        bench = Path(args[-1]) / "bench.json"
        if bench.is_file():
            written.append(str(bench))
        if code != 0 or not bench.is_file():
            failed.append(f"{Path(args[-1]).name} (exit {code})")
    if written:
        print(table(written))
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; their cases are missing above",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 1
    if argv == ["--plan"]:
        print("\n".join(plan()))
        return 0
    if argv[0] == "--run":
        if len(argv) != 2:
            print("error: --run takes one folder: python tools/perf_targets.py --run DIR", file=sys.stderr)
            return 1
        try:
            return run(Path(argv[1]))
        except TargetsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    try:
        print(table(argv))
    except TargetsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
