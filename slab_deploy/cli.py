"""The `slab-deploy` command line. typer lives only here; each command is thin over one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slab_deploy import __version__
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
    import shutil

    from rich.console import Console

    # Reports are read in CI logs too: do not squeeze tables into 80 columns when not on a terminal.
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(stderr=stderr, highlight=False, width=width)


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
    from slab_deploy.models import get_spec, list_models
    from slab_deploy.models.stats import model_stats

    rows: list[dict[str, Any]] = []
    for name in list_models(pattern, include_test=all_):
        s = get_spec(name)
        params, gmacs = model_stats(name) if measure else (None, None)
        rows.append(
            {
                "name": name,
                "family": s.family,
                "norm": s.norm,
                "attention": list(s.attention),
                "params_m": None if params is None else round(params / 1e6, 2),
                "gmacs": None if gmacs is None else round(gmacs, 2),
                "paper_params_m": s.paper_params_m,
                "paper_gmacs": s.paper_gmacs,
                "paper_top1": s.paper_top1,
                "released": s.released,
                "layout": s.layout,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"slab-deploy model zoo ({len(rows)} models)")
    for col in ("name", "family", "norm", "attention", "params (M)", "GMACs", "top-1", "weights"):
        t.add_column(col, justify="right" if col in ("params (M)", "GMACs", "top-1") else "left")
    for r in rows:
        t.add_row(
            r["name"],
            r["family"],
            r["norm"],
            "/".join(r["attention"]),
            "-" if r["params_m"] is None else f"{r['params_m']:.1f}",
            "-" if r["gmacs"] is None else f"{r['gmacs']:.2f}",
            "-" if r["paper_top1"] is None else f"{r['paper_top1']:.1f}",
            "released" if r["released"] else "-",
        )
    _console().print(t)


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
    d = info.to_dict()
    d["variants"] = variants
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))
        return
    from rich.table import Table

    t = Table(title=str(checkpoint), show_header=False)
    t.add_column(style="bold")
    t.add_column()
    unfinished = [s for s in info.prepbn if not s.finished]
    prep = (
        "n/a (no PRepBN layers)"
        if not info.prepbn
        else (
            f"finished ({len(info.prepbn)} layers, iter=0, warm=0)"
            if not unfinished
            else f"UNFINISHED: {len(unfinished)}/{len(info.prepbn)} layers, least done at "
            f"{min(s.progress for s in unfinished):.1%} (iter {max(s.iter for s in unfinished)})"
        )
    )
    rows = [
        ("format", info.format),
        ("weights from", info.entry or "(top level)"),
        ("top-level keys", ", ".join(info.top_level_keys[:10]) if info.entry else "-"),
        ("layout", info.layout),
        ("variant(s)", ", ".join(variants) or "no registered variant matches"),
        ("classes", str(info.num_classes)),
        ("PRepBN", prep),
        ("EMA weights", "yes (use --ema)" if info.has_ema else "no"),
        ("tensors / params", f"{info.num_tensors} / {info.num_params:,}"),
        ("inert objects", ", ".join(info.opaque_objects) or "-"),
        ("epoch / max acc", f"{info.epoch} / {info.max_accuracy}"),
        ("folded", "yes (slab-deploy fold)" if info.folded else "no"),
        ("key names", info.remapped or "as saved"),
        ("sha256", info.sha256),
    ]
    for k, v in rows:
        t.add_row(k, v)
    _console().print(t)


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
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    from slab_deploy.report import fold_table

    con = _console()
    con.print(fold_table(report))
    con.print(f"[bold]{report.summary()}[/bold]")
    con.print(f"params {report.params_before:,} -> {report.params_after:,}; wrote {output}")


# ------------------------------------------------------------------------------------------------ export


def _whole_number(flag: str, value: str | None) -> int | None:
    """Parse a whole-number option here, so garbage is one line and exit 1 like every bad input."""
    if value is None:
        return None
    from slab_deploy.errors import UnsupportedInputError

    text = value.strip()
    if not text.lstrip("+-").isdigit():
        raise UnsupportedInputError(f"{flag} must be a whole number, not {value!r}")
    return int(text)


@app.command()
def export(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory [default: ./<model>].")] = None,
    batch: Annotated[str | None, typer.Option("--batch", metavar="N", help="Static batch size (default: dynamic batch).")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Dynamic batch dimension (the default).")] = False,
    opset: Annotated[str, typer.Option("--opset", metavar="N", help="ONNX opset: 18-25 with the torch.export exporter (18 is its native one), 7-20 with TorchScript.")] = "18",
    precision: Annotated[str, typer.Option("--precision", help="fp32 or fp16 (fp16 keeps SLA's normaliser and k^T v in fp32).")] = "fp32",
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
    from slab_deploy.errors import UnsupportedInputError
    from slab_deploy.export.api import ExportOptions, export_model

    if batch is not None and dynamic_batch:
        raise UnsupportedInputError("--batch and --dynamic-batch exclude each other; pass one")
    opset_n = _whole_number("--opset", opset)
    assert opset_n is not None
    opts = ExportOptions(batch=_whole_number("--batch", batch), opset=opset_n, precision=precision, simplifier=simplifier,
                         exporter=exporter, seed=seed, img_size=_whole_number("--img-size", img_size), sla_policy=sla_policy)
    con = _console(stderr=True)
    with con.status("exporting", spinner="dots") as status:
        result = export_model(
            model, checkpoint, output, opts, force=force, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
            progress=lambda s: status.update(f"{model}: {s}"),
        )
    if as_json:
        typer.echo(json.dumps(result.manifest, indent=2))
        return
    from slab_deploy.report import export_summary

    _console().print(export_summary(result.manifest, result.onnx_path))


# ------------------------------------------------------------------------------------------------ check


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def check(
    model: ModelOpt,
    checkpoint: CkptOpt = None,
    artifacts: Annotated[Path | None, typer.Option("--artifacts", "-a", help="Output directory of `export` (default: export now, in a temporary directory).")] = None,
    backends: Annotated[str, typer.Option("--backends", help="Comma list of torch, onnx, ort-cpu, ort-cuda, tensorrt.")] = "torch,onnx,ort-cpu,ort-cuda,tensorrt",
    precision: Annotated[str, typer.Option("--precision", help="Comma list of fp32, fp16 (without --artifacts).")] = "fp32",
    inputs: Annotated[int, typer.Option("--inputs", help="Number of seeded random images (or the most images to read).")] = 8,
    images: Annotated[Path | None, typer.Option("--images", help="Folder of real images, fed through the model's preprocessing.")] = None,
    replay: Annotated[Path | None, typer.Option("--replay", help="io.npz of an earlier report: rerun its exact inputs.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 0,
    tolerance: Annotated[list[str] | None, typer.Option("--tolerance", help="Override RUNG:METRIC=VALUE (repeatable), e.g. ort_cuda:min_cosine=0.995.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Directory for report.json, report.md and io.npz.")] = None,
    ema: EmaOpt = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the parity ladder; exit 0 on pass, 3 naming the first rung that broke, 1 on bad input or a broken artefact."""
    from slab_deploy.check import (
        check_report_dir,
        parse_tolerance_overrides,
        raise_for_verdict,
        run_check,
        write_reports,
    )

    overrides = parse_tolerance_overrides(tolerance or [])
    if report is not None:
        check_report_dir(report)  # before any work: a bad --report must cost nothing
    con = _console(stderr=True)
    with con.status("checking", spinner="dots") as status:
        rep = run_check(
            model, checkpoint, artifacts=artifacts, backends=_csv(backends), precisions=_csv(precision), inputs=inputs,
            images=images, replay=replay, seed=seed, tolerance=overrides, ema=ema,
            allow_unfinished_prepbn=allow_unfinished_prepbn, progress=lambda s: status.update(f"{model}: {s}"),
        )
    base = f"slab-deploy check --model {model}" + (f" --checkpoint {checkpoint}" if checkpoint else "") + (
        f" --artifacts {artifacts}" if artifacts else f" --precision {precision}"
    ) + "".join(f" --tolerance {t}" for t in tolerance or [])
    paths = write_reports(rep, report, base) if report is not None else {}
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2, default=str))
    else:
        from slab_deploy.report import check_table

        out = _console()
        out.print(check_table(rep))
        style = "green" if rep.passed else "red"
        out.print(f"[bold {style}]{rep.verdict()}[/bold {style}]")
        if paths:
            from rich.markup import escape

            out.print(escape(f"reports: {paths['json']}, {paths['markdown']}; replay: {rep.replay_command}"))
    raise_for_verdict(rep)


