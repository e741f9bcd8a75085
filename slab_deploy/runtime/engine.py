"""`build_engine`: a TensorRT engine from an export directory (its manifest.json and model.onnx),
written as DIR/model.plan with its record DIR/engine.json, both at once or neither.

The options are checked before anything is read or imported (`EngineOptions.validate`), then
against the export (a batch range needs a dynamic-batch graph) and against the installed TensorRT
(`TensorRT.refuse_unsupported`), all before the ONNX is parsed. The directory is locked the way
`export` locks it, so a build and an export never write it at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slab_deploy.choices import HARDWARE_COMPAT, describe
from slab_deploy.errors import ArtifactError, ConfigError
from slab_deploy.runtime.base import UnsupportedBackend
from slab_deploy.runtime.engine_record import (
    PLAN_NAME,
    RECORD_NAME,
    EngineMismatch,
    EngineRecord,
    commit_engine,
    load_plan,
    onnx_sha256_of,
)
from slab_deploy.runtime.tensorrt import BuildSettings, TensorRT, inspect_engine, require_tensorrt

MAX_MANIFEST_BYTES = 4 << 20
MAX_TIMING_CACHE_BYTES = 1 << 30
DEFAULT_BATCH = (1, 1, 64)  # min, opt, max of a dynamic-batch engine when nothing else is said
MAX_OPT_LEVEL = 5


@dataclass(frozen=True)
class EngineOptions:
    """How `build` builds: the batch range of a dynamic-batch graph (from the options, else from a
    device profile, else 1/1/64), workspace limit (GiB), builder optimisation level (0-5), a timing
    cache file loaded and saved, version compatibility (lean runtime), TensorRT's hardware
    compatibility level, TensorRT-RTX's target compute capabilities, TensorRT 10's weakly typed FP16."""

    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    profile: str | None = None
    workspace_gib: float | None = None
    opt_level: int | None = None
    timing_cache: Path | None = None
    version_compatible: bool = False
    hardware_compat: str = "none"
    compute_capability: tuple[str, ...] = ()
    weak_fp16: bool = False
    force: bool = False

    def validate(self) -> EngineOptions:
        """Refuse a bad value in one line naming the option, before anything is read."""
        for flag, v in (("--min-batch", self.min_batch), ("--opt-batch", self.opt_batch),
                        ("--max-batch", self.max_batch)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{flag} must be a positive integer, not {v!r}")
        given = [v for v in (self.min_batch, self.opt_batch, self.max_batch) if v is not None]
        if given != sorted(given):
            raise ConfigError(f"the batch range must satisfy min <= opt <= max, not {self._range_text()}")
        if self.workspace_gib is not None and not (math.isfinite(self.workspace_gib)
                                                   and self.workspace_gib > 0):
            raise ConfigError(f"--workspace must be a positive number of GiB, not {self.workspace_gib!r}")
        if self.opt_level is not None and not 0 <= self.opt_level <= MAX_OPT_LEVEL:
            raise ConfigError(f"--opt-level must be 0 to {MAX_OPT_LEVEL} (TensorRT's default is 3), "
                              f"not {self.opt_level}")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise ConfigError(f"--hardware-compat must be {describe(HARDWARE_COMPAT)}, "
                              f"not {self.hardware_compat!r}")
        for cc in self.compute_capability:
            if cc != "current" and not _is_cc(cc):
                raise ConfigError("--compute-capability takes a comma list like 8.9,12.0 (or current), "
                                  f"not {cc!r}")
        if "current" in self.compute_capability and len(self.compute_capability) > 1:
            raise ConfigError("--compute-capability current stands alone (it means the GPU here)")
        if self.timing_cache is not None and self.timing_cache.is_dir():
            raise ConfigError(f"--timing-cache {self.timing_cache} is a directory; pass a file path")
        return self

    def _range_text(self) -> str:
        return "/".join("-" if v is None else str(v)
                        for v in (self.min_batch, self.opt_batch, self.max_batch)) + " (min/opt/max)"


def _is_cc(text: str) -> bool:
    major, _, minor = text.partition(".")
    return major.isdigit() and minor.isdigit() and len(minor) == 1


def compute_capabilities(text: str | None) -> tuple[str, ...]:
    """`--compute-capability 8.9,12.0` as a tuple (spaces and empty items dropped)."""
    return tuple(v.strip().lower() for v in (text or "").split(",") if v.strip())


@dataclass(frozen=True)
class Export:
    """What `build` reads from an export directory's manifest.json."""

    folder: Path
    model: str
    onnx: Path
    onnx_sha256: str
    precision: str
    batch: int | None  # the static batch, None for a dynamic-batch graph
    input_shape: list[Any]
    attention: tuple[str, ...]


