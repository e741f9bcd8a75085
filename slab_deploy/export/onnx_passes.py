"""ONNX graph passes: op counts, the norm-free lint, metadata, simplification with a parity re-check."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from slab_deploy.errors import ExportError
from slab_deploy.tolerances import Tolerance

NORM_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type, including nodes inside local functions the exporter left."""
    c: Counter[str] = Counter(n.op_type for n in model.graph.node)
    for f in model.functions:
        c.update(n.op_type for n in f.node)
    return dict(sorted(c.items()))


ONES_MAX_ELEMENTS = 1 << 16  # a token-sum row of ones is (1, N); larger constants are weights


def _small_constants(graph: onnx.GraphProto, max_elements: int) -> list[tuple[str, np.ndarray]]:
    """The graph's constants (initializers, Constant nodes) of at most `max_elements` elements,
    stored in the file, by name."""
    from onnx import numpy_helper

    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    return [(name, numpy_helper.to_array(t)) for name, t in tensors
            if int(np.prod(t.dims)) <= max_elements and t.data_location != onnx.TensorProto.EXTERNAL]


def ones_constants(graph: onnx.GraphProto) -> frozenset[str]:
    """Names of the graph's small constants (initializers, Constant nodes) whose elements are all one
    positive value: the row of ones (or of 1/N) that writes SLA's token sum (mean) as `MatMul(ones, k)`
    (`models.layers.token_ones`)."""
    return frozenset(name for name, a in _small_constants(graph, ONES_MAX_ELEMENTS)
                     if a.size > 1 and np.issubdtype(a.dtype, np.floating)
                     and a.reshape(-1)[0] > 0 and np.all(a == a.reshape(-1)[0]))


def token_sums(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes that sum (or average) tokens: ReduceSum/ReduceMean, and a MatMul by a row of ones."""
    ones = ones_constants(graph)
    return [n for n in graph.node if n.op_type in ("ReduceSum", "ReduceMean")
            or (n.op_type == "MatMul" and any(i in ones for i in n.input[:2]))]


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, float]:
    """The graph's one-element constants (initializers and Constant nodes) by name."""
    return {name: float(a.reshape(-1)[0]) for name, a in _small_constants(graph, 1) if a.size == 1}


def canonical_gelu(model: onnx.ModelProto) -> int:
    """Rewrite the exact GELU as torch.export writes it, `x * (0.5 * (1 + erf(x / sqrt 2)))`,
    into `(x * 0.5) * (1 + erf(x / sqrt 2))`, in place; returns how many were rewritten.

    The second form is the one ONNX Runtime's GeluFusion matches: it then runs one Gelu kernel,
    BiasGelu with the Linear's bias add before it, where the first form runs as five elementwise
    kernels after the bias add (Div, Erf, Add, two Muls: 2.1 of SLAB-DeiT-S's 7.8 ms of kernels at
    batch 64 fp16 on an H200). Both are plain ONNX; the outputs are the same bits (halving is
    exact, so both round x * a / 2 once)."""
    graph = model.graph
    consts = _scalar_constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Counter[str] = Counter(i for n in graph.node for i in n.input)
    done = 0
    for m2 in graph.node:
        if m2.op_type != "Mul" or len(m2.input) != 2:
            continue
        for x, t in (m2.input, m2.input[::-1]):
            m1 = producer.get(t)
            if m1 is None or m1.op_type != "Mul" or consumers[t] != 1:
                continue
            half = [i for i in m1.input if consts.get(i) == 0.5]
            rest = [i for i in m1.input if i not in half]
            add = producer.get(rest[0]) if half and len(rest) == 1 else None
            if add is None or add.op_type != "Add":
                continue
            erf = next((producer[i] for i in add.input
                        if i in producer and producer[i].op_type == "Erf"), None)
            one = [i for i in add.input if consts.get(i) == 1.0]
            div = producer.get(erf.input[0]) if erf is not None and one else None
            if div is None or div.op_type != "Div" or div.input[0] != x:
                continue
            if abs(consts.get(div.input[1], 0.0) - 2**0.5) > 1e-3:
                continue
            m1.input[:] = [x, half[0]]
            m2.input[:] = [t, rest[0]]
            done += 1
            break
    return done


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def norm_statistic_reductions(model: onnx.ModelProto) -> list[str]:
    """ReduceMean nodes that compute normalisation statistics: a ReduceMean whose input is
    `x - ReduceMean(x)` squared (variance), or which feeds such a subtraction (mean)."""
    prod = _producers(model)
    names = []
    for n in model.graph.node:
        if n.op_type != "ReduceMean":
            continue
        src = prod.get(n.input[0])
        if src is not None and src.op_type in ("Pow", "Mul"):
            inner = prod.get(src.input[0])
            if inner is not None and inner.op_type == "Sub":
                names.append(n.name or n.output[0])
    return names


@dataclass
class LintResult:
    norm_nodes: dict[str, int]
    norm_reductions: list[str]
    einsum: int
    resize: int

    @property
    def norm_free(self) -> bool:
        return not self.norm_nodes and not self.norm_reductions

    def to_dict(self) -> dict[str, Any]:
        return {
            "norm_nodes": self.norm_nodes,
            "norm_statistic_reductions": len(self.norm_reductions),
            "einsum": self.einsum,
            "resize": self.resize,
            "norm_free": self.norm_free,
        }


def lint(model: onnx.ModelProto) -> LintResult:
    ops = op_counts(model)
    return LintResult(
        norm_nodes={k: v for k, v in ops.items() if k in NORM_OPS},
        norm_reductions=norm_statistic_reductions(model),
        einsum=ops.get("Einsum", 0),
        resize=ops.get("Resize", 0),
    )


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@dataclass
class SimplifyResult:
    model: onnx.ModelProto
    simplifier: str  # what actually produced `model` ("none" when rejected)
    requested: str
    seconds: float
    nodes_before: int
    nodes_after: int
    accepted: bool
    note: str = ""
    max_abs_delta: float | None = None
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)


