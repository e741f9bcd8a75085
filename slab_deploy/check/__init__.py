"""The parity ladder behind `slab-deploy check`.

  options.py    what is refused before any work (backends, precisions, inputs, --report, --tolerance)
  artifacts.py  readers of what is on disk: an export's manifest and graphs, a replay's io.npz
  inputs.py     the images every rung sees and their labels (replay, a folder, the demo set, seeded)
  ladder.py     the rungs, each run through a runtime/ runner, and `run_check`, which climbs them
  report.py     the verdict (`CheckReport`), report.json / report.md / io.npz, `raise_for_verdict`
  run.py        `check_and_report`: run_check with its report files, what `slab-deploy check` calls

Same inputs through every rung, each compared with the reference (the checkpoint model in eval
mode, torch fp32 on the CPU):

  fold        folded torch model
  onnx        exported graph before simplification, ONNX Runtime CPU with graph optimisations off
  simplified  deployed (simplified) graph, ONNX Runtime CPU with graph optimisations off
  ort_cpu     deployed graph, ONNX Runtime CPU with all graph optimisations
  ort_cuda    deployed graph on ONNX Runtime CUDA (fp32 and fp16 artefacts)
  tensorrt    TensorRT engine built from the deployed graph

The gate fails closed. Each rung ends in one of four states:

  pass     it ran and every criterion of its tolerance held
  fail     it ran and the outputs differ beyond tolerance, or hold NaN/Inf        -> exit 3
  error    it could not run on the artefact (would not load, crashed, wrong shape) -> exit 1
  skipped  its runtime is missing on this host (no CUDA provider, no TensorRT), or
           its backend was not selected; the reason is recorded

The verdict is PASS (exit 0) only when no rung failed or errored AND at least one rung ran on the
deployed graph (simplified, ort_cpu, ort_cuda or tensorrt); with none it is NOT JUDGED (exit 1).
A rung that errors outranks one that fails: a broken artefact exits 1, never 3 and never 0. Bad
input (options, a manifest that is not an export's, a damaged replay file, a graph that is
truncated, empty, not a file or another model's) is refused with one line before any rung runs,
and nothing is written. The verdict names the first rung that broke, so "which step broke it"
has an answer.
"""

from __future__ import annotations

from slab_deploy.check.artifacts import (
    MAX_MANIFEST_BYTES,
    MAX_REPLAY_BYTES,
    ArtifactManifest,
    check_graph,
    read_manifest,
    read_replay,
    read_replay_labels,
)
from slab_deploy.check.inputs import Inputs, seeded_inputs, select_inputs
from slab_deploy.check.ladder import Graph, Ladder, Ran, batched, run_check
from slab_deploy.check.options import (
    MAX_INPUTS,
    METRICS,
    check_report_dir,
    parse_tolerance_overrides,
    validate_options,
)
from slab_deploy.check.report import CheckReport, RungResult, raise_for_verdict, replay_base, write_reports
from slab_deploy.check.run import CheckOutcome, check_and_report

__all__ = [
    "MAX_INPUTS",
    "MAX_MANIFEST_BYTES",
    "MAX_REPLAY_BYTES",
    "METRICS",
    "ArtifactManifest",
    "CheckOutcome",
    "CheckReport",
    "Graph",
    "Inputs",
    "Ladder",
    "Ran",
    "RungResult",
    "batched",
    "check_and_report",
    "check_graph",
    "check_report_dir",
    "parse_tolerance_overrides",
    "raise_for_verdict",
    "read_manifest",
    "read_replay",
    "read_replay_labels",
    "run_check",
    "seeded_inputs",
    "select_inputs",
    "validate_options",
    "replay_base",
    "write_reports",
]
