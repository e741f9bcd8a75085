"""A checkpoint file with some tensors given new values and everything else kept as it was.

For commands that change a few tensors of a user's checkpoint (`recalibrate`: the BatchNorm running
statistics) and must hand back the same kind of file: the SLAB authors' training file stays a
training file, with its yacs config, optimizer and scheduler state, epoch, EMA weights and anything
else it holds, so it loads wherever the input loaded (the authors' code, `slab-deploy`).

- torch zip files (torch.save's default) and the legacy non-zip stream: the file is copied and only
  the bytes of the replaced tensors are overwritten in place (with the zip's CRC-32 fields); the
  pickle, every other record and the layout of the archive stay byte for byte what they were.
  Which storage holds which tensor is read from the pickle by `_Locator`, which resolves no global
  at all (every object it meets becomes an inert placeholder), and runs only on a file that
  `read_checkpoint` has already accepted.
- safetensors: rewritten with the same tensors and metadata (the format holds nothing else).

`replace_tensors` reads the result back through `read_checkpoint` and compares every tensor of the
file (both the model and the EMA weights when present) with what was asked for.
"""

from __future__ import annotations

import io
import math
import pickle
import shutil
import struct
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from slab_deploy.errors import ArtifactError, CheckpointError
from slab_deploy.models.checkpoint import read_checkpoint


class _Sealed:
    def __setstate__(self, state: Any) -> None:
        raise CheckpointError("the pickle sets the state of a tensor or storage; a state_dict does not")


@dataclass(frozen=True)
class _StorageRef(_Sealed):
    key: str
    type_name: str
    numel: int


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Inert(dict):  # type: ignore[type-arg]
    """Whatever global a pickle names (a config class, a set, a numpy scalar): built, filled and
    given its state without running anything of the class it stands for."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


class _StorageName:
    def __init__(self, name: str) -> None:
        self.name = name


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> Any:
    if not isinstance(storage, _StorageRef):
        return _Inert()
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


_SPECIAL: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_ref,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_a: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_a: data,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): lambda seq=(): tuple(seq),
}


class _Locator(pickle.Unpickler):
    """The structure of a torch pickle with tensors as `_TensorRef`s (storage key, offset, size,
    stride) and every other object inert; no global of the file is ever resolved."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SPECIAL:
            return _SPECIAL[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageName(name)
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError("a persistent id of the pickle is not a torch storage")
        kind = pid[1].name if isinstance(pid[1], _StorageName) else "?"
        return _StorageRef(str(pid[2]), kind, int(pid[4]))


def _locate(f: BinaryIO, path: Path) -> Any:
    try:
        return _Locator(f).load()
    except CheckpointError:
        raise
    except Exception as exc:  # the reader accepted this pickle; anything here means it is not what it read
        raise CheckpointError(
            f"{path}: cannot tell where its tensors are stored ({type(exc).__name__}: {exc})") from None


def _tensor_refs(obj: Any) -> Iterator[_TensorRef]:
    """Every `_TensorRef` reachable from `obj` (each object visited once)."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, _TensorRef):
            yield o
        elif isinstance(o, dict):
            stack += list(o.values()) + list(getattr(o, "__dict__", {}).values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack += list(o)


def _entry_refs(top: Any, entry: str, path: Path) -> dict[str, _TensorRef]:
    sd = top[entry] if entry else top
    if not isinstance(sd, dict) or not all(isinstance(v, _TensorRef) for v in sd.values()):
        raise CheckpointError(
            f"{path}: entry {entry or '(top level)'!r} is not a plain state_dict of tensors")
    return {str(k): v for k, v in sd.items()}


def _dtype_of(type_name: str) -> torch.dtype:
    with warnings.catch_warnings():  # the typed storage classes warn that they are deprecated
        warnings.simplefilter("ignore")
        dtype = getattr(getattr(torch, type_name, None), "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown storage type torch.{type_name}")
    return dtype


def _itemsize(type_name: str) -> int:
    return torch.empty((), dtype=_dtype_of(type_name)).element_size()


def _patched_bytes(raw: bytes, ref: _TensorRef, value: torch.Tensor) -> bytes:
    """The storage `raw` with the elements of `ref` set to `value` (cast to the storage's dtype)."""
    buf = bytearray(raw)
    dtype = _dtype_of(ref.storage.type_name)
    flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty((0,), dtype=dtype)
    last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride, strict=True))
    if math.prod(ref.size) != value.numel() or min(ref.size, default=1) < 1 or last >= flat.numel():
        raise CheckpointError(f"a tensor of size {list(ref.size)} does not lie where the pickle says it does")
    view = torch.as_strided(flat, ref.size, ref.stride, ref.offset)
    view.copy_(value.detach().to("cpu", dtype).reshape(ref.size))
    return bytes(buf)