def resolve_simplifier(name: str) -> str:
    """`auto` -> onnxslim (a core dependency), else onnxsim, else none.

    Measured on the four folded SLAB families exported by torch.export (docs/simplifiers.md):
    onnxslim shrinks every graph (Swin-T 608 -> 539, PVT-T 424 -> 400, CSwin-T 1902 -> 1683 nodes,
    DeiT-T unchanged) with bit-identical outputs, while onnxsim 0.8 grows three of them
    (DeiT-T 594 -> 618, PVT-T 424 -> 440, CSwin-T 1902 -> 1970); onnxsim is faster (0.1-0.5 s vs
    0.4-5.9 s), which matters less than the graph."""
    from slab_deploy._deps import available

    if name != "auto":
        if name not in ("onnxsim", "onnxslim", "none"):
            raise ExportError(f"unknown simplifier {name!r}; use onnxsim, onnxslim, none or auto")
        return name
    for cand in ("onnxslim", "onnxsim"):
        if available(cand):
            return cand
    return "none"


def _run_simplifier(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
    from slab_deploy._deps import no_pip_install, require

    mod = require(name, "ONNX simplification")
    with no_pip_install():
        if name == "onnxsim":
            out, ok = mod.simplify(model, check_n=0)
            if not ok:
                raise ExportError("onnxsim could not validate its simplified model")
            return out
        return mod.slim(model)


def simplify(
    model: onnx.ModelProto,
    simplifier: str,
    inputs: np.ndarray,
    *,
    tolerance: Tolerance,
) -> SimplifyResult:
    """Simplify, then re-check the outputs against the unsimplified graph on `inputs` (ORT CPU).
    A simplifier that fails or changes results beyond `tolerance` (the table's `simplified` rung)
    is rejected: the input is returned."""
    from slab_deploy.parity import compare, judge
    from slab_deploy.runtime.ort import run_onnx

    name = resolve_simplifier(simplifier)
    before = op_counts(model)
    n_before = sum(before.values())
    if name == "none":
        return SimplifyResult(model, "none", simplifier, 0.0, n_before, n_before, True, "simplification off",
                              ops_before=before, ops_after=before)
    t0 = time.perf_counter()
    try:
        out = _run_simplifier(name, model)
    except ExportError:
        raise
    except Exception as exc:
        return SimplifyResult(model, "none", name, time.perf_counter() - t0, n_before, n_before, False,
                              f"{name} failed ({exc.__class__.__name__}: {str(exc)[:200]}); "
                              "kept the unsimplified graph",
                              ops_before=before, ops_after=before)
    secs = time.perf_counter() - t0
    ref = run_onnx(model, inputs)
    got = run_onnx(out, inputs)
    metrics = compare(ref, got)
    verdict = judge(metrics, tolerance)
    delta = metrics.max_abs
    after = op_counts(out)
    if not verdict.passed:
        return SimplifyResult(model, "none", name, secs, n_before, n_before, False,
                              f"{name} changed the outputs ({'; '.join(verdict.failures)}); "
                              "rejected, kept the unsimplified graph", delta, before, before)
    return SimplifyResult(out, name, simplifier, secs, n_before, sum(after.values()), True, "", delta, before,
                          after)
