"""Latency and throughput measurement -> report.

Every case runs warm-up iterations, then timed iterations (at least `iters`, and for at least
`min_seconds`). GPU compute is timed with CUDA events on the stream that does the work (torch,
TensorRT) or with perf_counter after a synchronisation (ONNX Runtime, whose stream is its own);
inputs are already on the device, and the host<->device copies of one batch are measured apart
and reported in their own columns. CPU cases use perf_counter.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.choices import BACKENDS
from slab_deploy.errors import (
    ArtifactError,
    BenchCaseError,
    CheckpointError,
    ConfigError,
    ExportError,
    RegressionError,
    SlabDeployError,
)
from slab_deploy.profiles import Profile

CV_WARN = 0.10  # coefficient of variation above which a case is flagged unstable


@dataclass
class Case:
    model: str
    variant: str  # folded | unfolded | baseline
    backend: str
    precision: str
    batch: int
    threads: int | None = None

    @property
    def key(self) -> str:
        t = f"/t{self.threads}" if self.threads else ""
        return f"{self.model}[{self.variant}]/{self.backend}/{self.precision}/b{self.batch}{t}"


@dataclass
class Result:
    case: Case
    status: str  # ok | skipped | error
    reason: str = ""
    median_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    cv: float | None = None
    samples: int = 0
    throughput: float | None = None  # images / s at the median
    h2d_ms: float | None = None
    d2h_ms: float | None = None
    peak_mem_mib: float | None = None
    compile_s: float | None = None
    gmacs: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    unstable: bool = False
    timer: str = ""

    def flat(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("case"))
        d["key"] = self.case.key
        return d


@dataclass
class BenchReport:
    environment: dict[str, Any]
    profile: dict[str, Any]
    results: list[Result]
    command: str = ""
    created: str = ""
    speedups: list[dict[str, Any]] = field(default_factory=list)
    best_speedups: list[dict[str, Any]] = field(default_factory=list)
    untrained: bool = True
    notes: list[str] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)  # set by `judge`

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "command": self.command,
            "environment": self.environment,
            "profile": self.profile,
            "untrained_weights": self.untrained,
            "results": [r.flat() for r in self.results],
            "speedups": self.speedups,
            "best_speedups": self.best_speedups,
            "notes": self.notes,
            "verdict": self.verdict,
        }


# ---------------------------------------------------------------------------------------------- environment


def environment(device: str) -> dict[str, Any]:
    import torch

    from slab_deploy import __version__
    from slab_deploy._deps import version_of

    env: dict[str, Any] = {
        "slab-deploy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        **_ort_environment(),
        "tensorrt": version_of("tensorrt") or version_of("tensorrt-rtx") or version_of("tensorrt-rtx-cu13-bindings") or version_of("tensorrt-rtx-cu12-bindings"),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            compute_capability=f"{p.major}.{p.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
    return env


def _ort_environment() -> dict[str, Any]:
    """The ONNX Runtime that will actually be imported (not just the installed distribution's
    metadata: a CPU and a GPU build can sit side by side on a host)."""
    from slab_deploy._deps import available, require

    if not available("onnxruntime"):
        return {"onnxruntime": None, "onnxruntime_providers": []}
    ort = require("onnxruntime")
    return {"onnxruntime": ort.__version__, "onnxruntime_providers": list(ort.get_available_providers())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------- timing


def _stats(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    mean = float(a.mean())
    return {
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": mean,
        "min_ms": float(a.min()),
        "cv": float(a.std(ddof=1) / mean) if len(a) > 1 and mean > 0 else 0.0,
    }


def time_host(fn: Callable[[], Any], warmup: int, iters: int, min_seconds: float, sync: Callable[[], None] | None = None) -> list[float]:
    """perf_counter timing (after `sync` when given) of `fn`."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(out) < iters or (time.perf_counter() < t_end and len(out) < iters * 20):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_cuda_events(fn: Callable[[], Any], warmup: int, iters: int, min_seconds: float, stream: Any = None) -> list[float]:
    """CUDA-event timing of `fn` on `stream` (default: the current stream)."""
    import torch

    stream = stream or torch.cuda.current_stream()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(out) < iters or (time.perf_counter() < t_end and len(out) < iters * 20):
        n = max(iters - len(out), 10)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for s, e in events:
            s.record(stream)
            fn()
            e.record(stream)
        torch.cuda.synchronize()
        out += [s.elapsed_time(e) for s, e in events]
    return out


# ---------------------------------------------------------------------------------------------- per-backend setup


