"""TensorRT engines: build from the deployed ONNX graph, run with device buffers from torch.

Written against the TensorRT 10/11 Python API (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`),
which share Builder / OnnxParser / build_serialized_network / Runtime. Networks are created
strongly typed: TensorRT 11 has no FP16/INT8 builder flags, so precision comes from the ONNX
graph itself (slab-deploy's fp16 export keeps SLA's fp32 islands as typed Casts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.runtime.base import Prepared, RunnerInfo, UnsupportedBackend


def import_tensorrt() -> Any:
    """The TensorRT module: full TensorRT when installed, else TensorRT-RTX."""
    from slab_deploy._deps import available, require

    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        if available(name):
            return require(name, "TensorRT engines")
    raise UnsupportedBackend(
        "TensorRT is not installed (pip install 'slab-deploy[tensorrt]' on a host with NVIDIA's index)")


def build_serialized_engine(
    onnx_path: str | Path,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 64,
    workspace_gib: float = 4.0,
    trt: Any = None,
) -> bytes:
    """Parse `onnx_path` and build a serialized engine with one optimisation profile over the batch."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedBackend(f"TensorRT could not parse {onnx_path}: {errors[:400]}")
    config = builder.create_builder_config()
    if hasattr(trt, "MemoryPoolType"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    inp = network.get_input(0)
    shape = list(inp.shape)
    if shape and shape[0] == -1:
        profile = builder.create_optimization_profile()
        rest = shape[1:]
        profile.set_shape(inp.name, [min_batch, *rest], [opt_batch, *rest], [max_batch, *rest])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UnsupportedBackend("TensorRT failed to build an engine (see the TensorRT log above)")
    return bytes(serialized)


class TensorRTRunner:
    """Runs a serialized engine; host<->device copies are outside the timed region in `bench`."""

    def __init__(self, engine_bytes: bytes, precision: str = "fp32", trt: Any = None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedBackend("TensorRT needs a CUDA device")
        self.trt = trt or import_tensorrt()
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise UnsupportedBackend(
                "TensorRT could not deserialize the engine on this GPU (see the TensorRT log)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == mode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == mode.OUTPUT)
        self.stream = torch.cuda.Stream()
        self.info = RunnerInfo("tensorrt", "cuda", precision,
                               {"tensorrt": getattr(self.trt, "__version__", "?")})

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, precision: str = "fp32", max_batch: int = 64) -> TensorRTRunner:
        trt = import_tensorrt()
        return cls(build_serialized_engine(onnx_path, max_batch=max_batch, trt=trt), precision, trt)

    def bind(self, x: Any) -> Any:
        """Set shapes and addresses for device tensor `x`; returns the device output tensor."""
        import torch

        self.context.set_input_shape(self.input, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        return out

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")

    def prepare(self, images: np.ndarray) -> Prepared:
        """Copy `images` to the GPU once, bind them; `execute` is timed with CUDA events on the
        runner's stream."""
        import torch

        x = torch.from_numpy(images).cuda()
        out = self.bind(x)
        return Prepared(self.execute, "cuda-events",
                        stream=torch.cuda.ExternalStream(self.stream.cuda_stream),
                        output_elems=images.shape[0] * 1000, keep=(x, out))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda()
        out = self.bind(x)
        with torch.cuda.stream(self.stream):
            self.execute()
        self.stream.synchronize()
        return out.cpu().numpy()
