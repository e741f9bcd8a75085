"""Where the time goes: a profiled run of one benchmark case, summarised by category.

`trace_targets` runs each target on the runner `bench` times (runtime.make_runner, same model
preparation),
measures its latency without the profiler, then runs it again under a profiler and sums time by:

- category of work (matmul, conv, norm, softmax, elementwise, reduction, copy/cast/layout, ...),
  from CUDA kernel names (torch profiler / CUPTI, which also sees ONNX Runtime's kernels), from
  ATen operator names (torch on the CPU) or from ONNX operator types (ONNX Runtime's profiler on
  the CPU);
- model component (attention, mlp, norm, embed/merge, head; "glue" is the rest: residual adds,
  window partition, rolls, pooling), for the torch backends, from ranges recorded around modules;
- the top kernels or operators by time.

Figures are per iteration. Kernel sums are device time; the latency measured without the profiler
is also given, so a launch-bound case shows as a kernel sum well below the latency.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.bench.cache import onnx_for
from slab_deploy.bench.cases import Case, Target, load_target, reason
from slab_deploy.bench.categories import (
    ATEN_CATEGORIES,
    CATEGORY_ORDER,
    Row,
    categorize,
    kernels_from_chrome_trace,
    ops_from_ort_profile,
    summarize_rows,
)
from slab_deploy.bench.environment import environment
from slab_deploy.bench.timing import time_prepared
from slab_deploy.choices import BACKENDS
from slab_deploy.errors import ConfigError
from slab_deploy.profiles import Profile

# Model components, matched on module class names; the outermost match labels a subtree.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("attention", r"Attention|Attn|LePE"),
    ("mlp", r"^Mlp$|^MLP$|FeedForward"),
    ("norm", r"Norm|RepBN|ChannelAffine"),
    ("embed/merge", r"Embed|Merg|Downsample"),
)


@dataclass
class TraceResult:
    model: str
    variant: str
    backend: str
    precision: str
    batch: int
    threads: int | None
    source: str  # what the breakdown was read from
    iters: int
    latency_ms: float | None = None  # median, measured without the profiler
    traced_total_ms: float = 0.0  # sum of the breakdown per iteration (device time for CUDA)
    categories: dict[str, float] = field(default_factory=dict)
    components: dict[str, float] = field(default_factory=dict)
    top: list[Row] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.model if self.variant in ("folded", "baseline") else f"{self.model} ({self.variant})"



def _component_hooks(model: Any) -> list[Any]:
    """Record a profiler range around the outermost module of each component kind."""
    import torch

    handles: list[Any] = []
    labelled: list[str] = []
    for name, mod in model.named_modules():
        if name and any(name.startswith(p + ".") for p in labelled):
            continue
        cls = type(mod).__name__
        kind = next((k for k, pat in COMPONENTS if re.search(pat, cls)), None)
        if kind is None and name.split(".")[-1] == "head" and isinstance(mod, torch.nn.Linear):
            kind = "head"
        if not name:
            kind = "forward"  # the whole model: what the components leave is "glue"
        elif kind is None:
            continue
        else:
            labelled.append(name)
        label = f"component::{kind}"

        def pre(_m: Any, _a: Any, label: str = label) -> None:
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            _m._slab_trace_rf = rf  # type: ignore[attr-defined]

        def post(_m: Any, _a: Any, _o: Any) -> None:
            rf = _m.__dict__.pop("_slab_trace_rf", None)
            if rf is not None:
                rf.__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def _component_times(prof: Any, cuda: bool, iters: int) -> dict[str, float]:
    """ms per iteration inside each component range: device time of the kernels launched in it
    (CUDA), or the time spent in it (CPU). Read from the CPU-side range events only (the GPU-side
    copies of user ranges would count twice)."""
    from torch.autograd import DeviceType

    out: dict[str, float] = {}
    for e in prof.events():
        if not e.name.startswith("component::") or e.device_type != DeviceType.CPU:
            continue
        if cuda:
            v = getattr(e, "device_time_total", None)
            t = float(v if v is not None else getattr(e, "cuda_time_total", 0.0))
        else:
            t = float(e.cpu_time_total)
        kind = e.name.split("::", 1)[1]
        out[kind] = out.get(kind, 0.0) + t / 1e3 / iters
    return out


def _profile(fn: Any, iters: int, cuda: bool, sync: Any, out_dir: Path) -> tuple[Any, Path]:
    import inspect

    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # One profiling cycle; acc_events (torch >= 2.4) also silences the "clears events" warning.
    kwargs: dict[str, Any] = (
        {"acc_events": True} if "acc_events" in inspect.signature(profile.__init__).parameters else {})
    with profile(activities=acts, **kwargs) as prof:
        for _ in range(iters):
            fn()
        if sync:
            sync()
        if cuda:
            torch.cuda.synchronize()
    raw = out_dir / "chrome_trace.json"
    prof.export_chrome_trace(str(raw))
    gz = out_dir / "chrome_trace.json.gz"
    with open(raw, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    raw.unlink()
    return prof, gz


def trace_case(target: Target, case: Case, profile: Profile, out_dir: Path, *, iters: int = 10,
               export_cache: Path | None = None) -> TraceResult:
    """Latency (no profiler), then a profiled run of `iters` iterations, summarised."""
    import copy

    import torch

    from slab_deploy.models import get_spec
    from slab_deploy.runtime.factory import make_runner

    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = profile.device == "cuda"
    res = TraceResult(case.model, case.variant, case.backend, case.precision, case.batch, case.threads,
                      source="", iters=iters)
    x_np = np.random.default_rng(0).standard_normal((case.batch, *get_spec(case.model).input_size),
                                                    dtype=np.float32)

    def runner(source: Any, backend: str = case.backend, profile_prefix: str | None = None) -> Any:
        return make_runner(backend, source, profile.device, case.precision, sla_policy=profile.sla_policy,
                           compile_mode=profile.compile_mode, threads=case.threads,
                           profile_prefix=profile_prefix, ort_cuda_layout=profile.ort_cuda_layout)

    if case.backend.startswith("torch"):
        model = load_target(target)
        with torch.inference_mode():
            p = runner(copy.deepcopy(model)).prepare(x_np)
            res.latency_ms = float(np.median(
                time_prepared(p, profile.warmup, profile.iters, profile.min_seconds)))
            # The profiled run: eager on a fresh copy with component ranges (a CUDA graph or a
            # compiled graph replays kernels the profiler may attribute to no module).
            if case.backend == "torch":
                m = copy.deepcopy(model)
                hooks = _component_hooks(m)
                p = runner(m).prepare(x_np)
            else:
                hooks = []
            for _ in range(3):
                p.step()
            prof, gz = _profile(p.step, iters, cuda, None, out_dir)
            for h in hooks:
                h.remove()
        res.files["chrome_trace"] = gz.name
        if cuda:
            rows = kernels_from_chrome_trace(gz, iters)
            res.source = "CUDA kernels (torch profiler)"
        else:
            rows = [Row(e.key, e.self_cpu_time_total / 1e3 / iters, e.count / iters,
                        categorize(e.key, ATEN_CATEGORIES))
                    for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
            res.source = "ATen operators, self CPU time (torch profiler)"
        comps = _component_times(prof, cuda, iters)
        forward = comps.pop("forward", None)
        if comps and forward is not None:
            # Same measure on both sides: device time of the kernels in each range (CPU: time in range).
            comps["glue"] = max(forward - sum(comps.values()), 0.0)
            res.components = {k: comps[k] for k in ("embed/merge", "norm", "attention", "mlp", "head", "glue")
                              if k in comps}
    else:
        onnx_path = onnx_for(target, case.precision, export_cache or out_dir.parent / "onnx",
                             profile.sla_policy, profile.exporter, activation_type=profile.activation_type)
        p = runner(onnx_path).prepare(x_np)
        res.latency_ms = float(np.median(
            time_prepared(p, profile.warmup, profile.iters, profile.min_seconds)))
        if case.backend == "ort-cpu":
            warm = 3
            r = runner(onnx_path, profile_prefix=str(out_dir / "ort_profile"))
            p = r.prepare(x_np)
            for _ in range(warm + iters):
                p.step()
            target_path = out_dir / "ort_profile.json"
            r.end_profiling().replace(target_path)
            rows = ops_from_ort_profile(target_path, iters, skip_runs=warm)
            res.files["ort_profile"] = target_path.name
            res.source = "ONNX operators, node time (ONNX Runtime profiler)"
        else:
            for _ in range(3):
                p.step()
            _prof, gz = _profile(p.step, iters, True, p.sync, out_dir)
            res.files["chrome_trace"] = gz.name
            rows = kernels_from_chrome_trace(gz, iters)
            res.source = "CUDA kernels (torch profiler, CUPTI)"
    res.categories, res.top = summarize_rows(rows)
    res.traced_total_ms = sum(res.categories.values())
    return res


@dataclass
class TraceReport:
    environment: dict[str, Any]
    profile: dict[str, Any]
    results: list[TraceResult]
    command: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "command": self.command, "environment": self.environment,
                "profile": self.profile, "results": [asdict(r) for r in self.results]}


TRACE_BACKENDS = tuple(b for b in BACKENDS if b != "tensorrt")  # an engine has no profiler ranges to read


def check_trace_profile(profile: Profile) -> None:
    """trace profiles one case per target: one backend (not tensorrt), one precision, one batch
    and one thread count; anything else is refused (ConfigError) naming the option."""
    import torch

    for what, values in (("--backends", profile.backends), ("--precision", profile.precisions),
                         ("--batch", profile.batches), ("--threads", profile.threads)):
        if len(values) > 1:
            shown = ",".join("default" if v is None else str(v) for v in values)
            raise ConfigError(f"trace profiles one case per model: pass one value to {what}, not {shown} "
                              "(run trace once per combination)")
    backend = profile.backends[0]
    if backend not in TRACE_BACKENDS:
        raise ConfigError(f"trace supports the backends {', '.join(TRACE_BACKENDS)}, not {backend!r}")
    if profile.device != "cuda" and backend not in ("torch", "ort-cpu"):
        raise ConfigError(
            f"--backends {backend} runs on a GPU: pass --device cuda, or use torch or ort-cpu on the CPU")
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or a GPU host")


def trace_targets(targets: Sequence[Target], profile: Profile, output: Path, *, iters: int = 10,
                  export_cache: Path | None = None, progress: Any = None) -> TraceReport:
    """Trace the one case of `profile` (see check_trace_profile) for every target; a target that
    fails is recorded (status error) and the others still run."""
    import torch

    from slab_deploy.runtime.base import UnsupportedBackend

    check_trace_profile(profile)
    if iters < 1:
        raise ConfigError("--iters must be at least 1")
    backend, precision, batch, threads = (profile.backends[0], profile.precisions[0], profile.batches[0],
                                          profile.threads[0])
    results = []
    task = progress.add_task("tracing", total=len(targets)) if progress is not None else None
    for t in targets:
        case = Case(t.model, t.variant, backend, precision, batch, threads)
        if progress is not None:
            progress.update(task, description=case.key)
        d = output / f"{t.model}-{t.variant}"
        try:
            res = trace_case(t, case, profile, d, iters=iters, export_cache=export_cache)
        except UnsupportedBackend as exc:
            res = TraceResult(t.model, t.variant, backend, precision, batch, threads, "", iters,
                              status="skipped", reason=str(exc))
        except Exception as exc:  # one target failing must not hide the others
            res = TraceResult(t.model, t.variant, backend, precision, batch, threads, "", iters,
                              status="error", reason=reason(exc))
        finally:
            if profile.device == "cuda":
                torch.cuda.empty_cache()
        res.files = {k: f"{d.name}/{v}" for k, v in res.files.items()}
        results.append(res)
        if progress is not None:
            progress.advance(task)
    return TraceReport(environment(profile.device), profile.to_dict(), results,
                       created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


@dataclass
class TraceOutcome:
    """A finished trace: the report, the files written, and the error to exit with (None: exit 0)."""

    report: TraceReport
    paths: dict[str, Path]
    failure: ConfigError | None


def run_trace(targets: Sequence[Target], profile: Profile, output: Path, *, iters: int = 10, top: int = 12,
              export_cache: Path | None = None, progress: Any = None, command: str = "") -> TraceOutcome:
    """`slab-deploy trace`: trace every target, write trace.json and trace.md; a target that failed
    to trace is the failure (ConfigError, exit 1) once the files are written."""
    rep = trace_targets(targets, profile, output, iters=iters, export_cache=export_cache, progress=progress)
    rep.command = command
    paths = write_outputs(rep, output, top)
    failed = [r for r in rep.results if r.status == "error"]
    failure = ConfigError(f"{len(failed)} target(s) failed to trace: "
                          + "; ".join(f"{r.label}: {r.reason}" for r in failed[:3])) if failed else None
    return TraceOutcome(rep, paths, failure)


def to_markdown(report: TraceReport, top: int = 12) -> str:
    env = report.environment
    ok = [r for r in report.results if r.status == "ok"]
    lines = [
        "# slab-deploy trace",
        "",
        f"- date: {report.created}",
        f"- command: `{report.command}`",
        f"- device: {env.get('gpu') or env.get('cpu')} ({env.get('device')}); "
        f"driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')}",
        f"- versions: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, "
        f"slab-deploy {env.get('slab-deploy')}",
        "- figures: ms per iteration; latency is the median measured without the profiler; the breakdown is "
        "device time of CUDA kernels (or operator time on the CPU) summed by category",
        "",
    ]
    for r in report.results:
        if r.status != "ok":
            lines.append(f"- {r.label}: {r.status}: {r.reason}")
    if not ok:
        return "\n".join(lines) + "\n"
    first = ok[0]
    lines += [f"## By category ({first.backend}, {first.precision}, batch {first.batch}; {first.source})", "",
              "| category | " + " | ".join(r.label for r in ok) + " |", "|---|" + "---|" * len(ok)]
    cats = [c for c in CATEGORY_ORDER if any(c in r.categories for r in ok)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{r.categories.get(c, 0.0):.3f}" for r in ok) + " |")
    lines.append("| **sum** | " + " | ".join(f"**{r.traced_total_ms:.3f}**" for r in ok) + " |")
    lines.append("| latency (median, no profiler) | "
                 + " | ".join(f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-" for r in ok) + " |")
    with_comp = [r for r in ok if r.components]
    if with_comp:
        comps = [c for c in ("embed/merge", "norm", "attention", "mlp", "head", "glue")
                 if any(c in r.components for r in with_comp)]
        lines += ["", "## By model component (torch eager, ranges around modules)", "",
                  "| component | " + " | ".join(r.label for r in with_comp) + " |",
                  "|---|" + "---|" * len(with_comp)]
        for c in comps:
            lines.append(
                f"| {c} | " + " | ".join(f"{r.components.get(c, 0.0):.3f}" for r in with_comp) + " |")
    for r in ok:
        lines += ["", f"## Top {min(top, len(r.top))} of {r.label}", "", "| ms | calls | category | name |",
                  "|---|---|---|---|"]
        for row in r.top[:top]:
            name = row.name if len(row.name) <= 110 else row.name[:107] + "..."
            lines.append(f"| {row.ms:.3f} | {row.calls:g} | {row.category} | `{name.replace('|', '/')}` |")
    return "\n".join(lines) + "\n"


def write_outputs(report: TraceReport, out: Path, top: int = 12) -> dict[str, Path]:
    from slab_deploy.utils import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "trace.json", "markdown": out / "trace.md"}
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(report, top))
    return paths
