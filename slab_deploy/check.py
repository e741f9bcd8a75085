"""The parity ladder behind `slab-deploy check`.

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

import json
import math
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import numpy as np

from slab_deploy.choices import CHECK_BACKENDS, DEPLOYED_RUNGS, EXPORT_PRECISIONS, RUNG_BACKEND, RUNGS
from slab_deploy.errors import (
    ArtifactError,
    CheckpointError,
    ConfigError,
    ExportParityError,
    MissingDependencyError,
    ParityError,
    SlabDeployError,
)
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import Tolerance, tolerance_for

BACKENDS = CHECK_BACKENDS
_RUNG_BACKEND = RUNG_BACKEND
_METRICS = ("max_rel", "min_cosine", "min_sqnr_db", "min_top1")
MAX_INPUTS = 4096  # images per check (the exporter's dynamic batch goes up to 4096 too)
MAX_MANIFEST_BYTES = 4 << 20  # manifests are tens of kB; refuse anything that would cost memory to parse
MAX_REPLAY_BYTES = 1 << 30  # uncompressed size of the inputs array of a replay file
_MAX_ZIP_ENTRIES = 256  # io.npz holds the inputs, the reference and one array per rung and precision


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
    replay_command: str = ""
    artifacts_precision: dict[str, Any] | None = None  # the export manifest's precision block (--artifacts)
    exported_here: bool = False  # the graphs are check's own export (no --artifacts)

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
        """pass | fail (parity, exit 3) | error (broken artefact, exit 1) | unjudged (nothing ran on the deployed graph, exit 1)."""
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
        return {"pass": 0, "fail": ParityError.exit_code, "error": ArtifactError.exit_code, "unjudged": ConfigError.exit_code}[self.outcome]

    def verdict(self) -> str:
        outcome = self.outcome
        ran = sum(r.status in ("pass", "fail") for r in self.rungs)
        if outcome == "pass":
            return f"PASS: {ran} rungs agree with the checkpoint model ({len(self.rungs) - ran} skipped)"
        if outcome == "unjudged":
            why = "; ".join(f"{r.label}: {r.reason}" for r in self.rungs if r.rung in DEPLOYED_RUNGS) or "no graph to run"
            return (f"NOT JUDGED: no rung ran on the deployed graph ({why}); a pass needs at least one of "
                    f"{', '.join(DEPLOYED_RUNGS)}: select a backend this host has")
        if outcome == "error":
            e = self.first_error
            assert e is not None
            own = (" (on the graph check exported itself: a bug in slab-deploy, please report it with report.json)"
                   if self.exported_here else " (the artefact is broken: export again)")
            text = f"ERROR at rung {e.label}: could not run: {e.reason}{own}"
            f = self.first_failure
            if f is not None and f is not e:
                text += f"; earlier, FAIL at rung {f.label}: {'; '.join(f.failures)}"
            return text
        f = self.first_failure
        assert f is not None
        return f"FAIL at rung {f.label}: {'; '.join(f.failures)} (first rung that broke; earlier rungs passed)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "untrained": self.untrained,
            "inputs": self.inputs,
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
        lines = [
            f"# slab-deploy check: {self.model}",
            "",
            f"**{self.verdict()}**",
            "",
            f"- checkpoint: `{self.checkpoint or 'embedded default (UNTRAINED)'}` (sha256 `{(self.checkpoint_sha256 or '')[:16]}`)",
            f"- inputs: {self.inputs.get('source')} ({self.inputs.get('count')} images, seed {self.inputs.get('seed')})",
            "- reference: checkpoint model in eval mode, torch fp32 on the CPU",
            "",
            "| rung | precision | status | max abs | max rel | mean abs | cosine | SQNR dB | top-1 | top-5 | tolerance | needed to pass |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rungs:
            m = r.metrics or {}

            def f(k: str, fmt: str, m: dict[str, Any] = m) -> str:
                v = m.get(k)
                return "-" if v is None else format(v, fmt)

            tol = ", ".join(f"{k}={v:g}" for k, v in r.tolerance.items()) or "-"
            need = ", ".join(f"{k}={v:.3g}" for k, v in r.needed.items()) or "-"
            status = f"{r.status}: {r.reason}" if r.status in ("skipped", "error") else r.status
            if r.status == "fail" and r.metrics and (r.metrics.get("nonfinite") or r.metrics.get("nonfinite_reference")):
                status += f": {'; '.join(r.failures)}"
            lines.append(
                f"| {r.rung} | {r.precision} | {status.replace('|', '/')} | {f('max_abs', '.2e')} | {f('max_rel', '.2e')} | {f('mean_abs', '.2e')} "
                f"| {f('cosine', '.6f')} | {f('sqnr_db', '.1f')} | {f('top1', '.3f')} | {f('top5', '.3f')} | {tol} | {need} |"
            )
        if self.replay_command:
            lines += ["", "Replay locally:", "", f"    {self.replay_command}"]
        return "\n".join(lines) + "\n"


def parse_tolerance_overrides(items: Sequence[str]) -> dict[str, dict[str, float]]:
    """`RUNG:METRIC=VALUE` strings -> {rung: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        try:
            rung, rest = item.split(":", 1)
            metric, value = rest.split("=", 1)
            v = float(value)
        except ValueError:
            raise ConfigError(f"--tolerance {item!r}: expected RUNG:METRIC=VALUE, e.g. ort_cuda:min_cosine=0.995") from None
        if rung not in RUNGS:
            raise ConfigError(f"--tolerance {item!r}: unknown rung {rung!r}; rungs are {', '.join(RUNGS)}")
        if metric not in _METRICS:
            raise ConfigError(f"--tolerance {item!r}: unknown metric {metric!r}; metrics are {', '.join(_METRICS)}")
        if not math.isfinite(v):
            raise ConfigError(f"--tolerance {item!r}: the value must be a finite number (NaN passes or fails everything)")
        out.setdefault(rung, {})[metric] = v
    return out


def load_images(folder: str | Path, preprocessing: dict[str, Any], limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Images of `folder` through the model's own preprocessing: resize the shorter side, centre
    crop, scale to [0, 1], normalise with mean/std. Returns (N, 3, H, W) float32 and the file names."""
    from slab_deploy._deps import require

    Image = require("PIL.Image", "--images")
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    if not files:
        raise ConfigError(f"--images {folder} holds no .jpg/.jpeg/.png/.bmp/.webp files")
    files = files[:limit] if limit else files
    _, h, w = preprocessing["input_size"]
    short = preprocessing["resize_shorter_to"]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(preprocessing["interpolation"], Image.BICUBIC)
    mean = np.array(preprocessing["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.array(preprocessing["std"], dtype=np.float32).reshape(3, 1, 1)
    batch = []
    for p in files:
        try:
            img = Image.open(p).convert("RGB")
        except Exception as exc:
            raise ConfigError(f"cannot read image {p}: {exc}") from None
        iw, ih = img.size
        scale = short / min(iw, ih)
        img = img.resize((max(w, round(iw * scale)), max(h, round(ih * scale))), resample)
        iw, ih = img.size
        left, top = (iw - w) // 2, (ih - h) // 2
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        batch.append((arr - mean) / std)
    return np.stack(batch).astype(np.float32), [p.name for p in files]


# ------------------------------------------------------------------------------------------------
# Input validation: everything here runs before the checkpoint is loaded and writes nothing.


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _first_line(exc: BaseException, n: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:n]}" if text else type(exc).__name__


def validate_options(backends: Sequence[str], precisions: Sequence[str], inputs: int, *,
                     images: str | Path | None = None, replay: str | Path | None = None) -> None:
    """Refuse options that cannot give a verdict (ConfigError, exit 1)."""
    if not backends:
        raise ConfigError(f"--backends is empty; choose from {', '.join(BACKENDS)}")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ConfigError(f"unknown backend(s) {', '.join(map(_short, bad))}; choose from {', '.join(BACKENDS)}")
    if not any(_RUNG_BACKEND[r] in backends for r in DEPLOYED_RUNGS):
        raise ConfigError(
            f"--backends {','.join(backends)} runs no rung on the deployed graph, so nothing would be judged; "
            "add onnx, ort-cpu, ort-cuda or tensorrt"
        )
    if not precisions:
        raise ConfigError("--precision is empty; pass fp32, fp16 or fp32,fp16")
    for p in precisions:
        if p not in EXPORT_PRECISIONS:
            raise ConfigError(f"unknown precision {_short(p)}; check supports fp32 and fp16")
    if isinstance(inputs, bool) or not isinstance(inputs, int) or not 1 <= inputs <= MAX_INPUTS:
        raise ConfigError(f"--inputs must be between 1 and {MAX_INPUTS}, not {_short(inputs)}")
    if images is not None and replay is not None:
        raise ConfigError("--images and --replay exclude each other: a replay reruns the inputs it saved")


def check_report_dir(path: str | Path) -> Path:
    """`--report` must be a directory, or a path where one can be made; refuse it before any work."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--report {out} is a file; pass a directory (report.json, report.md and io.npz go into it)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--report {out}: {parent} is a file, so the directory cannot be made")
            break
    for name in ("report.json", "report.md", "io.npz"):
        if (out / name).is_dir():
            raise ConfigError(f"--report {out}: {out / name} is a directory; remove it or choose another --report")
    return out


@dataclass
class ArtifactManifest:
    """What `check` reads from an export's manifest.json, validated."""

    folder: Path
    model: str
    deployed: Path
    unsimplified: Path | None  # named by the manifest, or model.unsimplified.onnx when present
    precision: str  # fp32 | fp16
    precision_block: dict[str, Any] | None


def _member(folder: Path, manifest: Path, key: str, name: Any) -> Path:
    """`folder / name`, refusing names that are not a plain relative path inside `folder`."""
    if not isinstance(name, str) or not name or not name.isprintable():
        raise ArtifactError(f"{manifest}: {key!r} must name a file inside {folder}, not {_short(name)}; export again")
    pure = PurePath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith(("/", "\\")):
        raise ArtifactError(f"{manifest}: {key} {_short(name)} points outside {folder}; a manifest names files in its own folder: export again")
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise ArtifactError(f"{manifest}: {key} {_short(name)} resolves outside {folder} (a link?); export again")
    return path


def read_manifest(folder: str | Path) -> ArtifactManifest:
    """Read and validate DIR/manifest.json of an export. Bounded in memory; raises ArtifactError."""
    from slab_deploy.export.api import UNSIMPLIFIED_NAME

    d = Path(folder)
    if not d.is_dir():
        raise ArtifactError(f"--artifacts {d} is not a directory; pass the output directory of `slab-deploy export`")
    mp = d / "manifest.json"
    if not mp.exists():
        raise ArtifactError(f"{d} has no manifest.json; pass the output directory of `slab-deploy export`")
    if not mp.is_file():
        raise ArtifactError(f"{mp} is not a file; pass the output directory of `slab-deploy export`")
    try:
        with open(mp, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot read {mp}: {_first_line(exc)}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mp} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest `slab-deploy export` writes; export again")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{mp} is not valid JSON ({_first_line(exc, 120)}); export again") from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{mp} holds a JSON {type(m).__name__}, not the object `slab-deploy export` writes; export again")
    model = m.get("model")
    if not isinstance(model, str) or not model:
        raise ArtifactError(f"{mp} names no model (its 'model' is {_short(model)}); export again")
    deployed = _member(d, mp, "onnx", m.get("onnx", "model.onnx"))
    if "unsimplified_onnx" in m:
        unsimplified: Path | None = _member(d, mp, "unsimplified_onnx", m["unsimplified_onnx"])
    else:
        unsimplified = d / UNSIMPLIFIED_NAME if (d / UNSIMPLIFIED_NAME).is_file() else None
    block = m.get("precision", {})
    if not isinstance(block, dict):
        raise ArtifactError(f"{mp}: 'precision' is {_short(block)}, not an object; export again")
    mode = block.get("mode", "fp32")
    if mode not in EXPORT_PRECISIONS:
        raise ArtifactError(f"{mp}: precision mode {_short(mode)} is not fp32 or fp16; export again")
    return ArtifactManifest(d, model, deployed, unsimplified, mode, block or None)


