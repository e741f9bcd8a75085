"""What `check` refuses before any work: options, the report directory, tolerance overrides.

Everything here runs before the checkpoint is loaded and writes nothing. `short_repr` and
`first_line` shape the one-line messages of every check module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slab_deploy.choices import (
    CHECK_BACKENDS,
    DEPLOYED_RUNGS,
    EXPORT_PRECISIONS,
    RUNG_BACKEND,
    RUNGS,
    describe,
)
from slab_deploy.errors import ConfigError

MAX_INPUTS = 4096  # images per check (the exporter's dynamic batch goes up to 4096 too)
# what `--tolerance` may override
METRICS = ("max_rel", "min_cosine", "min_sqnr_db", "min_top1", "max_accuracy_drop")


def short_repr(value: Any, n: int = 80) -> str:
    """repr(value), cut to `n` characters: user values go into one-line messages."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def first_line(exc: BaseException, n: int = 300) -> str:
    """`Type: first line of the message`, cut to `n` characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:n]}" if text else type(exc).__name__


def validate_options(backends: Sequence[str], precisions: Sequence[str], inputs: int | None, *,
                     images: str | Path | None = None, replay: str | Path | None = None) -> None:
    """Refuse options that cannot give a verdict (ConfigError, exit 1)."""
    if not backends:
        raise ConfigError(f"--backends is empty; choose from {', '.join(CHECK_BACKENDS)}")
    bad = [b for b in backends if b not in CHECK_BACKENDS]
    if bad:
        raise ConfigError(f"unknown backend(s) {', '.join(map(short_repr, bad))}; "
                          f"choose from {', '.join(CHECK_BACKENDS)}")
    if not any(RUNG_BACKEND[r] in backends for r in DEPLOYED_RUNGS):
        raise ConfigError(
            f"--backends {','.join(backends)} runs no rung on the deployed graph, "
            "so nothing would be judged; add onnx, ort-cpu, ort-cuda or tensorrt"
        )
    if not precisions:
        raise ConfigError("--precision is empty; pass fp32, fp16, int8 or a comma list such as fp32,int8")
    for p in precisions:
        if p not in EXPORT_PRECISIONS:
            raise ConfigError(
                f"unknown precision {short_repr(p)}; check supports {describe(EXPORT_PRECISIONS)}")
    if inputs is not None and (isinstance(inputs, bool) or not isinstance(inputs, int)
                               or not 1 <= inputs <= MAX_INPUTS):
        raise ConfigError(f"--inputs must be between 1 and {MAX_INPUTS}, not {short_repr(inputs)}")
    if images is not None and replay is not None:
        raise ConfigError("--images and --replay exclude each other: a replay reruns the inputs it saved")


def check_report_dir(path: str | Path) -> Path:
    """`--report` must be a directory, or a path where one can be made; refuse it before any work."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--report {out} is a file; "
                          "pass a directory (report.json, report.md and io.npz go into it)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--report {out}: {parent} is a file, so the directory cannot be made")
            break
    for name in ("report.json", "report.md", "io.npz"):
        if (out / name).is_dir():
            raise ConfigError(f"--report {out}: {out / name} is a directory; "
                              "remove it or choose another --report")
    return out


def parse_tolerance_overrides(items: Sequence[str]) -> dict[str, dict[str, float]]:
    """`RUNG:METRIC=VALUE` strings -> {rung: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        try:
            rung, rest = item.split(":", 1)
            metric, value = rest.split("=", 1)
            v = float(value)
        except ValueError:
            raise ConfigError(f"--tolerance {item!r}: expected RUNG:METRIC=VALUE, "
                              "e.g. ort_cuda:min_cosine=0.995") from None
        if rung not in RUNGS:
            raise ConfigError(f"--tolerance {item!r}: unknown rung {rung!r}; rungs are {', '.join(RUNGS)}")
        if metric not in METRICS:
            raise ConfigError(f"--tolerance {item!r}: unknown metric {metric!r}; "
                              f"metrics are {', '.join(METRICS)}")
        if not math.isfinite(v):
            raise ConfigError(f"--tolerance {item!r}: the value must be a finite number "
                              "(NaN passes or fails everything)")
        out.setdefault(rung, {})[metric] = v
    return out
