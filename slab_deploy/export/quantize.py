"""INT8: the folded, simplified fp32 graph -> a Q/DQ graph, by ONNX Runtime's static quantisation.

Recipe (measured in docs/int8.md):
- `quantize_static` in QDQ format; INT8 weights (symmetric) and biases left float. Activations are
  `int8` (the default: signed, symmetric, zero point 0, the explicit-precision form TensorRT builds
  from; `audit` checks it) or `uint8` (asymmetric, a zero point fitted to the range: ONNX Runtime's
  CPU form, which TensorRT refuses; `require_tensorrt_form` names the fix wherever an engine is
  asked for).
- Only the inputs of the compute ops are quantised (Conv, MatMul, Gemm), where TensorRT and
  NVIDIA's ModelOpt place Q/DQ too; the residual stream, LayerNorms and activations stay float.
  `quantize_static` gives every consumer of a quantised tensor its DequantizeLinear output, so in a
  folded SLAB graph (whose qkv and fc1 Linears read the residual stream itself) the residual Add read
  the INT8-rounded stream, and ONNX Runtime, seeing one QuantizeLinear feed two DequantizeLinear,
  neither converted it to uint8 on x86 nor fused the Linear (a float MatMul behind a runtime
  dequantisation of its weights). `float_side_inputs` rewires every other consumer to the float
  tensor and gives each compute op its own Q/DQ pair.
- Linear attention keeps its core in float (`float_islands`): the normaliser (sum of k over tokens,
  q . sum k, + eps, the reciprocal and the scaling by it) and the two activation-by-activation
  products feeding it. INT8 there took the demo model's held-out top-1 from 99.4% to 37.5%.
- Calibration runs here, in bounded feeds, through ONNX Runtime's calibrators (`create_calibrator`);
  its ranges go to `quantize_static` as a calibration cache. That way the histogram methods get
  their bin counts (`quantize_static` passes none, and its entropy defaults, 128 bins for 128
  quantised bins, leave one candidate threshold: min/max), and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slab_deploy.export.onnx_passes import token_sums

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
COMPUTE_OPS = QUANTIZED_OPS
TENSORRT_ACTIVATION_TYPE = "int8"  # the activation type TensorRT builds (choices.ACTIVATION_TYPES)
# Histogram settings of the calibrators (ONNX Runtime's names). Entropy: 512 bins searched for the
# threshold that keeps 128 quantised bins closest in KL divergence; percentile: 99.999% of |x|.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {"symmetric": True},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
}
# intermediate outputs held per calibration feed (an estimate, see feed_size)
CALIBRATION_FEED_BYTES = 512 * 2**20
CALIBRATION_TENSOR_FACTOR = 100  # tensors held per image, as multiples of the largest activation

R_NORMALISER = "linear-attention normaliser"
REASONS = {
    "reduce": f"{R_NORMALISER}: sum (or mean) of k over tokens; grows with the token count",
    "layout": f"{R_NORMALISER}: layout of the summed k",
    "denominator": f"{R_NORMALISER}: q . sum(k), the denominator",
    "eps": f"{R_NORMALISER}: + eps",
    "reciprocal": (
        f"{R_NORMALISER}: 1 / (q . sum k + eps); a ReLU'd q row of zeros gives 1/eps = 1e6, and one INT8 "
        "scale for z then rounds every other token's factor to 0"
    ),
    "scale": f"{R_NORMALISER}: the product scaled by the reciprocal (z must stay float, see above)",
    "product": (
        "linear-attention product (k^T v, q k^T v): numerator and denominator must see the same q and k; "
        "INT8 here cost the demo model about 2 points of held-out top-1 (docs/int8.md)"
    ),
}


def method_options(method: str, activation_type: str) -> dict[str, Any]:
    """The calibrator's settings: symmetric ranges for int8 activations, the observed range for uint8."""
    opts = dict(METHOD_OPTIONS[method])
    if "symmetric" in opts:
        opts["symmetric"] = activation_type == "int8"
    return opts


def activation_description(activation_type: str) -> str:
    return ("int8 symmetric (zero point 0)" if activation_type == "int8"
            else "uint8 asymmetric (zero point from the calibrated range; CPU only, TensorRT refuses it)")


@dataclass(frozen=True)
class FloatNode:
    name: str
    op: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "op": self.op, "reason": self.reason}


def _graph_maps(
    model: onnx.ModelProto,
) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]], set[str]]:
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return producers, consumers, constants


