"""What a benchmark run records: one Result per case, and the BenchReport of the run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slab_deploy.bench.cases import Case

CV_WARN = 0.10  # coefficient of variation above which a case is flagged unstable


@dataclass
class Result:
    case: Case
    status: str  # ok | skipped | error
    reason: str = ""
    median_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    cv: float | None = None
    samples: int = 0
    throughput: float | None = None  # images / s at the median
    h2d_ms: float | None = None
    d2h_ms: float | None = None
    peak_mem_mib: float | None = None
    compile_s: float | None = None
    gmacs: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    unstable: bool = False
    timer: str = ""
    note: str = ""  # e.g. where an int8 graph's scales came from (random ones: latency only)

    def flat(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("case"))
        d["key"] = self.case.key
        return d


@dataclass
class BenchReport:
    environment: dict[str, Any]
    profile: dict[str, Any]
    results: list[Result]
    command: str = ""
    created: str = ""
    speedups: list[dict[str, Any]] = field(default_factory=list)
    best_speedups: list[dict[str, Any]] = field(default_factory=list)
    untrained: bool = True
    weights: dict[str, str] = field(default_factory=dict)  # model -> checkpoint | demo | untrained
    notes: list[str] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)  # set by `judge`

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "command": self.command,
            "environment": self.environment,
            "profile": self.profile,
            "untrained_weights": self.untrained,
            "weights": self.weights,
            "results": [r.flat() for r in self.results],
            "speedups": self.speedups,
            "best_speedups": self.best_speedups,
            "notes": self.notes,
            "verdict": self.verdict,
        }

