"""`export`: checkpoint -> folded model -> ONNX (fp32, fp16, or int8 quantised from the fp32 graph) ->
simplified -> parity-checked, with a manifest.

An export is a transaction on its output directory DIR: the options are checked first (values,
the image size against the model, a memory estimate), then DIR is locked, the whole artefact set
is built in a hidden sibling and swapped in only when every gate passed. A failed set goes to
DIR.failed (DIR untouched); an interrupted one leaves nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slab_deploy import __version__
from slab_deploy.errors import ArtifactError, ExportLintError, ExportParityError
from slab_deploy.export.calibration import INT8_PARITY_FEED
from slab_deploy.export.manifest import (
    build_manifest,
    onnx_metadata,
    preprocessing,
    tool_versions,
    write_artifacts,
)
from slab_deploy.export.onnx_passes import get_metadata, lint, set_metadata
from slab_deploy.export.options import (
    MAX_IMG_SIZE,
    PRECISIONS,
    ExportOptions,
    Footprint,
    estimate_footprint,
)
from slab_deploy.export.steps import (
    base_precision,
    check_model,
    check_opset,
    export_onnx,
    fold,
    load,
    parity,
    prepare_precision,
    quantize,
    reference,
    simplify_checked,
)
from slab_deploy.export.target import (
    ARTIFACT_NAMES,
    FAILED_ONNX_NAME,
    LOCK_TIMEOUT_S,
    MANIFEST_NAME,
    ONNX_NAME,
    UNSIMPLIFIED_NAME,
    ExportTarget,
)

__all__ = [
    "ARTIFACT_NAMES",
    "FAILED_ONNX_NAME",
    "LOCK_TIMEOUT_S",
    "MANIFEST_NAME",
    "MAX_IMG_SIZE",
    "ONNX_NAME",
    "PRECISIONS",
    "UNSIMPLIFIED_NAME",
    "ExportOptions",
    "ExportResult",
    "ExportTarget",
    "Footprint",
    "estimate_footprint",
    "export_model",
    "prepare_precision",
    "preprocessing",
    "tool_versions",
]

@dataclass
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    passed: bool
    steps: dict[str, float] = field(default_factory=dict)

def export_model(
    model_name: str,
    checkpoint: str | Path | None,
    output_dir: str | Path | None,
    options: ExportOptions | None = None,
    *,
    force: bool = False,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    keep_unsimplified: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Fold, export, simplify and parity-check `model_name`; writes DIR/model.onnx and DIR/manifest.json.

    Options are validated and the export's memory estimated before anything is read or written.
    The artefacts are built beside DIR and replace it whole only when every gate passed
    (`ExportTarget`); `force` allows replacing an earlier export. Raises ExportParityError (a
    ParityError, exit 3) when the deployed graph does not match the checkpoint model and
    ExportLintError when norm nodes are left: DIR is then untouched and the failed set is in
    `err.failed_dir` (DIR.failed).
    """
    opts = options or ExportOptions()
    say = progress or (lambda _s: None)
    out_dir = Path(output_dir) if output_dir is not None else Path(model_name)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--output {out_dir} is a file; pass a directory")
    footprint = opts.validate(model_name)
    largest = footprint.activation_bytes if footprint is not None else 0
    with ExportTarget(out_dir, force=force) as target:
        return _export_into(target, model_name, checkpoint, opts, say, ema=ema,
                            allow_unfinished_prepbn=allow_unfinished_prepbn,
                            keep_unsimplified=keep_unsimplified, largest_activation=largest)

@contextmanager
def _timed(steps: dict[str, float], name: str, minus: Callable[[], float] = lambda: 0.0) -> Iterator[None]:
    """Record the seconds of the block as `steps[name]` (less `minus()`, time spent in a step timed apart)."""
    t = time.perf_counter()
    yield
    steps[name] = time.perf_counter() - t - minus()