def prepare_torch(model: Any, case: Case, profile: Profile, x_np: np.ndarray) -> tuple[Callable[[], Any], dict[str, Any]]:
    """Move `model` to the case's device and dtype and return a no-argument callable running one
    batch (eager, CUDA graph replay or torch.compile), plus what setup measured (compile time).
    Call it, and the callable, under `torch.inference_mode()`."""
    import torch

    from slab_deploy.models.layers import set_sla_policy
    from slab_deploy.runtime.base import UnsupportedBackend
    from slab_deploy.runtime.torch_runner import DTYPES

    dev = torch.device(profile.device)
    if dev.type == "cpu" and case.precision != "fp32":
        raise UnsupportedBackend(f"torch {case.precision} on the CPU is not a deployment target")
    if case.backend != "torch" and dev.type != "cuda":
        raise UnsupportedBackend(f"{case.backend} needs a CUDA device")
    dtype = DTYPES[case.precision]
    m = model.to(dev, dtype).eval()
    set_sla_policy(m, profile.sla_policy if dtype != torch.float32 else "native")
    extra: dict[str, Any] = {}
    if case.threads and dev.type == "cpu":
        torch.set_num_threads(case.threads)
    x = torch.from_numpy(x_np).to(dev, dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if case.backend == "torch-compile":
        t0 = time.perf_counter()
        fn_c = torch.compile(m, mode=profile.compile_mode)
        fn_c(x)
        torch.cuda.synchronize()
        extra["compile_s"] = time.perf_counter() - t0

        def fn() -> Any:
            return fn_c(x)

    elif case.backend == "torch-cudagraph":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                m(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            m(x)
        fn = g.replay
    else:

        def fn() -> Any:
            return m(x)

    return fn, extra


def _torch_case(model: Any, case: Case, profile: Profile, x_np: np.ndarray) -> tuple[list[float], dict[str, Any]]:
    import torch

    cuda = profile.device == "cuda"
    with torch.inference_mode():
        fn, extra = prepare_torch(model, case, profile, x_np)
        if cuda:
            samples = time_cuda_events(fn, profile.warmup, profile.iters, profile.min_seconds)
            extra["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            extra["timer"] = "cuda-events"
        else:
            samples = time_host(fn, profile.warmup, profile.iters, profile.min_seconds)
            extra["timer"] = "perf_counter"
    if cuda:
        extra.update(_copy_times(x_np, model_out_elems=x_np.shape[0] * 1000))
    return samples, extra


def _copy_times(x_np: np.ndarray, model_out_elems: int) -> dict[str, float]:
    """Median host->device time of one input batch and device->host time of its logits (pinned memory)."""
    import torch

    host = torch.from_numpy(x_np).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    out_dev = torch.empty(model_out_elems, device="cuda")
    out_host = torch.empty(model_out_elems).pin_memory()
    h2d = time_cuda_events(lambda: dev.copy_(host, non_blocking=True), 3, 20, 0.0)
    d2h = time_cuda_events(lambda: out_host.copy_(out_dev, non_blocking=True), 3, 20, 0.0)
    return {"h2d_ms": statistics.median(h2d), "d2h_ms": statistics.median(d2h)}


def prepare_ort(onnx_path: Path, case: Case, profile: Profile, x_np: np.ndarray, *, profile_prefix: str | None = None
                ) -> tuple[Callable[[], Any], Callable[[], None] | None, Any]:
    """An ONNX Runtime session for the case and a no-argument callable running one batch (CUDA:
    IO binding on device buffers, optionally a CUDA graph), the synchronisation to time it with,
    and the session."""
    from slab_deploy.runtime.base import UnsupportedBackend
    from slab_deploy.runtime.ort import _ort, session

    ort = _ort()
    if case.backend == "ort-cpu":
        sess = session(onnx_path, ["CPUExecutionProvider"], threads=case.threads, profile_prefix=profile_prefix)
        name = sess.get_inputs()[0].name
        return (lambda: sess.run(None, {name: x_np})), None, sess
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UnsupportedBackend("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    graph = case.backend == "ort-cuda-graph"
    opts = {"device_id": 0, "enable_cuda_graph": "1" if graph else "0"}
    sess = session(onnx_path, [("CUDAExecutionProvider", opts)], profile_prefix=profile_prefix)
    if "CUDAExecutionProvider" not in sess.get_providers():
        raise UnsupportedBackend("ONNX Runtime's CUDA provider failed to initialise")
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    x_dev = ort.OrtValue.ortvalue_from_numpy(x_np, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type([x_np.shape[0], _out_dim(sess)], np.float32, "cuda", 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input(inp.name, x_dev)
    binding.bind_ortvalue_output(out.name, y_dev)

    def fn() -> None:
        sess.run_with_iobinding(binding)

    return fn, binding.synchronize_outputs, sess


def _ort_case(onnx_path: Path, case: Case, profile: Profile, x_np: np.ndarray) -> tuple[list[float], dict[str, Any]]:
    fn, sync, sess = prepare_ort(onnx_path, case, profile, x_np)
    extra: dict[str, Any] = {"timer": "perf_counter"}
    samples = time_host(fn, profile.warmup, profile.iters, profile.min_seconds, sync=sync)
    if case.backend != "ort-cpu":
        extra.update(_copy_times(x_np, x_np.shape[0] * _out_dim(sess)))
    return samples, extra


def _out_dim(sess: Any) -> int:
    shape = sess.get_outputs()[0].shape
    return int(shape[-1]) if isinstance(shape[-1], int) else 1000


def _trt_case(onnx_path: Path, case: Case, profile: Profile, x_np: np.ndarray) -> tuple[list[float], dict[str, Any]]:
    import torch

    from slab_deploy.runtime.tensorrt import TensorRTRunner

    r = TensorRTRunner.from_onnx(onnx_path, precision=case.precision, max_batch=max(profile.batches))
    x = torch.from_numpy(x_np).cuda()
    r.bind(x)
    samples = time_cuda_events(r.execute, profile.warmup, profile.iters, profile.min_seconds, stream=torch.cuda.ExternalStream(r.stream.cuda_stream))
    return samples, {"timer": "cuda-events", **_copy_times(x_np, x_np.shape[0] * 1000)}


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Target:
    model: str
    variant: str  # folded | unfolded | baseline
    checkpoint: str | None = None


def compare_targets(name: str, *, unfolded: bool = False, checkpoint: str | None = None) -> list[Target]:
    from slab_deploy.models import get_spec

    spec = get_spec(name)
    if not spec.is_slab:
        raise ConfigError(f"--compare takes a SLAB model; {name} is a {spec.norm} baseline (try one of its SLAB counterparts)")
    out = [Target(name, "folded", checkpoint)]
    if unfolded:
        out.append(Target(name, "unfolded", checkpoint))
    out += [Target(b, "baseline") for b in spec.compare_with]
    return out


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
    targets = list({(t.model, t.variant, t.checkpoint): t for t in targets}.values())  # a model named twice runs once
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

            x_np = np.random.default_rng(0).standard_normal((case.batch, *get_spec(t.model).input_size), dtype=np.float32)
            if case.backend.startswith("torch"):
                import copy

                samples, extra = _torch_case(copy.deepcopy(models[_model_key(t)]), case, profile, x_np)
            else:
                graph = (t.model, t.variant, t.checkpoint, case.precision)
                if graph in export_failed:
                    raise ExportError(f"{export_failed[graph]} (the export failed for an earlier case of this run)")
                try:
                    onnx_path = _onnx_for(t, case.precision, cache, profile.sla_policy, profile.exporter, notes=notes)
                except UnsupportedBackend:
                    raise
                except Exception as exc:
                    export_failed[graph] = _reason(exc)
                    raise
                if case.backend == "tensorrt":
                    samples, extra = _trt_case(onnx_path, case, profile, x_np)
                else:
                    samples, extra = _ort_case(onnx_path, case, profile, x_np)
            st = _stats(samples)
            if not all(math.isfinite(v) for v in st.values()) or st["median_ms"] <= 0:
                raise ArithmeticError(f"timing produced a non-positive or non-finite median ({st['median_ms']!r} ms)")
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
            res.status, res.reason = "error", _reason(exc)
        finally:
            if profile.device == "cuda":
                torch.cuda.empty_cache()
        results.append(res)
        if progress is not None:
            progress.advance(task)
    report = BenchReport(env, profile.to_dict(), results, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report.untrained = all(t.checkpoint is None for t in targets)
    report.speedups = speedups(results)
    report.best_speedups = best_speedups(results)
    report.notes = notes
    return report


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:300] if text.strip() else ''}".rstrip(": ")


def _model_key(t: Target) -> tuple[str, str, str | None]:
    return (t.model, t.variant, t.checkpoint)


def _torch_model(t: Target) -> Any:
    from slab_deploy.passes import fold_model
    from slab_deploy.weights import load_model

    m = load_model(t.model, t.checkpoint)
    if t.variant == "folded":
        m, _ = fold_model(m)
    return m


# ---------------------------------------------------------------------------------------------- before any case


def preflight(targets: Sequence[Target], profile: Profile, notes: list[str]) -> dict[tuple[str, str, str | None], Any]:
    """Load (and fold) every target and estimate the memory of its largest batch, before any case
    runs: a checkpoint that does not load is bad input (CheckpointError, exit 1), not a failed case,
    and a batch that cannot fit is refused (ConfigError) instead of running the host out of memory.
    Returns the loaded models when a torch backend will use them (else nothing is kept)."""
    keep = any(b.startswith("torch") for b in profile.backends)
    models: dict[tuple[str, str, str | None], Any] = {}
    for t in targets:
        m = _torch_model(t)
        checkpoint_identity(t)
        check_memory(m, t, max(profile.batches), profile.device, notes)
        if keep:
            models[_model_key(t)] = m
        del m
    return models


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one case, estimated: the weights once more (the case's copy of the model or
    the runtime's session), the input batch (twice on CUDA: the device buffer and the pinned host
    copy the transfer timing uses) and the activations, measured as the peak of live tensors in
    one eager fp32 forward of batch 1 on the CPU and scaled linearly to the batch."""

    batch: int
    weights: int
    input_per_image: int
    activations_per_image: int

    def device_bytes(self, cuda: bool) -> int:
        return self.weights + self.batch * (self.input_per_image * (2 if cuda else 1) + self.activations_per_image)

    def host_bytes(self, cuda: bool) -> int:
        return self.batch * self.input_per_image * 2 if cuda else self.device_bytes(False)

    def describe(self, cuda: bool) -> str:
        batch_in = _size(self.batch * self.input_per_image)
        return (f"weights {_size(self.weights)} + input {'2 x ' if cuda else ''}{batch_in} + activations "
                f"{_size(self.activations_per_image)}/image x {self.batch}, the peak of live tensors in an eager fp32 batch-1 forward")


def estimate_memory(model: Any, input_size: Sequence[int], batch: int) -> MemoryEstimate:
    """Measure the activation peak of batch 1 (see MemoryEstimate) and scale it to `batch`."""
    import torch

    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    x = torch.zeros(1, *input_size)
    ignore = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    model = model.eval()
    with torch.inference_mode(), _live_bytes(ignore) as live:
        model(x)
    per_image_in = int(np.prod(input_size)) * 4
    return MemoryEstimate(batch, weights, per_image_in, live.peak)


def _live_bytes(ignore: set[int]) -> Any:
    """A dispatch mode recording the peak bytes of tensor storages alive at once during the ops
    run under it (the outputs of every op, less the storages in `ignore`: weights and input).
    Frees are seen through weak references; views and in-place results share their storage and
    are counted once. (Defined in a function: torch is imported only when bench runs.)"""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Mode(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count: dict[int, int] = {}
            self.size: dict[int, int] = {}
            self.current = 0
            self.peak = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self._track(t)
            return out

        def _track(self, t: Any) -> None:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in ignore:
                return
            if key not in self.count:
                self.count[key] = 0
                self.size[key] = st.nbytes()
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
            self.count[key] += 1
            weakref.finalize(t, self._release, key)

        def _release(self, key: int) -> None:
            self.count[key] -= 1
            if not self.count[key]:
                del self.count[key]
                self.current -= self.size.pop(key)

    return Mode()


def check_memory(model: Any, t: Target, batch: int, device: str, notes: list[str]) -> MemoryEstimate | None:
    """Refuse (ConfigError) a batch whose estimated peak exceeds the memory available to it."""
    from slab_deploy.models import get_spec

    try:
        est = estimate_memory(model, get_spec(t.model).input_size, batch)
    except Exception as exc:  # the cases of this target will fail and say why; do not guess here
        notes.append(f"memory estimate of {t.model} [{t.variant}] unavailable ({_reason(exc)})")
        return None
    cuda = device == "cuda"
    checks = [("the host", est.host_bytes(cuda), available_host_memory())]
    if cuda:
        import torch

        checks.insert(0, ("the GPU", est.device_bytes(True), int(torch.cuda.mem_get_info()[0])))
    for where, need, have in checks:
        if have is not None and need > have:
            raise ConfigError(
                f"batch {batch} of {t.model} [{t.variant}] needs an estimated {_size(need)} on {where} "
                f"({est.describe(cuda)}) but {_size(have)} is available; pass a smaller --batch"
            )
    return est


def available_host_memory() -> int | None:
    """Bytes the host can still give this process: the least of MemAvailable, the cgroup's limit
    less its usage, and psutil's figure (when installed); None when none of them can be read."""
    import os

    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim, use = Path(limit).read_text().strip(), Path(usage).read_text().strip()
            if lim.isdigit() and use.isdigit() and int(lim) < 1 << 60:
                found.append(max(int(lim) - int(use), 0))
        except OSError:
            pass
    try:
        import psutil  # type: ignore[import-untyped]  # optional: used when present

        found.append(int(psutil.virtual_memory().available))
    except ImportError:
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


# ---------------------------------------------------------------------------------------------- the ONNX cache


CACHE_RECORD = "bench-cache.json"
CACHE_FORMAT = "slab-deploy bench cache 1"
_MAX_RECORD_BYTES = 1 << 16
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def checkpoint_identity(t: Target) -> str:
    """sha256 of the file the target's weights come from (the embedded default when it names none);
    memoised by path, size and modification time."""
    from slab_deploy.models.checkpoint import sha256_file
    from slab_deploy.weights import default_checkpoint

    path = Path(t.checkpoint) if t.checkpoint else default_checkpoint(t.model)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _SHA_MEMO:
            _SHA_MEMO[key] = sha256_file(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc}); check the path") from None
    return _SHA_MEMO[key]


def _onnx_for(t: Target, precision: str, cache: Path, sla_policy: str = "fp32", exporter: str = "auto",
              *, notes: list[str] | None = None) -> Path:
    """The ONNX graph of a target at `precision`: reused from `cache` only when the record bench
    wrote beside it (CACHE_RECORD) matches the request (model, variant, precision, SLA policy,
    exporter, checkpoint sha256) and the file's sha256; otherwise exported afresh (and `notes`
    says why). The directory name carries the checkpoint's identity, so another checkpoint gets
    its own graph."""
    from slab_deploy.export.api import ExportOptions, export_model
    from slab_deploy.runtime.base import UnsupportedBackend

    if precision not in ("fp32", "fp16"):
        raise UnsupportedBackend(f"ONNX artefacts are exported in fp32 or fp16, not {precision}")
    ck = checkpoint_identity(t)
    want = {"model": t.model, "variant": t.variant, "precision": precision,
            "sla_policy": sla_policy if precision == "fp16" else None, "exporter": exporter, "checkpoint_sha256": ck}
    name = f"{t.model}-{t.variant}-{precision}" + (f"-sla_{sla_policy}" if precision == "fp16" else "") + (
        f"-{exporter}" if exporter != "auto" else "") + f"-ck{ck[:12]}"
    d = cache / name
    if d.exists() and not d.is_dir():
        raise ArtifactError(f"{d} is a file where bench keeps a cached graph; remove it or pass another --onnx-cache")
    path, record = d / "model.onnx", d / CACHE_RECORD
    problem = _cache_problem(path, record, want)
    if problem is None:
        return path
    if problem and notes is not None:
        notes.append(f"re-exported {d}: {problem}")
    record.unlink(missing_ok=True)  # a failed export below must not leave a record behind
    export_model(t.model, t.checkpoint, d, ExportOptions(precision=precision, fold=t.variant != "unfolded", simplifier="auto", sla_policy=sla_policy, exporter=exporter), force=True)
    _write_cache_record(path, record, want)
    return path


def _cache_problem(path: Path, record: Path, want: dict[str, Any]) -> str | None:
    """None when `path` may be reused; "" when there is nothing cached; else what is wrong."""
    from slab_deploy.models.checkpoint import sha256_file

    if not path.exists() and not record.exists():
        return ""
    if not path.is_file():
        return "model.onnx is missing"
    if not record.is_file():
        return f"no {CACHE_RECORD} beside model.onnx (not written by bench, or an interrupted export)"
    try:
        if record.stat().st_size > _MAX_RECORD_BYTES:
            return f"{CACHE_RECORD} is too large to be a record"
        rec = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return f"{CACHE_RECORD} is unreadable ({exc.__class__.__name__})"
    if not isinstance(rec, dict) or rec.get("format") != CACHE_FORMAT:
        return f"{CACHE_RECORD} is not a record of this format"
    stale = [k for k, v in want.items() if rec.get(k) != v]
    if stale:
        return f"{CACHE_RECORD} was written for another {', '.join(stale)}"
    if rec.get("onnx_sha256") != sha256_file(path):
        return "model.onnx does not match the sha256 recorded when it was exported (changed or corrupt)"
    return None


def _write_cache_record(path: Path, record: Path, want: dict[str, Any]) -> None:
    from slab_deploy import __version__
    from slab_deploy.models.checkpoint import sha256_file
    from slab_deploy.utils import atomic_write

    manifest: dict[str, Any] = {}
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    rec = {"format": CACHE_FORMAT, **want, "onnx_sha256": sha256_file(path), "onnx_bytes": path.stat().st_size,
           "exporter_used": (manifest.get("export") or {}).get("exporter") if isinstance(manifest, dict) else None,
           "slab_deploy": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_write(record) as tmp:
        tmp.write_text(json.dumps(rec, indent=2) + "\n")


def speedups(results: Sequence[Result]) -> list[dict[str, Any]]:
    """For each (backend, precision, batch, threads): SLAB folded vs each baseline and vs unfolded."""
    ok = [r for r in results if r.status == "ok" and r.median_ms]
    out = []
    for r in ok:
        if r.case.variant != "folded":
            continue
        for o in ok:
            c, d = r.case, o.case
            if o is r or (d.backend, d.precision, d.batch, d.threads) != (c.backend, c.precision, c.batch, c.threads):
                continue
            if d.variant in ("baseline", "unfolded"):
                out.append({
                    "slab": c.model, "other": d.model if d.variant == "baseline" else f"{d.model} (unfolded)",
                    "backend": c.backend, "precision": c.precision, "batch": c.batch, "threads": c.threads,
                    "slab_ms": r.median_ms, "other_ms": o.median_ms, "speedup": o.median_ms / r.median_ms,  # type: ignore[operator]
                })
    return out


def best_speedups(results: Sequence[Result]) -> list[dict[str, Any]]:
    """For each (precision, batch, threads) and each other model: the folded SLAB model's best
    median over the backends measured for both, against the other's best over those backends
    (a backend run for one side only does not count)."""
    ok = [r for r in results if r.status == "ok" and r.median_ms]
    out = []
    for slab in dict.fromkeys(r.case.model for r in ok if r.case.variant == "folded"):
        others = dict.fromkeys((r.case.model, r.case.variant) for r in ok if r.case.variant in ("baseline", "unfolded"))
        for prec, batch, threads in dict.fromkeys((r.case.precision, r.case.batch, r.case.threads) for r in ok):
            mine = [r for r in ok if (r.case.model, r.case.variant, r.case.precision, r.case.batch, r.case.threads) == (slab, "folded", prec, batch, threads)]
            for model, variant in others:
                if variant == "unfolded" and model != slab:
                    continue
                theirs = [r for r in ok if (r.case.model, r.case.variant, r.case.precision, r.case.batch, r.case.threads) == (model, variant, prec, batch, threads)]
                common = {r.case.backend for r in mine} & {r.case.backend for r in theirs}
                if not common:
                    continue
                a = min((r for r in mine if r.case.backend in common), key=lambda r: r.median_ms or 0.0)
                b = min((r for r in theirs if r.case.backend in common), key=lambda r: r.median_ms or 0.0)
                out.append({
                    "slab": slab, "other": model if variant == "baseline" else f"{model} (unfolded)",
                    "precision": prec, "batch": batch, "threads": threads,
                    "slab_ms": a.median_ms, "slab_backend": a.case.backend, "other_ms": b.median_ms, "other_backend": b.case.backend,
                    "speedup": (b.median_ms or 0.0) / (a.median_ms or 1.0), "backends": sorted(common),
                })
    return out


# ---------------------------------------------------------------------------------------------- outputs


COLUMNS = ("model", "variant", "backend", "precision", "batch", "threads", "status", "median_ms", "p90_ms", "p95_ms",
           "p99_ms", "mean_ms", "cv", "throughput", "h2d_ms", "d2h_ms", "peak_mem_mib", "compile_s", "tflops", "mfu",
           "samples", "unstable", "timer", "reason")


def write_outputs(report: BenchReport, out: Path) -> dict[str, Path]:
    from slab_deploy.utils import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "markdown": out / "bench.md"}
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in report.results:
        w.writerow(r.flat())
    with atomic_write(paths["csv"]) as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(report))
    try:
        paths.update(plot(report, out))
    except Exception as exc:  # plots are a convenience; the numbers are in the files above
        if exc.__class__.__name__ != "MissingDependencyError":
            raise
    return paths


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def to_markdown(report: BenchReport) -> str:
    env = report.environment
    lines = [
        "# slab-deploy bench",
        "",
        f"- date: {report.created}",
        f"- command: `{report.command}`",
        f"- device: {env.get('gpu') or env.get('cpu')} ({env.get('device')}); driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')}",
        f"- versions: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')} ({', '.join(env.get('onnxruntime_providers') or [])}), TensorRT {env.get('tensorrt') or '-'}, slab-deploy {env.get('slab-deploy')}",
        f"- profile: {report.profile.get('name')} (warm-up {report.profile.get('warmup')}, >= {report.profile.get('iters')} timed runs, >= {report.profile.get('min_seconds')} s)",
        f"- weights: {'embedded default (untrained; latency does not depend on weights)' if report.untrained else 'from checkpoint'}",
        "- latency: compute only, inputs already on the device; host<->device copies of one batch in their own columns",
    ]
    if report.verdict:
        v = report.verdict
        lines.append(f"- verdict: {'passed' if v.get('passed') else 'FAILED'} (exit {v.get('exit_code')}): {v.get('message')}")
    lines += [
        "",
        "| model | variant | backend | prec | batch | thr | median ms | p90 | p99 | CV | img/s | H2D ms | D2H ms | peak MiB | MFU | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        c = r.case
        note = r.reason if r.status != "ok" else ("unstable (CV > 10%)" if r.unstable else "")
        if r.compile_s:
            note = (note + f"; compile {r.compile_s:.0f} s").strip("; ")
        lines.append(
            f"| {c.model} | {c.variant} | {c.backend} | {c.precision} | {c.batch} | {c.threads or '-'} | {_fmt(r.median_ms, '.3f')} "
            f"| {_fmt(r.p90_ms, '.3f')} | {_fmt(r.p99_ms, '.3f')} | {_fmt(r.cv, '.1%')} | {_fmt(r.throughput, ',.0f')} "
            f"| {_fmt(r.h2d_ms, '.3f')} | {_fmt(r.d2h_ms, '.3f')} | {_fmt(r.peak_mem_mib, ',.0f')} | {_fmt(r.mfu, '.1%')} | {note} |"
        )
    if report.speedups:
        lines += ["", "## Speed-up of the folded SLAB model (other median / SLAB median)", "",
                  "| SLAB | vs | backend | prec | batch | SLAB ms | other ms | speed-up |", "|---|---|---|---|---|---|---|---|"]
        for s in report.speedups:
            lines.append(f"| {s['slab']} | {s['other']} | {s['backend']} | {s['precision']} | {s['batch']} | {s['slab_ms']:.3f} | {s['other_ms']:.3f} | {s['speedup']:.2f}x |")
    if report.best_speedups:
        lines += ["", "## Speed-up, best backend each side (over the backends measured for both)", "",
                  "| SLAB | vs | prec | batch | thr | SLAB ms (backend) | other ms (backend) | speed-up |", "|---|---|---|---|---|---|---|---|"]
        for s in report.best_speedups:
            lines.append(f"| {s['slab']} | {s['other']} | {s['precision']} | {s['batch']} | {s['threads'] or '-'} | {s['slab_ms']:.3f} ({s['slab_backend']}) "
                         f"| {s['other_ms']:.3f} ({s['other_backend']}) | {s['speedup']:.2f}x |")
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, out: Path) -> dict[str, Path]:
    from slab_deploy._deps import require

    mpl = require("matplotlib", "benchmark plots")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "benchmark plots")
    ok = [r for r in report.results if r.status == "ok"]
    paths: dict[str, Path] = {}
    if not ok:
        return paths
    series: dict[tuple[str, str, str, str], list[tuple[int, float]]] = {}
    for r in ok:
        c = r.case
        series.setdefault((c.model, c.variant, c.backend, f"{c.precision}{'/t' + str(c.threads) if c.threads else ''}"), []).append((c.batch, r.median_ms or 0))
    backends = sorted({k[2] for k in series})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, b in zip(axes[0], backends, strict=True):
        for (model, variant, backend, prec), pts in sorted(series.items()):
            if backend != b:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} [{variant}] {prec}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(b)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["latency_plot"] = out / "latency_vs_batch.png"
    fig.savefig(paths["latency_plot"], dpi=110)
    plt.close(fig)
    if report.speedups:
        # Grouped bars: one group per (backend, precision, batch, threads), one bar per baseline.
        groups = list(dict.fromkeys((s["backend"], s["precision"], s["batch"], s["threads"]) for s in report.speedups))
        others = list(dict.fromkeys(s["other"] for s in report.speedups))
        width = 0.8 / len(others)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.5))
        for i, other in enumerate(others):
            ups = {(s["backend"], s["precision"], s["batch"], s["threads"]): s["speedup"] for s in report.speedups if s["other"] == other}
            xs = [g for g in range(len(groups)) if groups[g] in ups]
            ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], [ups[groups[x]] for x in xs], width, label=f"vs {other}")
        ax.axhline(1.0, color="k", lw=0.8)
        labels = [f"{b}\n{p} b{bs}" + (f" t{th}" if th else "") for b, p, bs, th in groups]
        ax.set_xticks(range(len(groups)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speed-up of folded SLAB (x)")
        ax.set_title(f"{report.speedups[0]['slab']}: other median / SLAB median")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["speedup_plot"] = out / "speedup.png"
        fig.savefig(paths["speedup_plot"], dpi=110)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- the verdict


MAX_BASELINE_BYTES = 64 << 20  # a bench.json of thousands of cases is a few MiB


@dataclass(frozen=True)
class Baseline:
    """The measured (status "ok") cases of an earlier bench.json: case key -> median ms."""

    path: Path
    medians: dict[str, float]


def load_baseline(path: Path) -> Baseline:
    """Read and check an earlier bench.json for --against; any malformed content is a ConfigError
    (exit 1) naming the file and the field, and a file without one measured case is malformed: it
    could not fail a comparison."""
    where = f"--against {path}"
    hint = "pass a bench.json written by slab-deploy bench"
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"{where} is not a file; {hint}")
        if size > MAX_BASELINE_BYTES:
            raise ConfigError(f"{where}: {size} bytes is too large for a bench.json (at most {MAX_BASELINE_BYTES}); {hint}")
        old = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc}); {hint}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{where}: not JSON ({' '.join(str(exc).split())[:200]}); {hint}") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object, not {_json_type(old)}; {hint}")
    results = old.get("results")
    if not isinstance(results, list):
        raise ConfigError(f"{where}: 'results' must be a list of cases, not {_json_type(results)}; {hint}")
    medians: dict[str, float] = {}
    seen: set[str] = set()
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: results[{i}] must be an object, not {_json_type(r)}; {hint}")
        key, status, median = r.get("key"), r.get("status"), r.get("median_ms")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: results[{i}].key must be a non-empty string, not {_json_type(key)}; {hint}")
        if key in seen:
            raise ConfigError(f"{where}: case {key} appears twice; {hint}")
        seen.add(key)
        if status not in ("ok", "skipped", "error"):
            raise ConfigError(f"{where}: results[{i}].status must be ok, skipped or error, not {status!r}; {hint}")
        if status == "ok":
            if not (isinstance(median, (int, float)) and not isinstance(median, bool) and math.isfinite(median) and median > 0):
                raise ConfigError(f"{where}: results[{i}].median_ms of ok case {key} must be a finite number > 0, not {median!r}; {hint}")
            medians[key] = float(median)
    if not medians:
        raise ConfigError(f"{where}: no measured (status ok) case to compare against; {hint}")
    return Baseline(path, medians)


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(v), "a number")


