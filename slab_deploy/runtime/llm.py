"""Runners for language models with a key/value cache: torch and ONNX Runtime (CPU, CUDA).

Every runner has the same two calls, the two phases of generation:

  prefill(input_ids)        -> last-position logits (B, vocab) float32 numpy, cache
  decode(next_ids, cache)   -> last-position logits, cache extended by one position

plus `sync()` (wait for the device) for timing. The cache stays where the runner computes: torch
tensors on its device; for ONNX Runtime CUDA, OrtValues on the GPU bound through IO binding, so
no key/value tensor crosses to the host between steps (only the logits do, which decoding needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from slab_deploy.models.llama import LlamaForCausalLM

_NP = {"fp32": np.float32, "fp16": np.float16}


class TorchLLMRunner:
    """A (folded) LLaMA in torch on `device` at `precision` (fp32, fp16 or bf16)."""

    def __init__(self, model: LlamaForCausalLM, device: str = "cpu", precision: str = "fp32") -> None:
        import copy

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type} {precision}"

    @torch.no_grad()
    def _run(self, ids: Any, cache: Any) -> tuple[np.ndarray, Any]:
        x = torch.as_tensor(np.asarray(ids), dtype=torch.int64).to(self.device)
        logits, cache = self.model(x, cache, use_cache=True, last_only=True)
        return logits[:, -1].float().cpu().numpy(), cache

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        return self._run(ids, None)

    def decode(self, next_ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        return self._run(np.asarray(next_ids).reshape(-1, 1), cache)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class OrtLLMRunner:
    """An `export_llm` graph in ONNX Runtime. `provider` is "cpu" or "cuda"; `graph_opt` as in
    `runtime.ort.session` ("none" shows exporter faults apart from optimiser ones). CUDA always runs
    through IO binding (the cache stays on the GPU as OrtValues); `io_binding=True` takes the same
    path on the CPU (what the tests use to check that path where there is no GPU)."""

    def __init__(
        self,
        onnx_path: str | Path,
        manifest: dict[str, Any],
        provider: str = "cpu",
        graph_opt: str = "all",
        threads: int | None = None,
        io_binding: bool = False,
    ) -> None:
        from slab_deploy.runtime.ort import cuda_provider_options, session

        providers: list[Any] = (
            [("CUDAExecutionProvider", cuda_provider_options(manifest["cache_dtype"] == "fp32")),
             "CPUExecutionProvider"]
            if provider == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.sess = session(onnx_path, providers, threads=threads, graph_opt=graph_opt)
        if provider == "cuda" and "CUDAExecutionProvider" not in self.sess.get_providers():
            from slab_deploy.errors import UnsupportedInputError

            raise UnsupportedInputError(
                "ONNX Runtime did not take the CUDA execution provider; "
                "install onnxruntime-gpu with a matching CUDA"
            )
        arch = manifest["architecture"]
        self.heads, self.head_dim = int(arch["num_heads"]), int(arch["head_dim"])
        self.inputs, self.outputs = list(manifest["inputs"]), list(manifest["outputs"])
        self.dtype = _NP[manifest["cache_dtype"]]
        self.cuda = provider == "cuda"
        self.binding_device = "cuda" if self.cuda else ("cpu" if io_binding else None)
        opt = "" if graph_opt == "all" else f", graph optimisation {graph_opt}"
        self.name = f"ort-{provider} {manifest['precision']}{opt}"

    def _empty(self, batch: int) -> list[np.ndarray]:
        z = np.zeros((batch, self.heads, 0, self.head_dim), self.dtype)
        return [z] * (len(self.inputs) - 1)

    def _run(self, ids: np.ndarray, cache: list[Any]) -> tuple[np.ndarray, list[Any]]:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.binding_device is None:
            out = self.sess.run(
                self.outputs, {"input_ids": ids, **dict(zip(self.inputs[1:], cache, strict=True))}
            )
            return np.asarray(out[0], dtype=np.float32), list(out[1:])
        b = self.sess.io_binding()
        b.bind_cpu_input("input_ids", ids)
        for name, v in zip(self.inputs[1:], cache, strict=True):
            if isinstance(v, np.ndarray):
                b.bind_cpu_input(name, v)
            else:
                b.bind_ortvalue_input(name, v)
        b.bind_output(self.outputs[0], "cpu")
        for name in self.outputs[1:]:
            b.bind_output(name, self.binding_device)
        self.sess.run_with_iobinding(b)
        outs = b.get_outputs()
        return np.asarray(outs[0].numpy(), dtype=np.float32), list(outs[1:])

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        return self._run(ids, self._empty(int(np.asarray(ids).shape[0])))

    def decode(self, next_ids: np.ndarray, cache: list[Any]) -> tuple[np.ndarray, list[Any]]:
        return self._run(np.asarray(next_ids).reshape(-1, 1), cache)

    def sync(self) -> None:
        """Runs are synchronous (the logits come back to the host at the end of each)."""


def teacher_forced(
    runner: TorchLLMRunner | OrtLLMRunner, prompts: np.ndarray, tokens: np.ndarray
) -> np.ndarray:
    """Last-position logits (B, N, vocab) of greedy decoding fed the given tokens (B, N): step 0 is
    the prefill of `prompts`, step s feeds tokens[:, s-1]. When every step's argmax equals
    `tokens[:, s]`, free-running greedy decoding on this runner yields exactly `tokens`."""
    logits, cache = runner.prefill(prompts)
    steps = [logits]
    for s in range(1, tokens.shape[1]):
        logits, cache = runner.decode(tokens[:, s - 1], cache)
        steps.append(logits)
    return np.stack(steps, axis=1)


def greedy(runner: TorchLLMRunner | OrtLLMRunner, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """Free-running greedy decoding: the (B, new_tokens) tokens."""
    logits, cache = runner.prefill(prompts)
    out = [logits.argmax(-1)]
    for _ in range(new_tokens - 1):
        logits, cache = runner.decode(out[-1], cache)
        out.append(logits.argmax(-1))
    return np.stack(out, axis=1).astype(np.int64)