def float_islands(model: onnx.ModelProto) -> list[FloatNode]:
    """The nodes of every linear-attention normaliser and its products, which stay float.

    A normaliser is `1 / (MatMul(q, f(Reduce(k))) + eps)` (a Reciprocal, or the denominator of a
    Div), where f is a chain of Transpose/Reshape/Unsqueeze/Squeeze/Mul and Reduce a token sum
    (ReduceSum, ReduceMean, or a MatMul by a row of ones): SLA's and FLatten's, whichever exporter
    wrote them. Softmax attention has none."""
    prod, cons, const = _graph_maps(model)
    sums = {n.name for n in token_sums(model.graph)}
    out: dict[str, FloatNode] = {}

    def add(n: onnx.NodeProto, why: str) -> None:
        out.setdefault(n.name, FloatNode(n.name, n.op_type, REASONS[why]))

    def dynamic(n: onnx.NodeProto) -> bool:
        return all(i not in const for i in n.input[:2])

    def reduction(t: str) -> list[onnx.NodeProto] | None:
        path: list[onnx.NodeProto] = []
        for _ in range(8):
            p = prod.get(t)
            if p is None:
                return None
            if p.name in sums:
                return [p, *path]
            if p.op_type not in ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Mul", "Cast"):
                return None
            path.append(p)
            t = p.input[0]
        return None

    def products(t: str, depth: int = 2) -> list[onnx.NodeProto]:
        p = prod.get(t)
        if p is None or p.op_type != "MatMul" or not dynamic(p) or depth == 0:
            return []
        return [p, *[q for i in p.input for q in products(i, depth - 1)]]

    for n in model.graph.node:
        if n.op_type == "Reciprocal":
            den = n.input[0]
        elif n.op_type == "Div" and len(n.input) == 2 and n.input[1] not in const:
            den = n.input[1]
        else:
            continue
        eps = prod.get(den)
        if eps is None or eps.op_type != "Add" or not any(i in const for i in eps.input):
            continue
        dm = prod.get(next(i for i in eps.input if i not in const))
        if dm is None or dm.op_type != "MatMul" or not dynamic(dm):
            continue
        chain = next((c for c in (reduction(i) for i in dm.input) if c), None)
        if chain is None:
            continue
        add(chain[0], "reduce")
        for p in chain[1:]:
            add(p, "layout")
        add(dm, "denominator")
        add(eps, "eps")
        add(n, "reciprocal")
        scaled = (
            [c for c in cons.get(n.output[0], []) if c.op_type == "Mul"] if n.op_type == "Reciprocal" else [n]
        )
        for m in scaled:
            if m is not n:
                add(m, "scale")
            for i in m.input:
                if i != n.output[0]:
                    for p in products(i):
                        add(p, "product")
    return list(out.values())


def float_side_inputs(model: onnx.ModelProto, float_nodes: set[str] | frozenset[str] = frozenset()
                      ) -> dict[str, int]:
    """Edit the Q/DQ graph `quantize_static` wrote (in place) so that only compute ops read quantised
    activations, each through a Q/DQ pair of its own:

    - a node that is not Conv/MatMul/Gemm (the residual Add, a Reshape) and reads the DequantizeLinear
      of an activation a compute op reads reads the float tensor instead: the residual stream stays
      float, as the recipe says;
    - an activation read by several compute ops gets one QuantizeLinear -> DequantizeLinear pair per
      op (same scale and zero point): ONNX Runtime converts an int8 Q/DQ pair to uint8 on x86, and
      fuses the op into QLinearMatMul/QLinearConv, only when the QuantizeLinear feeds a single
      DequantizeLinear that feeds that op alone.

    A compute op named in `float_nodes` (SLA's core) counts as a float consumer. Returns how many
    inputs were rewired to float and how many pairs were added."""
    prod, cons, const = _graph_maps(model)
    rewired = added = 0
    new_nodes: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    for dq in list(model.graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] in const:
            continue
        q = prod.get(dq.input[0])
        users = cons.get(dq.output[0], [])
        compute = [u for u in users if u.op_type in COMPUTE_OPS and u.name not in float_nodes]
        if q is None or q.op_type != "QuantizeLinear" or not compute:
            continue
        ids = {id(u) for u in compute}
        for u in users:
            if id(u) not in ids:
                for k, i in enumerate(u.input):
                    if i == dq.output[0]:
                        u.input[k] = q.input[0]
                        rewired += 1
        extra: list[onnx.NodeProto] = []
        for j, u in enumerate(compute[1:], start=1):
            q2, dq2 = onnx.NodeProto(), onnx.NodeProto()
            q2.CopyFrom(q)
            dq2.CopyFrom(dq)
            q2.name, dq2.name = f"{q.name}/pair{j}", f"{dq.name}/pair{j}"
            q2.output[0], dq2.output[0] = f"{q.output[0]}/pair{j}", f"{dq.output[0]}/pair{j}"
            dq2.input[0] = q2.output[0]
            for k, i in enumerate(u.input):
                if i == dq.output[0]:
                    u.input[k] = dq2.output[0]
            extra += [q2, dq2]
            added += 1
        if extra:
            new_nodes.append((dq, extra))
    for dq, extra in new_nodes:  # keep the node list topologically sorted: each pair right after its DQ
        at = list(model.graph.node).index(dq) + 1
        for n in reversed(extra):
            model.graph.node.insert(at, n)
    return {"inputs_rewired_to_float": rewired, "qdq_pairs_added": added}


