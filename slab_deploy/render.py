"""Every rich table and summary the command line prints, in one place (imported by the CLI only).

Each function takes a library result and returns renderables; nothing here decides, computes a
verdict or writes a file. Importing this module stays light (rich only, no torch).
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

if TYPE_CHECKING:
    from slab_deploy.models.checkpoint import CheckpointInfo
    from slab_deploy.passes.fold import FoldReport
    from slab_deploy.passes.recalibrate import RecalibrationReport
    from slab_deploy.profiles import Profile


def console(stderr: bool = False) -> Any:
    """A rich console; off a terminal (CI logs) tables get at least 160 columns, not 80."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(stderr=stderr, highlight=False, width=width)


def _table(title: str, columns: Sequence[str], right: Sequence[str] = (), **column: Any) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left", **column)
    return t


def _key_value(title: str, rows: Sequence[tuple[str, str]]) -> Any:
    """A two-column table without header: bold keys, plain values."""
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


# ------------------------------------------------------------------------------------------------ models


def models_table(rows: Sequence[dict[str, Any]]) -> Any:
    """The zoo listing, from `slab_deploy.models.zoo_rows`."""
    t = _table(f"slab-deploy model zoo ({len(rows)} models)",
               ("name", "family", "norm", "attention", "params (M)", "GMACs", "top-1", "weights"),
               right=("params (M)", "GMACs", "top-1"))
    for r in rows:
        t.add_row(r["name"], r["family"], r["norm"], "/".join(r["attention"]), _num(r["params_m"], ".1f"),
                  _num(r["gmacs"], ".2f"), _num(r["paper_top1"], ".1f"), "released" if r["released"] else "-")
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
    return _key_value(str(path), [
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
    ])


def profiles_table(profiles: Sequence[Profile]) -> Any:
    """The device profiles (benchmark targets)."""
    t = _table("device profiles",
               ("name", "device", "backends", "precisions", "batches", "threads", "description"),
               overflow="fold")
    for p in profiles:
        t.add_row(p.name, p.device, ",".join(p.backends), ",".join(p.precisions),
                  ",".join(map(str, p.batches)),
                  ",".join("default" if x is None else str(x) for x in p.threads),
                  p.description + (" (emulated)" if p.emulated else ""))
    return t


