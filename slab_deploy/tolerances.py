"""The one tolerance table, keyed by (rung, precision), used by `check` and by the test suite.

Exact rewrites (fold, ONNX export, simplification) are judged by max |delta| relative to the
reference's max |logit|; reduced-precision rungs by cosine similarity, SQNR and top-1 agreement,
since a 1e-5 elementwise bound fails every fp16 transformer. Every report carries the observed
figures, so a threshold can be moved with evidence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

# One point of top-1 against labels, for every rung and precision (the bound INT8 deployments are
# usually held to). An accuracy drop needs flipped predictions, so for fp16 `min_top1=0.99` already
# implies it; for fp32 it adds a bound on flips, which `max_rel` alone does not give; for int8 it is
# what decides, the logit criteria being loose there.
ACCURACY_DROP = 0.01


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria. `None` disables a criterion. `max_rel` is max|delta| / max|reference|."""

    max_rel: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None  # fraction of samples whose argmax agrees
    # Top-1 accuracy against labels may fall by at most this fraction below the reference's own
    # (ACCURACY_DROP for every row of the table). Judged only when the inputs carry labels (the demo
    # set, `--images` with one folder per class); without labels the other criteria decide alone.
    max_accuracy_drop: float | None = ACCURACY_DROP

    def __post_init__(self) -> None:
        # NaN compares false with everything and +-Inf disables a bound: neither is a tolerance.
        for k, v in asdict(self).items():
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"tolerance {k}={v!r} is not a finite number")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# rung -> precision -> tolerance. Rungs:
#   fold        folded torch model vs checkpoint model (exact rewrite, fp32)
#   onnx        exported ONNX (ORT CPU, unsimplified) vs checkpoint model
#   simplified  simplified ONNX vs checkpoint model
#   ort_cpu     deployed ONNX on ORT CPU vs checkpoint model
#   ort_cuda    deployed ONNX on ORT CUDA vs checkpoint model
#   tensorrt    TensorRT engine vs checkpoint model
#   torch_cuda  torch on CUDA (eager/compile) vs checkpoint model on CPU
# INT8 (the deployed Q/DQ graph against the fp32 checkpoint model, on in-distribution images: the
# export's parity images, or check's --images / a demo model's held-out digits). Measured with the
# default recipe and every method x per-channel/per-tensor (docs/int8.md): on the trained demo models
# (64 held-out digits) cosine >= 0.990, SQNR >= 25.6 dB, top-1 agreement 1.0; on the tiny test models
# with random weights and randomised BN statistics, calibrated on digits, cosine >= 0.994, SQNR >= 24.6
# dB, top-1 agreement >= 0.81. Broken quantisation is far below: SLA's normaliser in INT8 gave SQNR
# -0.1 dB (cosine 0.38), its products alone in INT8 12 dB. The cosine is the worst single image's, so
# it falls with the number of images: on all 360 held-out digits slab_deit_demo's INT8 graph gives
# 0.9729 on its worst image (SQNR 32.4 dB, top-1 agreement 1.0, accuracy unchanged at 99.44%),
# deit_demo's 0.9956. So SQNR >= 20 dB (4.6 dB under the worst good graph, 8 dB over the partly
# broken one) and cosine >= 0.95 (0.02 under the worst good image) gate; top-1 agreement is loose
# (0.75) because untrained 1000-class models have near-tied logits that INT8 noise reorders (trained
# ones did not flip). The `onnx` rung of an int8 export runs its unsimplified graph, which is fp32:
# judged as an exact rewrite.
INT8 = Tolerance(min_cosine=0.95, min_sqnr_db=20.0, min_top1=0.75)
FP16 = Tolerance(min_cosine=0.999, min_sqnr_db=30.0, min_top1=0.99)

TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fold": {"fp32": Tolerance(max_rel=1e-4)},
    "onnx": {"fp32": Tolerance(max_rel=1e-4), "fp16": FP16, "int8": Tolerance(max_rel=1e-4)},
    "simplified": {"fp32": Tolerance(max_rel=1e-4), "fp16": FP16, "int8": INT8},
    "ort_cpu": {"fp32": Tolerance(max_rel=1e-4), "fp16": FP16, "int8": INT8},
    "ort_cuda": {
        "fp32": Tolerance(max_rel=1e-3),  # cuBLAS/cuDNN may use TF32-free but reordered reductions
        "fp16": Tolerance(min_cosine=0.999, min_sqnr_db=30.0, min_top1=0.99),
        "int8": INT8,  # not measured on a GPU: the CPU rows' bounds
    },
    "tensorrt": {
        "fp32": Tolerance(max_rel=1e-3),
        "fp16": Tolerance(min_cosine=0.999, min_sqnr_db=30.0, min_top1=0.99),
        "int8": INT8,  # not measured (no TensorRT here): the CPU rows' bounds
    },
    "torch_cuda": {
        "fp32": Tolerance(max_rel=1e-3),
        "fp16": Tolerance(min_cosine=0.999, min_sqnr_db=30.0, min_top1=0.99),
        "bf16": Tolerance(min_cosine=0.995, min_sqnr_db=20.0, min_top1=0.98),
    },
}


def tolerance_for(
    rung: str, precision: str = "fp32", overrides: dict[str, dict[str, Any]] | None = None
) -> Tolerance:
    """Tolerance of (rung, precision), with per-run `overrides` {rung: {metric: value}} applied."""
    try:
        tol = TOLERANCES[rung][precision]
    except KeyError:
        raise KeyError(f"no tolerance for rung {rung!r} at precision {precision!r}") from None
    if overrides and rung in overrides:
        tol = replace(tol, **overrides[rung])
    return tol


# Language models (`slab-deploy llm check`): the last-position logits of every step of greedy decoding
# with the key/value cache, teacher-forced on the reference's tokens, so top-1 here is token agreement
# and `min_top1=1.0` means greedy decoding token for token. fp32 rungs are exact rewrites (fold, export)
# judged like the vision rows plus every token; fp16 by the vision fp16 bounds. Measured on the tiny
# test models (test_slab_llama folded, test_llama; 2 seeds of randomised weights and BN statistics, 2
# prompts x 8 tokens, 16 steps; ORT 1.32 CPU): fp32 fold / ONNX / ORT max_rel <= 4.0e-6 (SQNR >= 112
# dB); fp16 graphs cosine >= 0.99998, SQNR >= 52.6 dB, max_rel <= 4.4e-3; every token equal in all.
LLM_FP16 = Tolerance(min_cosine=0.999, min_sqnr_db=30.0, min_top1=0.99)
LLM_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fold": {"fp32": Tolerance(max_rel=1e-4, min_top1=1.0)},
    "onnx": {"fp32": Tolerance(max_rel=1e-4, min_top1=1.0), "fp16": LLM_FP16},
    "ort_cpu": {"fp32": Tolerance(max_rel=1e-4, min_top1=1.0), "fp16": LLM_FP16},
    "ort_cuda": {"fp32": Tolerance(max_rel=1e-3, min_top1=1.0), "fp16": LLM_FP16},  # not measured on a GPU
    "torch_cuda": {"fp32": Tolerance(max_rel=1e-3, min_top1=1.0), "fp16": LLM_FP16},  # not measured on a GPU
}


def llm_tolerance_for(rung: str, precision: str = "fp32") -> Tolerance:
    """Tolerance of a language-model rung (see LLM_TOLERANCES)."""
    try:
        return LLM_TOLERANCES[rung][precision]
    except KeyError:
        raise KeyError(f"no language-model tolerance for rung {rung!r} at precision {precision!r}") from None
