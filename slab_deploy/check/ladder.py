"""The rungs of the parity ladder and `run_check`, which climbs them.

Each rung is a named function that runs the folded model or one graph through a runtime/ runner on
the check's inputs and returns what ran, on which artefact, and the outputs. `Ladder.record` runs a
rung, compares its outputs with the reference under the rung's tolerance and keeps the result:
only `UnsupportedBackend` (the host lacks the runtime) skips a rung; anything else that stops it is
an error.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from slab_deploy.check.artifacts import (
    ArtifactManifest,
    check_graph,
    read_manifest,
    read_replay,
    read_replay_labels,
)
from slab_deploy.check.inputs import check_int8_inputs, select_inputs
from slab_deploy.check.options import first_line, validate_options
from slab_deploy.check.report import CheckReport, RungResult
from slab_deploy.choices import CHECK_BACKENDS, RUNG_BACKEND
from slab_deploy.errors import (
    ArtifactError,
    CheckpointError,
    ExportParityError,
    MissingDependencyError,
    SlabDeployError,
)
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import tolerance_for


class Ran(NamedTuple):
    """What one rung ran: the runner (with its version), the artefact, and the outputs."""

    runner: str
    artifact: str
    outputs: np.ndarray


@dataclass(frozen=True)
class Graph:
    """One export, its graphs validated, and the deployed graph's static batch (None: dynamic)."""

    manifest: ArtifactManifest
    batch: int | None


Rung = Callable[[np.ndarray], Ran]  # the check's inputs -> what ran


class Ladder:
    """The rungs run so far, against one reference on one set of inputs."""

    def __init__(self, x: np.ndarray, reference: np.ndarray, backends: Sequence[str],
                 tolerance: dict[str, dict[str, float]] | None, labels: np.ndarray | None = None) -> None:
        self.x = x
        self.labels = labels  # (N,) when the inputs are labelled: every rung's accuracy is judged too
        self.reference = reference
        self.backends = backends
        self.tolerance = tolerance
        self.rungs: list[RungResult] = []
        self.outputs: dict[str, np.ndarray] = {"reference": reference}

    @property
    def num_classes(self) -> int:
        return int(self.reference.shape[1]) if self.reference.ndim == 2 else -1

    def record(self, rung: str, precision: str, run: Rung) -> None:
        """Run one rung (unless its backend was not selected) and keep its result."""
        from slab_deploy.runtime.base import UnsupportedBackend

        backend = RUNG_BACKEND[rung]
        if backend not in self.backends:
            self.rungs.append(RungResult(rung, precision, "skipped",
                                         reason=f"backend {backend} not selected"))
            return
        t0 = time.perf_counter()
        try:
            runner, artifact, out = run(self.x)
        except UnsupportedBackend as exc:
            self.rungs.append(RungResult(rung, precision, "skipped", reason=str(exc)))
            return
        except MissingDependencyError:
            raise  # the install line is the message
        except SlabDeployError as exc:
            self.rungs.append(RungResult(rung, precision, "error", reason=str(exc),
                                         seconds=time.perf_counter() - t0))
            return
        except Exception as exc:
            if rung == "fold":
                raise  # in memory, no artefact: an exception here is a bug and keeps its traceback
            self.rungs.append(RungResult(rung, precision, "error", reason=first_line(exc),
                                         seconds=time.perf_counter() - t0))
            return
        out = np.asarray(out)
        if out.shape != self.reference.shape:
            self.rungs.append(RungResult(rung, precision, "error", runner, artifact,
                                         f"outputs of shape {out.shape}, "
                                         f"the reference has {self.reference.shape}",
                                         seconds=time.perf_counter() - t0))
            return
        tol = tolerance_for(rung, precision, self.tolerance)
        m = compare(self.reference, out, self.labels)
        v = judge(m, tol)
        self.outputs[f"{rung}.{precision}"] = out
        self.rungs.append(
            RungResult(rung, precision, "pass" if v.passed else "fail", runner, artifact, "", m.to_dict(),
                       tol.to_dict(), v.failures, v.needed, time.perf_counter() - t0)
        )


# ------------------------------------------------------------------------------------------------
# The rungs


def fold_rung(model: Any, x: np.ndarray) -> Ran:
    """The folded torch model, fp32 on the CPU."""
    from slab_deploy.passes import fold_model
    from slab_deploy.runtime.torch_runner import TorchRunner

    folded, _ = fold_model(model)
    runner = TorchRunner(folded, "cpu", "fp32")
    return Ran(f"torch {runner.info.details['torch']} cpu fp32", "in memory", runner(x))


