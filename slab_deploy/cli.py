"""The `slab-deploy` command line. typer lives only here; each command is thin over one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slab_deploy import __version__
from slab_deploy.choices import CHECK_BACKENDS, EXPORT_PRECISIONS, describe
from slab_deploy.errors import SlabDeployError

app = typer.Typer(
    name="slab-deploy",
    help="Take SLAB vision transformers from checkpoint to production: inspect, fold, export, check, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered model name (see `slab-deploy models`).")]
CkptOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="Checkpoint file (authors' .pth, state_dict, safetensors or folded)."),
]
EmaOpt = Annotated[bool, typer.Option("--ema", help="Use the EMA weights (state_dict_ema) of a training checkpoint.")]
UnfinishedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unfinished-prepbn",
        help="Deploy a checkpoint saved before PRepBN finished (its eval output differs from what was trained).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def _console(stderr: bool = False) -> Any:
    from slab_deploy.render import console

    return console(stderr)


def _print(*renderables: Any, stderr: bool = False) -> None:
    con = _console(stderr)
    for r in renderables:
        con.print(r)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slab-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """slab-deploy: SLAB checkpoints to production."""


# ------------------------------------------------------------------------------------------------ models


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'slab_*'.")] = "*",
    all_: Annotated[bool, typer.Option("--all", help="Include the tiny test variants.")] = False,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="Count params and GMACs from the model itself.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """List the model zoo: family, norm, attention per stage, params, GMACs, released weights."""
    from slab_deploy.models import zoo_rows

    rows = zoo_rows(pattern, include_test=all_, measure=measure)
    if as_json:
        _echo_json(rows)
        return
    from slab_deploy.render import models_table

    _print(models_table(rows))


# ------------------------------------------------------------------------------------------------ inspect


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file to inspect.")],
    ema: EmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Report a checkpoint's format, layout, variant(s), PRepBN state, EMA, params and sha256."""
    from slab_deploy.models.checkpoint import detect_variants, read_checkpoint

    sd, info = read_checkpoint(checkpoint, ema=ema)
    variants = detect_variants(sd)
    if as_json:
        _echo_json({**info.to_dict(), "variants": variants})
        return
    from slab_deploy.render import inspect_table

    _print(inspect_table(checkpoint, info, variants))


# ------------------------------------------------------------------------------------------------ fold