@dataclass
class Comparison:
    """This run against a baseline: cases slower than the threshold allows, and measured cases of
    the baseline that this run did not measure (absent, skipped or failed)."""

    baseline: str
    threshold: float
    regressions: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    compared: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ConfigError(f"--threshold must be a finite fraction >= 0 (0.10 allows 10% slower), not {threshold!r}")
    return float(threshold)


def compare_against(report: BenchReport, baseline: Baseline, threshold: float) -> Comparison:
    """Compare every measured case of `baseline` with this run (NaN-safe: medians were checked)."""
    check_threshold(threshold)
    now = {r.case.key: r for r in report.results}
    cmp = Comparison(str(baseline.path), threshold)
    for key, old_ms in baseline.medians.items():
        r = now.get(key)
        if r is None:
            cmp.missing.append(f"{key}: not in this run")
        elif r.status != "ok" or not r.median_ms:
            cmp.missing.append(f"{key}: {r.status} ({r.reason[:120]})")
        else:
            cmp.compared += 1
            ratio = r.median_ms / old_ms
            if ratio > 1 + threshold:
                cmp.regressions.append(f"{key}: {old_ms:.3f} -> {r.median_ms:.3f} ms (+{ratio - 1:.0%})")
    return cmp


def judge(report: BenchReport, comparison: Comparison | None = None) -> SlabDeployError | None:
    """The run's verdict, recorded in `report.verdict`: BenchCaseError (exit 5) when a case failed
    or nothing was measured (every case skipped: a benchmark that measured nothing cannot pass a
    gate); else RegressionError (exit 4) when a measured case of the baseline is missing from this
    run or regressed; else None (exit 0). A failed case outranks a regression."""
    errors = [r for r in report.results if r.status == "error"]
    ok = [r for r in report.results if r.status == "ok"]
    n = len(report.results)
    exc: SlabDeployError | None = None
    if errors:
        exc = BenchCaseError(f"{len(errors)} of {n} case(s) failed: " + "; ".join(f"{r.case.key}: {r.reason}" for r in errors[:3])
                             + ("; ..." if len(errors) > 3 else ""))
    elif not ok:
        skipped = report.results[0].reason if report.results else "no cases"
        exc = BenchCaseError(f"nothing was measured: all {n} case(s) were skipped (first: {skipped}); run on a host with the backend")
    elif comparison is not None and (comparison.missing or comparison.regressions):
        parts = []
        if comparison.missing:
            parts.append(f"{len(comparison.missing)} measured case(s) of the baseline not measured now: " + "; ".join(comparison.missing[:3]))
        if comparison.regressions:
            parts.append(f"{len(comparison.regressions)} case(s) slower than the baseline by more than {comparison.threshold:.0%}: "
                         + "; ".join(comparison.regressions[:5]))
        exc = RegressionError(" and ".join(parts))
    report.verdict = {"exit_code": exc.exit_code if exc else 0, "passed": exc is None, "message": str(exc) if exc else "passed",
                      "cases": n, "ok": len(ok), "errors": len(errors), "skipped": n - len(ok) - len(errors),
                      "against": comparison.to_dict() if comparison is not None else None}
    return exc