def read_export(folder: str | Path) -> Export:
    """The export in `folder`, its model.onnx checked against the manifest's sha256; ArtifactError
    otherwise."""
    d = Path(folder)
    mp = d / "manifest.json"
    if not d.is_dir() or not mp.is_file():
        raise ArtifactError(f"{d} is not an export directory (no manifest.json); "
                            "pass the output directory of `slab-deploy export`")
    with open(mp, "rb") as fh:
        raw = fh.read(MAX_MANIFEST_BYTES + 1)
    try:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        m = json.loads(raw.decode("utf-8"))
        if not isinstance(m, dict):
            raise ValueError("not an object")
        name, status, model = m.get("onnx", "model.onnx"), m.get("status"), m["model"]
        precision = m.get("precision", {}).get("mode", "fp32")
        batch = m.get("export", {}).get("batch")
        shape = list(m["io"]["inputs"][0]["shape"])
        attention = tuple(str(a) for a in m.get("attention", ()))
        entry = m.get("files", {}).get(name, {})
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError,
            RecursionError) as exc:
        raise ArtifactError(f"{mp} is not a manifest `slab-deploy export` writes ({exc.__class__.__name__}); "
                            "export again") from None
    if status != "ok":
        raise ArtifactError(f"{d} holds an export whose status is {status!r}, not ok; export again")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ArtifactError(f"{mp}: 'onnx' must name a file in {d}, not {name!r}; export again")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ArtifactError(f"{mp}: export.batch is {batch!r}, not a batch size; export again")
    onnx = d / name
    sha = onnx_sha256_of(onnx)
    if not isinstance(entry, dict) or entry.get("sha256") != sha:
        raise ArtifactError(f"{onnx} does not match its manifest (sha256 {sha[:12]}..., the manifest records "
                            f"{str(entry.get('sha256') if isinstance(entry, dict) else None)[:12]}...): "
                            "export again")
    return Export(d, str(model), onnx, sha, str(precision), batch, shape, attention)



