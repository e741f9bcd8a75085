"""The record of a TensorRT engine (`engine.json` beside `model.plan` in an export directory): what
it was built from, with what and for which GPU, and the checks that refuse a plan whose record does
not match the graph, the TensorRT or the GPU at hand. The plan file holds the engine's bytes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from slab_deploy import __version__
from slab_deploy.errors import ArtifactError
from slab_deploy.export.target import PLAN_NAME, RECORD_NAME  # what an export directory may hold
from slab_deploy.utils import deferred_signals, file_mode, fsync_path, raise_if_interrupted, sha256_file

RECORD_FORMAT = "slab-deploy engine record"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 << 20  # the inspector's per-layer JSON of a large model is a few MiB


class EngineMismatch(ArtifactError):
    """A plan whose record does not fit: `what` is "record" (unreadable), "plan" (bytes changed),
    "onnx" (another graph), "tensorrt" (another TensorRT) or "gpu" (another compute capability)."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


@dataclass
class EngineRecord:
    """engine.json: provenance of one model.plan."""

    model: str
    precision: str  # the export's: fp32 | fp16 (an INT8 export: int8)
    typing: str  # strong | weak-fp16
    onnx: dict[str, Any]  # file, sha256
    plan: dict[str, Any]  # file, sha256, bytes
    tensorrt: dict[str, Any]  # flavour, module, version
    gpu: dict[str, Any] | None  # the GPU the build ran on: name, compute_capability (None: none there)
    targets: dict[str, Any]  # compute_capabilities (or "8.0+"), hardware_compat, version_compatible
    profile: dict[str, Any]  # input, min, opt, max (shapes), static
    flags: dict[str, Any]  # workspace_gib, opt_level, timing_cache, pinned_fp32_layers
    build_seconds: float
    network: dict[str, Any]  # the parsed network's layer types (runtime.tensorrt.network_summary)
    inspector: Any = None  # the engine inspector's per-layer JSON, when the engine could be loaded
    inspector_note: str = ""  # why there is none
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    slab_deploy: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "version": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> EngineRecord:
        fix = f"rebuild with `slab-deploy build {where.parent} --force`"
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise EngineMismatch("record", f"{where} is not an engine record slab-deploy writes; {fix}")
        if data.get("version") != RECORD_VERSION:
            raise EngineMismatch("record", f"{where} is record version {data.get('version')!r}, "
                                           f"not {RECORD_VERSION}; {fix}")
        body = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        missing = [f.name for f in fields(cls)
                   if f.name not in body and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise EngineMismatch("record", f"{where} lacks {', '.join(missing)}; {fix}")
        for key in ("onnx", "plan", "tensorrt", "targets", "profile", "flags", "network"):
            if not isinstance(body[key], dict):
                raise EngineMismatch("record", f"{where}: {key} is not an object; {fix}")
        return cls(**body)


def read_record(folder: Path) -> EngineRecord:
    """DIR/engine.json, validated and bounded in memory; EngineMismatch("record") otherwise."""
    path = folder / RECORD_NAME
    fix = f"rebuild with `slab-deploy build {folder} --force`"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise EngineMismatch("record", f"cannot read {path} ({exc.strerror or exc}); {fix}") from None
    if len(raw) > MAX_RECORD_BYTES:
        raise EngineMismatch("record", f"{path} is larger than {MAX_RECORD_BYTES >> 20} MiB; {fix}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EngineMismatch("record", f"{path} is not valid JSON; {fix}") from None
    return EngineRecord.from_dict(data, path)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def _short(sha: Any) -> str:
    return str(sha)[:12] + "..."


def verify_record(record: EngineRecord, folder: Path, *, onnx_sha256: str, tensorrt: dict[str, str],
                  gpu: dict[str, Any] | None, plan_sha256: str | None = None) -> None:
    """Refuse, in one line naming what differs, a plan whose record does not match: the plan's own
    bytes, the graph (sha256 of the ONNX it was built from), this TensorRT (flavour and version; a
    version-compatible engine also runs on a later release of the same major), this GPU's compute
    capability (one of the targets; ampere-plus: 8.0 or later)."""
    fix = f"rebuild with `slab-deploy build {folder} --force`"
    plan = folder / str(record.plan.get("file", PLAN_NAME))
    if plan_sha256 is not None and plan_sha256 != record.plan.get("sha256"):
        raise EngineMismatch(
            "plan",
            f"{plan} does not match its record {RECORD_NAME} (sha256 {_short(plan_sha256)}, "
            f"recorded {_short(record.plan.get('sha256'))}: changed or half-replaced); {fix}",
        )
    if onnx_sha256 != record.onnx.get("sha256"):
        raise EngineMismatch("onnx", f"{plan} was built from another {record.onnx.get('file', 'model.onnx')} "
                                     f"(sha256 {_short(record.onnx.get('sha256'))}, "
                                     f"the graph there now is {_short(onnx_sha256)}); {fix}")
    built = f"{record.tensorrt.get('flavour')} {record.tensorrt.get('version')}"
    here = f"{tensorrt['flavour']} {tensorrt['version']}"
    same = built == here
    if (not same and record.targets.get("version_compatible")
            and record.tensorrt.get("flavour") == tensorrt["flavour"]):
        b, h = _version_tuple(str(record.tensorrt.get("version"))), _version_tuple(tensorrt["version"])
        same = bool(b) and bool(h) and b[0] == h[0] and h >= b
    if not same:
        raise EngineMismatch("tensorrt", f"{plan} was built with {built}, this host runs {here}; {fix}")
    if gpu is None:
        return  # nothing to compare: the runner refuses to run without a GPU
    cc = str(gpu["compute_capability"])
    targets = record.targets.get("compute_capabilities") or []
    fits = cc in targets or ("8.0+" in targets and _version_tuple(cc) >= (8, 0))
    if not fits:
        raise EngineMismatch("gpu", f"{plan} was built for compute capability "
                                    f"{', '.join(map(str, targets)) or '?'}, "
                                    f"this GPU ({gpu.get('name')}) is {cc}; {fix} on this GPU")


def commit_engine(folder: Path, plan: bytes, record: EngineRecord) -> tuple[Path, Path]:
    """Write model.plan and engine.json into `folder` as one step: both are written whole to hidden
    temporary files first (`.NAME.*.partial`), then renamed in with signals held; if the second
    rename fails the previous plan is put back. A crash between the renames leaves a plan whose
    sha256 its record does not carry, which every load refuses. Returns (plan path, record path)."""
    plan_path, record_path = folder / PLAN_NAME, folder / RECORD_NAME
    temps: list[Path] = []
    try:
        tmp_plan = _temp(folder, PLAN_NAME, temps)
        tmp_plan.write_bytes(plan)
        tmp_record = _temp(folder, RECORD_NAME, temps)
        tmp_record.write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")
        for tmp in (tmp_plan, tmp_record):
            os.chmod(tmp, file_mode())
            fsync_path(tmp)
        backup = _temp(folder, PLAN_NAME, temps)
        raise_if_interrupted()
        with deferred_signals():  # a signal held here is delivered after both renames (or the rollback)
            had_plan = plan_path.is_file()
            if had_plan:
                os.replace(plan_path, backup)
            try:
                os.replace(tmp_plan, plan_path)
                os.replace(tmp_record, record_path)
            except BaseException:
                if had_plan:
                    os.replace(backup, plan_path)
                else:
                    plan_path.unlink(missing_ok=True)
                raise
        fsync_path(folder, directory=True)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    return plan_path, record_path


def _temp(folder: Path, name: str, temps: list[Path]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    os.close(fd)
    temps.append(Path(tmp))
    return Path(tmp)


def load_plan(
    folder: Path, *, onnx_sha256: str, tensorrt: dict[str, str], gpu: dict[str, Any] | None
) -> tuple[bytes, EngineRecord]:
    """DIR/model.plan and its record, refused (EngineMismatch naming what differs) unless the record
    matches the plan's bytes, the graph's sha256, this TensorRT and this GPU."""
    record = read_record(folder)
    plan_path = folder / PLAN_NAME
    if record.plan.get("file") != PLAN_NAME or not plan_path.is_file():
        raise EngineMismatch("plan", f"{plan_path} is missing beside its record; "
                                     f"rebuild with `slab-deploy build {folder} --force`")
    plan = plan_path.read_bytes()
    verify_record(record, folder, onnx_sha256=onnx_sha256, tensorrt=tensorrt, gpu=gpu,
                  plan_sha256=hashlib.sha256(plan).hexdigest())
    return plan, record


def onnx_sha256_of(path: Path) -> str:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; export again")
    return sha256_file(path)