# ------------------------------------------------------------------------------------------------ bench


def _targets(compare: str | None, models_: str | None, unfolded: bool, checkpoint: Path | None) -> list[Any]:
    """What `bench` and `trace` run: a SLAB model with its baselines, or a list of models (SLAB
    ones folded, and also unfolded with --unfolded; a checkpoint only applies to a single model)."""
    from slab_deploy.bench import Target, compare_targets
    from slab_deploy.errors import ConfigError
    from slab_deploy.models import get_spec

    if compare and models_:
        raise ConfigError("--compare and --models exclude each other")
    if compare:
        return compare_targets(compare, unfolded=unfolded, checkpoint=str(checkpoint) if checkpoint else None)
    if not models_:
        raise ConfigError("pass --compare SLAB_MODEL or --models a,b,c")
    names = _csv(models_)
    targets = []
    for n in names:
        slab = get_spec(n).is_slab
        targets.append(Target(n, "folded" if slab else "baseline", str(checkpoint) if checkpoint and len(names) == 1 else None))
        if slab and unfolded:
            targets.append(Target(n, "unfolded", targets[-1].checkpoint))
    return targets


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
    onnx_cache: Annotated[Path | None, typer.Option("--onnx-cache", help="Where exported graphs are kept for reuse [default: OUTPUT/onnx].")] = None,
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
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from slab_deploy.bench import (
        check_threshold,
        compare_against,
        judge,
        load_baseline,
        run_bench,
        write_outputs,
    )
    from slab_deploy.errors import ConfigError
    from slab_deploy.profiles import Profile, load_profile

    if device not in ("cuda", "cpu"):
        raise ConfigError(f"--device must be cuda or cpu, not {device!r}")
    targets = _targets(compare, models_, unfolded, checkpoint)
    check_threshold(threshold)
    baseline = load_baseline(against) if against is not None else None  # malformed: refused before the run
    if profile:
        prof = load_profile(profile)
        if prof.device != device:
            raise ConfigError(f"profile {prof.name} is for --device {prof.device}, not {device}")
    else:
        cuda = device == "cuda"
        prof = Profile(
            name=f"default-{device}", description="command-line defaults", device=device,
            backends=("torch", "torch-cudagraph", "ort-cuda") if cuda else ("ort-cpu",),
            precisions=("fp32", "fp16") if cuda else ("fp32",), batches=(1, 64) if cuda else (1,),
            warmup=20 if cuda else 3, iters=100 if cuda else 10, min_seconds=0.5,
        )
    overrides: dict[str, Any] = {}
    if backends:
        overrides["backends"] = tuple(_csv(backends))
    if precision:
        overrides["precisions"] = tuple(_csv(precision))
    if batch:
        overrides["batches"] = tuple(_int_csv(batch, "--batch"))
    if threads:
        overrides["threads"] = tuple(_int_csv(threads, "--threads"))
    if iters is not None:
        overrides["iters"] = iters
    if warmup is not None:
        overrides["warmup"] = warmup
    if min_seconds is not None:
        overrides["min_seconds"] = min_seconds
    if compile_mode is not None:
        overrides["compile_mode"] = compile_mode
    if sla_policy is not None:
        overrides["sla_policy"] = sla_policy
    if exporter is not None:
        overrides["exporter"] = exporter
    if overrides:
        from slab_deploy.profiles import validate

        merged = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in prof.to_dict().items() if k not in ("source", "extra")}, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()}}
        if merged.get("threads") == [None]:
            merged["threads"] = None
        prof = replace(validate(merged, "command line"), source=prof.source)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_console(stderr=True), transient=True) as progress:
        rep = run_bench(targets, prof, output, progress=progress, export_cache=onnx_cache)
    rep.command = "slab-deploy " + " ".join(sys.argv[1:])
    failure = judge(rep, compare_against(rep, baseline, threshold) if baseline is not None else None)
    paths = write_outputs(rep, output)  # complete files, verdict included, before any non-zero exit
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2, default=str))
    else:
        from rich.markup import escape

        from slab_deploy.report import bench_tables

        con = _console()
        for t in bench_tables(rep):
            con.print(t)
        for note in rep.notes:
            con.print(escape(f"note: {note}"))
        con.print(escape("wrote " + ", ".join(str(p) for p in paths.values())))
    if failure is not None:
        failure.args = (f"{failure} (reports written: {paths['json']}, {paths['csv'].name}, {paths['markdown'].name})",)
        raise failure


