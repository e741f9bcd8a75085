"""The run: every case of a profile over its targets, each timed through its runtime/ runner."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.bench.cache import calibration_note, checkpoint_identity, onnx_for
from slab_deploy.bench.cases import Case, Target, load_target, reason, target_key
from slab_deploy.bench.environment import environment
from slab_deploy.bench.gate import check_threshold, compare_against, judge, load_baseline
from slab_deploy.bench.memory import check_memory
from slab_deploy.bench.outputs import write_outputs
from slab_deploy.bench.results import CV_WARN, BenchReport, Result
from slab_deploy.bench.speedups import best_speedups, speedups
from slab_deploy.bench.timing import copy_times, stats, time_prepared
from slab_deploy.choices import BACKENDS
from slab_deploy.errors import ConfigError, ExportError, SlabDeployError
from slab_deploy.profiles import Profile
from slab_deploy.weights.default import default_weights


@dataclass
class BenchOutcome:
    """A finished run: the report (verdict included), the files written, and the error to exit
    with (None: exit 0)."""

    report: BenchReport
    paths: dict[str, Path]
    failure: SlabDeployError | None


def benchmark(targets: Sequence[Target], profile: Profile, output: Path, *, against: Path | None = None,
              threshold: float = 0.10, export_cache: Path | None = None, progress: Any = None,
              command: str = "") -> BenchOutcome:
    """`slab-deploy bench`: check the threshold and the --against file (bad input: exit 1 before
    anything runs), run every case, judge the run (against the baseline when given) and write
    bench.json/csv/md in full, verdict included, before the caller exits with `failure`."""
    check_threshold(threshold)
    baseline = load_baseline(against) if against is not None else None  # malformed: refused before the run
    rep = run_bench(targets, profile, output, progress=progress, export_cache=export_cache)
    rep.command = command
    failure = judge(rep, compare_against(rep, baseline, threshold) if baseline is not None else None)
    paths = write_outputs(rep, output)
    if failure is not None:
        failure.args = (f"{failure} (reports written: {paths['json']}, {paths['csv'].name}, "
                        f"{paths['markdown'].name})",)
    return BenchOutcome(rep, paths, failure)


def run_bench(
    targets: Sequence[Target],
    profile: Profile,
    output: Path,
    *,
    progress: Any = None,
    export_cache: Path | None = None,
) -> BenchReport:
    """Run every (target, backend, precision, batch, threads) case of `profile`.

    Bad input fails before anything runs or is written (a SlabDeployError, exit 1): an unknown
    backend, no CUDA device, an output path that is a file, a checkpoint that does not load, a
    batch whose estimated memory exceeds what the device has. A case that then fails is recorded
    with status "error" and the others still run; `judge` turns the results into the verdict."""
    import torch

    from slab_deploy.models.stats import model_stats
    from slab_deploy.runtime.base import UnsupportedBackend

    for b in profile.backends:
        if b not in BACKENDS:
            raise ConfigError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or a GPU host")
    cache = export_cache or (output / "onnx")
    for what, p in (("--output", output), ("--onnx-cache", cache)):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{what} {p} is a file; pass a directory")
    # a model named twice runs once
    targets = list({(t.model, t.variant, t.checkpoint): t for t in targets}.values())
    notes: list[str] = []
    models = preflight(targets, profile, notes)
    env = environment(profile.device)
    cases = [
        (t, Case(t.model, t.variant, b, p, bs, th))
        for t in targets
        for b in profile.backends
        for p in profile.precisions
        for bs in profile.batches
        for th in (profile.threads if b in ("ort-cpu", "torch") and profile.device == "cpu" else (None,))
    ]
    results: list[Result] = []
    export_failed: dict[tuple[str, str, str | None, str], str] = {}
    task = progress.add_task("benchmarking", total=len(cases)) if progress is not None else None
    for t, case in cases:
        if progress is not None:
            progress.update(task, description=case.key)
        res = Result(case, "ok")
        try:
            from slab_deploy.models import get_spec

            x_np = np.random.default_rng(0).standard_normal((case.batch, *get_spec(t.model).input_size),
                                                            dtype=np.float32)
            if case.backend.startswith("torch"):
                import copy

                source: Any = copy.deepcopy(models[target_key(t)])
            else:
                graph = (t.model, t.variant, t.checkpoint, case.precision)
                if graph in export_failed:
                    raise ExportError(f"{export_failed[graph]} "
                                      "(the export failed for an earlier case of this run)")
                res.note = calibration_note(t.model, case.precision, profile.activation_type)
                if res.note and "LATENCY ONLY" in res.note and f"{t.model}: {res.note}" not in notes:
                    notes.append(f"{t.model}: {res.note}")
                try:
                    source = onnx_for(t, case.precision, cache, profile.sla_policy, profile.exporter,
                                      notes=notes, activation_type=profile.activation_type)
                except UnsupportedBackend:
                    raise
                except Exception as exc:
                    export_failed[graph] = reason(exc)
                    raise
            samples, extra = measure(case, source, profile, x_np)
            st = stats(samples)
            if not all(math.isfinite(v) for v in st.values()) or st["median_ms"] <= 0:
                raise ArithmeticError("timing produced a non-positive or non-finite median "
                                      f"({st['median_ms']!r} ms)")
            for k, v in st.items():
                setattr(res, k, v)
            for k, v in extra.items():
                setattr(res, k, v)
            res.samples = len(samples)
            res.throughput = case.batch / (st["median_ms"] / 1e3)
            res.unstable = st["cv"] > CV_WARN
            _, gmacs = model_stats(t.model)
            res.gmacs = gmacs
            res.tflops = 2 * gmacs * 1e9 * case.batch / (st["median_ms"] / 1e3) / 1e12
            if profile.peak_tflops:
                res.mfu = res.tflops / profile.peak_tflops
        except UnsupportedBackend as exc:
            res.status, res.reason = "skipped", str(exc)
        except Exception as exc:  # a backend crashing on one case must not hide the others
            res.status, res.reason = "error", reason(exc)
        finally:
            if profile.device == "cuda":
                torch.cuda.empty_cache()
        results.append(res)
        if progress is not None:
            progress.advance(task)
    report = BenchReport(env, profile.to_dict(), results,
                         created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report.weights = {t.model: "checkpoint" if t.checkpoint else default_weights(t.model) for t in targets}
    report.untrained = all(w == "untrained" for w in report.weights.values())
    report.speedups = speedups(results)
    report.best_speedups = best_speedups(results)
    report.notes = notes
    return report


def measure(
    case: Case, source: Any, profile: Profile, x_np: np.ndarray
) -> tuple[list[float], dict[str, Any]]:
    """Time one case on its runner (`source`: the torch model, or the ONNX graph's path): the
    timed samples, and what else was measured (timer, compile time, peak memory, and on a GPU the
    host<->device copies of one batch, apart from the compute)."""
    import torch

    from slab_deploy.runtime.factory import make_runner

    with torch.inference_mode():
        runner = make_runner(case.backend, source, profile.device, case.precision,
                             sla_policy=profile.sla_policy, compile_mode=profile.compile_mode,
                             threads=case.threads, max_batch=max(profile.batches),
                             ort_cuda_layout=profile.ort_cuda_layout)
        p = runner.prepare(x_np)
        samples = time_prepared(p, profile.warmup, profile.iters, profile.min_seconds)
        extra: dict[str, Any] = {**p.details, "timer": p.timer}
        if p.peak_memory is not None:
            extra["peak_mem_mib"] = p.peak_memory()
    if p.output_elems:
        extra.update(copy_times(x_np, p.output_elems))
    return samples, extra


def preflight(
    targets: Sequence[Target], profile: Profile, notes: list[str]
) -> dict[tuple[str, str, str | None], Any]:
    """Load (and fold) every target and estimate the memory of its largest batch, before any case
    runs: a checkpoint that does not load is bad input (CheckpointError, exit 1), not a failed case,
    and a batch that cannot fit is refused (ConfigError) instead of running the host out of memory.
    Returns the loaded models when a torch backend will use them (else nothing is kept)."""
    keep = any(b.startswith("torch") for b in profile.backends)
    models: dict[tuple[str, str, str | None], Any] = {}
    for t in targets:
        m = load_target(t)
        checkpoint_identity(t)
        check_memory(m, t, max(profile.batches), profile.device, notes)
        if keep:
            models[target_key(t)] = m
        del m
    return models
