"""config.pbtxt of one Triton model, in the protobuf text format of Triton's `ModelConfig`.

`model_config(...)` decides every field from the export and the options; `render_config` writes it
as text. The text is written here without protobuf so a repository can be written where
tritonclient is not installed; `parse_config` reads it back through Triton's own `ModelConfig`
message (`tritonclient.grpc.model_config_pb2`), which the tests run on every generated config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slab_deploy.errors import ConfigError
from slab_deploy.serve.artifact import ONNX_NAME, PLAN_NAME, ServedArtifact, TensorSpec
from slab_deploy.serve.deps import require_serve
from slab_deploy.serve.options import (
    BACKENDS,
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE_DELAY_US,
    PLATFORMS,
    RepoOptions,
)

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
TRT_WORKSPACE_BYTES = 1 << 30
# Parameters the python flavour's model.py reads (the onnxruntime backend reads the thread count
# under the same key).
ONNX_FILE_PARAM = "onnx_file"
THREADS_PARAM = "intra_op_thread_count"


@dataclass
class ModelConfig:
    """The fields of config.pbtxt that slab-deploy sets (a subset of Triton's ModelConfig)."""

    name: str
    backend: str  # the Triton backend that must be present to load it
    platform: str | None
    max_batch_size: int
    default_model_filename: str | None
    input: TensorSpec
    output: TensorSpec
    dynamic_batching: dict[str, Any] | None
    instance_count: int
    instance_kind: str  # KIND_CPU | KIND_GPU
    accelerator: dict[str, Any] | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    warmup: bool = False


def resolve_max_batch(art: ServedArtifact, opts: RepoOptions) -> int:
    """Triton's max_batch_size: 0 for a static-batch export (its batch is part of the dims), else
    --max-batch, the engine's profile, or DEFAULT_MAX_BATCH; refused where it cannot hold."""
    if art.static_batch is not None:
        given = [
            flag
            for flag, v in (
                ("--max-batch", opts.max_batch),
                ("--preferred-batch", opts.preferred_batch),
                ("--queue-delay-us", opts.queue_delay_us),
            )
            if v
        ]
        if given:
            raise ConfigError(
                f"{art.folder} was exported with a static batch of {art.static_batch}: Triton serves "
                f"it with max_batch_size 0 and cannot batch requests, so {', '.join(given)} cannot "
                "apply; drop them, or export with --dynamic-batch"
            )
        return 0
    engine_max = art.engine_max_batch if opts.flavour == "tensorrt" else None
    if opts.flavour == "tensorrt" and engine_max is None and opts.max_batch is None:
        raise ConfigError(
            f"{art.folder}/engine.json does not state the engine's largest batch (max_batch or "
            "profile.max): pass --max-batch N, at most the batch of its optimisation profile"
        )
    max_batch = opts.max_batch or engine_max or DEFAULT_MAX_BATCH
    if engine_max is not None and max_batch > engine_max:
        raise ConfigError(
            f"--max-batch {max_batch} exceeds the engine's optimisation profile (at most "
            f"{engine_max}); pass --max-batch {engine_max} or less, or build a larger engine"
        )
    if any(b > max_batch for b in opts.preferred_batch):
        raise ConfigError(
            f"--preferred-batch {','.join(map(str, opts.preferred_batch))} exceeds the max batch "
            f"{max_batch}; pass --max-batch or smaller preferred sizes"
        )
    return max_batch


def model_config(art: ServedArtifact, opts: RepoOptions, name: str) -> ModelConfig:
    """Every field of the model's config.pbtxt, decided from the export and the options."""
    max_batch = resolve_max_batch(art, opts)
    inp, out = art.input, art.output
    if art.static_batch is not None:  # max_batch_size 0: the dims are the full shape
        inp = TensorSpec(inp.name, inp.dtype, (art.static_batch, *inp.dims))
        out = TensorSpec(out.name, out.dtype, (art.static_batch, *out.dims))
    if opts.fp16_io:
        graph_fp16 = art.input.dtype == "float16" and art.output.dtype == "float16"
        if art.precision != "fp16":
            raise ConfigError(
                f"--fp16-io is for fp16 artefacts; {art.folder} holds an {art.precision} graph: "
                "export with --precision fp16, or drop --fp16-io"
            )
        if opts.flavour != "python" and not graph_fp16:
            raise ConfigError(
                f"{art.folder}/model.onnx takes {art.input.dtype} images and gives {art.output.dtype} "
                f"logits, and the {opts.flavour} flavour serves the graph's own I/O types: use "
                "--flavour python (its model.py casts at the boundary), or drop --fp16-io"
            )
        inp, out = TensorSpec(inp.name, "float16", inp.dims), TensorSpec(out.name, "float16", out.dims)
    batching = None
    if max_batch > 0 and opts.dynamic_batching:
        batching = {
            "preferred_batch_size": list(opts.preferred_batch),
            "max_queue_delay_microseconds": DEFAULT_QUEUE_DELAY_US
            if opts.queue_delay_us is None
            else opts.queue_delay_us,
        }
    params: dict[str, str] = {}
    if opts.flavour == "python":
        params[ONNX_FILE_PARAM] = ONNX_NAME
    if opts.threads is not None:
        params[THREADS_PARAM] = str(opts.threads)
    filename = {"onnxruntime": ONNX_NAME, "tensorrt": PLAN_NAME}.get(opts.flavour)
    return ModelConfig(
        name=name,
        backend=BACKENDS[opts.flavour],
        platform=PLATFORMS.get(opts.flavour),
        max_batch_size=max_batch,
        default_model_filename=filename,
        input=inp,
        output=out,
        dynamic_batching=batching,
        instance_count=opts.instances,
        instance_kind="KIND_GPU" if opts.instance_kind == "gpu" else "KIND_CPU",
        accelerator=_accelerator(art, opts, max_batch),
        parameters=params,
        warmup=opts.accelerator == "tensorrt",  # the TensorRT execution provider builds its engine at load
    )


def _accelerator(art: ServedArtifact, opts: RepoOptions, max_batch: int) -> dict[str, Any] | None:
    if opts.accelerator == "cuda":
        return {"name": "cuda", "parameters": {"cudnn_conv_use_max_workspace": "1"}}
    if opts.accelerator != "tensorrt":
        return None
    params = {
        "precision_mode": "FP16" if art.precision == "fp16" else "FP32",
        "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
    }
    if max_batch > 0:  # one optimisation profile over the batch, so no shape rebuilds an engine
        dims = "x".join(map(str, art.input.dims))
        opt = max(opts.preferred_batch) if opts.preferred_batch else max_batch
        params["trt_profile_min_shapes"] = f"{art.input.name}:1x{dims}"
        params["trt_profile_opt_shapes"] = f"{art.input.name}:{opt}x{dims}"
        params["trt_profile_max_shapes"] = f"{art.input.name}:{max_batch}x{dims}"
    return {"name": "tensorrt", "parameters": params}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(t: TensorSpec) -> list[str]:
    return [
        "  {",
        f"    name: {_q(t.name)}",
        f"    data_type: {TRITON_DTYPES[t.dtype]}",
        f"    dims: [ {', '.join(map(str, t.dims))} ]",
        "  }",
    ]


def render_config(cfg: ModelConfig) -> str:
    """config.pbtxt text of `cfg`."""
    lines = [f"name: {_q(cfg.name)}"]
    lines.append(f"platform: {_q(cfg.platform)}" if cfg.platform else f"backend: {_q(cfg.backend)}")
    lines.append(f"max_batch_size: {cfg.max_batch_size}")
    if cfg.default_model_filename:
        lines.append(f"default_model_filename: {_q(cfg.default_model_filename)}")
    lines += ["input [", *_tensor_block(cfg.input), "]", "output [", *_tensor_block(cfg.output), "]"]
    if cfg.dynamic_batching is not None:
        lines.append("dynamic_batching {")
        if cfg.dynamic_batching["preferred_batch_size"]:
            sizes = ", ".join(map(str, cfg.dynamic_batching["preferred_batch_size"]))
            lines.append(f"  preferred_batch_size: [ {sizes} ]")
        lines += [
            f"  max_queue_delay_microseconds: {cfg.dynamic_batching['max_queue_delay_microseconds']}",
            "}",
        ]
    lines += [
        "instance_group [",
        "  {",
        f"    count: {cfg.instance_count}",
        f"    kind: {cfg.instance_kind}",
        "  }",
        "]",
    ]
    if cfg.accelerator is not None:
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator [",
            "      {",
            f"        name: {_q(cfg.accelerator['name'])}",
        ]
        lines += [
            f"        parameters {{ key: {_q(k)} value: {_q(v)} }}"
            for k, v in cfg.accelerator["parameters"].items()
        ]
        lines += ["      }", "    ]", "  }", "}"]
    if cfg.warmup:
        dims = ", ".join(map(str, cfg.input.dims))
        lines += [
            "model_warmup [",
            "  {",
            '    name: "zeros"',
            "    batch_size: 1",
            "    inputs {",
            f"      key: {_q(cfg.input.name)}",
            "      value {",
            f"        data_type: {TRITON_DTYPES[cfg.input.dtype]}",
            f"        dims: [ {dims} ]",
            "        zero_data: true",
            "      }",
            "    }",
            "  }",
            "]",
        ]
    for k, v in cfg.parameters.items():
        lines.append(f"parameters {{ key: {_q(k)} value {{ string_value: {_q(v)} }} }}")
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> Any:
    """`text` parsed into Triton's own `ModelConfig` protobuf message (needs tritonclient[grpc]);
    a text Triton would not parse raises ConfigError."""
    from google.protobuf import text_format

    pb2 = require_serve("tritonclient.grpc.model_config_pb2", "reading Triton model configurations")
    msg = pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ConfigError(f"not a Triton model configuration: {exc}") from None
    return msg