def _int_csv(value: str, option: str) -> list[int]:
    """A comma list of positive integers; anything else is one line naming the option."""
    from slab_deploy.errors import ConfigError

    out = []
    for item in _csv(value):
        if not (item.isascii() and item.isdigit() and len(item) <= 15) or int(item) < 1:
            shown = item if len(item) <= 20 else item[:17] + "..."
            raise ConfigError(f"{option} takes a comma list of positive integers (e.g. 1,8,64), not {shown!r}")
        out.append(int(item))
    if not out:
        raise ConfigError(f"{option} takes a comma list of positive integers (e.g. 1,8,64), not {value!r}")
    return out


@app.command()
def trace(
    device: Annotated[str, typer.Option("--device", help="cuda or cpu.")] = "cpu",
    models_: Annotated[str | None, typer.Option("--models", help="Comma list of models (SLAB ones run folded).")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help="A SLAB model: trace it folded with its LayerNorm and FLatten baselines.")] = None,
    unfolded: Annotated[bool, typer.Option("--unfolded", help="Also trace SLAB models unfolded (as trained).")] = False,
    backend: Annotated[str, typer.Option("--backend", help="torch, torch-cudagraph, torch-compile, ort-cpu, ort-cuda or ort-cuda-graph (default: torch with --device cuda, ort-cpu with --device cpu).")] = "",
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16.")] = "fp32",
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from slab_deploy.errors import ConfigError
    from slab_deploy.profiles import validate
    from slab_deploy.trace import to_markdown, trace_targets, write_outputs

    if device not in ("cuda", "cpu"):
        raise ConfigError(f"--device must be cuda or cpu, not {device!r}")
    backend = backend or ("torch" if device == "cuda" else "ort-cpu")
    targets = _targets(compare, models_, unfolded, checkpoint)
    cuda = device == "cuda"
    prof = validate({
        "name": f"trace-{device}", "description": "trace settings", "device": device, "backends": [backend],
        "precisions": [precision], "batches": [batch], "threads": threads, "warmup": 10 if cuda else 3,
        "iters": 30 if cuda else 5, "min_seconds": 0.0, "compile_mode": compile_mode, "sla_policy": sla_policy,
        "exporter": exporter,
    }, "command line")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_console(stderr=True), transient=True) as progress:
        rep = trace_targets(targets, prof, output, backend=backend, precision=precision, batch=batch, threads=threads,
                            iters=iters, progress=progress)
    rep.command = "slab-deploy " + " ".join(sys.argv[1:])
    paths = write_outputs(rep, output, top)
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2, default=str))
    else:
        from rich.markdown import Markdown

        con = _console()
        con.print(Markdown(to_markdown(rep, top)))
        con.print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [r for r in rep.results if r.status == "error"]
    if failed:
        raise ConfigError(f"{len(failed)} target(s) failed to trace: " + "; ".join(f"{r.label}: {r.reason}" for r in failed[:3]))


