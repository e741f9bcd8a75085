"""Device profiles: named, schema-checked benchmark targets (YAML files in `profiles/`)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from slab_deploy.choices import (
    ACTIVATION_TYPES,
    BACKENDS,
    COMPILE_MODES,
    DEFAULT_SLA_POLICY,
    DEVICES,
    EXPORTERS,
    ORT_CUDA_LAYOUTS,
    PRECISIONS,
    SLA_POLICIES,
)
from slab_deploy.errors import ConfigError


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
    sla_policy: str = DEFAULT_SLA_POLICY  # half-precision policy of SLA (see SLACore): fp32 | mixed
    exporter: str = "auto"  # ONNX exporter for the ONNX Runtime / TensorRT backends
    activation_type: str = "int8"  # int8 cases: int8 (signed symmetric, TensorRT's) or uint8 (CPU only)
    ort_cuda_layout: str = "nchw"  # ONNX Runtime CUDA: nchw (its default) or nhwc (prefer_nhwc)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_THREADS = 1024  # a sanity bound: more threads than this is a typo, not an edge CPU
MAX_PROFILE_BYTES = 1 << 20  # a profile is a few hundred bytes; refuse to parse a huge file

_FIELDS = ("name", "description", "device", "backends", "precisions", "batches", "threads", "warmup", "iters",
           "min_seconds", "peak_tflops", "emulated", "compile_mode", "sla_policy", "exporter",
           "activation_type", "ort_cuda_layout")
_REQUIRED = ("name", "description", "device", "backends", "precisions", "batches")


def profile_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("SLAB_DEPLOY_PROFILES", "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parent.parent / "profiles")  # a source checkout
    dirs.append(Path(sys.prefix) / "share" / "slab-deploy" / "profiles")  # an installed wheel
    return dirs


def _shown(v: Any) -> str:
    r = repr(v)
    return (r if len(r) <= 40 else r[:37] + "...") + f" ({type(v).__name__})"


def _is_int(v: Any) -> bool:
    # YAML `true` is a bool, and bool is an int in Python
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    """Type checks of one profile mapping; every failure is one line naming the source, the key and
    what was expected."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data, self.source = data, source

    def fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: {key} must be {expected}, not {_shown(value)}")

    def choice(self, key: str, choices: Sequence[str], default: str | None = None) -> str:
        v = self.data.get(key, default)
        if not isinstance(v, str) or v not in choices:
            raise self.fail(key, "one of " + ", ".join(choices), v)
        return v

    def text(self, key: str, default: str | None = None) -> str:
        v = self.data.get(key, default)
        if not isinstance(v, str) or (key == "name" and not v.strip()):
            raise self.fail(key, "a non-empty string" if key == "name" else "a string", v)
        return v

    def integer(self, key: str, default: int, minimum: int) -> int:
        v = self.data.get(key, default)
        if not _is_int(v) or v < minimum:
            raise self.fail(key, f"an integer >= {minimum}", v)
        return int(v)

    def number(self, key: str, default: float | None, *, positive: bool = False,
               optional: bool = False) -> float | None:
        v: Any = self.data.get(key, default)
        if v is None and optional:
            return None
        if not _is_number(v) or v < 0 or (positive and v == 0):
            what = "a finite number > 0" if positive else "a finite number >= 0"
            raise self.fail(key, what + (" or null" if optional else ""), v)
        return float(v)

    def choices(self, key: str, choices: Sequence[str]) -> tuple[str, ...]:
        v = self.data[key]
        if not isinstance(v, list) or not v:
            raise self.fail(key, "a non-empty list of " + ", ".join(choices), v)
        for i, x in enumerate(v):
            if not isinstance(x, str) or x not in choices:
                raise self.fail(f"{key}[{i}]", "one of " + ", ".join(choices), x)
        self._unique(key, v)
        return tuple(v)

    def integers(self, key: str, *, maximum: int | None = None, nullable: bool = False,
                 scalar: bool = False) -> tuple[Any, ...]:
        v = self.data[key]
        items = v if isinstance(v, list) else [v]
        if (isinstance(v, list) and not v) or (not scalar and not isinstance(v, list)):
            raise self.fail(key, "a non-empty list of positive integers", v)
        expected = ("a positive integer" + (f" <= {maximum}" if maximum else "")
                    + (" or null" if nullable else ""))
        for i, x in enumerate(items):
            if x is None and nullable:
                continue
            if not _is_int(x) or x < 1 or (maximum is not None and x > maximum):
                raise self.fail(f"{key}[{i}]" if isinstance(v, list) else key, expected, x)
        self._unique(key, items)
        return tuple(items)

    def _unique(self, key: str, items: list[Any]) -> None:
        dup = [x for i, x in enumerate(items) if x in items[:i]]
        if dup:
            raise ConfigError(f"{self.source}: {key} lists {dup[0]!r} twice")


