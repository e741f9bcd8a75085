"""Triton Python-backend model written by slab-deploy: runs the exported ONNX graph beside it
(`1/model.onnx`) with ONNX Runtime on the CPU.

This file is copied verbatim into `REPO/<model>/1/model.py`; it runs inside Triton's Python
backend stub, imports nothing of slab-deploy and needs only numpy and onnxruntime there.

Triton's dynamic batcher hands `execute` several requests at once: their images are stacked
into one batch (up to max_batch_size), run once, and the logits split back per request. Triton
checks every request against config.pbtxt (input name, dtype, shape, batch bound) before it gets
here; the same checks are repeated so that a mismatch is an error response for that request
alone, never a wrong answer or a failed batch.

Tensors cross the stub boundary through DLPack only. The stub's numpy path (`as_numpy()`,
`Tensor(name, ndarray)`) reads numpy's C structures as numpy 1.x laid them out and returns wrong
data under numpy 2; DLPack carries the pointer, shape and dtype explicitly and works under both.
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort  # noqa: TID251 - this file runs inside Triton, not slab-deploy
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

# The stub renames a DLPack capsule it consumed "used_dlpack" where the protocol says
# "used_dltensor"; numpy's capsule destructor then cannot tell it was consumed and reports an
# error for every response. Renaming it as the protocol asks keeps the logs clean (the stub still
# calls the tensor's deleter, as a consumer must).
_USED = ctypes.c_char_p(b"used_dltensor")
_set_name = ctypes.pythonapi.PyCapsule_SetName
_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_name.restype = ctypes.c_int
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.argtypes = [ctypes.py_object]
_get_name.restype = ctypes.c_char_p


def _output_tensor(name: str, array: np.ndarray) -> Any:
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    if _get_name(capsule) == b"used_dlpack":
        _set_name(capsule, _USED)
    return tensor


def _error(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0") or 0)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(folder, params.get("onnx_file", "model.onnx")),
            options,
            providers=["CPUExecutionProvider"],
        )
        graph_in, graph_out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        (inp,), (out,) = cfg["input"], cfg["output"]
        self.max_batch = int(cfg.get("max_batch_size", 0))
        self.in_name, self.out_name = inp["name"], out["name"]
        self.graph_in_name = graph_in.name
        self.in_dtype = pb_utils.triton_string_to_numpy(inp["data_type"])
        self.out_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        self.graph_dtype = _ORT_DTYPES[graph_in.type]
        # the shape one request's images must have after its batch dimension (all of it at batch 0)
        self.item_shape = tuple(int(d) for d in inp["dims"])
        if graph_out.name != self.out_name or graph_in.name != self.in_name:
            raise ValueError(
                f"config.pbtxt names {self.in_name}/{self.out_name}, the graph "
                f"{graph_in.name}/{graph_out.name}: write the repository again"
            )
        warm = np.zeros((1, *self.item_shape) if self.max_batch else self.item_shape, self.graph_dtype)
        self.session.run([self.out_name], {self.graph_in_name: warm})

    def _images(self, request: Any) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, self.in_name)
        if tensor is None:
            raise ValueError(f"the request has no input {self.in_name!r}")
        x = np.from_dlpack(tensor)
        if x.dtype != self.in_dtype:
            raise ValueError(f"input {self.in_name!r} is {x.dtype}, expected {np.dtype(self.in_dtype)}")
        shape = tuple(x.shape[1:]) if self.max_batch else tuple(x.shape)
        if shape != self.item_shape or (self.max_batch and not 1 <= x.shape[0] <= self.max_batch):
            want = (
                f"[1..{self.max_batch}, {', '.join(map(str, self.item_shape))}]"
                if self.max_batch
                else str(list(self.item_shape))
            )
            raise ValueError(f"input {self.in_name!r} has shape {list(x.shape)}, expected {want}")
        # a copy in the graph's dtype: the request's memory is Triton's and is released after execute
        return np.array(x, dtype=self.graph_dtype, copy=True)

    def _run(self, images: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run([self.out_name], {self.graph_in_name: images})
        return np.asarray(logits, dtype=self.out_dtype)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        images: dict[int, np.ndarray] = {}
        for i, request in enumerate(requests):
            try:
                images[i] = self._images(request)
            except ValueError as exc:
                responses[i] = _error(str(exc))
        # stack the requests into batches of at most max_batch images (each alone without batching)
        groups: list[list[int]] = []
        filled = 0
        for i, x in images.items():
            if groups and self.max_batch and filled + x.shape[0] <= self.max_batch:
                groups[-1].append(i)
                filled += x.shape[0]
            else:
                groups.append([i])
                filled = x.shape[0]
        for group in groups:
            try:
                parts = [images[i] for i in group]
                logits = self._run(np.concatenate(parts) if len(parts) > 1 else parts[0])
                start = 0
                for i, part in zip(group, parts, strict=True):
                    n = part.shape[0] if self.max_batch else logits.shape[0]
                    out = _output_tensor(self.out_name, logits[start : start + n])
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                    start += n
            except Exception as exc:  # ONNX Runtime failed on this batch: each of its requests says so
                for i in group:
                    responses[i] = _error(f"ONNX Runtime failed: {type(exc).__name__}: {exc}")
        return responses

    def finalize(self) -> None:
        self.session = None