def _zip_directory_ok(path: Path, what: str) -> None:
    """Refuse a zip whose central directory would cost memory to read (many entries, zip64): an
    io.npz that check writes has a handful of entries."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        tail_len = min(size, 22 + 0xFFFF)
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        raise ArtifactError(f"{what} is not an .npz (zip) archive; pass the io.npz that `check --report` wrote")
    _sig, _disk, _cd_disk, _n_disk, n_total, cd_size, _cd_offset, _clen = struct.unpack("<4s4H2LH", tail[i : i + 22])
    zip64 = i >= 20 and tail[i - 20 : i - 16] == b"PK\x06\x07"
    if zip64 or n_total > _MAX_ZIP_ENTRIES or cd_size > _MAX_ZIP_ENTRIES * 1024:
        raise ArtifactError(f"{what} has {'a zip64' if zip64 else f'{n_total} entries in a'} directory: not an io.npz that `check --report` writes")


def _read_npy(fh: BinaryIO, limit: int, what: str) -> np.ndarray:
    """One .npy member, header first: no pickle, and no allocation beyond what the file holds."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise ArtifactError(f"{what}: inputs are stored in .npy format {version}, which check does not write")
    if dtype.hasobject or dtype.kind != "f" or dtype.fields is not None or dtype.subdtype is not None:
        raise ArtifactError(f"{what}: inputs are {dtype}, not floating-point images (object arrays are never unpickled)")
    if len(shape) != 4 or any(n < 0 for n in shape):
        raise ArtifactError(f"{what}: inputs have shape {_short(shape)}, not (N, 3, H, W)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limit:
        raise ArtifactError(f"{what}: inputs of shape {shape} need {nbytes} bytes, more than the file holds ({limit})")
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise ArtifactError(f"{what}: inputs are truncated ({len(data)} of {nbytes} bytes)")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def read_replay(path: str | Path) -> np.ndarray:
    """The inputs of an io.npz written by `check --report`, as (N, 3, H, W) float32, finite.

    Never unpickles, reads only the `inputs` member, bounds memory by MAX_REPLAY_BYTES and by the
    file's own sizes; anything else raises ArtifactError."""
    p = Path(path)
    what = f"--replay {p}"
    if not p.is_file():
        raise ArtifactError(f"{what} is not a file; pass the io.npz that `check --report` wrote")
    try:
        _zip_directory_ok(p, what)
        with zipfile.ZipFile(p) as z:
            try:
                info = z.getinfo("inputs.npy")
            except KeyError:
                raise ArtifactError(f"{what} holds no 'inputs' array; pass the io.npz that `check --report` wrote") from None
            if info.file_size > MAX_REPLAY_BYTES:
                raise ArtifactError(f"{what}: its inputs take {info.file_size} bytes, more than the {MAX_REPLAY_BYTES} check reads")
            with z.open(info) as fh:
                x = _read_npy(fh, info.file_size, what)  # type: ignore[arg-type]
    except ArtifactError:
        raise
    except MemoryError:
        raise  # not reachable through the bounds above; if it is, that is a bug worth its traceback
    except Exception as exc:  # zipfile, zlib and numpy's header parser (ast, tokenize) raise many types on damaged bytes
        raise ArtifactError(f"{what} is not a readable io.npz ({_first_line(exc, 160)}); pass the io.npz that `check --report` wrote") from None
    if x.shape[0] < 1 or x.shape[0] > MAX_INPUTS:
        raise ArtifactError(f"{what} holds {x.shape[0]} images; check runs 1 to {MAX_INPUTS}")
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ArtifactError(f"{what}: its inputs hold {bad} NaN/Inf values (as float32); nothing can be judged on them")
    return np.ascontiguousarray(x)


def _check_graph(path: Path, manifest: ArtifactManifest, input_size: Sequence[int], num_classes: int) -> int | None:
    """Refuse a graph that is missing, not a file, empty, not ONNX, or another model's. Returns its
    static batch size (None when the batch is dynamic)."""
    import onnx

    if not path.exists():
        raise ArtifactError(f"{path} is missing; export again")
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file; export again")
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path} is empty; export again")
    try:
        g = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: a damaged file, whatever the exception
        raise ArtifactError(f"{path} is not a readable ONNX model ({_first_line(exc, 120)}): truncated or damaged; export again") from None
    graph = g.graph
    if not graph.node or not graph.output:
        raise ArtifactError(f"{path} holds no complete graph ({len(graph.node)} nodes, {len(graph.output)} outputs): truncated? export again")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise ArtifactError(f"{path} keeps weights in external files; slab-deploy exports embed them: export again")
    meta = {p.key: p.value for p in g.metadata_props}
    if meta.get("slab_deploy.model", manifest.model) != manifest.model:
        raise ArtifactError(f"{path} is the graph of {_short(meta['slab_deploy.model'])}, but {manifest.folder}/manifest.json "
                            f"says {manifest.model!r}: the folder mixes exports; export again")
    if meta.get("slab_deploy.precision", manifest.precision) != manifest.precision:
        raise ArtifactError(f"{path} is a {_short(meta['slab_deploy.precision'])} graph, but the manifest says {manifest.precision}; export again")
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ArtifactError(f"{path} has {len(inputs)} inputs and {len(graph.output)} outputs; a slab-deploy graph has one of each")

    def dims(v: Any) -> list[int | None]:
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    di, do = dims(inputs[0]), dims(graph.output[0])
    want = [None, *input_size]
    if len(di) != 4 or any(a is not None and a != b for a, b in zip(di[1:], input_size, strict=True)):
        raise ArtifactError(f"{path} takes images of shape {di}, but {manifest.model} takes {want}: "
                            "it is not this model's graph (or not at this input size); export again")
    if len(do) != 2 or (do[1] is not None and do[1] != num_classes):
        raise ArtifactError(f"{path} gives outputs of shape {do}, but {manifest.model} gives [batch, {num_classes}]: "
                            "it is not this model's graph; export again")
    return di[0] if di[0] else None


