"""The measuring commands: bench, trace, profiles."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slab_deploy.choices import DEFAULT_SLA_POLICY
from slab_deploy.cli.app import (
    CkptOpt,
    JsonOpt,
    app,
    console,
    csv,
    echo_json,
    print_all,
)

# ------------------------------------------------------------------------------------------------ bench


def bench_targets(
    compare: str | None, models_: str | None, unfolded: bool, checkpoint: Path | None
) -> list[Any]:
    from slab_deploy.bench import build_targets

    return build_targets(compare, csv(models_) if models_ else None, unfolded=unfolded,
                         checkpoint=str(checkpoint) if checkpoint else None)


def progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console(stderr=True), transient=True)


@app.command()
def bench(
    device: Annotated[str, typer.Option("--device", help="cuda or cpu.")] = "cpu",
    models_: Annotated[str | None, typer.Option(
        "--models", help="Comma list of models (SLAB ones run folded).")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help=(
        "A SLAB model: benchmark it folded "
        "with its LayerNorm and FLatten baselines."))] = None,
    unfolded: Annotated[bool, typer.Option(
        "--unfolded", help="Also benchmark SLAB models unfolded (as trained).")] = False,
    backends: Annotated[str | None, typer.Option("--backends", help=(
        "Comma list: torch, torch-cudagraph, torch-compile, "
        "ort-cpu, ort-cuda, ort-cuda-graph, tensorrt."))] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision",
        help="Comma list of fp32, fp16, bf16, int8 (int8: Q/DQ graphs on the ONNX backends).")] = None,
    batch: Annotated[str | None, typer.Option(
        "--batch", help="Comma list of batch sizes, e.g. 1,8,64.")] = None,
    threads: Annotated[str | None, typer.Option(
        "--threads", help="Comma list of CPU thread counts (CPU backends).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help=(
        "Named target in profiles/ (see `slab-deploy profiles`) "
        "or a .yaml path."))] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Timed iterations (at least).")] = None,
    min_seconds: Annotated[float | None, typer.Option(
        "--min-seconds", help="Keep timing each case at least this long.")] = None,
    compile_mode: Annotated[str | None, typer.Option(
        "--compile-mode", help="torch.compile mode for the torch-compile backend.")] = None,
    sla_policy: Annotated[str | None, typer.Option(
        "--sla-policy", help="Half precision SLA policy: mixed (the default) or fp32.")] = None,
    exporter: Annotated[str | None, typer.Option(
        "--exporter", help="ONNX exporter for ORT/TensorRT cases: auto, dynamo, torchscript.")] = None,
    activation_type: Annotated[str | None, typer.Option("--activation-type", help=(
        "int8 cases: int8 activations (signed symmetric, TensorRT's; the default) "
        "or uint8 (asymmetric, ONNX Runtime CPU only)."))] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Warm-up iterations.")] = None,
    ort_cuda_layout: Annotated[str | None, typer.Option("--ort-cuda-layout", help=(
        "ONNX Runtime CUDA convolution layout: nchw (its default) or nhwc (the provider's "
        "prefer_nhwc)."))] = None,
    checkpoint: CkptOpt = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory for bench.json/csv/md, plots and exported graphs.")
    ] = Path("bench-out"),
    onnx_cache: Annotated[Path | None, typer.Option(
        "--onnx-cache", help="Where exported graphs are kept for reuse (default: OUTPUT/onnx).")] = None,
    against: Annotated[Path | None, typer.Option("--against", help=(
        "Earlier bench.json: exit 4 when a case it measured regressed beyond --threshold, "
        "or was not measured now."))] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="Allowed slow-down against --against (fraction).")] = 0.10,
    as_json: JsonOpt = False,
) -> None:
    """Measure latency and throughput of SLAB models against their LayerNorm and FLatten baselines.

    Exit codes (CI gates on them):

    0: no case failed and at least one was measured (a case is skipped, not failed, only when this
    host lacks its backend); with --against, every case measured there was measured now and none
    regressed beyond --threshold.

    1: bad input, refused before anything runs or is written: an option or profile value, a
    checkpoint that does not load, a batch whose estimated memory exceeds what is available, an
    unreadable or malformed --against file (or one with no measured case).

    2: a command line the parser rejects (an unknown option, a non-number for --iters).

    4: with --against, a case measured there regressed beyond --threshold, or was not measured now
    (absent, skipped or failed).

    5: a case failed (status error), or every case was skipped (nothing was measured). 5 outranks 4.

    With 0, 4 and 5, bench.json, bench.csv and bench.md are written in full first, the verdict in
    them. Exported graphs are reused from --onnx-cache only when their sha256 matches the record
    bench wrote beside them (else they are exported again, and a note says why).
    """
    from slab_deploy.bench import benchmark
    from slab_deploy.profiles import resolve_profile

    targets = bench_targets(compare, models_, unfolded, checkpoint)
    prof = resolve_profile(device, profile, {
        "backends": backends, "precisions": precision, "batches": batch, "threads": threads,
        "iters": iters, "warmup": warmup, "min_seconds": min_seconds, "compile_mode": compile_mode,
        "sla_policy": sla_policy, "exporter": exporter, "activation_type": activation_type,
        "ort_cuda_layout": ort_cuda_layout,
    })
    with progress_bar() as progress:
        done = benchmark(targets, prof, output, against=against, threshold=threshold,
                         export_cache=onnx_cache, progress=progress,
                         command="slab-deploy " + " ".join(sys.argv[1:]))
    rep = done.report
    if as_json:
        echo_json(rep.to_dict())
    else:
        from rich.markup import escape

        from slab_deploy.render import bench_tables

        con = console()
        for t in bench_tables(rep):
            con.print(t)
        for note in rep.notes:
            con.print(escape(f"note: {note}"))
        con.print(escape("wrote " + ", ".join(str(p) for p in done.paths.values())))
    if done.failure is not None:
        raise done.failure


@app.command()
def trace(
    device: Annotated[str, typer.Option("--device", help="cuda or cpu.")] = "cpu",
    models_: Annotated[str | None, typer.Option(
        "--models", help="Comma list of models (SLAB ones run folded).")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help=(
        "A SLAB model: trace it folded "
        "with its LayerNorm and FLatten baselines."))] = None,
    unfolded: Annotated[bool, typer.Option(
        "--unfolded", help="Also trace SLAB models unfolded (as trained).")] = False,
    backends: Annotated[str | None, typer.Option("--backends", "--backend", help=(
        "One of torch, torch-cudagraph, torch-compile, ort-cpu, ort-cuda, ort-cuda-graph "
        "(default: torch with --device cuda, ort-cpu with --device cpu); "
        "--backend is the earlier spelling."))] = None,
    precision: Annotated[str, typer.Option(
        "--precision",
        help="One of fp32, fp16, bf16, int8 (trace profiles one backend and precision per run).")] = "fp32",
    batch: Annotated[int, typer.Option("--batch", help="Batch size.")] = 1,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (CPU backends).")] = None,
    iters: Annotated[int, typer.Option(
        "--iters", help="Profiled iterations (figures are per iteration).")] = 10,
    top: Annotated[int, typer.Option(
        "--top", help="How many kernels/operators to list per model.")] = 12,
    sla_policy: Annotated[str, typer.Option(
        "--sla-policy", help="Half precision SLA policy: mixed or fp32.")] = DEFAULT_SLA_POLICY,
    exporter: Annotated[str, typer.Option(
        "--exporter", help="ONNX exporter for ORT cases: auto, dynamo, torchscript.")] = "auto",
    activation_type: Annotated[str, typer.Option("--activation-type", help=(
        "int8: int8 activations (signed symmetric, TensorRT's) or uint8 (asymmetric, CPU only)."))] = "int8",
    compile_mode: Annotated[str, typer.Option(
        "--compile-mode", help="torch.compile mode for the torch-compile backend.")
    ] = "max-autotune-no-cudagraphs",
    ort_cuda_layout: Annotated[str | None, typer.Option("--ort-cuda-layout", help=(
        "ONNX Runtime CUDA convolution layout: nchw (its default) or nhwc (the provider's "
        "prefer_nhwc)."))] = None,
    checkpoint: CkptOpt = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory for trace.json/md and the raw profiles.")] = Path("trace-out"),
    as_json: JsonOpt = False,
) -> None:
    """Profile where the time goes: kernel (or operator) time by category and by model component."""
    from slab_deploy.bench.trace import run_trace, to_markdown
    from slab_deploy.profiles import resolve_profile

    prof = resolve_profile(device, None, {
        "backends": backends, "precisions": precision, "batches": batch, "threads": threads,
        "compile_mode": compile_mode, "sla_policy": sla_policy, "exporter": exporter,
        "activation_type": activation_type, "ort_cuda_layout": ort_cuda_layout,
    }, command="trace")
    targets = bench_targets(compare, models_, unfolded, checkpoint)
    with progress_bar() as progress:
        done = run_trace(targets, prof, output, iters=iters, top=top, progress=progress,
                         command="slab-deploy " + " ".join(sys.argv[1:]))
    if as_json:
        echo_json(done.report.to_dict())
    else:
        from rich.markdown import Markdown

        con = console()
        con.print(Markdown(to_markdown(done.report, top)))
        con.print("wrote " + ", ".join(str(p) for p in done.paths.values()))
    if done.failure is not None:
        raise done.failure


@app.command()
def profiles(as_json: JsonOpt = False) -> None:
    """List the device profiles (benchmark targets) in profiles/."""
    from slab_deploy.profiles import list_profiles, load_profile

    profs = [load_profile(n) for n in list_profiles()]
    if as_json:
        echo_json([p.to_dict() for p in profs])
        return
    from slab_deploy.render import profiles_table

    print_all(profiles_table(profs))


