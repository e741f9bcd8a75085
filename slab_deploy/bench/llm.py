"""Language-model benchmark: prefill and decode throughput and time to first token, SLAB vs its twin.

One case is (model, backend, precision, batch). One run of a case is what serving does for a batch
of prompts: a prefill of `prompt_tokens` per prompt (its time is the time to first token, TTFT),
then `new_tokens - 1` greedy decode steps with the cache. From `runs` timed runs (after `warmup`):
  ttft_ms          median prefill time
  prefill_tok_s    batch * prompt_tokens / median prefill time
  decode_tok_s     batch * (new_tokens - 1) / median decode time (all steps of a run)
  decode_step_ms   median time of one decode step (over all steps of all runs), with p90
Times are perf_counter after a device synchronisation; each step includes moving the logits to the
host and the argmax (what greedy decoding needs), not the cache (it stays on the device).

Backends: torch-cpu, torch-cuda (the folded model in torch), ort-cpu, ort-cuda (the `export_llm`
graph, exported into a scratch directory for the run; ORT CUDA keeps the cache on the GPU through
IO binding). SLAB models are folded first; RMSNorm twins run as they are.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.errors import BenchCaseError, UnsupportedInputError

LLM_BACKENDS = ("torch-cpu", "torch-cuda", "ort-cpu", "ort-cuda")


@dataclass
class LLMCase:
    model: str
    backend: str
    precision: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_step_ms: float
    decode_step_p90_ms: float
    folded: bool
    prefill_cv: float = 0.0  # coefficient of variation of the prefill and run-decode samples:
    decode_cv: float = 0.0  # differences below them are noise


@dataclass
class LLMBenchReport:
    cases: list[LLMCase]
    speedups: list[dict[str, Any]]
    environment: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _runner(model: Any, backend: str, precision: str, scratch: Path, threads: int | None) -> Any:
    from slab_deploy.runtime.llm import OrtLLMRunner, TorchLLMRunner

    if backend.startswith("torch"):
        return TorchLLMRunner(model, backend.split("-")[1], precision)
    from slab_deploy.export.llm import export_llm

    res = export_llm(model, scratch / f"{model.spec.name}-{precision}", precision=precision, force=True)
    return OrtLLMRunner(res.onnx_path, res.manifest, provider=backend.split("-")[1], threads=threads)


def _time_case(
    runner: Any, prompts: np.ndarray, new_tokens: int, warmup: int, runs: int
) -> tuple[list[float], list[float], list[float]]:
    prefill, decode, steps = [], [], []
    for r in range(warmup + runs):
        runner.sync()
        t0 = time.perf_counter()
        logits, cache = runner.prefill(prompts)
        tok = logits.argmax(-1)
        runner.sync()
        t1 = time.perf_counter()
        step_times = []
        for _ in range(new_tokens - 1):
            s0 = time.perf_counter()
            logits, cache = runner.decode(tok, cache)
            tok = logits.argmax(-1)
            runner.sync()
            step_times.append(time.perf_counter() - s0)
        t2 = time.perf_counter()
        if not np.isfinite(logits).all():
            raise BenchCaseError(f"{runner.name} gave NaN/Inf logits: nothing was measured")
        if r >= warmup:
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
            steps += step_times
    return prefill, decode, steps


def _cv(samples: list[float]) -> float:
    return statistics.stdev(samples) / statistics.mean(samples) if len(samples) > 1 else 0.0


def bench_llm(
    models: list[str],
    *,
    backends: tuple[str, ...] = ("torch-cpu",),
    precision: str = "fp32",
    batches: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    warmup: int = 1,
    runs: int = 3,
    threads: int | None = None,
    compare: bool = True,
    seed: int = 0,
) -> LLMBenchReport:
    """Benchmark `models` (and, with `compare`, each SLAB model's twin) on `backends` at `batches`.
    Random seeded weights (`create_llm` without a checkpoint): speed does not depend on them."""
    import torch

    from slab_deploy.bench.environment import environment
    from slab_deploy.check.llm import seeded_prompts
    from slab_deploy.models.llm import create_llm, get_llm_spec
    from slab_deploy.passes.fold_llm import fold_llm

    bad = [b for b in backends if b not in LLM_BACKENDS]
    if bad:
        raise UnsupportedInputError(
            f"unknown backend {bad[0]!r} for language models; choose from {', '.join(LLM_BACKENDS)}"
        )
    if precision not in ("fp32", "fp16"):
        raise UnsupportedInputError(
            f"--precision {precision} is not available for language models; use fp32 or fp16"
        )
    if any(b < 1 for b in batches) or prompt_tokens < 1 or new_tokens < 2 or runs < 1 or warmup < 0:
        raise UnsupportedInputError("--batch, --prompt-tokens and --runs must be >= 1, --new-tokens >= 2")
    if any(b.endswith("cuda") for b in backends):
        if "torch-cuda" in backends and not torch.cuda.is_available():
            raise UnsupportedInputError("torch-cuda needs a CUDA device; this host has none")
        if "ort-cuda" in backends:
            from slab_deploy.runtime.ort import cuda_available

            if not cuda_available():
                raise UnsupportedInputError(
                    "ort-cuda needs onnxruntime-gpu with a CUDA device; "
                    "install slab-deploy[gpu] on a GPU host"
                )
    if precision == "fp16" and "torch-cpu" in backends:
        raise UnsupportedInputError("fp16 on torch-cpu is not a deployment path; use fp32 there")
    names = list(dict.fromkeys(models))
    if compare:
        for n in list(names):
            names += [t for t in get_llm_spec(n).compare_with if t not in names]
    cases: list[LLMCase] = []
    with tempfile.TemporaryDirectory(prefix="slab-llm-bench-") as tmp:
        for name in names:
            model = create_llm(name)
            folded = get_llm_spec(name).is_slab
            if folded:
                model, _ = fold_llm(model)
            max_pos = model.config.max_position_embeddings
            if prompt_tokens + new_tokens > max_pos:
                raise UnsupportedInputError(
                    f"--prompt-tokens + --new-tokens exceed {name}'s {max_pos} positions"
                )
            for backend in backends:
                runner = _runner(model, backend, precision, Path(tmp), threads)
                for b in batches:
                    prompts = seeded_prompts(model.config.vocab_size, b, prompt_tokens, seed)
                    pre, dec, steps = _time_case(runner, prompts, new_tokens, warmup, runs)
                    p, d = statistics.median(pre), statistics.median(dec)
                    cases.append(
                        LLMCase(
                            name,
                            backend,
                            precision,
                            b,
                            prompt_tokens,
                            new_tokens,
                            runs,
                            ttft_ms=1e3 * p,
                            prefill_tok_s=b * prompt_tokens / p,
                            decode_tok_s=b * (new_tokens - 1) / d,
                            decode_step_ms=1e3 * statistics.median(steps),
                            decode_step_p90_ms=1e3 * float(np.percentile(steps, 90)),
                            folded=folded,
                            prefill_cv=_cv(pre),
                            decode_cv=_cv(dec),
                        )
                    )
                del runner
    speedups = []
    for c in cases:
        for twin in get_llm_spec(c.model).compare_with:
            base = next(
                (x for x in cases if x.model == twin and x.backend == c.backend and x.batch == c.batch), None
            )
            if base is not None:
                speedups.append(
                    {
                        "model": c.model,
                        "baseline": twin,
                        "backend": c.backend,
                        "batch": c.batch,
                        "prefill": c.prefill_tok_s / base.prefill_tok_s,
                        "decode": c.decode_tok_s / base.decode_tok_s,
                        "ttft": base.ttft_ms / c.ttft_ms,
                    }
                )
    device = "cuda" if any(b.endswith("cuda") for b in backends) else "cpu"
    env = environment(device)
    env["torch_threads"] = torch.get_num_threads()
    import datetime

    settings = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "precision": precision,
        "batches": list(batches),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "runs": runs,
        "threads": threads,
        "seed": seed,
        "weights": "seeded random (no checkpoint): speed only",
    }
    return LLMBenchReport(cases, speedups, env, settings)