@app.command()
def fold(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folded checkpoint to write.")] = Path("folded.pt"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    ema: EmaOpt = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold every PRepBN/RepBN into its neighbouring Linear/Conv and write a folded checkpoint."""
    from slab_deploy.errors import ArtifactError
    from slab_deploy.passes import fold_model, save_folded
    from slab_deploy.weights import load_model

    if output.exists() and not force:
        raise ArtifactError(f"{output} exists; pass --force to overwrite it or choose another --output")
    m = load_model(model, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn)
    folded, report = fold_model(m)
    info = getattr(m, "checkpoint_info", None)
    save_folded(folded, output, source_sha256=info.sha256 if info else None)
    if as_json:
        _echo_json(report.to_dict())
        return
    from slab_deploy.render import fold_summary

    _print(*fold_summary(report, output))


# ------------------------------------------------------------------------------------------------ recalibrate


@app.command()
def recalibrate(
    model: ModelOpt,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="Unfolded checkpoint whose BatchNorm statistics are re-estimated.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (same file format and entries as the input).")],
    images: Annotated[Path | None, typer.Option("--images", help="Folder of images (flat, or one sub-folder per class for top-1); default: the held-out digits, demo models only.")] = None,
    eval_images: Annotated[Path | None, typer.Option("--eval-images", help="Labelled folder (one sub-folder per class) to measure top-1 on (default: the calibration images).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    limit: Annotated[int, typer.Option("--limit", help="Most images read from each folder (spread over the classes).")] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the order the images are batched in.")] = 0,
    img_size: Annotated[int | None, typer.Option("--img-size", metavar="PX", help="Input resolution (default: the model's); must fit the checkpoint's positional encodings.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file (never the input).")] = False,
    ema: Annotated[bool, typer.Option("--ema", help="Recalibrate the EMA weights (state_dict_ema) instead of the model weights.")] = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-estimate the RepBN (BatchNorm) statistics of an unfolded SLAB checkpoint on your images, before folding."""
    from slab_deploy.passes.recalibrate import recalibrate_checkpoint

    with _console(stderr=True).status("recalibrating", spinner="dots") as status:
        report = recalibrate_checkpoint(
            model, checkpoint, output, images=images, eval_images=eval_images, batch_size=batch_size, limit=limit,
            seed=seed, img_size=img_size, device=device, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
            force=force, progress=lambda s: status.update(f"{model}: {s}"),
        )
    if as_json:
        _echo_json(report.to_dict())
        return
    from slab_deploy.render import recalibrate_summary

    _print(*recalibrate_summary(report))


# ------------------------------------------------------------------------------------------------ export


@app.command()
def export(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory (default: ./<model>).")] = None,
    batch: Annotated[str | None, typer.Option("--batch", metavar="N", help="Static batch size (default: dynamic batch).")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Dynamic batch dimension (the default).")] = False,
    opset: Annotated[str, typer.Option("--opset", metavar="N", help="ONNX opset: 18-25 with the torch.export exporter (18 is its native one), 7-20 with TorchScript.")] = "18",
    precision: Annotated[str, typer.Option("--precision", help=f"{describe(EXPORT_PRECISIONS)}: one value, as an export holds one precision (`check --precision` takes a comma list and exports each); fp16 keeps SLA's normaliser and k^T v in fp32.")] = "fp32",
    simplifier: Annotated[str, typer.Option("--simplifier", help="onnxslim, onnxsim, none or auto (onnxslim, else onnxsim).")] = "auto",
    exporter: Annotated[str, typer.Option("--exporter", help="dynamo (torch.export), torchscript, or auto (dynamo, falling back).")] = "auto",
    img_size: Annotated[str | None, typer.Option("--img-size", metavar="PX", help="Input resolution (default: the model's, 224); must be the checkpoint's for models with positional encodings.")] = None,
    sla_policy: Annotated[str, typer.Option("--sla-policy", help="fp16 only: SLA in fp32 (the authors' island) or mixed (fp16 matmuls, fp32 normaliser).")] = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the parity inputs.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in the output directory (it is replaced whole, and only once the new one passed).")] = False,
    ema: EmaOpt = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold, export to ONNX, simplify and parity-check: writes DIR/model.onnx and DIR/manifest.json.

    DIR is written whole or not at all: a failed export leaves it as it was and puts the failed
    artefacts in DIR.failed."""
    from slab_deploy.export.api import ExportOptions, export_model

    opts = ExportOptions.from_text(batch=batch, dynamic_batch=dynamic_batch, opset=opset, img_size=img_size,
                                   precision=precision, simplifier=simplifier, exporter=exporter, seed=seed,
                                   sla_policy=sla_policy)
    with _console(stderr=True).status("exporting", spinner="dots") as status:
        result = export_model(
            model, checkpoint, output, opts, force=force, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
            progress=lambda s: status.update(f"{model}: {s}"),
        )
    if as_json:
        _echo_json(result.manifest)
        return
    from slab_deploy.render import export_summary

    _print(export_summary(result.manifest, result.onnx_path))


