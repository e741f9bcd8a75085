"""The verdict of a run: failed or unmeasured cases, and regressions against an earlier bench.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slab_deploy.bench.results import BenchReport
from slab_deploy.errors import BenchCaseError, ConfigError, RegressionError, SlabDeployError

MAX_BASELINE_BYTES = 64 << 20  # a bench.json of thousands of cases is a few MiB


@dataclass(frozen=True)
class Baseline:
    """The measured (status "ok") cases of an earlier bench.json: case key -> median ms."""

    path: Path
    medians: dict[str, float]


def load_baseline(path: Path) -> Baseline:
    """Read and check an earlier bench.json for --against; any malformed content is a ConfigError
    (exit 1) naming the file and the field, and a file without one measured case is malformed: it
    could not fail a comparison."""
    where = f"--against {path}"
    hint = "pass a bench.json written by slab-deploy bench"
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"{where} is not a file; {hint}")
        if size > MAX_BASELINE_BYTES:
            raise ConfigError(f"{where}: {size} bytes is too large for a bench.json "
                              f"(at most {MAX_BASELINE_BYTES}); {hint}")
        old = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc}); {hint}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{where}: not JSON ({' '.join(str(exc).split())[:200]}); {hint}") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object, not {_json_type(old)}; {hint}")
    results = old.get("results")
    if not isinstance(results, list):
        raise ConfigError(f"{where}: 'results' must be a list of cases, not {_json_type(results)}; {hint}")
    medians: dict[str, float] = {}
    seen: set[str] = set()
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: results[{i}] must be an object, not {_json_type(r)}; {hint}")
        key, status, median = r.get("key"), r.get("status"), r.get("median_ms")
        if not isinstance(key, str) or not key:
            raise ConfigError(
                f"{where}: results[{i}].key must be a non-empty string, not {_json_type(key)}; {hint}")
        if key in seen:
            raise ConfigError(f"{where}: case {key} appears twice; {hint}")
        seen.add(key)
        if status not in ("ok", "skipped", "error"):
            raise ConfigError(
                f"{where}: results[{i}].status must be ok, skipped or error, not {status!r}; {hint}")
        if status == "ok":
            if not (isinstance(median, (int, float)) and not isinstance(median, bool)
                    and math.isfinite(median) and median > 0):
                raise ConfigError(f"{where}: results[{i}].median_ms of ok case {key} "
                                  f"must be a finite number > 0, not {median!r}; {hint}")
            medians[key] = float(median)
    if not medians:
        raise ConfigError(f"{where}: no measured (status ok) case to compare against; {hint}")
    return Baseline(path, medians)


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


@dataclass
class Comparison:
    """This run against a baseline: cases slower than the threshold allows, and measured cases of
    the baseline that this run did not measure (absent, skipped or failed)."""

    baseline: str
    threshold: float
    regressions: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    compared: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_threshold(threshold: float) -> float:
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
            or threshold < 0):
        raise ConfigError(
            f"--threshold must be a finite fraction >= 0 (0.10 allows 10% slower), not {threshold!r}")
    return float(threshold)


def compare_against(report: BenchReport, baseline: Baseline, threshold: float) -> Comparison:
    """Compare every measured case of `baseline` with this run (NaN-safe: medians were checked)."""
    check_threshold(threshold)
    now = {r.case.key: r for r in report.results}
    cmp = Comparison(str(baseline.path), threshold)
    for key, old_ms in baseline.medians.items():
        r = now.get(key)
        if r is None:
            cmp.missing.append(f"{key}: not in this run")
        elif r.status != "ok" or not r.median_ms:
            cmp.missing.append(f"{key}: {r.status} ({r.reason[:120]})")
        else:
            cmp.compared += 1
            ratio = r.median_ms / old_ms
            if ratio > 1 + threshold:
                cmp.regressions.append(f"{key}: {old_ms:.3f} -> {r.median_ms:.3f} ms (+{ratio - 1:.0%})")
    return cmp


def judge(report: BenchReport, comparison: Comparison | None = None) -> SlabDeployError | None:
    """The run's verdict, recorded in `report.verdict`: BenchCaseError (exit 5) when a case failed
    or nothing was measured (every case skipped: a benchmark that measured nothing cannot pass a
    gate); else RegressionError (exit 4) when a measured case of the baseline is missing from this
    run or regressed; else None (exit 0). A failed case outranks a regression."""
    errors = [r for r in report.results if r.status == "error"]
    ok = [r for r in report.results if r.status == "ok"]
    n = len(report.results)
    exc: SlabDeployError | None = None
    if errors:
        exc = BenchCaseError(f"{len(errors)} of {n} case(s) failed: "
                             + "; ".join(f"{r.case.key}: {r.reason}" for r in errors[:3])
                             + ("; ..." if len(errors) > 3 else ""))
    elif not ok:
        skipped = report.results[0].reason if report.results else "no cases"
        exc = BenchCaseError(f"nothing was measured: all {n} case(s) were skipped (first: {skipped}); "
                             "run on a host with the backend")
    elif comparison is not None and (comparison.missing or comparison.regressions):
        parts = []
        if comparison.missing:
            parts.append(f"{len(comparison.missing)} measured case(s) of the baseline not measured now: "
                         + "; ".join(comparison.missing[:3]))
        if comparison.regressions:
            parts.append(f"{len(comparison.regressions)} case(s) slower than the baseline by more than "
                         f"{comparison.threshold:.0%}: "
                         + "; ".join(comparison.regressions[:5]))
        exc = RegressionError(" and ".join(parts))
    report.verdict = {"exit_code": exc.exit_code if exc else 0, "passed": exc is None,
                      "message": str(exc) if exc else "passed",
                      "cases": n, "ok": len(ok), "errors": len(errors), "skipped": n - len(ok) - len(errors),
                      "against": comparison.to_dict() if comparison is not None else None}
    return exc