def _export_into(
    target: ExportTarget, model_name: str, checkpoint: str | Path | None, opts: ExportOptions,
    say: Callable[[str], None], *, ema: bool, allow_unfinished_prepbn: bool, keep_unsimplified: bool,
    largest_activation: int = 0,
) -> ExportResult:
    """The steps, in order, writing into `target.staging`; commits or diverts `target` at the end."""
    from slab_deploy.models import checkpoint_info, model_spec

    assert target.staging is not None
    steps: dict[str, float] = {}
    with _timed(steps, "load"):
        say("loading checkpoint")
        ref = load(model_name, checkpoint, opts, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn)
    info = checkpoint_info(ref)
    with _timed(steps, "fold"):
        say("folding norms")
        folded, report = fold(ref, opts)
    pre = preprocessing(ref)
    probe = reference(ref, opts, pre["input_size"])
    base = base_precision(opts.precision)
    with _timed(steps, "export"):
        say(f"exporting ONNX ({base})")
        deploy = prepare_precision(folded, base, opts.sla_policy)
        raw, exp = export_onnx(deploy, probe, opts, pre["input_size"], target.staging)
    check_model(raw)

    rungs: dict[str, Any] = {}
    int8 = None
    with _timed(steps, "parity", minus=lambda: steps["simplify"] + steps.get("quantize", 0.0)):
        say("checking ONNX Runtime parity (unsimplified)")
        rungs["onnx"] = parity(raw, probe, "onnx", base)
        say("simplifying")
        sres = simplify_checked(raw, probe, opts, rungs["onnx"])
        final = sres.model
        steps["simplify"] = sres.seconds
        check_opset(final, exp, sres)
        if opts.precision == "int8":
            say("calibrating and quantising (int8)")
            int8 = quantize(model_name, final, ref, opts, pre, target.staging, probe.generator,
                            largest_activation, info.num_classes if info else None)
            final, steps["quantize"] = int8.result.model, int8.result.seconds
        say("checking ONNX Runtime parity (deployed graph)")
        judged_on = int8.reference if int8 else probe
        rungs["ort_cpu"] = parity(final, judged_on, "ort_cpu", opts.precision, opts.batch,
                                  chunk=INT8_PARITY_FEED if int8 else None)
        if int8 is not None:
            rungs["ort_cpu"]["inputs"] = int8.calibration.parity_source

    lint_res = lint(final)
    weights = str(getattr(ref, "weights", "checkpoint"))
    meta = onnx_metadata(model_name, opts, pre, info, weights, int8.calibration if int8 else None)
    set_metadata(final, meta)
    mode = f"int8, {opts.activations} activations" if int8 else opts.precision
    final.doc_string = f"{model_name} exported by slab-deploy {__version__} ({mode}, folded)" + (
        f"; {int8.calibration.source}" if int8 and int8.calibration.latency_only else "")
    spec = model_spec(ref)
    passed = all(r.get("passed", True) for r in rungs.values())
    norm_ok = lint_res.norm_free or not spec.is_slab or report.kept > 0 or not opts.fold
    status = "lint-failed" if not norm_ok else "ok" if passed else "parity-failed"
    manifest = build_manifest(
        status=status, model_name=model_name, spec=spec, weights=weights, info=info, ema=ema, report=report,
        exp=exp, sres=sres, final=final, lint_res=lint_res, opts=opts, pre=pre, parity=rungs,
        parity_batch=opts.batch or opts.parity_batch, steps=steps, int8=int8,
    )
    write_artifacts(target.staging, manifest, raw, final, meta, keep_unsimplified=keep_unsimplified)
    return _commit(target, model_name, manifest, steps, lint_res.norm_nodes, rungs, final)

def _commit(
    target: ExportTarget, model_name: str, manifest: dict[str, Any], steps: dict[str, float],
    norm_nodes: Any, rungs: dict[str, Any], final: Any,
) -> ExportResult:
    """Swap a passing set in as DIR; divert a failing one to DIR.failed and raise its error."""
    status = manifest["status"]
    if status == "ok":
        assert get_metadata(final)["slab_deploy.model"] == model_name
        target.commit()
        return ExportResult(target.out_dir / ONNX_NAME, target.out_dir / MANIFEST_NAME, manifest, True, steps)
    failed = target.divert()
    kept = (f"{target.out_dir} {'is unchanged' if target.existed else 'was not created'}; "
            f"the failed artefacts are in {failed}")
    if status == "lint-failed":
        raise ExportLintError(
            f"the folded {model_name} graph still has norm nodes {norm_nodes} or statistic reductions; "
            f"{kept}",
            failed,
        )
    first = next(k for k, r in rungs.items() if not r.get("passed", True))
    raise ExportParityError(
        f"exported graph does not match the checkpoint model at rung '{first}' "
        f"({'; '.join(rungs[first]['failures'])}); {kept}",
        failed,
    )
