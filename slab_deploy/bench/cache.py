"""The verified ONNX cache: graphs exported for the ONNX Runtime and TensorRT cases, reused only
when the record written beside them matches the request and the file's sha256."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slab_deploy.bench.cases import Target
from slab_deploy.choices import DEFAULT_SLA_POLICY, EXPORT_PRECISIONS
from slab_deploy.errors import ArtifactError, CheckpointError

CACHE_RECORD = "bench-cache.json"
CACHE_FORMAT = "slab-deploy bench cache 1"
_MAX_RECORD_BYTES = 1 << 16
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def checkpoint_identity(t: Target) -> str:
    """sha256 of the file the target's weights come from (the embedded default when it names none);
    memoised by path, size and modification time."""
    from slab_deploy.utils import sha256_file
    from slab_deploy.weights import default_checkpoint

    path = Path(t.checkpoint) if t.checkpoint else default_checkpoint(t.model)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _SHA_MEMO:
            _SHA_MEMO[key] = sha256_file(path)
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({exc.strerror or exc}); check the path") from None
    return _SHA_MEMO[key]


def onnx_for(t: Target, precision: str, cache: Path, sla_policy: str = DEFAULT_SLA_POLICY,
             exporter: str = "auto", *, notes: list[str] | None = None,
             activation_type: str = "int8") -> Path:
    """The ONNX graph of a target at `precision`: reused from `cache` only when the record bench
    wrote beside it (CACHE_RECORD) matches the request (model, variant, precision, SLA policy,
    exporter, checkpoint sha256) and the file's sha256; otherwise exported afresh (and `notes`
    says why). The directory name carries the checkpoint's identity, so another checkpoint gets
    its own graph."""
    from slab_deploy.export.api import export_model
    from slab_deploy.runtime.base import UnsupportedBackend

    if precision not in EXPORT_PRECISIONS:
        raise UnsupportedBackend(
            f"ONNX artefacts are exported in {', '.join(EXPORT_PRECISIONS)}, not {precision}")
    if precision == "int8" and t.variant == "unfolded":
        raise UnsupportedBackend(
            "int8 quantises the folded graph; the unfolded variant runs in fp32 and fp16 only")
    opts = export_options(t, precision, sla_policy, exporter, activation_type)
    ck = checkpoint_identity(t)
    want = {"model": t.model, "variant": t.variant, "precision": precision,
            "sla_policy": sla_policy if precision == "fp16" else None, "exporter": exporter,
            "checkpoint_sha256": ck, "int8": opts.int8_key()}
    name = (f"{t.model}-{t.variant}-{precision}" + (f"-sla_{sla_policy}" if precision == "fp16" else "")
            + (f"-{exporter}" if exporter != "auto" else "")
            + (f"-{int8_tag(opts)}" if precision == "int8" else "") + f"-ck{ck[:12]}")
    d = cache / name
    if d.exists() and not d.is_dir():
        raise ArtifactError(
            f"{d} is a file where bench keeps a cached graph; remove it or pass another --onnx-cache")
    path, record = d / "model.onnx", d / CACHE_RECORD
    problem = cache_problem(path, record, want)
    if problem is None:
        return path
    if problem and notes is not None:
        notes.append(f"re-exported {d}: {problem}")
    record.unlink(missing_ok=True)  # a failed export below must not leave a record behind
    export_model(t.model, t.checkpoint, d, opts, force=True)
    _write_cache_record(path, record, want)
    return path


def export_options(t: Target, precision: str, sla_policy: str = DEFAULT_SLA_POLICY, exporter: str = "auto",
                   activation_type: str = "int8") -> Any:
    """The export a bench case runs on. INT8: the demo models calibrate on their held-out digits; any
    other model on seeded random images, which is good for latency and nothing else (`calibration_note`)."""
    from slab_deploy.datasets import is_demo_model
    from slab_deploy.export.api import ExportOptions

    random = precision == "int8" and not is_demo_model(t.model)
    return ExportOptions(precision=precision, fold=t.variant != "unfolded", simplifier="auto",
                         sla_policy=sla_policy, exporter=exporter, random_calibration=random,
                         activation_type=activation_type if precision == "int8" else None)


def int8_tag(opts: Any) -> str:
    key = opts.int8_key()
    weights = "pc" if key["per_channel"] else "pt"
    acts = "" if key["activation_type"] == "int8" else f"-{key['activation_type']}"
    return f"{key['method']}-{weights}{acts}-{'random' if opts.random_calibration else 'cal'}"


def calibration_note(model: str, precision: str, activation_type: str = "int8") -> str:
    """What a bench result says about its INT8 graph: the activation type, and where its scales came
    from ("" for other precisions)."""
    if precision != "int8":
        return ""
    from slab_deploy.datasets import is_demo_model

    acts = ("int8 activations (TensorRT's form)" if activation_type == "int8"
            else f"{activation_type} activations (CPU only)")
    if is_demo_model(model):
        return f"int8, {acts}, calibrated on the demo model's held-out digits"
    from slab_deploy.export.calibration import RANDOM_LABEL

    return f"int8, {acts}, calibrated on {RANDOM_LABEL}"


def cache_problem(path: Path, record: Path, want: dict[str, Any]) -> str | None:
    """None when `path` may be reused; "" when there is nothing cached; else what is wrong."""
    from slab_deploy.utils import sha256_file

    if not path.exists() and not record.exists():
        return ""
    if not path.is_file():
        return "model.onnx is missing"
    if not record.is_file():
        return f"no {CACHE_RECORD} beside model.onnx (not written by bench, or an interrupted export)"
    try:
        if record.stat().st_size > _MAX_RECORD_BYTES:
            return f"{CACHE_RECORD} is too large to be a record"
        rec = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return f"{CACHE_RECORD} is unreadable ({exc.__class__.__name__})"
    if not isinstance(rec, dict) or rec.get("format") != CACHE_FORMAT:
        return f"{CACHE_RECORD} is not a record of this format"
    stale = [k for k, v in want.items() if rec.get(k) != v]
    if stale:
        return f"{CACHE_RECORD} was written for another {', '.join(stale)}"
    if rec.get("onnx_sha256") != sha256_file(path):
        return "model.onnx does not match the sha256 recorded when it was exported (changed or corrupt)"
    return None


def _write_cache_record(path: Path, record: Path, want: dict[str, Any]) -> None:
    from slab_deploy import __version__
    from slab_deploy.utils import atomic_write, sha256_file

    manifest: dict[str, Any] = {}
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    rec = {"format": CACHE_FORMAT, **want, "onnx_sha256": sha256_file(path),
           "onnx_bytes": path.stat().st_size,
           "exporter_used": ((manifest.get("export") or {}).get("exporter")
                             if isinstance(manifest, dict) else None),
           "slab_deploy": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_write(record) as tmp:
        tmp.write_text(json.dumps(rec, indent=2) + "\n")
