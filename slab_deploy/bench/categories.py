"""Where profiled time is filed: categories of CUDA kernels, ATen operators and ONNX operators,
and the readers of the profiles they come from (chrome traces, ONNX Runtime's profile)."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# First match wins. CUDA kernel names (cuBLAS/cuBLASLt, cuDNN, CUTLASS, ATen, ONNX Runtime).
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    # before conv: cuDNN's SDPA kernels are named "..._sdpa_..._flash_fprop_..."
    ("fused attention", r"fmha|flash|sdpa|[Aa]ttention|mha_|Mha|_sla_(mixed|kv|norm)_kernel"),  # + sla_kernel
    ("conv", r"conv|fprop|dgrad|wgrad|depthwise|implicit_convolve|winograd|Conv"),
    ("norm", r"layer_?norm|LayerNorm|batch_?norm|BatchNorm|cuApplyLayerNorm|SkipLayerNorm|welford|Welford"),
    ("softmax", r"softmax|SoftMax|Softmax"),
    ("matmul", r"gemm|Gemm|GEMM|gemv|Gemv|nvjet|xmma|cutlass|cublas|splitK|s16816|s1688|matmul|MatMul"),
    ("reduction", r"reduce|Reduce"),
    ("copy/cast/layout",
     r"[Cc]opy|memcpy|Memcpy|memset|Memset|[Tt]ranspose|permute|CatArray|[Cc]oncat|gather|Gather|\broll_|"
     r"constant_pad|reflection_pad|[_:]Pad|Slice|Split|Expand|Tile|index_elementwise|index_select|Cast"),
    ("elementwise", r"elementwise|vectorized|[Bb]inary|[Uu]nary|Cast|_[Aa]dd|Add|Mul|Div|[Rr]elu|[Gg]elu|"
                    r"Erf|Sqrt|Pow|Where|Clip|fused|Functor"),
)
# ATen operator names (self time, torch on the CPU).
ATEN_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("conv", r"conv|mkldnn_convolution"),
    ("norm", r"layer_norm|batch_norm"),
    ("softmax", r"softmax"),
    ("fused attention", r"scaled_dot_product|flash|efficient_attention|sla_mixed"),
    ("matmul", r"::(addmm|mm|bmm|baddbmm|matmul|linear|_addmm_activation)$"),
    ("reduction", r"::(sum|mean|norm|linalg_vector_norm|amax|max|min)$"),
    ("copy/cast/layout", r"copy_|contiguous|clone|_to_copy|::to$|transpose|permute|reshape|view|cat|roll|pad|"
                         r"index|select|slice|unflatten|flatten|expand|_unsafe_view|as_strided|empty"),
    ("elementwise", r"::(add|add_|mul|mul_|div|div_|relu|relu_|gelu|sub|rsub|reciprocal|pow|softplus|sigmoid|"
                    r"clamp|where)$"),
)
# ONNX operator types (ONNX Runtime's node-level profile).
ONNX_CATEGORIES: dict[str, str] = {
    **dict.fromkeys(("MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "QLinearMatMul", "MatMulInteger"),
                    "matmul"),
    **dict.fromkeys(("Conv", "FusedConv", "QLinearConv", "NhwcConv"), "conv"),
    **dict.fromkeys(("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                     "BatchNormalization"), "norm"),
    **dict.fromkeys(("Softmax",), "softmax"),
    **dict.fromkeys(("Attention", "MultiHeadAttention"), "fused attention"),
    **dict.fromkeys(("ReduceSum", "ReduceMean", "ReduceL2", "ReduceMax", "GlobalAveragePool"), "reduction"),
    **dict.fromkeys(("Transpose", "Reshape", "Concat", "Slice", "Split", "Gather", "Pad", "Cast", "Expand",
                     "Tile", "Squeeze", "Unsqueeze", "Flatten", "Identity", "MemcpyToHost", "MemcpyFromHost"),
                    "copy/cast/layout"),
}
CATEGORY_ORDER = ("matmul", "conv", "fused attention", "softmax", "norm", "reduction", "elementwise",
                  "copy/cast/layout", "other")


def categorize(name: str, table: Sequence[tuple[str, str]] = KERNEL_CATEGORIES) -> str:
    for cat, pattern in table:
        if re.search(pattern, name):
            return cat
    return "other"


def categorize_onnx(op_type: str) -> str:
    return ONNX_CATEGORIES.get(op_type, "elementwise" if op_type else "other")



@dataclass
class Row:
    name: str
    ms: float  # per iteration
    calls: float  # per iteration
    category: str = ""


def summarize_rows(rows: list[Row]) -> tuple[dict[str, float], list[Row]]:
    """Time per category (in CATEGORY_ORDER) and the rows, slowest first."""
    cats: dict[str, float] = {}
    for r in rows:
        cats[r.category] = cats.get(r.category, 0.0) + r.ms
    ordered = {c: cats[c] for c in CATEGORY_ORDER if c in cats}
    return ordered, sorted(rows, key=lambda r: -r.ms)


def kernels_from_chrome_trace(path: Path, iters: int) -> list[Row]:
    """Per-iteration time and calls of each CUDA kernel / memcpy / memset in a chrome trace."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    agg: dict[str, list[float]] = {}
    for ev in data.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") not in (
                "kernel", "gpu_memcpy", "gpu_memset", "Kernel", "Memcpy", "Memset"):
            continue
        a = agg.setdefault(ev.get("name", "?"), [0.0, 0.0])
        a[0] += float(ev.get("dur", 0.0)) / 1e3
        a[1] += 1
    return [Row(n, t / iters, c / iters, categorize(n)) for n, (t, c) in agg.items()]


def ops_from_ort_profile(path: Path, iters: int, skip_runs: int = 0) -> list[Row]:
    """Per-iteration time of each ONNX operator type from an ONNX Runtime profile (node events
    inside the `model_run` windows, after the first `skip_runs` runs)."""
    data = json.loads(Path(path).read_text())
    events = data if isinstance(data, list) else data.get("traceEvents", [])
    runs = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    keep = runs[skip_runs:]
    agg: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        ts = float(ev.get("ts", 0.0))
        if runs and not any(lo <= ts <= hi for lo, hi in keep):
            continue
        op = str(ev.get("args", {}).get("op_name", "?"))
        a = agg.setdefault(op, [0.0, 0.0])
        a[0] += float(ev.get("dur", 0.0)) / 1e3
        a[1] += 1
    return [Row(op, t / iters, c / iters, categorize_onnx(op)) for op, (t, c) in agg.items()]
