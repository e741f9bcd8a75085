"""The verdict of the parity ladder and the files that keep it.

A rung ends in pass, fail, error or skipped (see slab_deploy.check); `CheckReport` turns the rungs
into one outcome, a verdict line and an exit code, and `write_reports` keeps report.json,
report.md and io.npz (the inputs and every rung's outputs, for `--replay`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.check.options import check_report_dir
from slab_deploy.choices import CHECK_BACKENDS, DEPLOYED_RUNGS
from slab_deploy.errors import ArtifactError, ConfigError, ParityError


@dataclass
class RungResult:
    rung: str
    precision: str
    status: str  # pass | fail | error | skipped (see the module docstring)
    runner: str = ""
    artifact: str = ""
    reason: str = ""  # why it was skipped or could not run
    metrics: dict[str, Any] | None = None
    tolerance: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    needed: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.rung} ({self.precision})"


@dataclass
class CheckReport:
    model: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    untrained: bool
    inputs: dict[str, Any]
    rungs: list[RungResult]
    versions: dict[str, Any]
    weights: str = "checkpoint"  # checkpoint | demo | untrained (slab_deploy.weights.default)
    reference_accuracy: float | None = None  # the checkpoint model's top-1 against the labels, if any
    replay_command: str = ""
    artifacts_precision: dict[str, Any] | None = None  # the export manifest's precision block (--artifacts)
    exported_here: bool = False  # the graphs are check's own export (no --artifacts)
    # What io.npz holds: the inputs every rung saw, and the reference's and each rung's outputs.
    io_inputs: np.ndarray | None = field(default=None, repr=False, compare=False)
    io_outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    io_labels: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def weights_label(self) -> str:
        from slab_deploy.weights.default import weights_label

        return weights_label(self.model, self.weights)

    @property
    def first_failure(self) -> RungResult | None:
        """The first rung that failed or could not run."""
        return next((r for r in self.rungs if r.status in ("fail", "error")), None)

    @property
    def first_error(self) -> RungResult | None:
        return next((r for r in self.rungs if r.status == "error"), None)

    @property
    def deployed_ran(self) -> int:
        """Rungs that ran (passed or failed) on the deployed graph."""
        return sum(r.rung in DEPLOYED_RUNGS and r.status in ("pass", "fail") for r in self.rungs)

    @property
    def outcome(self) -> str:
        """pass | fail (parity, exit 3) | error (broken artefact, exit 1) | unjudged (nothing ran on the
        deployed graph, exit 1)."""
        if self.first_error is not None:
            return "error"
        if self.first_failure is not None:
            return "fail"
        return "pass" if self.deployed_ran else "unjudged"

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"

    @property
    def exit_code(self) -> int:
        return {"pass": 0, "fail": ParityError.exit_code, "error": ArtifactError.exit_code,
                "unjudged": ConfigError.exit_code}[self.outcome]

    def verdict(self) -> str:
        outcome = self.outcome
        ran = sum(r.status in ("pass", "fail") for r in self.rungs)
        if outcome == "pass":
            return f"PASS: {ran} rungs agree with the checkpoint model ({len(self.rungs) - ran} skipped)"
        if outcome == "unjudged":
            why = ("; ".join(f"{r.label}: {r.reason}" for r in self.rungs if r.rung in DEPLOYED_RUNGS)
                   or "no graph to run")
            return (f"NOT JUDGED: no rung ran on the deployed graph ({why}); a pass needs at least one of "
                    f"{', '.join(DEPLOYED_RUNGS)}: select a backend this host has")
        if outcome == "error":
            e = self.first_error
            assert e is not None
            own = (" (on the graph check exported itself: a bug in slab-deploy, "
                   "please report it with report.json)"
                   if self.exported_here else " (the artefact is broken: export again)")
            text = f"ERROR at rung {e.label}: could not run: {e.reason}{own}"
            f = self.first_failure
            if f is not None and f is not e:
                text += f"; earlier, FAIL at rung {f.label}: {'; '.join(f.failures)}"
            return text
        f = self.first_failure
        assert f is not None
        return (f"FAIL at rung {f.label}: {'; '.join(f.failures)} "
                "(first rung that broke; earlier rungs passed)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "untrained": self.untrained,
            "weights": {"kind": self.weights, "label": self.weights_label},
            "inputs": self.inputs,
            "reference_accuracy": self.reference_accuracy,
            "passed": self.passed,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "verdict": self.verdict(),
            "first_failure": self.first_failure.rung if self.first_failure else None,
            "rungs": [asdict(r) for r in self.rungs],
            "versions": self.versions,
            "replay_command": self.replay_command,
            "artifacts_precision": self.artifacts_precision,
        }

    def to_markdown(self) -> str:
        def acc(m: dict[str, Any]) -> str:
            v = m.get("accuracy")
            return "-" if v is None else f"{100 * v:.2f}%"

        lines = [
            f"# slab-deploy check: {self.model}",
            "",
            f"**{self.verdict()}**",
            "",
            f"- checkpoint: `{self.checkpoint or 'embedded default'}` "
            f"(sha256 `{(self.checkpoint_sha256 or '')[:16]}`)",
            f"- weights: {self.weights_label}",
            f"- inputs: {self.inputs.get('source')} "
            f"({self.inputs.get('count')} images, seed {self.inputs.get('seed')})",
            "- reference: checkpoint model in eval mode, torch fp32 on the CPU"
            + ("" if self.reference_accuracy is None
               else f"; top-1 accuracy against the labels {100 * self.reference_accuracy:.2f}%"),
            "- top-1 / top-5: agreement with the reference's top-1; accuracy: against the labels",
            "",
            "| rung | precision | status | max abs | max rel | mean abs | cosine | SQNR dB "
            "| top-1 | top-5 | accuracy | tolerance | needed to pass |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rungs:
            m = r.metrics or {}

            def f(k: str, fmt: str, m: dict[str, Any] = m) -> str:
                v = m.get(k)
                return "-" if v is None else format(v, fmt)

            tol = ", ".join(f"{k}={v:g}" for k, v in r.tolerance.items()) or "-"
            need = ", ".join(f"{k}={v:.3g}" for k, v in r.needed.items()) or "-"
            status = f"{r.status}: {r.reason}" if r.status in ("skipped", "error") else r.status
            if r.status == "fail" and r.metrics and (
                    r.metrics.get("nonfinite") or r.metrics.get("nonfinite_reference")):
                status += f": {'; '.join(r.failures)}"
            lines.append(
                f"| {r.rung} | {r.precision} | {status.replace('|', '/')} "
                f"| {f('max_abs', '.2e')} | {f('max_rel', '.2e')} | {f('mean_abs', '.2e')} "
                f"| {f('cosine', '.6f')} | {f('sqnr_db', '.1f')} | {f('top1', '.3f')} | {f('top5', '.3f')} "
                f"| {acc(m)} | {tol} | {need} |"
            )
        if self.replay_command:
            lines += ["", "Replay locally:", "", f"    {self.replay_command}"]
        return "\n".join(lines) + "\n"


def replay_base(model_name: str, checkpoint: str | Path | None = None, *,
                artifacts: str | Path | None = None,
                backends: Sequence[str] = CHECK_BACKENDS, precisions: Sequence[str] = ("fp32",),
                tolerance: Sequence[str] = (), ema: bool = False,
                allow_unfinished_prepbn: bool = False) -> str:
    """The `slab-deploy check` command line that reruns a check (`write_reports` appends
    `--replay io.npz`): the same model, weights, artefacts or precisions, backends and tolerance
    overrides, shell-quoted. Seed, input count and images are not repeated: a replay feeds the saved
    inputs."""
    from shlex import quote

    words = ["slab-deploy", "check", "--model", model_name]
    if checkpoint is not None:
        words += ["--checkpoint", str(checkpoint)]
    if ema:
        words.append("--ema")
    if allow_unfinished_prepbn:
        words.append("--allow-unfinished-prepbn")
    words += (["--artifacts", str(artifacts)] if artifacts is not None
              else ["--precision", ",".join(precisions)])
    if tuple(backends) != tuple(CHECK_BACKENDS):
        words += ["--backends", ",".join(backends)]
    for t in tolerance:
        words += ["--tolerance", t]
    return " ".join(quote(w) for w in words)


def write_reports(report: CheckReport, out_dir: str | Path, replay_base: str) -> dict[str, Path]:
    """report.json, report.md and io.npz (inputs and every rung's outputs) into `out_dir`."""
    from slab_deploy.utils import atomic_write

    if report.io_inputs is None:
        raise ValueError(
            "write_reports needs the report run_check returns: it holds the inputs and outputs io.npz keeps")
    out = check_report_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "io.npz"
    report.replay_command = f"{replay_base} --replay {npz}"
    with atomic_write(npz) as tmp:
        with open(tmp, "wb") as f:
            arrays = {k.replace(".", "_"): v for k, v in report.io_outputs.items()}
            # numpy's stubs type every ** keyword as its `allow_pickle: bool`; these are arrays
            if report.io_labels is not None:
                arrays["labels"] = report.io_labels
            np.savez_compressed(f, inputs=report.io_inputs, **arrays)  # type: ignore[arg-type]
    paths = {"json": out / "report.json", "markdown": out / "report.md", "npz": npz}
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(report.to_markdown())
    return paths


def raise_for_verdict(report: CheckReport) -> None:
    """PASS returns; a broken artefact raises ArtifactError (exit 1), wrong numbers ParityError
    (exit 3), nothing run on the deployed graph ConfigError (exit 1)."""
    outcome = report.outcome
    if outcome == "error":
        raise ArtifactError(report.verdict())
    if outcome == "fail":
        raise ParityError(report.verdict())
    if outcome == "unjudged":
        raise ConfigError(report.verdict())
