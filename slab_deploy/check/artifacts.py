"""What `check` reads from disk before any rung runs: an export's manifest, its graphs, a replay file.

Each reader validates what it reads and refuses anything that is not what `slab-deploy export` or
`check --report` writes with one ArtifactError line, bounded in memory on untrusted files.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import numpy as np

from slab_deploy.check.options import MAX_INPUTS, first_line, short_repr
from slab_deploy.choices import EXPORT_PRECISIONS, describe
from slab_deploy.errors import ArtifactError

MAX_MANIFEST_BYTES = 4 << 20  # manifests are tens of kB; refuse anything that would cost memory to parse
MAX_REPLAY_BYTES = 1 << 30  # uncompressed size of the inputs array of a replay file
_MAX_ZIP_ENTRIES = 256  # io.npz holds the inputs, the reference and one array per rung and precision


@dataclass
class ArtifactManifest:
    """What `check` reads from an export's manifest.json, validated."""

    folder: Path
    model: str
    deployed: Path
    unsimplified: Path | None  # named by the manifest, or model.unsimplified.onnx when present
    precision: str  # one of EXPORT_PRECISIONS
    precision_block: dict[str, Any] | None


def _member(folder: Path, manifest: Path, key: str, name: Any) -> Path:
    """`folder / name`, refusing names that are not a plain relative path inside `folder`."""
    if not isinstance(name, str) or not name or not name.isprintable():
        raise ArtifactError(
            f"{manifest}: {key!r} must name a file inside {folder}, not {short_repr(name)}; export again")
    pure = PurePath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith(("/", "\\")):
        raise ArtifactError(f"{manifest}: {key} {short_repr(name)} points outside {folder}; "
                            "a manifest names files in its own folder: export again")
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise ArtifactError(
            f"{manifest}: {key} {short_repr(name)} resolves outside {folder} (a link?); export again")
    return path


def read_manifest(folder: str | Path) -> ArtifactManifest:
    """Read and validate DIR/manifest.json of an export. Bounded in memory; raises ArtifactError."""
    from slab_deploy.export.api import UNSIMPLIFIED_NAME

    d = Path(folder)
    if not d.is_dir():
        raise ArtifactError(
            f"--artifacts {d} is not a directory; pass the output directory of `slab-deploy export`")
    mp = d / "manifest.json"
    if not mp.exists():
        raise ArtifactError(f"{d} has no manifest.json; pass the output directory of `slab-deploy export`")
    if not mp.is_file():
        raise ArtifactError(f"{mp} is not a file; pass the output directory of `slab-deploy export`")
    try:
        with open(mp, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot read {mp}: {first_line(exc)}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mp} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: "
                            "not a manifest `slab-deploy export` writes; export again")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{mp} is not valid JSON ({first_line(exc, 120)}); export again") from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{mp} holds a JSON {type(m).__name__}, "
                            "not the object `slab-deploy export` writes; export again")
    model = m.get("model")
    if not isinstance(model, str) or not model:
        raise ArtifactError(f"{mp} names no model (its 'model' is {short_repr(model)}); export again")
    deployed = _member(d, mp, "onnx", m.get("onnx", "model.onnx"))
    if "unsimplified_onnx" in m:
        unsimplified: Path | None = _member(d, mp, "unsimplified_onnx", m["unsimplified_onnx"])
    else:
        unsimplified = d / UNSIMPLIFIED_NAME if (d / UNSIMPLIFIED_NAME).is_file() else None
    block = m.get("precision", {})
    if not isinstance(block, dict):
        raise ArtifactError(f"{mp}: 'precision' is {short_repr(block)}, not an object; export again")
    mode = block.get("mode", "fp32")
    if mode not in EXPORT_PRECISIONS:
        raise ArtifactError(
            f"{mp}: precision mode {short_repr(mode)} is not {describe(EXPORT_PRECISIONS)}; export again")
    return ArtifactManifest(d, model, deployed, unsimplified, mode, block or None)