def _check_unshared(refs: list[_TensorRef], targets: dict[str, _TensorRef], path: Path) -> None:
    keys = {r.storage.key for r in targets.values()}
    counts: dict[str, int] = {}
    for r in refs:
        if r.storage.key in keys:
            counts[r.storage.key] = counts.get(r.storage.key, 0) + 1
    for name, r in targets.items():
        if counts.get(r.storage.key, 0) > 1:
            raise ArtifactError(
                f"{path}: tensor {name} shares its storage with other tensors of the file, "
                "so it cannot be changed alone; "
                "re-save the checkpoint with torch.save after `.clone()` of each tensor"
            )


# ------------------------------------------------------------------------------------------------ zip


def _cd_offsets(f: BinaryIO, size: int) -> dict[str, int]:
    """Offset of each central-directory record of the zip `f`, by file name."""
    tail_len = min(size, 65_557)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0:
        raise CheckpointError("the zip file has no end-of-central-directory record")
    count, cd_off = struct.unpack("<H4xI", tail[at + 10 : at + 20])
    if cd_off == 0xFFFFFFFF or count == 0xFFFF:  # zip64: the locator sits just before the record
        loc = tail[at - 20 : at]
        if loc[:4] != b"PK\x06\x07":
            raise CheckpointError("the zip64 file has no zip64 end-of-central-directory locator")
        (rec,) = struct.unpack("<Q", loc[8:16])
        f.seek(rec)
        rec_bytes = f.read(56)
        if rec_bytes[:4] != b"PK\x06\x06":
            raise CheckpointError("the zip64 end-of-central-directory record is not where its locator says")
        count, cd_off = struct.unpack("<Q8xQ", rec_bytes[32:56])
    out: dict[str, int] = {}
    pos = cd_off
    for _ in range(count):
        f.seek(pos)
        head = f.read(46)
        if head[:4] != b"PK\x01\x02":
            raise CheckpointError("the zip central directory is damaged")
        n, m, k = struct.unpack("<HHH", head[28:34])
        out[f.read(n).decode("utf-8", "replace")] = pos
        pos += 46 + n + m + k
    return out


def _set_crc(f: BinaryIO, at: int, old: int, new: int, what: str) -> None:
    f.seek(at)
    (found,) = struct.unpack("<I", f.read(4))
    if found != old:
        raise CheckpointError(f"the {what} CRC-32 of the zip does not match its central directory")
    f.seek(at)
    f.write(struct.pack("<I", new))