def validate(data: Any, source: str) -> Profile:
    """Schema and type check of one profile mapping (bool is not an integer, numbers are finite,
    strings come from the known vocabularies); raises ConfigError naming the source and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile must be a mapping of fields, not {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    c = _Checker(data, source)
    threads = data.get("threads")
    return Profile(
        name=c.text("name"),
        description=c.text("description"),
        device=c.choice("device", DEVICES),
        backends=c.choices("backends", BACKENDS),
        precisions=c.choices("precisions", PRECISIONS),
        batches=c.integers("batches"),
        threads=(None,) if threads is None else c.integers("threads", maximum=MAX_THREADS, nullable=True,
                                                           scalar=True),
        warmup=c.integer("warmup", 10, 0),
        iters=c.integer("iters", 50, 1),
        min_seconds=c.number("min_seconds", 0.0) or 0.0,
        peak_tflops=c.number("peak_tflops", None, positive=True, optional=True),
        emulated=_bool(data, "emulated", source),
        compile_mode=c.choice("compile_mode", COMPILE_MODES, "max-autotune-no-cudagraphs"),
        sla_policy=c.choice("sla_policy", SLA_POLICIES, DEFAULT_SLA_POLICY),
        exporter=c.choice("exporter", EXPORTERS, "auto"),
        activation_type=c.choice("activation_type", ACTIVATION_TYPES, "int8"),
        ort_cuda_layout=c.choice("ort_cuda_layout", ORT_CUDA_LAYOUTS, "nchw"),
        source=source,
    )


def _bool(data: dict[str, Any], key: str, source: str) -> bool:
    v = data.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: {key} must be true or false, not {_shown(v)}")
    return v


def load_profile(name_or_path: str) -> Profile:
    import yaml

    p = Path(name_or_path)
    candidates = ([p] if p.suffix in (".yaml", ".yml")
                  else [d / f"{name_or_path}.yaml" for d in profile_dirs()])
    for c in candidates:
        if c.is_file():
            if c.stat().st_size > MAX_PROFILE_BYTES:
                raise ConfigError(f"{c}: {c.stat().st_size} bytes is too large for a profile "
                                  f"(at most {MAX_PROFILE_BYTES})")
            try:
                data = yaml.safe_load(c.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{c}: cannot read the profile ({exc})") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{c}: not valid YAML ({' '.join(str(exc).split())})") from None
            prof = validate(data, c.name if c.parent in profile_dirs() else str(c))
            if p.suffix not in (".yaml", ".yml") and prof.name != name_or_path:
                raise ConfigError(f"{c}: profile name {prof.name!r} does not match its file name")
            return prof
    raise ConfigError(f"unknown profile {name_or_path!r}; available: {', '.join(list_profiles()) or 'none'} "
                      "(or pass a .yaml path)")


def list_profiles() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


# -------------------------------------------------------------------------------------- command-line profiles


def default_profile(device: str, command: str = "bench") -> Profile:
    """What `bench` (or `trace`) measures on `device` when no --profile is given."""
    if device not in DEVICES:
        raise ConfigError(f"--device must be {' or '.join(DEVICES)}, not {device!r}")
    cuda = device == "cuda"
    if command == "trace":
        return validate({
            "name": f"trace-{device}", "description": "trace settings", "device": device,
            "backends": ["torch" if cuda else "ort-cpu"], "precisions": ["fp32"], "batches": [1],
            "warmup": 10 if cuda else 3, "iters": 30 if cuda else 5, "min_seconds": 0.0,
        }, "command line")
    return Profile(
        name=f"default-{device}", description="command-line defaults", device=device,
        backends=("torch", "torch-cudagraph", "ort-cuda") if cuda else ("ort-cpu",),
        precisions=("fp32", "fp16") if cuda else ("fp32",), batches=(1, 64) if cuda else (1,),
        warmup=20 if cuda else 3, iters=100 if cuda else 10, min_seconds=0.5,
    )


# Fields an option may set as a comma list, and the option that spells it in messages.
LIST_OPTIONS = {"backends": "--backends", "precisions": "--precision", "batches": "--batch",
                "threads": "--threads"}
_INT_LISTS = ("batches", "threads")


def resolve_profile(device: str, profile: str | None = None, overrides: Mapping[str, Any] | None = None, *,
                    command: str = "bench") -> Profile:
    """The profile a command runs: the named (or .yaml) `profile`, which must be for `device`, or
    the device's default (`default_profile`), with the given `overrides` (profile fields; None
    values are ignored) merged over it and the result checked like a profile file. List fields
    (LIST_OPTIONS) also take a comma-separated string, as typed on the command line; bad values
    are a ConfigError naming the option or the field."""
    if device not in DEVICES:
        raise ConfigError(f"--device must be {' or '.join(DEVICES)}, not {device!r}")
    if profile:
        prof = load_profile(profile)
        if prof.device != device:
            raise ConfigError(f"profile {prof.name} is for --device {prof.device}, not {device}")
    else:
        prof = default_profile(device, command)
    given: dict[str, Any] = {}
    for k, v in (overrides or {}).items():
        if v is None or v == "":  # not given (an empty option keeps the profile's value, as before)
            continue
        if k not in _FIELDS or k in ("name", "description", "device"):
            raise ConfigError(
                f"{k} cannot be overridden; allowed: "
                f"{', '.join(f for f in _FIELDS if f not in ('name', 'description', 'device'))}")
        if isinstance(v, str) and k in LIST_OPTIONS:
            v = (_int_list(v, LIST_OPTIONS[k]) if k in _INT_LISTS
                 else [x.strip() for x in v.split(",") if x.strip()])
        elif isinstance(v, int) and k in LIST_OPTIONS:
            v = [v]  # one value of a list field (a bool stays in the list, and validate refuses it)
        given[k] = list(v) if isinstance(v, (tuple, list)) else v
    if not given:
        return prof
    merged = {k: (list(v) if isinstance(v, tuple) else v) for k, v in prof.to_dict().items()
              if k not in ("source", "extra")}
    merged.update(given)
    if merged.get("threads") == [None]:
        merged["threads"] = None
    return replace(validate(merged, "command line"), source=prof.source)


def _int_list(value: str, option: str) -> list[int]:
    """A comma list of positive integers; anything else is one line naming the option."""
    out = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if not (item.isascii() and item.isdigit() and len(item) <= 15) or int(item) < 1:
            shown = item if len(item) <= 20 else item[:17] + "..."
            raise ConfigError(
                f"{option} takes a comma list of positive integers (e.g. 1,8,64), not {shown!r}")
        out.append(int(item))
    if not out:
        raise ConfigError(f"{option} takes a comma list of positive integers (e.g. 1,8,64), not {value!r}")
    return out