@contextlib.contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """ONNX Runtime's quantiser prints progress to stdout and logs a pre-processing hint as a root
    WARNING: neither may reach a command's JSON output or the terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def feed_size(largest_activation_bytes: int, static_batch: int | None) -> int:
    """Images per calibration feed: the calibrator holds every calibrated tensor of a feed at once,
    estimated as CALIBRATION_TENSOR_FACTOR x the largest activation per image; 1 to 32."""
    if static_batch is not None:
        return static_batch
    per_image = max(1, CALIBRATION_TENSOR_FACTOR * largest_activation_bytes)
    return int(max(1, min(32, CALIBRATION_FEED_BYTES // per_image)))


class _Feed:
    """A CalibrationDataReader over one batch (ONNX Runtime's calibrators pull until None)."""

    def __init__(self, name: str, batch: np.ndarray) -> None:
        self.items = [{name: batch}]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return self.items.pop() if self.items else None


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    float_nodes: list[FloatNode]
    seconds: float
    calibration_seconds: float
    feed: int
    settings: dict[str, Any] = field(default_factory=dict)


def quantize_int8(
    fp32: onnx.ModelProto,
    images: np.ndarray,
    *,
    method: str,
    per_channel: bool,
    workdir: Path,
    feed: int,
    static_batch: int | None,
    activation_type: str = TENSORRT_ACTIVATION_TYPE,
) -> QuantizeResult:
    """Calibrate `fp32` on `images` and quantise it (see the module docstring); files go to a
    scratch folder inside `workdir`, removed on return."""
    from slab_deploy._deps import require
    from slab_deploy.export.calibration import chunks

    ortq = require("onnxruntime.quantization", "--precision int8")
    islands = float_islands(fp32)
    excluded = [f.name for f in islands]
    method_enum = {
        "minmax": ortq.CalibrationMethod.MinMax,
        "entropy": ortq.CalibrationMethod.Entropy,
        "percentile": ortq.CalibrationMethod.Percentile,
    }[method]
    signed = activation_type == "int8"
    calibrator_options = method_options(method, activation_type)
    extra = {"ActivationSymmetric": signed, "WeightSymmetric": True, "QuantizeBias": False}
    settings = {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activation_type": activation_type,
        "activations": activation_description(activation_type),
        "weights": "int8 symmetric" + (" per output channel" if per_channel else " per tensor"),
        "bias": "float",
        "quantized_ops": list(QUANTIZED_OPS),
        "calibrator_options": calibrator_options,
        "extra_options": extra,
        "pre_process": "not run (docs/int8.md: no gain on these graphs, and it fails on FLatten's)",
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=workdir) as tmp, _quiet_quantiser():
        src, cache, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        onnx.save(fp32, str(src))
        name = fp32.graph.input[0].name
        calibrator = ortq.create_calibrator(
            src,
            list(QUANTIZED_OPS),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method_enum,
            extra_options=calibrator_options,
        )
        for batch in chunks(images, feed, static_batch):
            calibrator.collect_data(_Feed(name, batch))
        ortq.save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        t_cal = time.perf_counter() - t0
        ortq.quantize_static(
            str(src),
            str(dst),
            None,
            quant_format=ortq.QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=per_channel,
            reduce_range=False,
            activation_type=ortq.QuantType.QInt8 if signed else ortq.QuantType.QUInt8,
            weight_type=ortq.QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=method_enum,
            extra_options=extra,
            calibration_cache_path=str(cache),
        )
        model = onnx.load(str(dst))
    settings["compute_op_inputs"] = float_side_inputs(model, set(excluded))
    return QuantizeResult(model, islands, time.perf_counter() - t0, t_cal, feed, settings)


# ------------------------------------------------------------------------------------------------
# What the Q/DQ graph holds, and whether TensorRT builds it as explicit precision


def _array(t: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    return numpy_helper.to_array(inits[t]) if t in inits else None


def audit(model: onnx.ModelProto, float_nodes: list[str] | None = None,
          activation_type: str = TENSORRT_ACTIVATION_TYPE) -> dict[str, Any]:
    """Q/DQ counts and the explicit-precision rules TensorRT holds a Q/DQ graph to: INT8 only, zero
    point 0, positive finite constant scales, per-channel only on a weight's output-channel axis,
    biases float; and every Conv/MatMul/Gemm fed by DequantizeLinear on all its (data) inputs but
    the named float nodes. `problems` lists what breaks a rule (empty: the graph conforms). A
    `uint8` graph is held to the same rules but for its activations, which must be uint8 (any zero
    point); it is never TensorRT's (`tensorrt_explicit_precision` false, `tensorrt_refusal` says why)."""
    prod, _, _ = _graph_maps(model)
    inits = {t.name: t for t in model.graph.initializer}
    problems: list[str] = []
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "int8_weights": 0, "per_channel_weights": 0}
    act_dtype = np.int8 if activation_type == "int8" else np.uint8
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts[n.op_type] += 1
        scale = _array(n.input[1], inits)
        zp = _array(n.input[2], inits) if len(n.input) > 2 and n.input[2] else None
        weight = n.op_type == "DequantizeLinear" and n.input[0] in inits
        if scale is None or not (np.isfinite(scale).all() and (scale > 0).all()):
            problems.append(f"{n.name}: scale is not a positive finite initializer")
        if weight or activation_type == "int8":
            if zp is None or zp.dtype != np.int8 or (zp != 0).any():
                problems.append(f"{n.name}: zero point is not int8 zero")
        elif zp is None or zp.dtype != act_dtype:
            problems.append(f"{n.name}: activation zero point is not {activation_type}")
        if weight:
            w = inits[n.input[0]]
            if w.data_type != onnx.TensorProto.INT8:
                problems.append(
                    f"{n.name}: dequantises a {onnx.TensorProto.DataType.Name(w.data_type)} initializer"
                )
            counts["int8_weights"] += 1
            if scale is not None and scale.size > 1:
                counts["per_channel_weights"] += 1
    compute_float: list[str] = []
    for n in model.graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        data = n.input[:2]
        fed = [prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in data]
        if not all(fed):
            compute_float.append(n.name)
        for k, i in enumerate(n.input[:2]):
            dq = prod.get(i)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            scale = _array(dq.input[1], inits)
            if scale is None or scale.size <= 1:
                continue
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            rank = len(inits[dq.input[0]].dims)
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            want = {"Conv": 0, "MatMul": rank - 1, "Gemm": 0 if trans_b else 1}[n.op_type]
            if k != 1 or axis % rank != want:
                problems.append(
                    f"{n.name}: per-channel scales on axis {axis}, not the weight's output channels ({want})"
                )
        if len(n.input) > 2 and n.input[2]:
            b = prod.get(n.input[2])
            if b is not None and b.op_type == "DequantizeLinear":
                problems.append(f"{n.name}: quantised bias (TensorRT takes float biases)")
    expected = set(float_nodes or [])
    unexpected = [n for n in compute_float if n not in expected]
    if unexpected:
        problems.append(
            f"{len(unexpected)} Conv/MatMul/Gemm node(s) run in float without being listed: "
            + ", ".join(unexpected[:5])
        )
    refusal = None if activation_type == TENSORRT_ACTIVATION_TYPE else (
        f"{activation_type} activations: TensorRT builds signed int8 symmetric Q/DQ only")
    return {
        **counts,
        "activation_type": activation_type,
        "float_compute_nodes": compute_float,
        "tensorrt_explicit_precision": not problems and refusal is None,
        "tensorrt_refusal": refusal,
        "problems": problems[:20],
    }


def require_tensorrt_form(manifest: Any, what: str) -> None:
    """Refuse (ConfigError, one line naming the fix) to make a TensorRT engine, or serve one, from an
    export whose quantisation record (the manifest's `precision.int8.activation_type`) says its
    activations are not signed int8; `what` is what asked ("slab-deploy build", ...). An INT8 record
    without the field predates the option, whose only value then was int8."""
    from slab_deploy.errors import ConfigError

    prec = manifest.get("precision") if isinstance(manifest, dict) else None
    if not isinstance(prec, dict) or prec.get("mode") != "int8":
        return
    rec = prec.get("int8")
    act = rec.get("activation_type", TENSORRT_ACTIVATION_TYPE) if isinstance(rec, dict) else None
    if act != TENSORRT_ACTIVATION_TYPE:
        raise ConfigError(f"{what} needs an INT8 export with signed int8 activations, and this one has "
                          f"{act if isinstance(act, str) else 'no readable'} activations (CPU only): "
                          "export again with --activation-type int8")