def check_graph(path: Path, manifest: ArtifactManifest, input_size: Sequence[int],
                num_classes: int) -> int | None:
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
        raise ArtifactError(f"{path} is not a readable ONNX model ({first_line(exc, 120)}): "
                            "truncated or damaged; export again") from None
    graph = g.graph
    if not graph.node or not graph.output:
        raise ArtifactError(f"{path} holds no complete graph ({len(graph.node)} nodes, "
                            f"{len(graph.output)} outputs): truncated? export again")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise ArtifactError(
            f"{path} keeps weights in external files; slab-deploy exports embed them: export again")
    meta = {p.key: p.value for p in g.metadata_props}
    if meta.get("slab_deploy.model", manifest.model) != manifest.model:
        raise ArtifactError(f"{path} is the graph of {short_repr(meta['slab_deploy.model'])}, "
                            f"but {manifest.folder}/manifest.json "
                            f"says {manifest.model!r}: the folder mixes exports; export again")
    if meta.get("slab_deploy.precision", manifest.precision) != manifest.precision:
        raise ArtifactError(f"{path} is a {short_repr(meta['slab_deploy.precision'])} graph, "
                            f"but the manifest says {manifest.precision}; export again")
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ArtifactError(f"{path} has {len(inputs)} inputs and {len(graph.output)} outputs; "
                            "a slab-deploy graph has one of each")

    def dims(v: Any) -> list[int | None]:
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    di, do = dims(inputs[0]), dims(graph.output[0])
    want = [None, *input_size]
    if len(di) != 4 or any(a is not None and a != b for a, b in zip(di[1:], input_size, strict=True)):
        raise ArtifactError(f"{path} takes images of shape {di}, but {manifest.model} takes {want}: "
                            "it is not this model's graph (or not at this input size); export again")
    if len(do) != 2 or (do[1] is not None and do[1] != num_classes):
        raise ArtifactError(f"{path} gives outputs of shape {do}, "
                            f"but {manifest.model} gives [batch, {num_classes}]: "
                            "it is not this model's graph; export again")
    return di[0] if di[0] else None


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
        raise ArtifactError(
            f"{what} is not an .npz (zip) archive; pass the io.npz that `check --report` wrote")
    _sig, _disk, _cd_disk, _n_disk, n_total, cd_size, _cd_offset, _clen = struct.unpack(
        "<4s4H2LH", tail[i : i + 22])
    zip64 = i >= 20 and tail[i - 20 : i - 16] == b"PK\x06\x07"
    if zip64 or n_total > _MAX_ZIP_ENTRIES or cd_size > _MAX_ZIP_ENTRIES * 1024:
        raise ArtifactError(f"{what} has {'a zip64' if zip64 else f'{n_total} entries in a'} directory: "
                            "not an io.npz that `check --report` writes")


def _read_npy(fh: BinaryIO, limit: int, what: str, *, labels: bool = False) -> np.ndarray:
    """One .npy member, header first: no pickle, and no allocation beyond what the file holds:
    the (N, 3, H, W) floating-point inputs, or with `labels` the (N,) integer labels."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise ArtifactError(f"{what}: inputs are stored in .npy format {version}, which check does not write")
    member, kinds, ndim, kind, want = (("labels", "iu", 1, "integer labels", "(N,)") if labels
                                       else ("inputs", "f", 4, "floating-point images", "(N, 3, H, W)"))
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise ArtifactError(f"{what}: {member} are {dtype}, not {kind} (object arrays are never unpickled)")
    if len(shape) != ndim or any(n < 0 for n in shape):
        raise ArtifactError(f"{what}: {member} have shape {short_repr(shape)}, not {want}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limit:
        raise ArtifactError(
            f"{what}: {member} of shape {shape} need {nbytes} bytes, more than the file holds ({limit})")
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise ArtifactError(f"{what}: {member} are truncated ({len(data)} of {nbytes} bytes)")
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
                raise ArtifactError(
                    f"{what} holds no 'inputs' array; pass the io.npz that `check --report` wrote") from None
            if info.file_size > MAX_REPLAY_BYTES:
                raise ArtifactError(f"{what}: its inputs take {info.file_size} bytes, "
                                    f"more than the {MAX_REPLAY_BYTES} check reads")
            with z.open(info) as fh:
                x = _read_npy(fh, info.file_size, what)  # type: ignore[arg-type]
    except ArtifactError:
        raise
    except MemoryError:
        raise  # not reachable through the bounds above; if it is, that is a bug worth its traceback
    except Exception as exc:
        # zipfile, zlib and numpy's header parser (ast, tokenize) raise many types on damaged bytes
        raise ArtifactError(f"{what} is not a readable io.npz ({first_line(exc, 160)}); "
                            "pass the io.npz that `check --report` wrote") from None
    if x.shape[0] < 1 or x.shape[0] > MAX_INPUTS:
        raise ArtifactError(f"{what} holds {x.shape[0]} images; check runs 1 to {MAX_INPUTS}")
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ArtifactError(
            f"{what}: its inputs hold {bad} NaN/Inf values (as float32); nothing can be judged on them")
    return np.ascontiguousarray(x)


def read_replay_labels(path: str | Path, count: int) -> np.ndarray | None:
    """The labels an io.npz keeps beside its inputs (a check on labelled images), as (N,) int64,
    or None when it has none. Read after `read_replay` accepted the file, under the same bounds."""
    p = Path(path)
    what = f"--replay {p}"
    try:
        with zipfile.ZipFile(p) as z:
            try:
                info = z.getinfo("labels.npy")
            except KeyError:
                return None
            if info.file_size > MAX_REPLAY_BYTES:
                raise ArtifactError(f"{what}: its labels take {info.file_size} bytes, "
                                    f"more than the {MAX_REPLAY_BYTES} check reads")
            with z.open(info) as fh:
                y = _read_npy(fh, info.file_size, what, labels=True)  # type: ignore[arg-type]
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{what} has unreadable labels ({first_line(exc, 160)}); "
                            "pass the io.npz that `check --report` wrote") from None
    if y.shape != (count,) or (y < 0).any():
        raise ArtifactError(f"{what}: {y.shape[0]} labels for {count} inputs, or negative labels; "
                            "pass the io.npz that `check --report` wrote")
    return y.astype(np.int64)
