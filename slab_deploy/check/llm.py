"""The parity ladder of a language model: greedy decoding of seeded prompts, token for token.

Reference: the checkpoint's model as loaded (unfolded, fp32, torch on the CPU) decodes `new_tokens`
greedily with its cache. Each rung runs the same prompts on another path and is fed the
reference's tokens (teacher forcing), so its per-step logits compare with the reference's at
every step; its argmax must give the reference's token at every step, which is the same as its own
free-running greedy decoding producing the reference's tokens (reported too, with the first step
where they part when they do).

Rungs: fold (the folded model in torch, fp32), onnx (the exported graph on ORT CPU with graph
optimisations off), ort_cpu, ort_cuda (ORT's CUDA provider), torch_cuda (the folded model on a
GPU at the export's precision). A rung whose backend the host lacks is skipped, saying so; one
that breaks, or gives NaN/Inf, fails. Tolerances: `tolerances.LLM_TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slab_deploy.errors import ArtifactError
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import llm_tolerance_for

LLM_RUNGS = ("fold", "onnx", "ort_cpu", "ort_cuda", "torch_cuda")


@dataclass
class LLMRung:
    rung: str
    runner: str
    precision: str
    status: str  # "passed" | "failed" | "skipped"
    reason: str = ""
    failures: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    tolerance: dict[str, Any] | None = None
    greedy_equal: bool | None = None  # free-running greedy tokens == the reference's
    first_divergence: int | None = None  # first step where they differ


@dataclass
class LLMCheckReport:
    model: str
    checkpoint: str | None
    export_dir: str | None
    batch: int
    prompt_tokens: int
    new_tokens: int
    seed: int
    reference_tokens: list[list[int]]
    rungs: list[LLMRung]
    fold_summary: str = ""

    @property
    def passed(self) -> bool:
        ran = [r for r in self.rungs if r.status != "skipped"]
        return bool(ran) and all(r.status == "passed" for r in ran)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def seeded_prompts(vocab: int, batch: int, tokens: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, tokens), generator=g).numpy()


def _judge_rung(
    rung: str,
    runner: Any,
    precision: str,
    prompts: np.ndarray,
    ref_tokens: np.ndarray,
    ref_logits: np.ndarray,
) -> LLMRung:
    from slab_deploy.runtime.llm import greedy, teacher_forced

    tol = llm_tolerance_for(rung, precision)
    try:
        got = teacher_forced(runner, prompts, ref_tokens)
        free = greedy(runner, prompts, ref_tokens.shape[1])
    except Exception as exc:  # a rung that cannot run on its input is a failure, never a pass
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return LLMRung(
            rung,
            runner.name,
            precision,
            "failed",
            reason=f"{exc.__class__.__name__}: {first}",
            failures=["the rung did not run"],
            tolerance=tol.to_dict(),
        )
    v = ref_logits.shape[-1]
    m = compare(ref_logits.reshape(-1, v), got.reshape(-1, v))
    verdict = judge(m, tol)
    diff = np.nonzero((free != ref_tokens).any(axis=0))[0]
    return LLMRung(
        rung,
        runner.name,
        precision,
        "passed" if verdict.passed else "failed",
        failures=verdict.failures,
        metrics=m.to_dict(),
        tolerance=tol.to_dict(),
        greedy_equal=not diff.size,
        first_divergence=int(diff[0]) if diff.size else None,
    )


def check_llm(
    model_name: str,
    checkpoint: str | Path | None = None,
    export_dir: str | Path | None = None,
    *,
    batch: int = 2,
    prompt_tokens: int = 8,
    new_tokens: int = 16,
    seed: int = 0,
    rungs: tuple[str, ...] | None = None,
    allow_unfinished_prepbn: bool = False,
    threads: int | None = None,
) -> LLMCheckReport:
    """Run the language-model ladder (see module doc); returns the report (the CLI fails on it)."""
    from slab_deploy.errors import UnsupportedInputError
    from slab_deploy.export.llm import ONNX_FILE, read_llm_export
    from slab_deploy.models.llm import create_llm
    from slab_deploy.passes.fold_llm import fold_llm
    from slab_deploy.runtime.llm import OrtLLMRunner, TorchLLMRunner

    if rungs is None:  # every rung the inputs allow; a rung the host lacks is skipped, saying so
        rungs = LLM_RUNGS if export_dir is not None else ("fold", "torch_cuda")
    unknown = [r for r in rungs if r not in LLM_RUNGS]
    if unknown:
        raise UnsupportedInputError(f"unknown rung {unknown[0]!r}; choose from {', '.join(LLM_RUNGS)}")
    needs = [r for r in rungs if r in ("onnx", "ort_cpu", "ort_cuda")]
    if needs and export_dir is None:
        raise UnsupportedInputError(
            f"rung {needs[0]} runs an exported graph: pass --export DIR "
            "(written by `slab-deploy llm export`), or leave it out of --rungs"
        )
    if not rungs:
        raise UnsupportedInputError("--rungs names no rung; choose from " + ", ".join(LLM_RUNGS))
    manifest = read_llm_export(export_dir) if export_dir is not None else None
    if manifest is not None and manifest.get("model") != model_name:
        raise ArtifactError(
            f"{export_dir} is an export of {manifest.get('model')}, not {model_name}: "
            f"pass --model {manifest.get('model')}"
        )
    ref = create_llm(model_name, checkpoint, allow_unfinished_prepbn=allow_unfinished_prepbn)
    info = getattr(ref, "checkpoint_info", None)
    if manifest is not None and manifest.get("checkpoint_sha256") != (info.sha256 if info else None):
        raise ArtifactError(
            f"{export_dir} was exported from another checkpoint than "
            f"{checkpoint or 'the random initial weights'}; export this one, or pass the "
            "checkpoint the export was made from"
        )
    precision = manifest["precision"] if manifest is not None else "fp32"
    prompts = seeded_prompts(ref.config.vocab_size, batch, prompt_tokens, seed)
    tokens, steps = ref.generate_greedy(torch.from_numpy(prompts), new_tokens)
    ref_tokens = tokens.numpy()
    ref_logits = torch.stack(steps, dim=1).numpy()
    folded, report = fold_llm(ref)
    out: list[LLMRung] = []
    for rung in rungs:
        if rung == "fold":
            out.append(
                _judge_rung(
                    rung, TorchLLMRunner(folded, "cpu", "fp32"), "fp32", prompts, ref_tokens, ref_logits
                )
            )
            continue
        if rung == "torch_cuda":
            if not torch.cuda.is_available():
                out.append(LLMRung(rung, "torch-cuda", precision, "skipped", reason="no CUDA device"))
                continue
            out.append(
                _judge_rung(
                    rung,
                    TorchLLMRunner(folded, "cuda", precision),
                    precision,
                    prompts,
                    ref_tokens,
                    ref_logits,
                )
            )
            continue
        assert manifest is not None and export_dir is not None  # refused above otherwise
        from slab_deploy._deps import available

        if not available("onnxruntime"):
            out.append(
                LLMRung(
                    rung, rung.replace("_", "-"), precision, "skipped", reason="onnxruntime is not installed"
                )
            )
            continue
        if rung == "ort_cuda":
            from slab_deploy.runtime.ort import cuda_available

            if not cuda_available():
                out.append(
                    LLMRung(
                        rung,
                        "ort-cuda",
                        precision,
                        "skipped",
                        reason="ONNX Runtime has no CUDA execution provider here",
                    )
                )
                continue
        path = Path(export_dir) / ONNX_FILE
        try:
            runner = OrtLLMRunner(
                path,
                manifest,
                provider="cuda" if rung == "ort_cuda" else "cpu",
                graph_opt="none" if rung == "onnx" else "all",
                threads=threads,
            )
        except Exception as exc:
            out.append(
                LLMRung(
                    rung,
                    rung.replace("_", "-"),
                    precision,
                    "failed",
                    reason=f"{exc.__class__.__name__}: {str(exc).strip()[:200]}",
                    failures=["the graph did not load"],
                )
            )
            continue
        out.append(_judge_rung(rung, runner, precision, prompts, ref_tokens, ref_logits))
    return LLMCheckReport(
        model_name,
        None if checkpoint is None else str(checkpoint),
        None if export_dir is None else str(export_dir),
        batch,
        prompt_tokens,
        new_tokens,
        seed,
        ref_tokens.tolist(),
        out,
        report.summary(),
    )
