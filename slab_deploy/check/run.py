"""`check_and_report`: what `slab-deploy check` calls. `run_check` with its options given as typed
on the command line (tolerance overrides as RUNG:METRIC=VALUE), the report directory refused before
any work when it cannot be written, and report.json / report.md / io.npz written with the command
that replays the check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slab_deploy.check.ladder import run_check
from slab_deploy.check.options import check_report_dir, parse_tolerance_overrides
from slab_deploy.check.report import CheckReport, replay_base, write_reports
from slab_deploy.choices import CHECK_BACKENDS


@dataclass
class CheckOutcome:
    report: CheckReport
    paths: dict[str, Path] = field(default_factory=dict)  # json, markdown, npz (with a report directory)


def check_and_report(
    model_name: str,
    checkpoint: str | Path | None = None,
    *,
    report_dir: str | Path | None = None,
    tolerance: Sequence[str] = (),
    artifacts: str | Path | None = None,
    backends: Sequence[str] = CHECK_BACKENDS,
    precisions: Sequence[str] = ("fp32",),
    inputs: int | None = None,
    images: str | Path | None = None,
    replay: str | Path | None = None,
    seed: int = 0,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckOutcome:
    """Run the ladder and keep its reports. Bad input (including `tolerance` strings and a
    `report_dir` that cannot be made) raises before any rung runs and nothing is written; the
    verdict does not raise: pass the report to `raise_for_verdict`."""
    overrides = parse_tolerance_overrides(tolerance)
    if report_dir is not None:
        check_report_dir(report_dir)
    rep = run_check(model_name, checkpoint, artifacts=artifacts, backends=backends, precisions=precisions,
                    inputs=inputs, images=images, replay=replay, seed=seed, tolerance=overrides, ema=ema,
                    allow_unfinished_prepbn=allow_unfinished_prepbn, progress=progress)
    if report_dir is None:
        return CheckOutcome(rep)
    base = replay_base(model_name, checkpoint, artifacts=artifacts, backends=backends, precisions=precisions,
                       tolerance=tolerance, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn)
    return CheckOutcome(rep, write_reports(rep, report_dir, base))
