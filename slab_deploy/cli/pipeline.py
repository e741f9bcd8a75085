"""The pipeline commands: models, inspect, fold, recalibrate, export, build, check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slab_deploy.choices import CHECK_BACKENDS, DEFAULT_SLA_POLICY, EXPORT_PRECISIONS, describe
from slab_deploy.cli.app import (
    CkptOpt,
    EmaOpt,
    JsonOpt,
    ModelOpt,
    UnfinishedOpt,
    app,
    console,
    csv,
    echo_json,
    print_all,
)

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
    """List the model zoo: family, norm, attention per stage, params, GMACs, released weights.

    Language models are listed by `slab-deploy llm models`."""
    from slab_deploy.models import zoo_rows

    rows = zoo_rows(pattern, include_test=all_, measure=measure)
    if as_json:
        echo_json(rows)
        return
    from slab_deploy.render import models_table

    print_all(models_table(rows))


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
    from slab_deploy.models.llm import detect_llms

    variants = detect_variants(sd) + detect_llms(sd)  # vision variants, then language models
    if as_json:
        echo_json({**info.to_dict(), "variants": variants})
        return
    from slab_deploy.render import inspect_table

    print_all(inspect_table(checkpoint, info, variants))


# ------------------------------------------------------------------------------------------------ fold


@app.command()
def fold(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folded checkpoint to write.")
    ] = Path("folded.pt"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    ema: EmaOpt = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    keep_biases: Annotated[bool, typer.Option("--keep-biases", help=(
        "Leave every bias where it is: no bias add moved into another layer (see docs/fold.md), so "
        "the outputs of the blocks inside a stage stay the unfolded model's too."))] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold every PRepBN/RepBN into its neighbouring Linear/Conv and write a folded checkpoint."""
    from slab_deploy.errors import ArtifactError
    from slab_deploy.passes import fold_model, save_folded
    from slab_deploy.weights import load_model

    if output.exists() and not force:
        raise ArtifactError(f"{output} exists; "
                            "pass --force to overwrite it or choose another --output")
    m = load_model(model, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn)
    folded, report = fold_model(m, keep_biases=keep_biases)
    info = getattr(m, "checkpoint_info", None)
    save_folded(folded, output, source_sha256=info.sha256 if info else None)
    if as_json:
        echo_json(report.to_dict())
        return
    from slab_deploy.render import fold_summary

    print_all(*fold_summary(report, output))


# ------------------------------------------------------------------------------------------------ recalibrate