def _refuse_cpu_only_int8(folder: Path) -> None:
    """An INT8 export with uint8 activations (a CPU-only graph) is refused before anything is
    built or written; read_export has checked the manifest already."""
    from slab_deploy.export.quantize import require_tensorrt_form

    with open(folder / "manifest.json", "rb") as fh:
        manifest = json.loads(fh.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    require_tensorrt_form(manifest, "slab-deploy build")

def batch_range(opts: EngineOptions, export: Export) -> tuple[int, int, int]:
    """min/opt/max batch of the engine: the export's own batch for a static graph (a range there is
    refused), else the options, then the device profile's batches (min, median, max), then 1/1/64."""
    given = (opts.min_batch, opts.opt_batch, opts.max_batch)
    if export.batch is not None:
        wrong = [v for v in given if v is not None and v != export.batch]
        if wrong or opts.profile:
            asked = opts._range_text() if wrong else f"--profile {opts.profile}"
            raise ConfigError(f"{export.onnx} has a static batch of {export.batch}, "
                              f"so it takes no batch range ({asked}); "
                              "export without --batch for a dynamic-batch engine")
        return export.batch, export.batch, export.batch
    lo, mid, hi = profile_batches(opts.profile) if opts.profile else DEFAULT_BATCH
    mn = (opts.min_batch if opts.min_batch is not None
          else min(v for v in (lo, opts.opt_batch, opts.max_batch) if v))
    mx = opts.max_batch if opts.max_batch is not None else max(v for v in (hi, mn, opts.opt_batch) if v)
    op = opts.opt_batch if opts.opt_batch is not None else min(max(mid, mn), mx)
    if not mn <= op <= mx:
        src = f" with --profile {opts.profile} ({lo}/{mid}/{hi})" if opts.profile else ""
        raise ConfigError(f"the batch range must satisfy min <= opt <= max, "
                          f"not {mn}/{op}/{mx} (min/opt/max){src}")
    return mn, op, mx


def profile_batches(name: str) -> tuple[int, int, int]:
    """A CUDA device profile's batches as min, opt (the median, upper for an even count), max."""
    from slab_deploy.profiles import load_profile

    prof = load_profile(name)
    if prof.device != "cuda":
        raise ConfigError(f"profile {prof.name} is for --device {prof.device}; "
                          "an engine needs a CUDA profile")
    b = sorted(prof.batches)
    return b[0], b[len(b) // 2], b[-1]


def gpu_info() -> dict[str, Any] | None:
    """Name and compute capability of the current CUDA device, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def sla_normaliser_nodes(onnx_path: Path, max_hops: int = 6) -> frozenset[str]:
    """The ONNX nodes of SLA's normaliser: every node on a path of at most `max_hops` from a token
    sum (ReduceSum/ReduceMean, or a MatMul by a row of ones) to a Reciprocal, the Reciprocal, and the
    Mul that scales by it."""
    import onnx

    from slab_deploy.export.onnx_passes import token_sums

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reach(start: Iterable[Any], step: Callable[[Any], list[Any]]) -> dict[str, int]:
        seen: dict[str, int] = {}
        frontier = [(n, 0) for n in start]
        while frontier:
            n, d = frontier.pop()
            if n.name in seen and seen[n.name] <= d:
                continue
            seen[n.name] = d
            if d < max_hops:
                frontier += [(m, d + 1) for m in step(n)]
        return seen

    reductions = token_sums(graph)
    reciprocals = [n for n in graph.node if n.op_type == "Reciprocal"]
    down = reach(reductions, lambda n: [c for o in n.output for c in consumers.get(o, [])])
    up = reach(reciprocals, lambda n: [producer[i] for i in n.input if i in producer])
    nodes = {name for name in down if name in up and up[name] + down[name] <= max_hops}
    if not nodes:
        return frozenset()
    scaling = {c.name for r in reciprocals if r.name in nodes
               for c in consumers.get(r.output[0], []) if c.op_type == "Mul"}
    return frozenset(nodes | scaling)


@dataclass
class EngineResult:
    """What `build_engine` wrote: the plan and its record (with the build time), and notes."""

    plan_path: Path
    record_path: Path
    record: EngineRecord
    notes: list[str] = field(default_factory=list)

    @property
    def plan_bytes(self) -> int:
        return int(self.record.plan["bytes"])


def build_engine(artifact_dir: str | Path, options: EngineOptions | None = None, *,
                 trt: TensorRT | None = None,
                 progress: Callable[[str], None] | None = None) -> EngineResult:
    """Build the TensorRT engine of the export in `artifact_dir` and write DIR/model.plan with its
    record DIR/engine.json (both, or neither: nothing else in DIR changes). Refuses bad options,
    a broken export, an existing plan without `force`, and an option this TensorRT lacks, all
    before parsing; raises MissingDependencyError without TensorRT."""
    opts = (options or EngineOptions()).validate()
    folder = Path(os.path.abspath(artifact_dir))
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an export directory; "
                            "pass the output directory of `slab-deploy export`")
    from filelock import FileLock, Timeout

    from slab_deploy.export.target import LOCK_TIMEOUT_S

    lock = FileLock(str(folder.parent / f".{folder.name}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise ArtifactError(f"{folder} is being written by an export or another build; "
                            "wait for it to finish") from None
    try:
        return _build_locked(folder, opts, trt, progress or (lambda _m: None))
    finally:
        lock.release()


def _build_locked(
    folder: Path, opts: EngineOptions, trt: TensorRT | None, say: Callable[[str], None]
) -> EngineResult:
    """`build_engine` holding the directory's lock: nothing can swap the export underneath."""
    from slab_deploy.runtime.tensorrt import build_serialized_engine

    export = read_export(folder)
    _refuse_cpu_only_int8(folder)
    lo, op, hi = batch_range(opts, export)
    if (folder / PLAN_NAME).exists() and not opts.force:
        raise ArtifactError(f"{folder / PLAN_NAME} exists; pass --force to rebuild it")
    if opts.weak_fp16 and export.precision != "fp32":
        raise ConfigError(f"--weak-fp16 builds an fp32 export in FP16; "
                          f"{export.onnx} is already {export.precision}: "
                          "drop --weak-fp16 (it is built as typed)")
    trt = trt or require_tensorrt("`slab-deploy build`")
    trt.refuse_unsupported(weak_fp16=opts.weak_fp16, hardware_compat=opts.hardware_compat,
                           compute_capability=opts.compute_capability,
                           timing_cache=opts.timing_cache is not None,
                           version_compatible=opts.version_compatible, opt_level=opts.opt_level is not None)
    gpu = gpu_info()
    targets = _targets(trt, opts, gpu)
    pin = sla_normaliser_nodes(export.onnx) if opts.weak_fp16 else frozenset()
    if opts.weak_fp16 and "sla" in export.attention and not pin:
        raise ConfigError("--weak-fp16: no SLA normaliser (token sum -> ... -> Reciprocal) found in "
                          f"{export.onnx} to pin to fp32; "
                          "export with --precision fp16 and build that graph instead")
    cache_in = _read_timing_cache(opts.timing_cache)
    settings = BuildSettings(min_batch=lo, opt_batch=op, max_batch=hi, workspace_gib=opts.workspace_gib,
                             opt_level=opts.opt_level,
                             timing_cache=None if opts.timing_cache is None else cache_in or b"",
                             version_compatible=opts.version_compatible, hardware_compat=opts.hardware_compat,
                             compute_capability=opts.compute_capability or (("current",) if trt.rtx else ()),
                             weak_fp16=opts.weak_fp16, pin_fp32=pin)
    try:
        built = build_serialized_engine(export.onnx, settings, trt=trt, progress=say)
    except UnsupportedBackend as exc:
        # a graph this TensorRT cannot parse or build: the artefact's fault here
        raise ArtifactError(str(exc)) from None
    if export.batch is None and built.input_shape[:1] != [-1]:
        raise ArtifactError(f"{export.onnx} parses with input shape {built.input_shape}, "
                            "but its manifest says dynamic batch; export again")
    say("inspecting the engine")
    inspector, note = inspect_engine(trt, built.plan)
    rest = [int(v) for v in built.input_shape[1:]]
    record = EngineRecord(
        model=export.model, precision=export.precision, typing="weak-fp16" if opts.weak_fp16 else "strong",
        onnx={"file": export.onnx.name, "sha256": export.onnx_sha256},
        plan={"file": PLAN_NAME, "sha256": _sha256(built.plan), "bytes": len(built.plan)},
        tensorrt={"flavour": trt.flavour, "module": trt.name, "version": trt.version}, gpu=gpu,
        targets={"compute_capabilities": targets, "hardware_compat": opts.hardware_compat,
                 "version_compatible": opts.version_compatible},
        profile={"input": built.input_name, "min": [lo, *rest], "opt": [op, *rest], "max": [hi, *rest],
                 "static": export.batch is not None},
        flags={"workspace_gib": opts.workspace_gib, "opt_level": opts.opt_level,
               "timing_cache": str(opts.timing_cache) if opts.timing_cache else None,
               "pinned_fp32_layers": built.pinned},
        build_seconds=round(built.seconds, 3), network=built.network, inspector=inspector,
        inspector_note=note,
    )
    plan_path, record_path = commit_engine(folder, built.plan, record)
    notes = []
    if opts.timing_cache is not None and built.timing_cache is not None:
        from slab_deploy.utils import atomic_write

        with atomic_write(opts.timing_cache) as tmp:
            tmp.write_bytes(built.timing_cache)
        notes.append(f"timing cache {'updated' if cache_in else 'written'}: {opts.timing_cache}")
    if note:
        notes.append(f"no per-layer inspector output: {note}")
    return EngineResult(plan_path, record_path, record, notes)


def _targets(trt: TensorRT, opts: EngineOptions, gpu: dict[str, Any] | None) -> list[str]:
    """The compute capabilities the engine is for (what a load compares with the GPU there)."""
    if trt.rtx:
        ccs = list(opts.compute_capability) or ["current"]
        if ccs == ["current"]:
            if gpu is None:
                raise ConfigError(f"no CUDA device here for {trt.label} to build for: name the targets with "
                                  "--compute-capability "
                                  f"(one or more of {', '.join(trt.compute_capabilities)})")
            return [str(gpu["compute_capability"])]
        return ccs
    if gpu is None:
        raise ConfigError(f"{trt.label} builds on the GPU that will run the engine, and there is none here "
                          "(TensorRT-RTX can build without one: --compute-capability)")
    return ["8.0+"] if opts.hardware_compat == "ampere-plus" else [str(gpu["compute_capability"])]


def _read_timing_cache(path: Path | None) -> bytes | None:
    if path is None or not path.exists():
        return None
    size = path.stat().st_size
    if size > MAX_TIMING_CACHE_BYTES:
        raise ConfigError(f"--timing-cache {path} is {size >> 20} MiB, larger than a timing cache; "
                          "pass another file")
    return path.read_bytes()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def tensorrt_identity(trt: TensorRT) -> dict[str, str]:
    return {"flavour": trt.flavour, "version": trt.version}


def load_engine(artifact_dir: str | Path, trt: TensorRT | None = None) -> tuple[bytes, EngineRecord]:
    """DIR/model.plan, refused with one line (EngineMismatch) unless its record matches the plan's
    bytes, DIR's graph, this TensorRT and this GPU."""
    from slab_deploy.runtime.tensorrt import import_tensorrt

    folder = Path(artifact_dir)
    export = read_export(folder)
    trt = trt or import_tensorrt()
    return load_plan(folder, onnx_sha256=export.onnx_sha256, tensorrt=tensorrt_identity(trt), gpu=gpu_info())


def reusable_plan(onnx_path: Path, trt: TensorRT) -> tuple[bytes | None, str]:
    """The plan `slab-deploy build` left beside `onnx_path` and the artefact label, when its record
    fits this graph, TensorRT and GPU; (None, why) when there is none or it is for another TensorRT
    or GPU (the caller builds one). A plan of another graph, or one its record does not describe,
    is a broken artefact: EngineMismatch."""
    folder = onnx_path.parent
    if not (folder / RECORD_NAME).exists() and not (folder / PLAN_NAME).exists():
        return None, f"{onnx_path.name} (engine built now)"
    sha = onnx_sha256_of(onnx_path)
    try:
        plan, _record = load_plan(folder, onnx_sha256=sha, tensorrt=tensorrt_identity(trt), gpu=gpu_info())
    except EngineMismatch as exc:
        if exc.what in ("tensorrt", "gpu"):
            return None, (f"{onnx_path.name} (engine built now: {PLAN_NAME} is for another "
                          f"{'TensorRT' if exc.what == 'tensorrt' else 'GPU'})")
        raise
    return plan, PLAN_NAME


__all__ = ["EngineOptions", "EngineResult", "Export", "batch_range", "build_engine", "compute_capabilities",
           "load_engine", "read_export", "reusable_plan", "sla_normaliser_nodes"]
