"""ONNX Runtime helpers and runner (CPU and CUDA execution providers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slab_deploy.runtime.base import Prepared


def session(model: onnx.ModelProto | str | Path, providers: list[Any] | None = None,
            threads: int | None = None, graph_opt: str = "all", profile_prefix: str | None = None) -> Any:
    """An InferenceSession on `model` (a path or an in-memory ModelProto)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_opt]
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=so, providers=providers or ["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto | str | Path, inputs: np.ndarray, providers: list[Any] | None = None,
             threads: int | None = None) -> np.ndarray:
    """Run a single-input, single-output model; returns the output as float32 numpy."""
    sess = session(model, providers, threads)
    name = sess.get_inputs()[0].name
    out = sess.run(None, {name: inputs})[0]
    return np.asarray(out, dtype=np.float32)


def cuda_provider_options(fp32: bool) -> dict[str, str]:
    """The CUDA provider's options for a graph: an fp32 graph runs in fp32. ONNX Runtime's CUDA
    provider computes fp32 MatMuls in TF32 unless told not to (`use_tf32`), 10 mantissa bits where
    torch's default keeps 23: fp32 parity against torch then misses 1e-3 (the tiny test LLaMA's logits:
    max rel 5.8e-3 on an H200), and fp32 timings would not be fp32 ones."""
    return {"device_id": "0", **({"use_tf32": "0"} if fp32 else {})}


def cuda_available() -> bool:
    from slab_deploy._deps import available

    if not available("onnxruntime"):
        return False
    from slab_deploy._deps import require

    return "CUDAExecutionProvider" in require("onnxruntime").get_available_providers()


class ORTRunner:
    """ONNX Runtime on CPU or CUDA. `graph_opt="none"` interprets the graph as written (the check
    ladder uses it to tell graph faults from optimiser faults). On CUDA, `cuda_graph` captures the
    run in a CUDA graph (ONNX Runtime replays it while the bound buffers stay the same), and
    `layout="nhwc"` sets the provider's `prefer_nhwc` (convolutions in NHWC, ONNX Runtime's layout
    transformer cancelling the graph's own NCHW transposes where it can; ignored on the CPU); a
    `profile_prefix` turns on ONNX Runtime's profiler (`end_profiling` returns its file).

    Raises `UnsupportedBackend` only for what the host lacks (no CUDA provider, no kernel for an op),
    and `ArtifactError` when the graph itself will not load."""

    def __init__(self, model_path: str | Path, provider: str = "cpu", *, threads: int | None = None,
                 graph_opt: str = "all", precision: str = "fp32", cuda_graph: bool = False,
                 profile_prefix: str | None = None, layout: str = "nchw") -> None:
        from slab_deploy.runtime.base import RunnerInfo, UnsupportedBackend

        ort = _ort()
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedBackend(
                    "ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
            opts = {**cuda_provider_options(precision == "fp32"),
                    **({"enable_cuda_graph": "1"} if cuda_graph else {}),
                    **({"prefer_nhwc": "1"} if layout == "nhwc" else {})}
            providers: list[Any] = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        elif cuda_graph:
            raise UnsupportedBackend("an ONNX Runtime CUDA graph needs the CUDA provider")
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = session(model_path, providers, threads, graph_opt, profile_prefix=profile_prefix)
        except Exception as exc:
            text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
                # This runtime build lacks a kernel (e.g. an fp16 op on the CPU provider):
                # the host, not the graph.
                raise UnsupportedBackend(
                    f"ONNX Runtime {ort.__version__} ({provider}) has no kernel for this graph: {text}"
                ) from None
            if cuda_graph and "graph capture" in text:
                # The graph loads, but ONNX Runtime placed some of its nodes off the CUDA provider
                # (seen with prefer_nhwc): the case cannot be measured as asked, which is a failure,
                # not a broken artefact and not a skip.
                from slab_deploy.errors import BenchCaseError

                hint = " or --ort-cuda-layout nchw" if layout == "nhwc" else ""
                raise BenchCaseError(
                    f"ONNX Runtime {ort.__version__} cannot capture {model_path} in a CUDA graph: not "
                    f"every node runs on the CUDA provider; measure it with the ort-cuda backend{hint}"
                ) from None
            # Anything else is the graph's fault (truncated, invalid, not ONNX): a broken artefact,
            # never a skip.
            from slab_deploy.errors import ArtifactError

            raise ArtifactError(f"ONNX Runtime cannot load {model_path}: {text}") from None
        if provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise UnsupportedBackend(
                "the CUDA execution provider failed to initialise (CUDA/cuDNN libraries?)")
        self.provider = provider
        self.input = self.session.get_inputs()[0].name
        backend = f"ort-{provider}" + ("-graph" if cuda_graph else "")
        self.info = RunnerInfo(
            backend, provider, precision,
            {"onnxruntime": ort.__version__, "graph_opt": graph_opt, "threads": threads,
             "providers": self.session.get_providers(),
             **({"cuda_layout": layout} if provider == "cuda" else {})},
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input: np.ascontiguousarray(images, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def prepare(self, images: np.ndarray) -> Prepared:
        """CPU: `session.run` on the host batch. CUDA: IO binding on device buffers (inputs copied
        once here), timed with perf_counter after the binding's synchronisation (the session runs
        on its own stream)."""
        sess, name = self.session, self.input
        if self.provider != "cuda":
            return Prepared(lambda: sess.run(None, {name: images}), "perf_counter")
        ort = _ort()
        out = sess.get_outputs()[0]
        x_dev = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
        y_dev = ort.OrtValue.ortvalue_from_shape_and_type([images.shape[0], self.out_dim()], np.float32,
                                                          "cuda", 0)
        binding = sess.io_binding()
        binding.bind_ortvalue_input(name, x_dev)
        binding.bind_ortvalue_output(out.name, y_dev)

        def step() -> None:
            sess.run_with_iobinding(binding)

        return Prepared(step, "perf_counter", sync=binding.synchronize_outputs,
                        output_elems=images.shape[0] * self.out_dim(), keep=(x_dev, y_dev, binding))

    def out_dim(self) -> int:
        """Classes of the logits (1000 when the graph leaves the dimension symbolic)."""
        shape = self.session.get_outputs()[0].shape
        return int(shape[-1]) if isinstance(shape[-1], int) else 1000

    def end_profiling(self) -> Path:
        """Stop ONNX Runtime's profiler (see `profile_prefix`); returns the file it wrote."""
        return Path(self.session.end_profiling())


def _ort() -> Any:
    from slab_deploy._deps import require

    ort = require("onnxruntime", "running ONNX models")
    ort.set_default_logger_severity(3)  # errors only: provider-discovery warnings are noise in reports
    return ort
