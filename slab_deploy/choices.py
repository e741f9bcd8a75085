"""The vocabulary every command, profile and report validates against, defined once.

Backends name what runs a model (`bench`, `trace`, the runtime layer); check backends select the
rungs of the parity ladder by the runtime that runs them; precisions, SLA policies, exporters,
simplifiers, compile modes and devices are the values their options take. Nothing here imports
anything heavy.
"""

from __future__ import annotations

from collections.abc import Sequence

DEVICES = ("cpu", "cuda")

# What runs a model: torch eager / CUDA graph replay / torch.compile, ONNX Runtime CPU / CUDA (IO
# binding) / CUDA with a captured CUDA graph, a TensorRT engine.
BACKENDS = ("torch", "torch-cudagraph", "torch-compile", "ort-cpu", "ort-cuda", "ort-cuda-graph", "tensorrt")
CUDA_ONLY_BACKENDS = ("torch-cudagraph", "torch-compile", "ort-cuda", "ort-cuda-graph", "tensorrt")

# The parity ladder (`check`): each rung and the check backend that runs it. `onnx` runs the
# graphs with ONNX Runtime's graph optimisations off, so exporter faults show apart from optimiser ones.
RUNGS = ("fold", "onnx", "simplified", "ort_cpu", "ort_cuda", "tensorrt")
CHECK_BACKENDS = ("torch", "onnx", "ort-cpu", "ort-cuda", "tensorrt")
RUNG_BACKEND = {"fold": "torch", "onnx": "onnx", "simplified": "onnx", "ort_cpu": "ort-cpu",
                "ort_cuda": "ort-cuda", "tensorrt": "tensorrt"}
DEPLOYED_RUNGS = ("simplified", "ort_cpu", "ort_cuda", "tensorrt")  # rungs that run the deployed graph

# what a backend may run at (bf16: torch only; int8: Q/DQ ONNX graphs)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # what an exported artefact holds
EXPORT_FORMATS = ("onnx", "engine", "triton")  # `export --format` (slab_deploy/formats.py)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # how INT8 activation ranges are calibrated
# INT8 activations: int8 signed symmetric (TensorRT's explicit precision; the default) or uint8 asymmetric
# (ONNX Runtime CPU only)
ACTIVATION_TYPES = ("int8", "uint8")
# ONNX Runtime CUDA convolution layout: its default NCHW, or NHWC (the provider's `prefer_nhwc`)
ORT_CUDA_LAYOUTS = ("nchw", "nhwc")
SLA_POLICIES = ("fp32", "mixed")  # half precision SLA: fp32 island, or fp16 matmuls with an fp32 normaliser
# The default of export, bench and trace: `mixed` keeps the trained demo model's accuracy and has the
# error of `fp32` on the zoo (parity ladder on ONNX Runtime CUDA, docs/benchmarks.md), and is faster.
DEFAULT_SLA_POLICY = "mixed"
EXPORTERS = ("auto", "dynamo", "torchscript")
SIMPLIFIERS = ("auto", "onnxslim", "onnxsim", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# TensorRT's hardware-compatibility levels of an engine (`build --hardware-compat`); TensorRT-RTX
# names target compute capabilities instead.
HARDWARE_COMPAT = ("none", "ampere-plus", "same-compute-capability")


def describe(allowed: Sequence[str]) -> str:
    """`a, b or c`, for messages."""
    items = list(allowed)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