# ------------------------------------------------------------------------------------------------ fold


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
    t = _table(f"re-estimated BatchNorm statistics: {report.model}", ("BatchNorm", "C", "mean moved (std)",
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
    kv = _key_value(f"recalibrate: {report.model}", [
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
    return _key_value(f"export: {m['model']} ({m['precision']['mode']})", rows)


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
    out: list[Any] = [_key_value(f"build: {r.model}", [(k, escape(v)) for k, v in rows])]
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


def bench_tables(report: Any) -> list[Any]:
    from rich.table import Table

    kinds = set(getattr(report, "weights", {}).values())
    tag = " (untrained weights)" if report.untrained else " (demo weights)" if kinds == {"demo"} else ""
    t = Table(title=f"bench on {report.environment.get('gpu') or report.environment.get('cpu')}{tag}")
    for col in ("model", "variant", "backend", "prec", "batch", "thr", "median ms", "p90", "p99", "CV",
                "img/s", "note"):
        t.add_column(col, justify=(
            "right" if col in ("batch", "thr", "median ms", "p90", "p99", "CV", "img/s") else "left"
        ), overflow="fold")
    for r in report.results:
        c = r.case
        note = (("[yellow]unstable[/yellow]" if r.unstable else "") if r.status == "ok"
                else f"[dim]{escape(r.status + ': ' + r.reason[:90])}[/dim]")
        fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        t.add_row(c.model, c.variant, c.backend, c.precision, str(c.batch), str(c.threads or "-"),
                  fmt(r.median_ms, ".3f"), fmt(r.p90_ms, ".3f"), fmt(r.p99_ms, ".3f"), fmt(r.cv, ".1%"),
                  fmt(r.throughput, ",.0f"), note)
    out = [t]
    if report.speedups:
        s = Table(title="speed-up of the folded SLAB model")
        for col in ("SLAB", "vs", "backend", "prec", "batch", "thr", "speed-up"):
            s.add_column(col, justify="right" if col in ("batch", "thr", "speed-up") else "left")
        for x in report.speedups:
            colour = "green" if x["speedup"] >= 1 else "red"
            s.add_row(x["slab"], x["other"], x["backend"], x["precision"], str(x["batch"]),
                      str(x["threads"] or "-"), f"[{colour}]{x['speedup']:.2f}x[/{colour}]")
        out.append(s)
    if report.best_speedups and len({b for x in report.best_speedups for b in x["backends"]}) > 1:
        s = Table(title="speed-up, best backend each side (over the backends measured for both)")
        for col in ("SLAB", "vs", "prec", "batch", "thr", "SLAB ms", "other ms", "speed-up"):
            s.add_column(col, justify="left" if col in ("SLAB", "vs", "prec") else "right")
        for x in report.best_speedups:
            colour = "green" if x["speedup"] >= 1 else "red"
            s.add_row(x["slab"], x["other"], x["precision"], str(x["batch"]), str(x["threads"] or "-"),
                      f"{x['slab_ms']:.3f} ({x['slab_backend']})",
                      f"{x['other_ms']:.3f} ({x['other_backend']})",
                      f"[{colour}]{x['speedup']:.2f}x[/{colour}]")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------------ reference


# ------------------------------------------------------------------------------------------------ serve


def serve_repo_summary(result: Any) -> Any:
    """What `serve-repo` wrote, from a `RepoResult`."""
    c = result.config
    batching = "off" if c.dynamic_batching is None else (
        "dynamic, preferred " + (",".join(map(str, c.dynamic_batching["preferred_batch_size"])) or "any")
        + f", queue delay {c.dynamic_batching['max_queue_delay_microseconds']} us")
    rows = [
        ("runs with", f"platform {c.platform}" if c.platform else f"backend {c.backend}"),
        ("max_batch_size", str(c.max_batch_size) + ("  (static-batch export: full shape, no batching)"
                                                     if c.max_batch_size == 0 else "")),
        ("input", f"{c.input.name} {c.input.dtype} {list(c.input.dims)}"),
        ("output", f"{c.output.name} {c.output.dtype} {list(c.output.dims)}"),
        ("batching", batching),
        ("instances", f"{c.instance_count} x {c.instance_kind}"),
    ]
    if c.accelerator is not None:
        rows.append(("accelerator", c.accelerator["name"]))
    rows += [(f"note {i + 1}", n) for i, n in enumerate(result.notes)]
    rows.append(("written", f"{result.model_dir}/ ({', '.join(sorted(result.files))})"
                 + (", replacing the previous model" if result.replaced else "")))
    return _key_value(f"triton model: {escape(result.name)} ({result.flavour})",
                      [(k, escape(v)) for k, v in rows])


def serve_ready(server: Any, models: dict[str, str]) -> Any:
    """Where a started `TritonServer` listens and what it serves."""
    rows = [("HTTP", server.http_url), ("gRPC", server.grpc_url), ("metrics", server.metrics_url),
            ("models", ", ".join(f"{m} ({b})" for m, b in models.items())), ("pid", str(server.pid)),
            ("stop", "Ctrl-C or SIGTERM")]
    return _key_value(f"tritonserver ready on {server.repo}", [(k, escape(v)) for k, v in rows])


def load_table(report: Any) -> Any:
    """What `serve-bench` measured, from a `LoadReport`."""
    d = report.to_dict()
    lat = d["latency_ms"]
    rows = [
        ("server", f"{d['url']} ({d['protocol']}), model {d['model']}"),
        ("load", f"{d['concurrency']} clients, batch {d['batch']}, {d['seconds']:.1f} s"),
        ("requests", f"{d['ok']} ok, {d['failed']} failed"),
        ("throughput", f"{d['throughput_rps']:.1f} requests/s ({d['throughput_images_s']:.1f} images/s)"),
        ("latency", "ms: " + ", ".join(f"{k} {_num(lat[k], '.2f')}"
                                       for k in ("p50", "p90", "p99", "mean", "max"))),
    ]
    rows += [(f"error x{n}", msg) for msg, n in d["errors"].items()]
    title = "serve-bench" + (" [red]FAILED REQUESTS[/red]" if d["failed"] else "")
    return _key_value(title, [(k, escape(v)) for k, v in rows])


def cli_reference(group: Any, prog: str = "slab-deploy") -> str:
    """A Markdown reference of the command line (docs/cli.md), from its parsed form: the click group
    the CLI's typer app builds, read by attribute (this module imports neither), and the type hints
    of each command's function. Per command: its help, usage, and every argument and option with its
    type, default and help.

    The text depends on the code alone: no terminal width, colour or markup is involved, and a
    default that would name this machine (an absolute path, or one under the home, temporary or
    working directory) is never printed: it reads "machine-dependent". Give such an option
    `show_default="a description"`, as for any environment-dependent value (a CPU count, a cache
    directory); that text is printed instead. A default computed when the command runs
    (`default_factory`) reads "computed at run time" unless it is described so."""
    import collections.abc
    import enum
    import inspect
    import os
    import tempfile
    import typing

    def md(text: str, cell: bool = True) -> str:
        """One line of Markdown: special characters escaped outside `code spans`; in a table cell
        every | escaped (GFM wants that inside code spans too)."""
        parts = " ".join(str(text).replace("\b", "").split()).split("`")
        for j in range(0, len(parts), 2):
            for ch in "\\*<>" + ("" if cell else "|"):
                parts[j] = parts[j].replace(ch, "\\" + ch)
        out = "`".join(parts)
        return out.replace("|", "\\|") if cell else out

    def paragraphs(text: str | None, cell: bool = False) -> list[str]:
        blocks = inspect.cleandoc(text or "").split("\n\n")
        return [md(b, cell) for b in blocks if b.replace("\b", "").strip()]

    def type_name(hint: Any) -> str:
        origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
        if origin in (list, tuple, set, collections.abc.Sequence):
            return f"{type_name(args[0]) if args else 'text'}, repeatable"
        if origin is typing.Literal:
            return "one of " + ", ".join(f"`{a}`" for a in args)
        if origin is not None and len(args) == 1:  # X | None
            return type_name(args[0])
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return "one of " + ", ".join(f"`{m.value}`" for m in hint)
        names = {bool: "flag", int: "integer", float: "number", str: "text", Path: "path"}
        return names.get(hint, "text") if isinstance(hint, type) else "text"

    places = (Path.home(), Path(tempfile.gettempdir()), Path.cwd(), Path(sys.prefix))
    here = {str(d) for d in places if len(str(d)) > 1}

    def default(p: Any) -> str:
        shown, d = getattr(p, "show_default", None), p.default
        if getattr(p, "required", False):
            return "required"
        if isinstance(shown, str):
            return md(shown)
        if shown is False:
            return ""
        if callable(d):
            return "computed at run time"
        if getattr(p, "is_flag", False) and isinstance(d, bool):
            if p.secondary_opts:
                return f"`{(p.opts if d else p.secondary_opts)[0]}`"
            return "on" if d else "off"
        if d is None or (isinstance(d, (list, tuple)) and not d):
            return ""
        values = d if isinstance(d, (list, tuple)) else [d]
        text = ",".join(str(v.value if isinstance(v, enum.Enum) else v) for v in values)
        if os.path.isabs(text) or text.startswith("~") or any(h in text for h in here):
            return "machine-dependent"
        return md(f"`{text}`")

    def spelling(p: Any) -> str:
        if p.param_type_name == "argument":
            return f"`{(p.metavar or p.name).upper()}`"
        spelled = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        return spelled + (f" `{p.metavar}`" if p.metavar else "")

    def usage(name: str, cmd: Any) -> str:
        pieces = [f"{prog} {name}".strip(), "[OPTIONS]"]
        for p in cmd.params:
            if p.param_type_name == "argument" and not getattr(p, "hidden", False):
                arg = (p.metavar or p.name).upper() + ("..." if p.nargs != 1 else "")
                pieces.append(arg if p.required else f"[{arg}]")
        if hasattr(cmd, "commands"):
            pieces.append("COMMAND [ARGS]...")
        return " ".join(pieces)

    def table(cmd: Any) -> list[str]:
        params = [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]
        if not params:
            return []
        try:
            hints = typing.get_type_hints(inspect.unwrap(cmd.callback)) if cmd.callback else {}
        except (NameError, TypeError):  # an annotation that names what the CLI module cannot see
            hints = {}
        rows = ["| argument / option | default | type | meaning |", "|---|---|---|---|"]
        for p in params:
            click_type = str(getattr(getattr(p, "type", None), "name", "text")).lower()
            kind = type_name(hints[p.name]) if p.name in hints else click_type
            rows.append(f"| {spelling(p)} | {default(p)} | {kind} | {md(getattr(p, 'help', None) or '')} |")
        return [*rows, ""]

    def section(title: str, cmd: Any, name: str) -> list[str]:
        helps = (f"{b}\n" for b in paragraphs(cmd.help))
        return [title, "", *helps, f"    {usage(name, cmd)}", "", *table(cmd)]

    commands = [(n, c) for n, c in group.commands.items() if not getattr(c, "hidden", False)]
    lines = [
        f"# `{prog}` command line", "",
        "<!-- Generated from the command line by `python tools/cli_reference.py --write`: do not edit by "
        "hand (tests/test_docs.py fails when this file and the command line differ). -->", "",
        *(f"{b}\n" for b in paragraphs(group.help)), f"    {usage('', group)}", "",
        "| command | what it does |", "|---|---|",
        *(f"| [`{n}`](#{prog}-{n}) | {(paragraphs(c.help, cell=True) or [''])[0]} |" for n, c in commands),
        "",
        "Every command takes `--help`. Exit codes and error messages: [ci.md](ci.md), "
        "[troubleshooting.md](troubleshooting.md).", "",
    ]
    if table(group):
        lines += [f"Options of `{prog}` itself, before the command:", "", *table(group)]
    for name, cmd in commands:
        lines += section(f"## `{prog} {name}`", cmd, name)
    return "\n".join(lines).rstrip("\n") + "\n"


def delivered_summary(done: Any) -> list[Any]:
    """What `export --format` delivered: the export's table, then the engine's or the repository's."""
    out: list[Any] = []
    if done.export is not None:
        out.append(export_summary(done.export.manifest, done.export.onnx_path))
    if done.engine is not None:
        out += list(build_summary(done.engine))
    if done.repository is not None:
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