# ------------------------------------------------------------------------------------------------ check


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def check(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    artifacts: Annotated[Path | None, typer.Option("--artifacts", "-a", help="Output directory of `export` (default: export now, in a temporary directory).")] = None,
    backends: Annotated[str, typer.Option("--backends", help=f"Comma list of {', '.join(CHECK_BACKENDS)}.")] = ",".join(CHECK_BACKENDS),
    precision: Annotated[str, typer.Option("--precision", help=f"Comma list of {', '.join(EXPORT_PRECISIONS)}, each exported and checked (without --artifacts, which hold one).")] = "fp32",
    inputs: Annotated[int | None, typer.Option("--inputs", help="Number of images (default: the whole demo set of a demo model, up to 1000 of --images spread over its classes, else 8 seeded random images).", show_default=False)] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Folder of real images through the model's preprocessing; one sub-folder per class gives labels, and every rung's top-1 accuracy is judged too.")] = None,
    replay: Annotated[Path | None, typer.Option("--replay", help="io.npz of an earlier report: rerun its exact inputs.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 0,
    tolerance: Annotated[list[str] | None, typer.Option("--tolerance", help="Override RUNG:METRIC=VALUE (repeatable), e.g. ort_cuda:min_cosine=0.995.")] = None,
    report: Annotated[Path | None, typer.Option("--report", "--output", "-o", help="Directory for report.json, report.md and io.npz (--output/-o, as in the other commands, are the same option).")] = None,
    ema: EmaOpt = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the parity ladder; exit 0 on pass, 3 naming the first rung that broke, 1 on bad input or a broken artefact."""
    from slab_deploy.check import check_and_report, raise_for_verdict

    with _console(stderr=True).status("checking", spinner="dots") as status:
        done = check_and_report(
            model, checkpoint, report_dir=report, tolerance=tolerance or [], artifacts=artifacts,
            backends=_csv(backends), precisions=_csv(precision), inputs=inputs, images=images, replay=replay,
            seed=seed, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
            progress=lambda s: status.update(f"{model}: {s}"),
        )
    if as_json:
        _echo_json(done.report.to_dict())
    else:
        from slab_deploy.render import check_summary

        _print(*check_summary(done.report, done.paths))
    raise_for_verdict(done.report)


# ------------------------------------------------------------------------------------------------ bench


def _bench_targets(compare: str | None, models_: str | None, unfolded: bool, checkpoint: Path | None) -> list[Any]:
    from slab_deploy.bench import build_targets

    return build_targets(compare, _csv(models_) if models_ else None, unfolded=unfolded,
                         checkpoint=str(checkpoint) if checkpoint else None)


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=_console(stderr=True), transient=True)


@app.command()
def bench(
    device: Annotated[str, typer.Option("--device", help="cuda or cpu.")] = "cpu",
    models_: Annotated[str | None, typer.Option("--models", help="Comma list of models (SLAB ones run folded).")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help="A SLAB model: benchmark it folded with its LayerNorm and FLatten baselines.")] = None,
    unfolded: Annotated[bool, typer.Option("--unfolded", help="Also benchmark SLAB models unfolded (as trained).")] = False,
    backends: Annotated[str | None, typer.Option("--backends", help="Comma list: torch, torch-cudagraph, torch-compile, ort-cpu, ort-cuda, ort-cuda-graph, tensorrt.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="Comma list of fp32, fp16, bf16.")] = None,
    batch: Annotated[str | None, typer.Option("--batch", help="Comma list of batch sizes, e.g. 1,8,64.")] = None,
    threads: Annotated[str | None, typer.Option("--threads", help="Comma list of CPU thread counts (CPU backends).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="Named target in profiles/ (see `slab-deploy profiles`) or a .yaml path.")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Timed iterations (at least).")] = None,
    min_seconds: Annotated[float | None, typer.Option("--min-seconds", help="Keep timing each case at least this long.")] = None,
    compile_mode: Annotated[str | None, typer.Option("--compile-mode", help="torch.compile mode for the torch-compile backend.")] = None,
    sla_policy: Annotated[str | None, typer.Option("--sla-policy", help="Half precision SLA policy: fp32 or mixed.")] = None,
    exporter: Annotated[str | None, typer.Option("--exporter", help="ONNX exporter for ORT/TensorRT cases: auto, dynamo, torchscript.")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Warm-up iterations.")] = None,
    checkpoint: CkptOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for bench.json/csv/md, plots and exported graphs.")] = Path("bench-out"),
    onnx_cache: Annotated[Path | None, typer.Option("--onnx-cache", help="Where exported graphs are kept for reuse (default: OUTPUT/onnx).")] = None,
    against: Annotated[Path | None, typer.Option("--against", help="Earlier bench.json: exit 4 when a case it measured regressed beyond --threshold, or was not measured now.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Allowed slow-down against --against (fraction).")] = 0.10,
    as_json: JsonOpt = False,
) -> None:
    """Measure latency and throughput of SLAB models against their LayerNorm and FLatten baselines.

    Exit codes (CI gates on them):

    0: no case failed and at least one was measured (a case is skipped, not failed, only when this host lacks its backend); with --against, every case measured there was measured now and none regressed beyond --threshold.

    1: bad input, refused before anything runs or is written: an option or profile value, a checkpoint that does not load, a batch whose estimated memory exceeds what is available, an unreadable or malformed --against file (or one with no measured case).

    2: a command line the parser rejects (an unknown option, a non-number for --iters).

    4: with --against, a case measured there regressed beyond --threshold, or was not measured now (absent, skipped or failed).

    5: a case failed (status error), or every case was skipped (nothing was measured). 5 outranks 4.

    With 0, 4 and 5, bench.json, bench.csv and bench.md are written in full first, the verdict in them. Exported graphs are reused from --onnx-cache only when their sha256 matches the record bench wrote beside them (else they are exported again, and a note says why).
    """
    from slab_deploy.bench import benchmark
    from slab_deploy.profiles import resolve_profile

    targets = _bench_targets(compare, models_, unfolded, checkpoint)
    prof = resolve_profile(device, profile, {
        "backends": backends, "precisions": precision, "batches": batch, "threads": threads, "iters": iters,
        "warmup": warmup, "min_seconds": min_seconds, "compile_mode": compile_mode, "sla_policy": sla_policy,
        "exporter": exporter,
    })
    with _progress() as progress:
        done = benchmark(targets, prof, output, against=against, threshold=threshold, export_cache=onnx_cache,
                         progress=progress, command="slab-deploy " + " ".join(sys.argv[1:]))
    rep = done.report
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2, default=str))
    else:
        from rich.markup import escape

        from slab_deploy.render import bench_tables

        con = _console()
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
    models_: Annotated[str | None, typer.Option("--models", help="Comma list of models (SLAB ones run folded).")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help="A SLAB model: trace it folded with its LayerNorm and FLatten baselines.")] = None,
    unfolded: Annotated[bool, typer.Option("--unfolded", help="Also trace SLAB models unfolded (as trained).")] = False,
    backends: Annotated[str | None, typer.Option("--backends", "--backend", help="One of torch, torch-cudagraph, torch-compile, ort-cpu, ort-cuda, ort-cuda-graph (default: torch with --device cuda, ort-cpu with --device cpu); --backend is the earlier spelling.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="One of fp32, fp16, bf16 (trace profiles one backend and one precision per run).")] = "fp32",
    batch: Annotated[int, typer.Option("--batch", help="Batch size.")] = 1,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (CPU backends).")] = None,
    iters: Annotated[int, typer.Option("--iters", help="Profiled iterations (figures are per iteration).")] = 10,
    top: Annotated[int, typer.Option("--top", help="How many kernels/operators to list per model.")] = 12,
    sla_policy: Annotated[str, typer.Option("--sla-policy", help="Half precision SLA policy: fp32 or mixed.")] = "fp32",
    exporter: Annotated[str, typer.Option("--exporter", help="ONNX exporter for ORT cases: auto, dynamo, torchscript.")] = "auto",
    compile_mode: Annotated[str, typer.Option("--compile-mode", help="torch.compile mode for the torch-compile backend.")] = "max-autotune-no-cudagraphs",
    checkpoint: CkptOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for trace.json/md and the raw profiles.")] = Path("trace-out"),
    as_json: JsonOpt = False,
) -> None:
    """Profile where the time goes: kernel (or operator) time by category and by model component."""
    from slab_deploy.bench.trace import run_trace, to_markdown
    from slab_deploy.profiles import resolve_profile

    prof = resolve_profile(device, None, {
        "backends": backends, "precisions": precision, "batches": batch, "threads": threads,
        "compile_mode": compile_mode, "sla_policy": sla_policy, "exporter": exporter,
    }, command="trace")
    targets = _bench_targets(compare, models_, unfolded, checkpoint)
    with _progress() as progress:
        done = run_trace(targets, prof, output, iters=iters, top=top, progress=progress,
                         command="slab-deploy " + " ".join(sys.argv[1:]))
    if as_json:
        typer.echo(json.dumps(done.report.to_dict(), indent=2, default=str))
    else:
        from rich.markdown import Markdown

        con = _console()
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
        _echo_json([p.to_dict() for p in profs])
        return
    from slab_deploy.render import profiles_table

    _print(profiles_table(profs))


# ------------------------------------------------------------------------------------------------ serve


@app.command("serve-repo")
def serve_repo(
    artifacts: Annotated[Path, typer.Argument(help="Output directory of `slab-deploy export` (model.onnx, manifest.json; model.plan with engine.json for --flavour tensorrt).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Triton model repository to write the model into (created if missing; other models in it are left alone).")],
    flavour: Annotated[str, typer.Option("--flavour", help="onnxruntime (platform onnxruntime_onnx), tensorrt (tensorrt_plan) or python (model.py running ONNX Runtime on the CPU; what the nvidia-pytriton server can load).")] = "onnxruntime",
    name: Annotated[str | None, typer.Option("--name", help="Model name in the repository and in URLs (default: the export's model name).")] = None,
    version: Annotated[int, typer.Option("--model-version", help="Model version (the folder REPO/<model>/N).")] = 1,
    max_batch: Annotated[int | None, typer.Option("--max-batch", metavar="N", help="max_batch_size for a dynamic-batch export (default: the engine's profile for tensorrt, else 32); a static-batch export is served with max_batch_size 0.", show_default=False)] = None,
    preferred_batch: Annotated[str | None, typer.Option("--preferred-batch", metavar="N,M", help="Comma list of preferred batch sizes for the dynamic batcher, e.g. 4,8.")] = None,
    queue_delay_us: Annotated[int | None, typer.Option("--queue-delay-us", metavar="US", help="Longest a request waits for others to batch with (default: 100).", show_default=False)] = None,
    no_dynamic_batching: Annotated[bool, typer.Option("--no-dynamic-batching", help="Run every request as it comes (no dynamic_batching block).")] = False,
    instances: Annotated[int, typer.Option("--instances", help="Model instances (instance_group count, per GPU with --kind gpu).")] = 1,
    kind: Annotated[str | None, typer.Option("--kind", help="cpu or gpu instances (default: gpu for tensorrt, else cpu).", show_default=False)] = None,
    fp16_io: Annotated[bool, typer.Option("--fp16-io", help="FP16 inputs and outputs (fp16 artefacts; the python flavour casts at the boundary).")] = False,
    accelerator: Annotated[str, typer.Option("--accelerator", help="onnxruntime on GPU: none, cuda (the CUDA execution provider's options) or tensorrt (ORT's TensorRT execution provider, with a batch profile).")] = "none",
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime intra-op threads per instance (0: its default).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the model if REPO already holds one of that name.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write an export as one model of a Triton model repository: REPO/<model>/config.pbtxt, the graph (or engine) in REPO/<model>/<version>/, the manifest beside it.

    The model folder appears whole or not at all; it is validated against the export's manifest first."""
    from slab_deploy.serve import RepoOptions, write_triton_repository

    opts = RepoOptions.from_text(
        preferred_batch=preferred_batch, flavour=flavour, name=name, version=version, max_batch=max_batch,
        queue_delay_us=queue_delay_us, dynamic_batching=not no_dynamic_batching, instances=instances, kind=kind,
        fp16_io=fp16_io, accelerator=accelerator, threads=threads)
    result = write_triton_repository(artifacts, output, opts, force=force)
    if as_json:
        _echo_json(result.to_dict())
        return
    from slab_deploy.render import serve_repo_summary

    _print(serve_repo_summary(result))


@app.command()
def serve(
    repo: Annotated[Path, typer.Argument(help="Triton model repository (see `slab-deploy serve-repo`).")],
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP port on 127.0.0.1 (0: a free one).")] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC port on 127.0.0.1 (0: a free one).")] = 8001,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port on 127.0.0.1 (0: a free one).")] = 8002,
    tritonserver: Annotated[Path | None, typer.Option("--tritonserver", help="tritonserver binary to run (default: $SLAB_DEPLOY_TRITONSERVER, the nvidia-pytriton wheel's, or tritonserver on PATH).")] = None,
    log: Annotated[Path | None, typer.Option("--log", help="Write the server's log to this file (default: stderr).")] = None,
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", help="Seconds to wait for the server to load every model.")] = 120.0,
) -> None:
    """Run a real Triton Inference Server on the repository, on loopback (127.0.0.1), until Ctrl-C or SIGTERM.

    Every model is checked loadable first (its config.pbtxt parses, this server has its backend). Ctrl-C / SIGTERM stop the server (Triton finishes in-flight requests) and exit 130 / 143; a server that stops on its own exits 1."""
    from slab_deploy.serve.server import ServerError, TritonServer, find_tritonserver, repository_models

    install = find_tritonserver(tritonserver)
    models = repository_models(repo, install)
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          install=install, log_path=log, verbose=log is None)
    try:
        with _console(stderr=True).status(f"starting tritonserver ({len(models)} models)", spinner="dots"):
            server.start(ready_timeout)
        from slab_deploy.render import serve_ready

        _print(serve_ready(server, models))
        sys.stdout.flush()
        code = server.proc.wait() if server.proc else None
        raise ServerError(f"tritonserver stopped on its own (exit code {code}): {server.log_tail(3)}")
    finally:
        server.stop()


