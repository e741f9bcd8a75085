"""The `slab-deploy llm` group: models, fold, export, check, bench for the LLaMA-style language models.

Language models take token ids and decode with a key/value cache, so their commands are a group of
their own with the same shape as the vision ones (same option names where they mean the same)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slab_deploy.cli.app import CkptOpt, JsonOpt, UnfinishedOpt, app, csv, echo_json, print_all

llm_app = typer.Typer(
    help=(
        "Language models (SLAB LLaMA and its RMSNorm twin): list, fold, export with a KV cache, check, bench."
    ),
    no_args_is_help=True,
)
app.add_typer(llm_app, name="llm")

LLMOpt = Annotated[
    str, typer.Option("--model", "-m", help="Registered language model (see `slab-deploy llm models`).")
]


@llm_app.command("models")
def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'slab_*'.")] = "*",
    all_: Annotated[bool, typer.Option("--all", help="Include the tiny test variants.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the language models: architecture, norm, key layout, params, the paper's throughput."""
    from slab_deploy.models.llm import llm_rows

    rows = llm_rows(pattern, include_test=all_)
    if as_json:
        echo_json(rows)
        return
    from slab_deploy.render.llm import llm_models_table

    print_all(llm_models_table(rows))


@llm_app.command("fold")
def fold(
    model: LLMOpt,
    checkpoint: CkptOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folded checkpoint to write.")] = Path(
        "folded.pt"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold every PRepBN into q/k/v, gate/up and lm_head and write a folded checkpoint."""
    from slab_deploy.errors import ArtifactError
    from slab_deploy.models.folded import save_folded
    from slab_deploy.models.llm import create_llm
    from slab_deploy.passes.fold_llm import fold_llm

    if output.exists() and not force:
        raise ArtifactError(f"{output} exists; pass --force to overwrite it or choose another --output")
    m = create_llm(model, checkpoint, allow_unfinished_prepbn=allow_unfinished_prepbn)
    folded, report = fold_llm(m)
    info = getattr(m, "checkpoint_info", None)
    save_folded(folded, output, source_sha256=info.sha256 if info else None)
    if as_json:
        echo_json(report.to_dict())
        return
    from slab_deploy.render import fold_summary

    print_all(*fold_summary(report, output))


@llm_app.command("export")
def export(
    model: LLMOpt,
    checkpoint: CkptOpt = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory to write (model.onnx, manifest.json).")
    ] = Path("llm-export"),
    precision: Annotated[
        str, typer.Option("--precision", help="fp32 or fp16 (logits are fp32 either way).")
    ] = "fp32",
    fold_: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold the PRepBN layers first.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export to one ONNX graph with past/present key-value inputs (prefill: past length 0)."""
    from slab_deploy.export.llm import export_llm_model

    res = export_llm_model(
        model,
        checkpoint,
        output,
        precision=precision,
        fold=fold_,
        allow_unfinished_prepbn=allow_unfinished_prepbn,
        force=force,
    )
    if as_json:
        echo_json(res.manifest)
        return
    from slab_deploy.render.llm import llm_export_summary

    print_all(llm_export_summary(res))


@llm_app.command("check")
def check(
    model: LLMOpt,
    checkpoint: CkptOpt = None,
    export_dir: Annotated[
        Path | None, typer.Option("--export", help="An `llm export` directory: adds the ONNX Runtime rungs.")
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="Seeded prompts decoded together.")] = 2,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Tokens per prompt.")] = 8,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Greedy decoding steps.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prompts.")] = 0,
    rungs: Annotated[
        str | None,
        typer.Option(
            "--rungs",
            help=(
                "Comma-separated: fold, onnx, ort_cpu, ort_cuda, torch_cuda (default: all; "
                "the ONNX rungs only with --export)."
            ),
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime intra-op threads.")] = None,
    allow_unfinished_prepbn: UnfinishedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Greedy decoding of seeded prompts, token for token and logits per step, on every rung; exit 3
    when a rung fails."""
    from slab_deploy.check.llm import check_llm
    from slab_deploy.errors import ParityError, UnsupportedInputError

    if batch < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise UnsupportedInputError("--batch, --prompt-tokens and --new-tokens must be at least 1")
    report = check_llm(
        model,
        checkpoint,
        export_dir,
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        seed=seed,
        rungs=None if rungs is None else tuple(csv(rungs)),
        allow_unfinished_prepbn=allow_unfinished_prepbn,
        threads=threads,
    )
    if as_json:
        echo_json(report.to_dict())
    else:
        from slab_deploy.render.llm import llm_check_table

        print_all(llm_check_table(report))
    if not report.passed:
        failed = [r.rung for r in report.rungs if r.status == "failed"]
        raise ParityError(
            f"{model}: rungs {', '.join(failed) or '(none ran)'} failed the language-model "
            "tolerances (tolerances.LLM_TOLERANCES); see the table above"
        )


@llm_app.command("bench")
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="Language model(s), comma-separated.")],
    backend: Annotated[
        str, typer.Option("--backend", help="Comma-separated: torch-cpu, torch-cuda, ort-cpu, ort-cuda.")
    ] = "torch-cpu",
    precision: Annotated[
        str, typer.Option("--precision", help="fp32 or fp16 (fp16: CUDA backends).")
    ] = "fp32",
    batch: Annotated[
        str, typer.Option("--batch", help="Comma-separated batch sizes (1 and a serving batch).")
    ] = "1,8",
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length (prefill).")] = 128,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per prompt.")] = 32,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per case.")] = 1,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per case (median reported).")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (torch and ORT).")] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare/--no-compare", help="Also run each SLAB model's RMSNorm twin and report speed-ups."
        ),
    ] = True,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSON report here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Prefill and decode tokens/s and time to first token (seeded random weights: speed only)."""
    from slab_deploy.bench.llm import bench_llm
    from slab_deploy.errors import UnsupportedInputError

    try:
        batches = tuple(int(b) for b in csv(batch))
    except ValueError:
        raise UnsupportedInputError(
            f"--batch {batch!r} is not a comma-separated list of whole numbers"
        ) from None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    report = bench_llm(
        csv(model),
        backends=tuple(csv(backend)),
        precision=precision,
        batches=batches,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        warmup=warmup,
        runs=runs,
        threads=threads,
        compare=compare,
    )
    if output is not None:
        from slab_deploy.utils import atomic_write

        with atomic_write(output) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if as_json:
        echo_json(report.to_dict())
        return
    from slab_deploy.render.llm import llm_bench_tables

    print_all(*llm_bench_tables(report))
