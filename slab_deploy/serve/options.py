"""The options of a Triton model repository (`RepoOptions`), refused before anything is read or written.

The vocabulary lives here: the repository flavours (which Triton backend runs the model), the
instance kinds and the ONNX Runtime accelerators of the `onnxruntime` flavour. Nothing here
imports anything heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from slab_deploy.choices import describe
from slab_deploy.errors import ConfigError

# flavour -> what config.pbtxt names: Triton's ONNX Runtime backend, its TensorRT backend, or the
# Python backend running the `model.py` slab-deploy writes (ONNX Runtime on the CPU inside it).
FLAVOURS = ("onnxruntime", "tensorrt", "python")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
BACKENDS = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "python": "python"}
KINDS = ("cpu", "gpu")
# optimization.execution_accelerators of the onnxruntime flavour on GPU instances: ORT's CUDA
# execution provider with its options, or its TensorRT execution provider.
ACCELERATORS = ("none", "cuda", "tensorrt")

DEFAULT_MAX_BATCH = 32  # for dynamic-batch exports without --max-batch (and without an engine profile)
MAX_BATCH_LIMIT = 4096
DEFAULT_QUEUE_DELAY_US = 100
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s: a longer wait is a typo, not a batching policy
MAX_INSTANCES = 64
MAX_THREADS = 1024
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class RepoOptions:
    """How one export becomes one model of a Triton repository.

    `max_batch`: Triton's max_batch_size for a dynamic-batch export (default: the engine's profile
    for `tensorrt`, else DEFAULT_MAX_BATCH); a static-batch export is served with max_batch_size 0
    and its full shape, so the batching options are refused for it. `preferred_batch` and
    `queue_delay_us` shape dynamic batching (on unless `dynamic_batching` is False). `kind`
    defaults to cpu, or gpu for `tensorrt`. `fp16_io` declares FP16 inputs and outputs: for fp16
    artefacts only, and only where the graph itself takes fp16 or the `python` flavour casts at
    the boundary. `threads` is ONNX Runtime's intra-op thread count per instance (0: its default)."""

    flavour: str = "onnxruntime"
    name: str | None = None  # default: the manifest's model name
    version: int = 1
    max_batch: int | None = None
    preferred_batch: tuple[int, ...] = ()
    queue_delay_us: int | None = None
    dynamic_batching: bool = True
    instances: int = 1
    kind: str | None = None
    fp16_io: bool = False
    accelerator: str = "none"
    threads: int | None = None

    @property
    def instance_kind(self) -> str:
        return self.kind or ("gpu" if self.flavour == "tensorrt" else "cpu")

    def validate(self) -> RepoOptions:
        """Refuse a bad value with one line naming the fix (ConfigError); returns self."""
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"--flavour {self.flavour!r} is not one of {describe(FLAVOURS)}")
        if self.name is not None and not MODEL_NAME.match(self.name):
            raise ConfigError(
                f"--name {self.name!r} is not a model name Triton serves in a URL: use letters, digits, "
                "'_', '-' and '.', starting with a letter or digit (at most 128)"
            )
        _whole("--version", self.version, 1, 2**31 - 1)
        _whole("--max-batch", self.max_batch, 1, MAX_BATCH_LIMIT, allow_none=True)
        _whole("--queue-delay-us", self.queue_delay_us, 0, MAX_QUEUE_DELAY_US, allow_none=True)
        _whole("--instances", self.instances, 1, MAX_INSTANCES)
        _whole("--threads", self.threads, 0, MAX_THREADS, allow_none=True)
        for b in self.preferred_batch:
            _whole("--preferred-batch", b, 1, MAX_BATCH_LIMIT)
        if len(set(self.preferred_batch)) != len(self.preferred_batch):
            raise ConfigError(
                f"--preferred-batch {_csv(self.preferred_batch)} repeats a size; list each once"
            )
        if self.max_batch is not None and any(b > self.max_batch for b in self.preferred_batch):
            raise ConfigError(
                f"--preferred-batch {_csv(self.preferred_batch)} exceeds --max-batch {self.max_batch}; "
                "a preferred batch must fit in the largest one"
            )
        if not self.dynamic_batching and (self.preferred_batch or self.queue_delay_us is not None):
            raise ConfigError(
                "--preferred-batch and --queue-delay-us shape dynamic batching, which "
                "--no-dynamic-batching turns off; drop one or the other"
            )
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"--kind {self.kind!r} is not one of {describe(KINDS)}")
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"--accelerator {self.accelerator!r} is not one of {describe(ACCELERATORS)}")
        kind = self.instance_kind
        if self.flavour == "tensorrt" and kind != "gpu":
            raise ConfigError("a TensorRT engine runs on a GPU: --flavour tensorrt takes --kind gpu")
        if self.flavour == "python" and kind != "cpu":
            raise ConfigError(
                "the python flavour runs ONNX Runtime on the CPU: use --kind cpu, or "
                "--flavour onnxruntime --kind gpu for GPU instances"
            )
        if self.accelerator != "none" and (self.flavour != "onnxruntime" or kind != "gpu"):
            raise ConfigError(
                f"--accelerator {self.accelerator} configures ONNX Runtime on a GPU: it takes "
                "--flavour onnxruntime --kind gpu"
            )
        if self.threads is not None and self.flavour == "tensorrt":
            raise ConfigError(
                "--threads sets ONNX Runtime's intra-op threads; a TensorRT engine has none: drop it"
            )
        return self

    @classmethod
    def from_text(cls, *, preferred_batch: str | None = None, **values: object) -> RepoOptions:
        """Options from command-line text: `preferred_batch` as a comma list ("4,8")."""
        sizes: tuple[int, ...] = ()
        if preferred_batch:
            try:
                sizes = tuple(int(v) for v in preferred_batch.split(",") if v.strip())
            except ValueError:
                raise ConfigError(
                    f"--preferred-batch {preferred_batch!r} is not a comma list of whole numbers, e.g. 4,8"
                ) from None
        return replace(cls(), preferred_batch=sizes, **values).validate()  # type: ignore[arg-type]


def _whole(flag: str, value: object, low: int, high: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{flag} must be a whole number from {low} to {high}, not {value!r}")


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)