def onnx_rung(graph: Graph, x: np.ndarray) -> Ran:
    """The exported graph before simplification, ONNX Runtime CPU with graph optimisations off."""
    return _ort(graph.manifest.unsimplified, x, "cpu", "none", graph, "exported graph (unsimplified)")


def simplified_rung(graph: Graph, x: np.ndarray) -> Ran:
    """The deployed (simplified) graph, ONNX Runtime CPU with graph optimisations off."""
    return _ort(graph.manifest.deployed, x, "cpu", "none", graph)


def ort_cpu_rung(graph: Graph, x: np.ndarray) -> Ran:
    """The deployed graph, ONNX Runtime CPU with all graph optimisations."""
    return _ort(graph.manifest.deployed, x, "cpu", "all", graph)


def ort_cuda_rung(graph: Graph, x: np.ndarray) -> Ran:
    """The deployed graph on ONNX Runtime CUDA."""
    return _ort(graph.manifest.deployed, x, "cuda", "all", graph)


def tensorrt_rung(graph: Graph, x: np.ndarray) -> Ran:
    """A TensorRT engine of the deployed graph: the export's model.plan when its record matches the
    graph, this TensorRT and this GPU (`slab-deploy build`), else one built now."""
    from slab_deploy.runtime.tensorrt import TensorRTRunner

    path = graph.manifest.deployed
    r = TensorRTRunner.from_onnx(path, precision=graph.manifest.precision)
    return Ran(f"{r.info.details.get('tensorrt')}", r.source, batched(r, x, graph.batch))


# The rungs on an export's graphs, in order, with what the progress line says before a rung.
GRAPH_RUNGS: tuple[tuple[str, Callable[[Graph, np.ndarray], Ran], str], ...] = (
    ("onnx", onnx_rung, "ONNX rungs"),
    ("simplified", simplified_rung, ""),
    ("ort_cpu", ort_cpu_rung, ""),
    ("ort_cuda", ort_cuda_rung, "ONNX Runtime CUDA"),
    ("tensorrt", tensorrt_rung, "TensorRT"),
)


def _ort(
    path: Path | None, x: np.ndarray, provider: str, graph_opt: str, graph: Graph, what: str = ""
) -> Ran:
    from slab_deploy.runtime.base import UnsupportedBackend
    from slab_deploy.runtime.ort import ORTRunner

    if path is None:
        # Not a broken artefact: the export was made without keeping it (keep_unsimplified=False).
        raise UnsupportedBackend(f"no {what or 'graph'} in the artefacts "
                                 "(export keeps it as model.unsimplified.onnx)")
    r = ORTRunner(path, provider, graph_opt=graph_opt, precision=graph.manifest.precision)
    return Ran(f"onnxruntime {r.info.details['onnxruntime']} {provider} (graph opt {graph_opt})", path.name,
               batched(r, x, graph.batch))


def batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int | None) -> np.ndarray:
    """Run a graph with a static batch on any number of images: whole batches, the last one
    padded with repeated images whose outputs are dropped."""
    n = x.shape[0]
    if batch is None or n == batch:
        return run(x)
    total = -(-n // batch) * batch
    xp = x[np.arange(total) % n]
    return np.concatenate([run(xp[i : i + batch]) for i in range(0, total, batch)])[:n]


# ------------------------------------------------------------------------------------------------
# Climbing the ladder


def _quiet(_message: str) -> None:
    pass


def given_manifest(artifacts: str | Path | None, model_name: str) -> ArtifactManifest | None:
    """The manifest of `--artifacts`, refused when it is another model's export."""
    if artifacts is None:
        return None
    manifest = read_manifest(artifacts)
    if manifest.model != model_name:
        raise ArtifactError(f"{manifest.folder} holds an export of {manifest.model!r}, not {model_name!r}: "
                            f"pass --model {manifest.model}")
    return manifest


def reference_outputs(model: Any, x: np.ndarray) -> np.ndarray:
    """The checkpoint model's logits on `x` (torch fp32, CPU); refused when any is NaN/Inf."""
    import torch

    with torch.no_grad():
        reference = model(torch.from_numpy(x)).float().numpy()
    bad = int((~np.isfinite(reference)).sum())
    if bad:
        raise CheckpointError(f"the checkpoint model gives {bad} NaN/Inf logits on these inputs, "
                              "so nothing can be judged; "
                              "check the checkpoint's weights (`slab-deploy inspect`)")
    return np.asarray(reference)


@contextmanager
def artifact_sets(manifest: ArtifactManifest | None, model_name: str, checkpoint: str | Path | None,
                  precisions: Sequence[str], *, ema: bool, allow_unfinished_prepbn: bool,
                  say: Callable[[str], None]) -> Iterator[list[ArtifactManifest]]:
    """The exports to climb: the one given, or one per precision exported now into a temporary
    directory that is removed on the way out."""
    if manifest is not None:
        yield [manifest]
        return
    from slab_deploy.export.api import ExportOptions, export_model

    with tempfile.TemporaryDirectory(prefix="slab-deploy-check-") as tmp:
        found = []
        for prec in precisions:
            say(f"exporting {prec}")
            d = Path(tmp) / prec
            try:
                export_model(model_name, checkpoint, d, ExportOptions(precision=prec), force=True, ema=ema,
                             allow_unfinished_prepbn=allow_unfinished_prepbn)
            except ExportParityError as exc:
                # the failed set is kept beside the output: the ladder shows where it broke
                d = exc.failed_dir
            found.append(read_manifest(d))
        yield found


def validate_graphs(
    found: Sequence[ArtifactManifest], input_size: Sequence[int], num_classes: int
) -> list[Graph]:
    """Every graph of every export, checked before the first ONNX rung runs."""
    graphs = []
    for man in found:
        batch = check_graph(man.deployed, man, input_size, num_classes)
        if man.unsimplified is not None:
            check_graph(man.unsimplified, man, input_size, num_classes)
        graphs.append(Graph(man, batch))
    return graphs


def run_check(
    model_name: str,
    checkpoint: str | Path | None,
    *,
    artifacts: str | Path | None = None,
    backends: Sequence[str] = CHECK_BACKENDS,
    precisions: Sequence[str] = ("fp32",),
    inputs: int | None = None,
    images: str | Path | None = None,
    replay: str | Path | None = None,
    seed: int = 0,
    tolerance: dict[str, dict[str, float]] | None = None,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Run the ladder and return the report. Bad input raises a SlabDeployError before any rung
    runs; a verdict (pass, fail, error, unjudged) does not raise: see `raise_for_verdict`."""
    from slab_deploy.export.api import preprocessing, tool_versions
    from slab_deploy.models import checkpoint_info, model_spec
    from slab_deploy.parity import accuracy
    from slab_deploy.weights import load_model

    say = progress or _quiet
    validate_options(backends, precisions, inputs, images=images, replay=replay)
    manifest = given_manifest(artifacts, model_name)
    int8 = "int8" in ([manifest.precision] if manifest is not None else precisions)
    if int8:
        check_int8_inputs(model_name, images=images, replay=replay, exporting=manifest is None)
    replayed = read_replay(replay) if replay is not None else None
    replay_labels = (read_replay_labels(replay, len(replayed))
                     if replay is not None and replayed is not None else None)
    say("loading checkpoint")
    ref = load_model(model_name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn)
    info = checkpoint_info(ref)
    pre = preprocessing(ref)
    x, labels, src = select_inputs(model_name, pre, count=inputs, seed=seed, images=images, replay=replay,
                                   replayed=replayed, replay_labels=replay_labels,
                                   num_classes=model_spec(ref).num_classes)
    say("reference forward")
    ladder = Ladder(x, reference_outputs(ref, x), backends, tolerance, labels)
    say("folding")
    ladder.record("fold", "fp32", partial(fold_rung, ref))
    with artifact_sets(manifest, model_name, checkpoint, precisions, ema=ema,
                       allow_unfinished_prepbn=allow_unfinished_prepbn, say=say) as found:
        for graph in validate_graphs(found, pre["input_size"], ladder.num_classes):
            for rung, run, announce in GRAPH_RUNGS:
                if announce:
                    say(f"{announce} ({graph.manifest.precision})")
                ladder.record(rung, graph.manifest.precision, partial(run, graph))
    return CheckReport(
        model=model_name,
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_sha256=info.sha256 if info else None,
        untrained=bool(getattr(ref, "untrained", False)),
        weights=str(getattr(ref, "weights", "checkpoint")),
        reference_accuracy=None if labels is None else accuracy(ladder.reference, labels),
        inputs=src,
        rungs=ladder.rungs,
        versions=tool_versions(),
        artifacts_precision=manifest.precision_block if manifest is not None else None,
        exported_here=manifest is None,
        io_inputs=x,
        io_labels=labels,
        io_outputs=ladder.outputs,
    )
