"""Latency and throughput measurement -> report.

Every case runs warm-up iterations, then timed iterations (at least `iters`, and for at least
`min_seconds`), on the runner runtime.make_runner builds for its backend. GPU compute is timed
with CUDA events on the stream that does the work (torch, TensorRT) or with perf_counter after a
synchronisation (ONNX Runtime, whose stream is its own); inputs are already on the device, and
the host<->device copies of one batch are measured apart and reported in their own columns. CPU
cases use perf_counter.

Where things live: cases.py (targets and cases), run.py (the run), timing.py, environment.py,
memory.py (the estimate before any case runs), cache.py (exported graphs), speedups.py,
results.py, outputs.py (bench.json/csv/md, plots), gate.py (the verdict), trace.py (where the
time goes) over categories.py. Importing the package imports neither torch nor any runtime.
"""

from slab_deploy.bench.cache import CACHE_RECORD, cache_problem, checkpoint_identity, onnx_for
from slab_deploy.bench.cases import Case, Target, build_targets, compare_targets, load_target
from slab_deploy.bench.environment import environment
from slab_deploy.bench.gate import (
    Baseline,
    Comparison,
    check_threshold,
    compare_against,
    judge,
    load_baseline,
)
from slab_deploy.bench.memory import MemoryEstimate, check_memory, estimate_memory
from slab_deploy.bench.outputs import to_markdown, write_outputs
from slab_deploy.bench.results import BenchReport, Result
from slab_deploy.bench.run import BenchOutcome, benchmark, measure, preflight, run_bench
from slab_deploy.bench.speedups import best_speedups, speedups
from slab_deploy.bench.timing import stats, time_cuda_events, time_host, time_prepared

__all__ = [
    "CACHE_RECORD", "Baseline", "BenchOutcome", "BenchReport", "Case", "Comparison", "MemoryEstimate",
    "Result", "Target", "benchmark", "best_speedups", "build_targets", "cache_problem", "check_memory",
    "check_threshold", "checkpoint_identity", "compare_against", "compare_targets", "environment",
    "estimate_memory", "judge", "load_baseline", "load_target", "measure", "onnx_for", "preflight",
    "run_bench", "speedups", "stats", "time_cuda_events", "time_host", "time_prepared", "to_markdown",
    "write_outputs",
]