@app.command()
def profiles(as_json: JsonOpt = False) -> None:
    """List the device profiles (benchmark targets) in profiles/."""
    from slab_deploy.profiles import list_profiles, load_profile

    profs = [load_profile(n) for n in list_profiles()]
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in profs], indent=2))
        return
    from rich.table import Table

    t = Table(title="device profiles")
    for col in ("name", "device", "backends", "precisions", "batches", "threads", "description"):
        t.add_column(col, overflow="fold")
    for p in profs:
        t.add_row(p.name, p.device, ",".join(p.backends), ",".join(p.precisions), ",".join(map(str, p.batches)),
                  ",".join("default" if x is None else str(x) for x in p.threads), p.description + (" (emulated)" if p.emulated else ""))
    _console().print(t)


class _Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM, so `finally` blocks and context managers
    clean up (temporary files, staging directories, locks) exactly as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _install_signal_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise `_Interrupted` once; a repeat while cleaning up is ignored.
    Returns the previous handlers (empty off the main thread, where handlers cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    fired: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        raise _Interrupted(signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def main() -> None:
    """Console-script entry: user errors print one line and exit with their code (1, or 3 for
    parity failures, 4 for benchmark regressions); usage errors are typer's (exit 2); SIGINT and
    SIGTERM clean up, print one line and exit 130 and 143 (128 + the signal number)."""
    import signal

    previous = _install_signal_handlers()
    try:
        app()  # standalone mode: typer prints usage errors and help, and exits
    except SlabDeployError as exc:
        from rich.markup import escape

        _console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except _Interrupted as exc:
        name = signal.Signals(exc.signum).name
        _console(stderr=True).print(f"[bold red]interrupted[/bold red] by {name}: stopped and cleaned up", soft_wrap=True)
        sys.exit(128 + exc.signum)
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


if __name__ == "__main__":  # pragma: no cover
    main()