@app.command("serve-bench")
def serve_bench(
    url: Annotated[str, typer.Argument(help="HOST:PORT of the server on this host: HTTP (e.g. 127.0.0.1:8000), or gRPC with --protocol grpc.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name on the server.")],
    concurrency: Annotated[int, typer.Option("--concurrency", help="Clients sending at once, one request in flight each.")] = 1,
    seconds: Annotated[float, typer.Option("--seconds", help="How long to send requests.")] = 10.0,
    batch: Annotated[int, typer.Option("--batch", help="Images per request.")] = 1,
    protocol: Annotated[str, typer.Option("--protocol", help="http or grpc.")] = "http",
    max_requests: Annotated[int | None, typer.Option("--max-requests", help="Stop after this many requests in all (default: only --seconds bounds the run).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random images.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Load a Triton server on loopback: throughput, p50/p99 latency and failed requests; exit 5 when any request failed (or none completed)."""
    from slab_deploy.serve.load import run_load

    with _console(stderr=True).status(f"loading {model} for {seconds:g} s", spinner="dots"):
        report = run_load(url, model, concurrency=concurrency, seconds=seconds, batch=batch, protocol=protocol,
                          max_requests=max_requests, seed=seed)
    if as_json:
        _echo_json(report.to_dict())
    else:
        from slab_deploy.render import load_table

        _print(load_table(report))
    failure = report.failure()
    if failure is not None:
        raise failure


def main() -> None:
    """Console-script entry: user errors print one line and exit with their code (1, or 3 for
    parity failures, 4 for benchmark regressions); usage errors are typer's (exit 2); SIGINT and
    SIGTERM clean up, print one line and exit 130 and 143 (128 + the signal number)."""
    import signal

    from rich.markup import escape

    from slab_deploy.utils import Interrupted, raise_if_interrupted, signals_interrupt

    with signals_interrupt():  # handlers stay until the exit below: a repeat signal is ignored
        try:
            try:
                app()  # standalone mode: typer prints usage errors and help, and exits
            finally:
                raise_if_interrupted()  # a signal whose exception a finaliser swallowed still ends as one
        except SlabDeployError as exc:
            _console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except Interrupted as exc:
            name = signal.Signals(exc.signum).name
            _console(stderr=True).print(f"[bold red]interrupted[/bold red] by {name}: stopped and cleaned up", soft_wrap=True)
            sys.exit(128 + exc.signum)


if __name__ == "__main__":  # pragma: no cover
    main()
