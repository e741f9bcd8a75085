"""Device profiles: named, schema-checked benchmark targets (YAML files in `profiles/`)."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slab_deploy.errors import ConfigError

BACKENDS = ("torch", "torch-cudagraph", "torch-compile", "ort-cpu", "ort-cuda", "ort-cuda-graph", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str  # cuda | cpu
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    batches: tuple[int, ...]
    threads: tuple[int | None, ...] = (None,)  # CPU threads (None: runtime default)
    warmup: int = 10
    iters: int = 50
    min_seconds: float = 0.0  # keep timing until this much time has passed (at least `iters` runs)
    peak_tflops: float | None = None  # for model FLOP utilisation
    emulated: bool = False
    compile_mode: str = "max-autotune-no-cudagraphs"
    sla_policy: str = "fp32"  # half-precision policy of SLA (see SLACore): fp32 | mixed
    exporter: str = "auto"  # ONNX exporter for the ONNX Runtime / TensorRT backends
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "description": str, "device": str, "backends": list, "precisions": list, "batches": list,
    "threads": (int, list, type(None)), "warmup": int, "iters": int, "min_seconds": (int, float),
    "peak_tflops": (int, float, type(None)), "emulated": bool, "compile_mode": str, "sla_policy": str, "exporter": str,
}
_REQUIRED = ("name", "description", "device", "backends", "precisions", "batches")


def profile_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("SLAB_DEPLOY_PROFILES", "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parent.parent / "profiles")  # a source checkout
    dirs.append(Path(sys.prefix) / "share" / "slab-deploy" / "profiles")  # an installed wheel
    return dirs


def validate(data: Any, source: str) -> Profile:
    """Schema check of one profile mapping; raises ConfigError naming the file and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile must be a mapping of fields")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    for k, typ in _FIELDS.items():
        if k in data and not isinstance(data[k], typ):
            raise ConfigError(f"{source}: field {k!r} has the wrong type ({type(data[k]).__name__})")
    if data["device"] not in ("cuda", "cpu"):
        raise ConfigError(f"{source}: device must be cuda or cpu, not {data['device']!r}")
    for b in data["backends"]:
        if b not in BACKENDS:
            raise ConfigError(f"{source}: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for p in data["precisions"]:
        if p not in PRECISIONS:
            raise ConfigError(f"{source}: unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if not data["batches"] or not all(isinstance(b, int) and b >= 1 for b in data["batches"]):
        raise ConfigError(f"{source}: batches must be a non-empty list of positive integers")
    threads = data.get("threads")
    threads_t: tuple[int | None, ...] = (None,) if threads is None else (tuple(threads) if isinstance(threads, list) else (threads,))
    if not all(t is None or (isinstance(t, int) and t >= 1) for t in threads_t):
        raise ConfigError(f"{source}: threads must be positive integers")
    if data.get("sla_policy", "fp32") not in ("fp32", "mixed"):
        raise ConfigError(f"{source}: sla_policy must be fp32 or mixed")
    if data.get("exporter", "auto") not in ("auto", "dynamo", "torchscript"):
        raise ConfigError(f"{source}: exporter must be auto, dynamo or torchscript")
    if data.get("iters", 1) < 1 or data.get("warmup", 0) < 0:
        raise ConfigError(f"{source}: iters must be >= 1 and warmup >= 0")
    kw = {k: v for k, v in data.items() if k not in ("backends", "precisions", "batches", "threads")}
    return Profile(
        backends=tuple(data["backends"]), precisions=tuple(data["precisions"]), batches=tuple(data["batches"]),
        threads=threads_t, source=source, **kw,
    )


def load_profile(name_or_path: str) -> Profile:
    import yaml

    p = Path(name_or_path)
    candidates = [p] if p.suffix in (".yaml", ".yml") else [d / f"{name_or_path}.yaml" for d in profile_dirs()]
    for c in candidates:
        if c.is_file():
            try:
                data = yaml.safe_load(c.read_text())
            except yaml.YAMLError as exc:
                raise ConfigError(f"{c}: not valid YAML ({exc})") from None
            prof = validate(data, c.name if c.parent in profile_dirs() else str(c))
            if p.suffix not in (".yaml", ".yml") and prof.name != name_or_path:
                raise ConfigError(f"{c}: profile name {prof.name!r} does not match its file name")
            return prof
    raise ConfigError(f"unknown profile {name_or_path!r}; available: {', '.join(list_profiles()) or 'none'} (or pass a .yaml path)")


def list_profiles() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)