# ------------------------------------------------------------------------------------------------
# The ladder


def run_check(
    model_name: str,
    checkpoint: str | Path | None,
    *,
    artifacts: str | Path | None = None,
    backends: Sequence[str] = BACKENDS,
    precisions: Sequence[str] = ("fp32",),
    inputs: int = 8,
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
    import torch

    from slab_deploy.export.api import (
        ExportOptions,
        export_model,
        preprocessing,
        tool_versions,
    )
    from slab_deploy.models import checkpoint_info
    from slab_deploy.passes import fold_model
    from slab_deploy.weights import load_model

    say = progress or (lambda _s: None)
    validate_options(backends, precisions, inputs, images=images, replay=replay)
    manifest: ArtifactManifest | None = None
    if artifacts is not None:
        manifest = read_manifest(artifacts)
        if manifest.model != model_name:
            raise ArtifactError(f"{manifest.folder} holds an export of {manifest.model!r}, not {model_name!r}: pass --model {manifest.model}")
    replayed = read_replay(replay) if replay is not None else None
    say("loading checkpoint")
    ref = load_model(model_name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn)
    info = checkpoint_info(ref)
    pre = preprocessing(ref)

    # ---- inputs
    if replayed is not None:
        x = replayed
        src = {"source": f"replay of {replay}", "count": int(x.shape[0]), "seed": None}
    elif images is not None:
        x, names = load_images(images, pre, limit=inputs)
        src = {"source": f"images from {images}", "count": len(names), "files": names, "seed": None}
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(inputs, *pre["input_size"], generator=g).numpy()
        src = {"source": "seeded random normal images", "count": inputs, "seed": seed}
    if tuple(x.shape[1:]) != tuple(pre["input_size"]):
        raise ConfigError(f"inputs have shape {tuple(x.shape[1:])}, {model_name} expects {tuple(pre['input_size'])}")

    say("reference forward")
    with torch.no_grad():
        reference = ref(torch.from_numpy(x)).float().numpy()
    bad = int((~np.isfinite(reference)).sum())
    if bad:
        raise CheckpointError(f"the checkpoint model gives {bad} NaN/Inf logits on these inputs, so nothing can be judged; "
                              "check the checkpoint's weights (`slab-deploy inspect`)")
    num_classes = int(reference.shape[1]) if reference.ndim == 2 else -1
    outputs: dict[str, np.ndarray] = {"reference": reference}
    rungs: list[RungResult] = []

    def record(rung: str, precision: str, fn: Callable[[], tuple[str, str, np.ndarray]], backend: str) -> None:
        """Run one rung; `fn` returns (runner, artefact, outputs). Only UnsupportedBackend (the host
        lacks the runtime) skips; anything else that stops the rung is an error."""
        from slab_deploy.runtime.base import UnsupportedBackend

        if backend not in backends:
            rungs.append(RungResult(rung, precision, "skipped", reason=f"backend {backend} not selected"))
            return
        t0 = time.perf_counter()
        try:
            runner, artifact, out = fn()
        except UnsupportedBackend as exc:
            rungs.append(RungResult(rung, precision, "skipped", reason=str(exc)))
            return
        except MissingDependencyError:
            raise  # the install line is the message
        except SlabDeployError as exc:
            rungs.append(RungResult(rung, precision, "error", reason=str(exc), seconds=time.perf_counter() - t0))
            return
        except Exception as exc:
            if rung == "fold":
                raise  # in memory, no artefact: an exception here is a bug and keeps its traceback
            rungs.append(RungResult(rung, precision, "error", reason=_first_line(exc), seconds=time.perf_counter() - t0))
            return
        out = np.asarray(out)
        if out.shape != reference.shape:
            rungs.append(RungResult(rung, precision, "error", runner, artifact,
                                    f"outputs of shape {out.shape}, the reference has {reference.shape}", seconds=time.perf_counter() - t0))
            return
        tol: Tolerance = tolerance_for(rung, precision, tolerance)
        m = compare(reference, out)
        v = judge(m, tol)
        outputs[f"{rung}.{precision}"] = out
        rungs.append(
            RungResult(rung, precision, "pass" if v.passed else "fail", runner, artifact, "", m.to_dict(), tol.to_dict(),
                       v.failures, v.needed, time.perf_counter() - t0)
        )

    # ---- fold (torch)
    say("folding")

    def run_fold() -> tuple[str, str, np.ndarray]:
        from slab_deploy.runtime.torch_runner import TorchRunner

        folded, _ = fold_model(ref)
        runner = TorchRunner(folded, "cpu", "fp32")
        return f"torch {runner.info.details['torch']} cpu fp32", "in memory", runner(x)

    record("fold", "fp32", run_fold, "torch")

    # ---- artefacts: given, or exported now into a temporary directory
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        found: list[ArtifactManifest] = []
        if manifest is not None:
            found = [manifest]
        else:
            tmp = tempfile.TemporaryDirectory(prefix="slab-deploy-check-")
            for prec in precisions:
                say(f"exporting {prec}")
                d = Path(tmp.name) / prec
                try:
                    export_model(model_name, checkpoint, d, ExportOptions(precision=prec), force=True, ema=ema,
                                 allow_unfinished_prepbn=allow_unfinished_prepbn)
                except ExportParityError as exc:
                    d = exc.failed_dir  # the failed set is kept beside the output: the ladder below shows where it broke
                found.append(read_manifest(d))
        runs = []
        for man in found:  # validate every graph before the first ONNX rung runs
            batch = _check_graph(man.deployed, man, pre["input_size"], num_classes)
            if man.unsimplified is not None:
                _check_graph(man.unsimplified, man, pre["input_size"], num_classes)
            runs.append((man, batch))
        for man, batch in runs:
            prec, unsimplified, deployed = man.precision, man.unsimplified, man.deployed
            say(f"ONNX rungs ({prec})")
            record("onnx", prec, _ort_rung(unsimplified, x, "cpu", "none", prec, batch, "exported graph (unsimplified)"), "onnx")
            record("simplified", prec, _ort_rung(deployed, x, "cpu", "none", prec, batch), "onnx")
            record("ort_cpu", prec, _ort_rung(deployed, x, "cpu", "all", prec, batch), "ort-cpu")
            say(f"ONNX Runtime CUDA ({prec})")
            record("ort_cuda", prec, _ort_rung(deployed, x, "cuda", "all", prec, batch), "ort-cuda")
            say(f"TensorRT ({prec})")
            record("tensorrt", prec, _trt_rung(deployed, x, prec, batch), "tensorrt")
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = CheckReport(
        model=model_name,
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_sha256=info.sha256 if info else None,
        untrained=bool(getattr(ref, "untrained", False)),
        inputs=src,
        rungs=rungs,
        versions=tool_versions(),
        artifacts_precision=manifest.precision_block if manifest is not None else None,
        exported_here=manifest is None,
    )
    report._inputs = x  # type: ignore[attr-defined]
    report._outputs = outputs  # type: ignore[attr-defined]
    return report


def _batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int | None) -> np.ndarray:
    """Run a graph with a static batch on any number of images: whole batches, the last one
    padded with repeated images whose outputs are dropped."""
    n = x.shape[0]
    if batch is None or n == batch:
        return run(x)
    total = -(-n // batch) * batch
    xp = x[np.arange(total) % n]
    return np.concatenate([run(xp[i : i + batch]) for i in range(0, total, batch)])[:n]


def _ort_rung(path: Path | None, x: np.ndarray, provider: str, opt: str, precision: str, batch: int | None,
              what: str = "") -> Callable[[], tuple[str, str, np.ndarray]]:
    def fn() -> tuple[str, str, np.ndarray]:
        from slab_deploy.runtime.base import UnsupportedBackend
        from slab_deploy.runtime.ort import ORTRunner

        if path is None:
            # Not a broken artefact: the export was made without keeping it (keep_unsimplified=False).
            raise UnsupportedBackend(f"no {what or 'graph'} in the artefacts (export keeps it as model.unsimplified.onnx)")
        r = ORTRunner(path, provider, graph_opt=opt, precision=precision)
        return f"onnxruntime {r.info.details['onnxruntime']} {provider} (graph opt {opt})", path.name, _batched(r, x, batch)

    return fn


def _trt_rung(path: Path, x: np.ndarray, precision: str, batch: int | None) -> Callable[[], tuple[str, str, np.ndarray]]:
    def fn() -> tuple[str, str, np.ndarray]:
        from slab_deploy.runtime.tensorrt import TensorRTRunner

        r = TensorRTRunner.from_onnx(path, precision=precision)
        return f"tensorrt {r.info.details.get('tensorrt')}", path.name, _batched(r, x, batch)

    return fn


def write_reports(report: CheckReport, out_dir: str | Path, replay_base: str) -> dict[str, Path]:
    """report.json, report.md and io.npz (inputs and every rung's outputs) into `out_dir`."""
    from slab_deploy.utils import atomic_write

    out = check_report_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "io.npz"
    report.replay_command = f"{replay_base} --replay {npz}"
    with atomic_write(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, inputs=report._inputs, **{k.replace(".", "_"): v for k, v in report._outputs.items()})  # type: ignore[attr-defined]
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