def _patch_zip(path: Path, entry: str, values: dict[str, torch.Tensor]) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkl = sorted(n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1)[0]
        prefix = pkl[: -len("data.pkl")]
        top = _locate(io.BytesIO(zf.read(pkl)), path)
    refs = _entry_refs(top, entry, path)
    targets = {k: refs[k] for k in values}
    _check_unshared(list(_tensor_refs(top)), targets, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        cd = _cd_offsets(f, size)
        for name, ref in targets.items():
            info = infos.get(f"{prefix}data/{ref.storage.key}")
            if info is None or info.filename not in cd:
                raise CheckpointError(f"{path}: the data of {name} is missing from the archive")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ArtifactError(
                    f"{path}: the data of {name} is compressed in the archive (torch.save stores it plain); "
                    "re-save the checkpoint with torch.save"
                )
            f.seek(info.header_offset)
            local = f.read(30)
            n, m = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + n + m
            f.seek(start)
            new = _patched_bytes(f.read(info.file_size), ref, values[name])
            crc = zlib.crc32(new)
            f.seek(start)
            f.write(new)
            _set_crc(f, cd[info.filename] + 16, info.CRC, crc, "central")
            if struct.unpack("<I", local[14:18])[0] == info.CRC:
                _set_crc(f, info.header_offset + 14, info.CRC, crc, "local")
            if info.flag_bits & 0x08:  # the CRC also follows the data, in a data descriptor
                f.seek(start + info.compress_size)
                sig = f.read(4)
                _set_crc(f, start + info.compress_size + (4 if sig == b"PK\x07\x08" else 0), info.CRC, crc,
                         "data descriptor")


# ------------------------------------------------------------------------------------------------ legacy


def _patch_legacy(path: Path, entry: str, values: dict[str, torch.Tensor]) -> None:
    with open(path, "r+b") as f:
        for _ in range(3):  # magic number, protocol version, sys_info
            _locate(f, path)
        top = _locate(f, path)
        keys = _locate(f, path)
        refs = _entry_refs(top, entry, path)
        targets = {k: refs[k] for k in values}
        every = list(_tensor_refs(top))
        _check_unshared(every, targets, path)
        storages = {r.storage.key: r.storage for r in every}
        by_storage = {r.storage.key: name for name, r in targets.items()}
        pos = f.tell()
        for key in keys:
            st = storages[str(key)]
            nbytes = st.numel * _itemsize(st.type_name)
            name = by_storage.get(st.key)
            if name is not None:
                f.seek(pos + 8)
                new = _patched_bytes(f.read(nbytes), targets[name], values[name])
                f.seek(pos + 8)
                f.write(new)
            pos += 8 + nbytes


# ------------------------------------------------------------------------------------------------ safetensors


def _rewrite_safetensors(path: Path, prefix: str, values: dict[str, torch.Tensor]) -> None:
    from slab_deploy._deps import require

    st = require("safetensors.torch", "writing .safetensors checkpoints")
    with require("safetensors").safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in values.items():
        old = tensors[prefix + k]
        tensors[prefix + k] = v.detach().to("cpu", old.dtype).reshape(old.shape).contiguous()
    st.save_file(tensors, str(path), metadata=meta)


# ------------------------------------------------------------------------------------------------ the call


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))


def replace_tensors(src: str | Path, dst: str | Path, values: dict[str, torch.Tensor], *, ema: bool = False,
                    expect_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Write `dst`: the checkpoint `src` with the tensors `values` (keys as `read_checkpoint(src,
    ema=ema)` names them) set to new values, each cast to its dtype in the file; everything else as
    it was. `dst` is normally a temporary path (see `utils.atomic_write`). `expect_sha256`, the
    hash of the file a model was loaded from, guards against `src` changing in between. Returns the
    new tensors as the file now holds them (in its dtypes). Raises ArtifactError when the result read
    back differs from what was asked for in any tensor."""
    src, dst = Path(src), Path(dst)
    shutil.copyfile(src, dst)
    before, info = read_checkpoint(dst, ema=ema)  # every check of the reader, on the bytes patched below
    if expect_sha256 is not None and info.sha256 != expect_sha256:
        raise ArtifactError(f"{src} changed while it was being used (sha256 differs); run the command again")
    unknown = sorted(set(values) - set(before))
    if unknown:
        raise ArtifactError(f"{src} has no tensor {unknown[0]}")
    for k, v in values.items():
        if tuple(v.shape) != tuple(before[k].shape):
            raise ArtifactError(
                f"{k}: new value is {list(v.shape)}, the file's tensor {list(before[k].shape)}")
    file_values = {info.stripped_prefix + k: v for k, v in values.items()}
    fmt = info.format.split(" ")[0]
    others = [not ema] if info.has_ema or ema else []  # the other state of a training file (EMA or model)
    other_before = [read_checkpoint(dst, ema=e)[0] for e in others]
    if fmt == "torch-zip":
        _patch_zip(dst, info.entry, file_values)
    elif fmt == "torch-legacy":
        _patch_legacy(dst, info.entry, file_values)
    elif fmt == "safetensors":
        _rewrite_safetensors(dst, info.stripped_prefix, values)
    else:  # pragma: no cover - read_checkpoint knows no other format
        raise ArtifactError(f"{src}: cannot write a {info.format} checkpoint")
    after, info_after = read_checkpoint(dst, ema=ema)
    want = {k: (values[k].detach().to("cpu", v.dtype).reshape(v.shape) if k in values else v)
            for k, v in before.items()}
    wrong = _same(want, after) + [k for e, ob in zip(others, other_before, strict=True)
                                  for k in _same(ob, read_checkpoint(dst, ema=e)[0])]
    if wrong or info_after.top_level_keys != info.top_level_keys:
        raise ArtifactError(
            f"writing {dst.name} changed more (or less) than asked: "
            f"{', '.join(wrong[:3]) or 'its top-level entries'}; "
            "nothing was written"
        )
    return {k: after[k] for k in values}
