"""`check_and_report`: what `slab-deploy check` calls. `run_check` with its options given as typed
on the command line (tolerance overrides as RUNG:METRIC=VALUE), the report directory refused before
any work when it cannot be written, and report.json / report.md / io.npz written with the command
that replays the check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slab_deploy.check.ladder import run_check
from slab_deploy.check.options import check_report_dir, parse_tolerance_overrides
from slab_deploy.check.report import CheckReport, replay_base, write_reports


@dataclass
class CheckOutcome:
    report: CheckReport
    paths: dict[str, Path] = field(default_factory=dict)  # json, markdown, npz (with a report directory)


def check_and_report(model_name: str, checkpoint: str | Path | None = None, *,
                     report_dir: str | Path | None = None, tolerance: Sequence[str] = (),
                     **options: Any) -> CheckOutcome:
    """Run the ladder (`options` are run_check's: artifacts, backends, precisions, inputs, images,
    replay, seed, ema, allow_unfinished_prepbn, progress) and keep its reports. Bad input, the
    `tolerance` strings and a `report_dir` that cannot be made among it, raises before any rung runs
    and nothing is written; the verdict does not raise: pass the report to `raise_for_verdict`."""
    overrides = parse_tolerance_overrides(tolerance)
    if report_dir is not None:
        check_report_dir(report_dir)
    rep = run_check(model_name, checkpoint, tolerance=overrides, **options)
    if report_dir is None:
        return CheckOutcome(rep)
    keep = ("artifacts", "backends", "precisions", "ema", "allow_unfinished_prepbn")
    base = replay_base(model_name, checkpoint, tolerance=tolerance,
                       **{k: options[k] for k in keep if k in options})
    return CheckOutcome(rep, write_reports(rep, report_dir, base))
