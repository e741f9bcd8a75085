"""Tables of the pipeline commands: models, inspect, fold, recalibrate, export (and its formats),
build, check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

if TYPE_CHECKING:
    from slab_deploy.models.checkpoint import CheckpointInfo
    from slab_deploy.passes.fold import FoldReport
    from slab_deploy.passes.recalibrate import RecalibrationReport


from slab_deploy.render.base import key_value, num, table


def models_table(rows: Sequence[dict[str, Any]]) -> Any:
    """The zoo listing, from `slab_deploy.models.zoo_rows`."""
    t = table(f"slab-deploy model zoo ({len(rows)} models)",
               ("name", "family", "norm", "attention", "params (M)", "GMACs", "top-1", "weights"),
               right=("params (M)", "GMACs", "top-1"))
    for r in rows:
        t.add_row(r["name"], r["family"], r["norm"], "/".join(r["attention"]), num(r["params_m"], ".1f"),
                  num(r["gmacs"], ".2f"), num(r["paper_top1"], ".1f"), "released" if r["released"] else "-")
    return t


def inspect_table(path: str | Path, info: CheckpointInfo, variants: Sequence[str]) -> Any:
    """What `inspect` says about a checkpoint."""
    unfinished = [s for s in info.prepbn if not s.finished]
    if not info.prepbn:
        prep = "n/a (no PRepBN layers)"
    elif not unfinished:
        prep = f"finished ({len(info.prepbn)} layers, iter=0, warm=0)"
    else:
        prep = (f"UNFINISHED: {len(unfinished)}/{len(info.prepbn)} layers, least done at "
                f"{min(s.progress for s in unfinished):.1%} (iter {max(s.iter for s in unfinished)})")
    return key_value(str(path), [
        ("format", info.format),
        ("weights from", info.entry or "(top level)"),
        ("top-level keys", ", ".join(info.top_level_keys[:10]) if info.entry else "-"),
        ("layout", info.layout),
        ("variant(s)", ", ".join(variants) or _unmatched(info)),
        ("classes", str(info.num_classes)),
        ("PRepBN", prep),
        ("EMA weights", "yes (use --ema)" if info.has_ema else "no"),
        ("tensors / params", f"{info.num_tensors} / {info.num_params:,}"),
        ("inert objects", ", ".join(info.opaque_objects) or "-"),
        ("epoch / max acc", f"{info.epoch} / {info.max_accuracy}"),
        ("folded", "yes (slab-deploy fold)" if info.folded else "no"),
        ("key names", info.remapped or "as saved"),
        ("sha256", info.sha256),
    ])


def fold_summary(report: FoldReport, output: str | Path) -> list[Any]:
    """The fold table, its one-line summary and what was written."""
    return [
        fold_table(report),
        f"[bold]{report.summary()}[/bold]",
        escape(f"params {report.params_before:,} -> {report.params_after:,}; wrote {output}"),
    ]


def fold_table(report: FoldReport) -> Any:
    from rich.table import Table

    t = Table(title=f"fold report: {report.model}")
    for col in ("norm", "kind", "C", "action", "into", "through", "max |delta|"):
        t.add_column(col, justify="right" if col in ("C", "max |delta|") else "left", overflow="fold")
    for n in report.norms:
        action = {
            "folded": f"[green]folded ({n.side})[/green]",
            "kept-affine": "[yellow]kept affine[/yellow]",
            "kept-layernorm": "[dim]LayerNorm[/dim]",
        }[n.action]
        into = ", ".join(n.into) if n.into else escape(n.reason)
        t.add_row(
            n.name, n.kind, str(n.channels), action, into, ",".join(n.through) or "-",
            _delta(n.max_abs_delta),
        )
    return t


def _delta(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1e}" if math.isfinite(v) else f"[bold red]{v} (not finite)[/bold red]"


def recalibrate_summary(report: RecalibrationReport) -> list[Any]:
    """What `recalibrate` did: per BatchNorm how far its statistics moved, top-1 before and after,
    the images used and what was written."""
    t = table(f"re-estimated BatchNorm statistics: {report.model}", ("BatchNorm", "C", "mean moved (std)",
               "variance moved"), right=("C", "mean moved (std)", "variance moved"), overflow="fold")
    for n in report.norms:
        t.add_row(n.name, str(n.channels), f"{n.mean_shift:.3g}", f"{n.var_change:.1%}")
    b, a = report.before, report.after
    if b is not None and a is not None:
        where = "the calibration images" if report.eval_on_calibration_images else report.eval_source or ""
        acc = (f"{b.top1:.2f}% ({b.correct}/{b.total}) -> {a.top1:.2f}% ({a.correct}/{a.total}); "
               f"{report.changed_predictions} predictions changed; on {where}")
    else:
        acc = "no labels: not measured"
    m, v = report.largest("mean_shift"), report.largest("var_change")
    kv = key_value(f"recalibrate: {report.model}", [
        ("checkpoint", escape(f"{report.checkpoint} (sha256 {report.checkpoint_sha256[:12]})")),
        ("recalibrated",
         "the EMA weights (state_dict_ema)" if report.state == "state_dict_ema" else "the model weights"),
        ("images", escape(f"{report.images} from {report.images_source}; {report.batches} batches of <= "
                          f"{report.batch_size} (seed {report.seed})")),
        ("statistics", escape(f"{len(report.norms)} BatchNorms; largest moves: "
                              f"mean {m.mean_shift:.3g} std ({m.name}), "
                              f"variance {v.var_change:.1%} ({v.name})")),
        ("top-1", escape(acc)),
        ("written", escape(f"{report.output} (sha256 {report.output_sha256[:12]})")),
        ("time", f"{report.seconds:.1f}s"),
    ])
    return [t, kv, *(escape(f"note: {n}") for n in report.notes)]


def export_summary(manifest: dict[str, Any], onnx_path: Any) -> Any:
    """What an export did, from its manifest."""
    m = manifest
    kind = m.get("weights", {}).get("kind", "untrained" if m["untrained"] else "checkpoint")
    if kind == "checkpoint":
        weights = f"{m['checkpoint']['path']} (sha256 {m['checkpoint']['sha256'][:12]})"
    else:
        weights = escape(m["weights"]["label"])
        weights = f"[yellow]{weights}[/yellow]" if kind == "untrained" else weights
    fold = m["fold"]
    exp = m["export"]
    simp = m["simplify"]
    rows = [
        ("weights", weights),
        ("fold", f"{fold['folded']}/{len(fold['norms'])} norms folded, {fold['kept']} kept; "
                 f"max |delta logit| {fold['max_abs_delta']:.1e}"),
        ("exporter", f"{exp['exporter']} (opset {exp['opset']}, "
                     f"{'dynamic batch' if exp['dynamic_batch'] else 'batch ' + str(exp['batch'])})"
                     + (f"; fallback: {exp['fallback_reason']}" if exp["fallback_reason"] else "")),
        ("simplifier", f"{simp['used']}: {simp['nodes_before']} -> {simp['nodes_after']} nodes"
                       + (f" ({simp['note']})" if simp["note"] else "")),
        ("norm-free graph", "yes" if m["norm_free"] else f"no: {m['lint']['norm_nodes']}"),
    ]
    i8 = m["precision"].get("int8")
    if i8:
        cal = i8["calibration"]
        where = f"[yellow]{escape(cal['source'])}[/yellow]" if cal["latency_only"] else escape(cal["source"])
        weights = "per-channel" if i8["per_channel"] else "per-tensor"
        rows.append(("int8", f"{i8['method']}, {weights} weights; calibrated on {cal['count']} images: "
                             f"{where}; "
                             f"{len(i8['float_nodes'])} nodes kept float; "
                             f"{i8['qdq']['QuantizeLinear']} Q / {i8['qdq']['DequantizeLinear']} DQ"))
    for rung in ("onnx", "ort_cpu"):
        p = m["parity"].get(rung)
        if not p:
            continue
        if p.get("skipped"):
            rows.append((f"parity {rung}", f"[yellow]skipped[/yellow]: {p['reason']}"))
        else:
            mark = "[green]pass[/green]" if p["passed"] else "[red]FAIL[/red]"
            rows.append((f"parity {rung}", f"{mark} max|d| {p['max_abs']:.1e} (rel {p['max_rel']:.1e}), "
                                           f"cos {p['cosine']:.6f}, top-1 {p['top1']:.2f}"))
    rows.append(("time", ", ".join(f"{k} {v:.1f}s" for k, v in m["steps_seconds"].items())))
    rows.append(("written", f"{onnx_path} and manifest.json"))
    return key_value(f"export: {m['model']} ({m['precision']['mode']})", rows)


def build_summary(result: Any) -> list[Any]:
    """What `build` wrote: the engine's provenance (TensorRT, GPU, targets, profile, flags), the
    precision of its layers, its size and build time, and the notes."""
    r = result.record
    prof = r.profile
    batch = (f"static batch {prof['min'][0]}" if prof["static"]
             else f"batch {prof['min'][0]}/{prof['opt'][0]}/{prof['max'][0]} (min/opt/max)")
    gpu = (f"{r.gpu['name']} (compute capability {r.gpu['compute_capability']})" if r.gpu
           else "none (ahead-of-time build)")
    flags = {k: v for k, v in r.flags.items() if v not in (None, 0, False)}
    net = r.network
    precisions = ", ".join(f"{k.lower()} {v}"
                           for k, v in sorted(net["by_dtype"].items(), key=lambda kv: -kv[1]))
    heavy = ", ".join(f"{k.lower()} {v}"
                      for k, v in sorted(net["matmul_conv_by_dtype"].items(), key=lambda kv: -kv[1]))
    typed = ("weakly typed FP16 (SLA normaliser pinned to fp32)" if r.typing == "weak-fp16"
             else "strongly typed")
    rows = [
        ("TensorRT", f"{r.tensorrt['flavour']} {r.tensorrt['version']}, {typed}"),
        ("graph", f"{r.onnx['file']} ({r.precision}, sha256 {r.onnx['sha256'][:12]})"),
        ("GPU", gpu),
        ("runs on", f"compute capability {', '.join(r.targets['compute_capabilities'])}"
                    + ("; version compatible" if r.targets["version_compatible"] else "")),
        ("profile", f"{prof['input']}: {batch}"),
        ("flags", ", ".join(f"{k} {v}" for k, v in flags.items()) or "defaults"),
        ("layers", f"{net['layers']}: {precisions}; matmul/conv: {heavy or '-'}"),
        ("engine", f"{result.plan_path} ({r.plan['bytes'] / (1 << 20):.1f} MiB), "
                   f"record {result.record_path.name}"),
        ("build time", f"{r.build_seconds:.1f}s"),
    ]
    out: list[Any] = [key_value(f"build: {r.model}", [(k, escape(v)) for k, v in rows])]
    return out + [escape(f"note: {n}") for n in result.notes]


def check_summary(report: Any, paths: dict[str, Path] | None = None) -> list[Any]:
    """The parity ladder, the verdict line and, when reports were written, where (and the replay)."""
    style = "green" if report.passed else "red"
    out = [check_table(report), f"[bold {style}]{escape(report.verdict())}[/bold {style}]"]
    if paths:
        out.append(escape(f"reports: {paths['json']}, {paths['markdown']}; replay: {report.replay_command}"))
    return out


def check_table(report: Any) -> Any:
    from rich.table import Table

    title = (f"parity ladder: {report.model}"
             + (" [yellow](untrained weights)[/yellow]" if report.untrained else ""))
    if report.weights == "demo":
        title += " (demo weights)"
    labelled = report.reference_accuracy is not None
    cols = ["rung", "prec", "status", "max abs", "max rel", "cosine", "SQNR dB", "top-1", "top-5"]
    cols += ["accuracy"] if labelled else []
    t = Table(title=title)
    for col in [*cols, "needed to pass"]:
        t.add_column(col, justify="left" if col in ("rung", "prec", "status", "needed to pass") else "right",
                     overflow="fold")
    first = report.first_failure
    notes: list[str] = []
    for r in report.rungs:
        m = r.metrics or {}

        def f(k: str, fmt: str, m: dict[str, Any] = m) -> str:
            v = m.get(k)
            return "-" if v is None else format(v, fmt)

        if r.status == "skipped":
            notes.append(escape(f"{r.rung} ({r.precision}) skipped: {r.reason}"))
            status = f"[dim]skipped [{len(notes)}][/dim]"
        elif r.status == "pass":
            status = "[green]pass[/green]"
        elif r.status == "error":
            notes.append(escape(f"{r.rung} ({r.precision}) could not run: {r.reason}"))
            status = f"[bold red]ERROR[/bold red] [{len(notes)}]" + (" (first)" if r is first else "")
        else:
            status = "[bold red]FAIL[/bold red]" + (" (first)" if r is first else "")
            if m.get("nonfinite") or m.get("nonfinite_reference"):
                notes.append(escape(f"{r.rung} ({r.precision}): {'; '.join(r.failures)}"))
                status += f" [{len(notes)}]"
        need = ", ".join(f"{k}={v:.3g}" for k, v in r.needed.items()) if r.status in ("pass", "fail") else ""
        row = [r.rung, r.precision, status, f("max_abs", ".1e"), f("max_rel", ".1e"), f("cosine", ".6f"),
               f("sqnr_db", ".1f"), f("top1", ".2f"), f("top5", ".2f")]
        if labelled:
            row.append("-" if m.get("accuracy") is None else f"{100 * m['accuracy']:.2f}%")
        t.add_row(*row, need)
    if labelled:
        n = report.inputs.get("count")
        notes.append(escape(f"top-1/top-5: agreement with the reference; "
                            f"accuracy: against the labels of {n} images "
                            f"({report.inputs.get('source')}); "
                            f"the reference scores {100 * report.reference_accuracy:.2f}%"))
    if notes:
        t.caption = "\n".join(f"[{i}] {n}" for i, n in enumerate(notes, 1))
        t.caption_justify = "left"
    return t


def delivered_summary(done: Any) -> list[Any]:
    """What `export --format` delivered: the export's table, then the engine's or the repository's."""
    out: list[Any] = []
    if done.export is not None:
        out.append(export_summary(done.export.manifest, done.export.onnx_path))
    if done.engine is not None:
        out += list(build_summary(done.engine))
    if done.repository is not None:
        from slab_deploy.render.serve import serve_repo_summary

        out.append(serve_repo_summary(done.repository))
    return out


def delivered_to_dict(done: Any) -> dict[str, Any]:
    """`export --json`: the manifest (format onnx, as before), with the engine record or the
    repository model beside it for the other formats."""
    if done.format == "onnx":
        return dict(done.export.manifest)
    d: dict[str, Any] = {"format": done.format}
    if done.export is not None:
        d["manifest"] = done.export.manifest
    if done.engine is not None:
        d["engine"] = done.engine.record.to_dict()
    if done.repository is not None:
        d["repository"] = done.repository.to_dict()
    return d


def _unmatched(info: CheckpointInfo) -> str:
    """The variant row where no registered variant's keys match. A folded file's never do (its norms
    are gone): its fold metadata names the model."""
    model = (info.folded or {}).get("model")
    if model:
        return f"{model}, from its fold metadata (load it with --model {model})"
    return "no registered variant matches"