@app.command()
def recalibrate(
    model: ModelOpt,
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", "-c", help="Unfolded checkpoint whose BatchNorm statistics are re-estimated.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Checkpoint to write (same file format and entries as the input).")],
    images: Annotated[Path | None, typer.Option("--images", help=(
        "Folder of images (flat, or one sub-folder per class for top-1); "
        "default: the held-out digits, demo models only."))] = None,
    eval_images: Annotated[Path | None, typer.Option("--eval-images", help=(
        "Labelled folder (one sub-folder per class) to measure top-1 on "
        "(default: the calibration images)."))] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    limit: Annotated[int, typer.Option(
        "--limit", help="Most images read from each folder (spread over the classes).")] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the order the images are batched in.")] = 0,
    img_size: Annotated[int | None, typer.Option("--img-size", metavar="PX", help=(
        "Input resolution (default: the model's); "
        "must fit the checkpoint's positional encodings."))] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite an existing output file (never the input).")] = False,
    ema: Annotated[bool, typer.Option(
        "--ema", help="Recalibrate the EMA weights (state_dict_ema) instead of the model weights.")] = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-estimate the RepBN (BatchNorm) statistics of an unfolded SLAB checkpoint on your images,
    before folding."""
    from slab_deploy.passes.recalibrate import recalibrate_checkpoint

    with console(stderr=True).status("recalibrating", spinner="dots") as status:
        report = recalibrate_checkpoint(
            model, checkpoint, output, images=images, eval_images=eval_images, batch_size=batch_size,
            limit=limit, seed=seed, img_size=img_size, device=device, ema=ema,
            allow_unfinished_prepbn=allow_unfinished_prepbn, force=force,
            progress=lambda s: status.update(f"{model}: {s}"),
        )
    if as_json:
        echo_json(report.to_dict())
        return
    from slab_deploy.render import recalibrate_summary

    print_all(*recalibrate_summary(report))


# ------------------------------------------------------------------------------------------------ export


@app.command()
def export(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output directory (default: ./<model>).")] = None,
    batch: Annotated[str | None, typer.Option(
        "--batch", metavar="N", help="Static batch size (default: dynamic batch).")] = None,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", help="Dynamic batch dimension (the default).")] = False,
    opset: Annotated[str, typer.Option("--opset", metavar="N", help=(
        "ONNX opset: 18-25 with the torch.export exporter (18 is its native one), "
        "7-20 with TorchScript."))] = "18",
    precision: Annotated[str, typer.Option("--precision", help=(
        f"{describe(EXPORT_PRECISIONS)}: one value, as an export holds one precision (`check "
        "--precision` takes a comma list and exports each); "
        "fp16 keeps SLA's normaliser and k^T v in fp32; "
        "int8 is a Q/DQ graph quantised from the fp32 one (docs/int8.md)."))] = "fp32",
    simplifier: Annotated[str, typer.Option(
        "--simplifier", help="onnxslim, onnxsim, none or auto (onnxslim, else onnxsim).")] = "auto",
    exporter: Annotated[str, typer.Option(
        "--exporter", help="dynamo (torch.export), torchscript, or auto (dynamo, falling back).")] = "auto",
    img_size: Annotated[str | None, typer.Option("--img-size", metavar="PX", help=(
        "Input resolution (default: the model's, 224); "
        "must be the checkpoint's for models with positional encodings."))] = None,
    sla_policy: Annotated[str, typer.Option("--sla-policy", help=(
        "fp16 only: mixed (fp16 matmuls, fp32 normaliser; the default) "
        "or fp32 (SLA in fp32, the authors' island)."))] = DEFAULT_SLA_POLICY,
    calibration: Annotated[Path | None, typer.Option("--calibration", metavar="DIR", help=(
        "int8: folder of calibration images (flat, or one folder per class); "
        "the demo models default to their held-out digits, any other model needs it."))] = None,
    calibration_samples: Annotated[str | None, typer.Option(
        "--calibration-samples", metavar="N",
        help="int8: images to calibrate on (default 128, at most 1024).")] = None,
    calibration_method: Annotated[str | None, typer.Option(
        "--calibration-method", help="int8: minmax (default), entropy or percentile (99.999%).")] = None,
    per_channel: Annotated[bool | None, typer.Option(
        "--per-channel/--per-tensor",
        help="int8: one weight scale per output channel (default) or per tensor.")] = None,
    activation_type: Annotated[str | None, typer.Option("--activation-type", help=(
        "int8: int8 activations (signed symmetric: what TensorRT builds, and as fast on ONNX Runtime "
        "x86; the default) or uint8 (asymmetric; ONNX Runtime CPU only, refused by build and "
        "--format engine). docs/int8.md."))] = None,
    fmt: Annotated[str, typer.Option("--format", help=(
        "onnx (DIR/model.onnx), engine (also DIR/model.plan: TensorRT) or triton (--output is a Triton "
        "model repository: REPO/<model>/config.pbtxt, 1/model.onnx)."))] = "onnx",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the parity inputs.")] = 0,
    force: Annotated[bool, typer.Option("--force", help=(
        "Replace an earlier export in the output directory "
        "(it is replaced whole, and only once the new one passed)."))] = False,
    ema: EmaOpt = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold, export to ONNX, simplify and parity-check: writes DIR/model.onnx and DIR/manifest.json.

    DIR is written whole or not at all: a failed export leaves it as it was and puts the failed
    artefacts in DIR.failed. --format engine also builds DIR/model.plan (TensorRT, checked first);
    --format triton writes the export as a model of the Triton repository --output REPO."""
    from slab_deploy.export.api import ExportOptions
    from slab_deploy.formats import export_format

    opts = ExportOptions.from_text(batch=batch, dynamic_batch=dynamic_batch, opset=opset,
                                   img_size=img_size, precision=precision, simplifier=simplifier,
                                   exporter=exporter, seed=seed, sla_policy=sla_policy,
                                   calibration=calibration, calibration_samples=calibration_samples,
                                   calibration_method=calibration_method, per_channel=per_channel,
                                   activation_type=activation_type)
    with console(stderr=True).status("exporting", spinner="dots") as status:
        done = export_format(model, checkpoint, output, opts, fmt=fmt, force=force, ema=ema,
                             allow_unfinished_prepbn=allow_unfinished_prepbn,
                             progress=lambda s: status.update(f"{model}: {s}"))
    from slab_deploy.render import delivered_summary, delivered_to_dict

    if as_json:
        echo_json(delivered_to_dict(done))
        return
    print_all(*delivered_summary(done))


# ------------------------------------------------------------------------------------------------ build


@app.command()
def build(
    artifacts: Annotated[Path, typer.Argument(
        help="Output directory of `export` (holds manifest.json and model.onnx).")],
    min_batch: Annotated[int | None, typer.Option("--min-batch", metavar="N", help=(
        "Smallest batch of the engine's profile "
        "(dynamic-batch exports; default: 1, or the --profile's smallest)."), show_default=False)] = None,
    opt_batch: Annotated[int | None, typer.Option("--opt-batch", metavar="N", help=(
        "Batch the engine is tuned for "
        "(default: --min-batch, or the --profile's median)."), show_default=False)] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", metavar="N", help=(
        "Largest batch of the engine's profile "
        "(default: 64, or the --profile's largest)."), show_default=False)] = None,
    profile: Annotated[str | None, typer.Option("--profile", help=(
        "CUDA device profile (see `slab-deploy profiles`) "
        "whose batches give min/median/max."))] = None,
    workspace: Annotated[float | None, typer.Option("--workspace", metavar="GIB", help=(
        "Builder workspace limit in GiB "
        "(default: TensorRT's, the device memory)."), show_default=False)] = None,
    opt_level: Annotated[int | None, typer.Option(
        "--opt-level", metavar="0-5", help="Builder optimisation level (default: TensorRT's, 3).",
        show_default=False)] = None,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help=(
        "Timing cache file: loaded when present, saved after the build "
        "(TensorRT; reused across builds)."))] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help=(
        "Version-compatible engine with TensorRT's lean runtime "
        "(later TensorRT releases of the same major load it)."))] = False,
    hardware_compat: Annotated[str, typer.Option("--hardware-compat", help=(
        "TensorRT hardware compatibility: "
        "none, ampere-plus or same-compute-capability."))] = "none",
    compute_capability: Annotated[str | None, typer.Option("--compute-capability", metavar="LIST", help=(
        "TensorRT-RTX targets, e.g. 8.9,12.0 "
        "(default: current, the GPU here; with a list no GPU is needed)."))] = None,
    weak_fp16: Annotated[bool, typer.Option("--weak-fp16", help=(
        "TensorRT 10 only: build an fp32 export weakly typed with the FP16 flag, "
        "SLA's normaliser pinned to fp32."))] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing model.plan and engine.json.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a TensorRT engine from an export: writes DIR/model.plan and its record DIR/engine.json
    (both or neither).

    Strongly typed (precision from the graph: fp16 export, INT8 Q/DQ export) on TensorRT 11 and
    TensorRT-RTX; TensorRT 10 also takes --weak-fp16. Without TensorRT it exits 1 naming the extra
    and the Docker image."""
    from slab_deploy.runtime.engine import EngineOptions, build_engine, compute_capabilities

    opts = EngineOptions(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, profile=profile,
                         workspace_gib=workspace, opt_level=opt_level, timing_cache=timing_cache,
                         version_compatible=version_compatible, hardware_compat=hardware_compat,
                         compute_capability=compute_capabilities(compute_capability), weak_fp16=weak_fp16,
                         force=force)
    with console(stderr=True).status("building", spinner="dots") as status:
        result = build_engine(artifacts, opts, progress=lambda s: status.update(f"{artifacts}: {s}"))
    if as_json:
        echo_json(result.record.to_dict())
        return
    from slab_deploy.render import build_summary

    print_all(*build_summary(result))


 # ------------------------------------------------------------------------------------------------ check



# ------------------------------------------------------------------------------------------------ check


@app.command()
def check(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    artifacts: Annotated[Path | None, typer.Option("--artifacts", "-a", help=(
        "Output directory of `export` "
        "(default: export now, in a temporary directory)."))] = None,
    backends: Annotated[str, typer.Option(
        "--backends", help=f"Comma list of {', '.join(CHECK_BACKENDS)}.")] = ",".join(CHECK_BACKENDS),
    precision: Annotated[str, typer.Option("--precision", help=(
        f"Comma list of {', '.join(EXPORT_PRECISIONS)}, "
        "each exported and checked (without --artifacts, which hold one)."))] = "fp32",
    inputs: Annotated[int | None, typer.Option("--inputs", help=(
        "Number of images (default: the whole demo set of a demo model, "
        "up to 1000 of --images spread over its classes, else 8 seeded random images)."),
        show_default=False)] = None,
    images: Annotated[Path | None, typer.Option("--images", help=(
        "Folder of real images through the model's preprocessing; one sub-folder per class gives labels, "
        "and every rung's top-1 accuracy is judged too."))] = None,
    replay: Annotated[Path | None, typer.Option(
        "--replay", help="io.npz of an earlier report: rerun its exact inputs.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 0,
    tolerance: Annotated[list[str] | None, typer.Option("--tolerance", help=(
        "Override RUNG:METRIC=VALUE (repeatable), "
        "e.g. ort_cuda:min_cosine=0.995."))] = None,
    report: Annotated[Path | None, typer.Option("--report", "--output", "-o", help=(
        "Directory for report.json, report.md and io.npz "
        "(--output/-o, as in the other commands, are the same option)."))] = None,
    ema: EmaOpt = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the parity ladder; exit 0 on pass, 3 naming the first rung that broke, 1 on bad input or a
    broken artefact."""
    from slab_deploy.check import check_and_report, raise_for_verdict

    with console(stderr=True).status("checking", spinner="dots") as status:
        done = check_and_report(
            model, checkpoint, report_dir=report, tolerance=tolerance or [], artifacts=artifacts,
            backends=csv(backends), precisions=csv(precision), inputs=inputs, images=images, replay=replay,
            seed=seed, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
            progress=lambda s: status.update(f"{model}: {s}"),
        )
    if as_json:
        echo_json(done.report.to_dict())
    else:
        from slab_deploy.render import check_summary

        print_all(*check_summary(done.report, done.paths))
    raise_for_verdict(done.report)


