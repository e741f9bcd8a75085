"""Read PyTorch checkpoint files without executing foreign code, within bounded memory.

The SLAB authors' training files carry a pickled `yacs.config.CfgNode` beside the tensors, so
`torch.load(weights_only=True)` refuses them, and a full unpickle would import yacs and could run
any code the file names. This module reads torch's two file formats itself (the zip format of
torch >= 1.6 and the legacy stream written with `_use_new_zipfile_serialization=False`) with one
restricted unpickler:

- globals are resolved through the same Python 2 -> 3 name mapping that `pickle` applies to
  protocols 0-2 (torch.save writes protocol 2, so `set` arrives as `__builtin__.set`), then
  looked up in an allow-list of inert callables; known data-only containers (yacs CfgNode,
  argparse/SimpleNamespace) become `OpaqueObject`s that run nothing; anything else is refused;
- every tensor rebuild is checked (a storage from this file, offset and strides >= 0, the view
  inside its storage, a sane element count) before any memory is touched;
- what is read is bounded by what the file declares: each storage must be exactly the size its
  persistent id declares, a compressed zip entry may not inflate beyond `MAX_RATIO` times its
  packed size, the pickle itself is capped, and legacy storages may not declare more bytes than
  the file holds. Reads go straight into the tensor's memory in chunks.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from slab_deploy.errors import CheckpointError

# Storage classes torch pickles by name; quantised ones are not weights a deploy tool reads.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()
    if not name.startswith("Q")
}

MAX_PICKLE_BYTES = 256 << 20  # the pickle of a training checkpoint is kilobytes; tensors live apart
MAX_RATIO = 20  # packed -> unpacked; torch.save stores entries uncompressed (ratio 1)
_RATIO_FREE_BYTES = 1 << 20  # small entries may compress as well as they like
MAX_DIMS = 64
_VIEW_SLACK = 1 << 24  # broadcast views (stride 0) may exceed their storage by this many elements
_CHUNK = 4 << 20

# Data-only containers seen in training checkpoints: rebuilt as inert objects.
_OPAQUE = {
    ("yacs.config", "CfgNode"),
    ("argparse", "Namespace"),
    ("types", "SimpleNamespace"),
}

_CONVERT = (
    "if you trust the file, re-save just its weights: "
    "python -c \"import torch; torch.save(torch.load('IN', weights_only=False)['model'], 'OUT.pth')\""
)


class OpaqueObject(dict):
    """Inert stand-in for a pickled config object; keeps its items and state, runs nothing."""

    origin = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<opaque {self.origin} with {len(self)} items>"


def _opaque_class(module: str, name: str) -> type:
    return type(name, (OpaqueObject,), {"origin": f"{module}.{name}", "__module__": "slab_deploy.opaque"})


class _Bad(ValueError):
    """A malformed structure inside the pickle; reported as a corrupt file."""


class _StorageType:
    """What `torch.FloatStorage` and friends resolve to: a marker carrying the dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Bad(f"the pickle calls torch.{self.name} directly")

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class SafeStorage:
    """A storage read from the file: its bytes and the dtype and element count it was declared with.

    Only `persistent_load` makes these, so a tensor rebuild can tell a real storage from any
    other argument the pickle passes."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, numel: int) -> None:
        self.untyped = untyped
        self.dtype = dtype
        self.numel = numel


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{what} is {type(v).__name__}, not an integer")
    return v


def _int_tuple(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list, torch.Size)) or len(v) > MAX_DIMS:
        raise _Bad(f"{what} is not a tuple of at most {MAX_DIMS} integers")
    out = tuple(_int(x, what) for x in v)
    if any(x < 0 for x in out):
        raise _Bad(f"{what} {list(out)} has a negative entry")
    return out


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """`torch._utils._rebuild_tensor_v2`, with every argument checked before memory is touched."""
    if not isinstance(storage, SafeStorage):
        raise _Bad(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage of this file")
    offset = _int(storage_offset, "a tensor's storage offset")
    if offset < 0:
        raise _Bad(f"a tensor has a negative storage offset ({offset})")
    shape = _int_tuple(size, "a tensor's size")
    strides = _int_tuple(stride, "a tensor's stride")
    if len(shape) != len(strides):
        raise _Bad(f"a tensor has size {list(shape)} but stride {list(strides)}")
    if backward_hooks not in (None, {}) or metadata not in (None, {}):
        raise _Bad("a tensor carries hooks or metadata; a state_dict tensor has none")
    numel = math.prod(shape)
    if numel > 0:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise _Bad(
                f"a tensor of size {list(shape)} at offset {offset} reaches element {last} of a storage "
                f"of {storage.numel}"
            )
        if numel > max(storage.numel, _VIEW_SLACK):
            raise _Bad(
                f"a tensor of size {list(shape)} claims {numel} elements from a storage of {storage.numel}")
    elif offset > storage.numel:
        raise _Bad(f"an empty tensor at offset {offset} lies past its storage of {storage.numel}")
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage.untyped, offset, shape, strides)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, *state: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise _Bad(f"a parameter is rebuilt from a {type(data).__name__}, not a tensor")
    return data  # a plain tensor is all a state_dict needs


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 writes every `bytes` object as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Bad("_codecs.encode is called with something other than (str, 'latin1')")
    return text.encode("latin1")


class _NumpyDtype:
    """A plain numpy number type named by the pickle; only `_numpy_scalar` uses it. Its state is
    numpy's dtype state, of which only the byte order is kept (numpy's own `__setstate__` is not
    handed untrusted input)."""

    __slots__ = ("spec", "order")

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.order = "<"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _Bad("a numpy dtype has a state that is not numpy's")
        self.order = "<" if state[1] in ("|", "=") else state[1]


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> _NumpyDtype:
    if not isinstance(spec, str) or not re.fullmatch(r"[biufc]\d{1,2}", spec):
        raise _Bad("a numpy dtype is not a plain number type")
    return _NumpyDtype(spec)


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | complex | bool:
    # numpy.float64(...) & co. as Python numbers: a checkpoint's accuracy needs nothing more.
    import numpy as np

    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise _Bad("a numpy scalar is not a plain number")
    np_dtype = np.dtype(dtype.spec).newbyteorder(">" if dtype.order == ">" else "<")
    if len(data) != np_dtype.itemsize:
        raise _Bad(f"a numpy {dtype.spec} scalar has {len(data)} bytes")
    return np.frombuffer(data, dtype=np_dtype)[0].item()  # type: ignore[no-any-return]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor, as protocols 0 and 1 write objects: only for the inert opaque classes.
    if not (isinstance(cls, type) and issubclass(cls, OpaqueObject)) or base not in (object, dict):
        raise _Bad("copyreg._reconstructor is asked to build something other than a config object")
    obj = cls.__new__(cls)
    if base is dict and state is not None:
        if not isinstance(state, dict):
            raise _Bad("a config object's items are not a dict")
        dict.update(obj, state)
    return obj


def _torch_dtype(name: str) -> torch.dtype | None:
    v = getattr(torch, name, None)
    return v if isinstance(v, torch.dtype) else None


def _no_setstate(state: Any) -> None:
    raise _Bad("the pickle tries to set a tensor's state")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
    ("builtins", "dict"): dict,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


def pickle_protocol(head: bytes) -> int:
    """The protocol a pickle starting with `head` was written with (0 when it has no PROTO opcode,
    which covers protocols 0 and 1: they share the Python 2 names)."""
    return head[1] if len(head) >= 2 and head[0] == 0x80 else 0


def _py3_name(module: str, name: str, protocol: int) -> tuple[str, str]:
    """The Python 3 name of a global, as `pickle.Unpickler.find_class` maps it (fix_imports=True)."""
    if protocol < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return module, name


StorageLoader = Callable[[str, torch.dtype, int, Any], SafeStorage]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor rebuilders, plain containers and inert configs.

    `protocol` is the one the stream was written with (see `pickle_protocol`); the C unpickler
    hands an overridden `find_class` the names as written, so the Python 2 mapping is applied
    here. `storages` loads a persistent id's bytes; None refuses tensors (for plain pickles)."""

    def __init__(self, file: BinaryIO, *, source: str, protocol: int, storages: StorageLoader | None) -> None:
        super().__init__(file)
        self._source = source
        self._protocol = protocol
        self._storages = storages
        self.opaque: list[str] = []
        self._tensors: list[torch.Tensor] = []

    def _rebuild(self, *args: Any) -> torch.Tensor:
        t = _rebuild_tensor_v2(*args)
        # A pickle may BUILD into any object it made; Tensor.__setstate__ would `set_` the tensor onto
        # another storage, unchecked (set_ grows a storage to fit). Block it until the load is done.
        t.__setstate__ = _no_setstate  # type: ignore[method-assign]
        self._tensors.append(t)
        return t

    def load(self) -> Any:
        try:
            return super().load()
        finally:
            for t in self._tensors:
                t.__dict__.pop("__setstate__", None)
            self._tensors.clear()

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Bad("a global is named by something other than strings")
        module, name = _py3_name(module, name, self._protocol)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and (dtype := _torch_dtype(name)) is not None:
            return dtype  # torch.float32 and friends pickle by name; dtypes are plain values
        if (module, name) in _OPAQUE:
            self.opaque.append(f"{module}.{name}")
            return _opaque_class(module, name)
        raise CheckpointError(
            f"{self._source} asks to call {module}.{name} when unpickled; refusing to execute code from a "
            f"checkpoint; {_CONVERT}"
        )

    def persistent_load(self, pid: Any) -> Any:
        if (self._storages is None or not isinstance(pid, tuple) or len(pid) not in (5, 6)
                or pid[0] != "storage"):
            raise _Bad(f"unknown persistent id (a {type(pid).__name__})")
        _, marker, key, location, numel = pid[:5]
        if not isinstance(marker, _StorageType):
            raise _Bad(f"unsupported storage type (a {type(marker).__name__})")
        if not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", key):
            raise _Bad("a storage key is not a plain name")
        if not isinstance(location, str):
            raise _Bad("a storage's location is not a string")
        numel = _int(numel, "a storage's element count")
        if numel < 0:
            raise _Bad(f"a storage declares {numel} elements")
        return self._storages(key, marker.dtype, numel, pid[5] if len(pid) == 6 else None)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_into(f: BinaryIO, nbytes: int) -> torch.UntypedStorage | None:
    """Read exactly `nbytes` from `f` into a new storage, in chunks (no second copy); None if short."""
    buf = torch.empty((nbytes,), dtype=torch.uint8)
    view = buf.numpy().data if nbytes else memoryview(bytearray())
    done = 0
    while done < nbytes:
        chunk = f.read(min(_CHUNK, nbytes - done))
        if not chunk:
            return None
        view[done : done + len(chunk)] = chunk
        done += len(chunk)
    return buf.untyped_storage()


_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def scan_pickle(f: BinaryIO, path: Path | str) -> None:
    """Walk one pickle's opcodes (up to STOP) before it is unpickled, and refuse memo indices beyond
    the opcodes seen so far: CPython's C unpickler sizes its memo table by the largest index, so a
    four-byte `LONG_BINPUT 0xffffffff` alone would ask for 32 GiB. An honest pickler numbers its
    memo entries from 0 upwards. Malformed opcodes are reported as a corrupt file."""
    import pickletools
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. a bad escape in a protocol-0 string: not an honest pickle
            for n, (op, arg, _pos) in enumerate(pickletools.genops(f)):
                if op.name in _PUTS and (not isinstance(arg, int) or arg > n):
                    raise CheckpointError(
                        f"{path} is truncated or corrupt "
                        f"(its pickle stores memo entry {arg} after {n} opcodes); "
                        "download it again and compare its sha256"
                    )
    except CheckpointError:
        raise
    except (ValueError, EOFError, OverflowError, UnicodeDecodeError, struct.error, Warning) as exc:
        raise _corrupt(path, f"{exc.__class__.__name__}: {str(exc)[:120]}") from None


def _corrupt(path: Path | str, why: object) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated or corrupt ({why}); download it again and compare its sha256")


def _unpickle(unpickler: RestrictedUnpickler, path: Path | str) -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise _corrupt(path, "the pickle nests too deeply") from None
    except MemoryError:
        raise _corrupt(path, "the pickle asks for more memory than it holds") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        RuntimeError,
        UnicodeDecodeError,
        zipfile.BadZipFile,
        OSError,
        struct.error,
    ) as exc:
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise _corrupt(path, f"{exc.__class__.__name__}: {msg}" if msg else exc.__class__.__name__) from None


# ------------------------------------------------------------------------------------------------ zip


def _entry_bound(path: Path, info: zipfile.ZipInfo, what: str) -> None:
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise _corrupt(
            path, f"{what} is stored with {info.compress_size} bytes but declares {info.file_size}")
    if info.file_size > _RATIO_FREE_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise CheckpointError(
            f"{path}: {what} would inflate {info.compress_size} bytes to {info.file_size} "
            f"(more than {MAX_RATIO}x); no torch checkpoint compresses like that, refusing to unpack it"
        )


def load_zip_checkpoint(path: Path) -> tuple[Any, list[str]]:
    """Unpickle torch's zip checkpoint at `path` safely. Returns (object, opaque class names)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise _corrupt(path, exc) from None
    with zf:
        try:
            infos = {i.filename: i for i in zf.infolist()}
        except (zipfile.BadZipFile, ValueError) as exc:
            raise _corrupt(path, exc) from None
        pkl = sorted(n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1)
        if not pkl:
            raise CheckpointError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl inside)")
        prefix = pkl[0][: -len("data.pkl")]
        pinfo = infos[pkl[0]]
        if pinfo.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"{path}: its pickle declares {pinfo.file_size} bytes "
                f"(more than {MAX_PICKLE_BYTES >> 20} MiB); "
                "a checkpoint keeps its tensors outside the pickle, so this is not one slab-deploy reads"
            )
        _entry_bound(path, pinfo, "data.pkl")
        storages: dict[str, SafeStorage] = {}

        def load_storage(key: str, dtype: torch.dtype, numel: int, _view: Any) -> SafeStorage:
            nbytes = numel * _itemsize(dtype)
            if key in storages:
                got = storages[key]
                if got.untyped.nbytes() != nbytes:
                    raise _Bad(f"storage {key} is declared with two sizes")
                return SafeStorage(got.untyped, dtype, numel)
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise _Bad(f"no data for storage {key}")
            if info.file_size != nbytes:
                raise _corrupt(path, f"tensor data {key} has {info.file_size} bytes, expected {nbytes}")
            _entry_bound(path, info, f"tensor data {key}")
            with zf.open(info) as f:
                untyped = _read_into(f, nbytes)  # type: ignore[arg-type]
            if untyped is None:
                raise _corrupt(path, f"tensor data {key} ends early")
            storages[key] = SafeStorage(untyped, dtype, numel)
            return storages[key]

        try:
            with zf.open(pinfo) as f:
                data = f.read(MAX_PICKLE_BYTES + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise _corrupt(path, exc) from None
        scan_pickle(io.BytesIO(data), path)
        unpickler = RestrictedUnpickler(
            io.BytesIO(data), source=str(path), protocol=pickle_protocol(data[:2]), storages=load_storage
        )
        obj = _unpickle(unpickler, path)
        return obj, unpickler.opaque


# ------------------------------------------------------------------------------------------------ legacy

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class _BoundedFile:
    """A read-only file that never asks the OS for more than the bytes left: a pickle opcode may
    declare a length of 2**63, and `read(n)` on a real file allocates n bytes before reading."""

    def __init__(self, f: Any, size: int) -> None:
        self._f = f
        self._size = size

    def _left(self) -> int:
        return max(self._size - self._f.tell(), 0)

    def read(self, n: int | None = -1) -> bytes:
        left = self._left()
        return self._f.read(left if n is None or n < 0 else min(n, left))  # type: ignore[no-any-return]

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        return self._f.readinto(view[: self._left()])  # type: ignore[no-any-return]

    def readline(self, limit: int = -1) -> bytes:
        left = self._left()
        return self._f.readline(left if limit < 0 else min(limit, left))  # type: ignore[no-any-return]

    def peek(self, n: int = 1) -> bytes:
        return self._f.peek(n)[: self._left()]  # type: ignore[no-any-return]

    def tell(self) -> int:
        return self._f.tell()  # type: ignore[no-any-return]

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)  # type: ignore[no-any-return]


def is_legacy_head(head: bytes) -> bool:
    """Whether `head` starts the legacy (non-zip) torch format: its first pickle is the magic number."""
    return head[:1] == b"\x80" or head.startswith(b"L119547037146038801333356")


def load_legacy_checkpoint(path: Path) -> tuple[Any, list[str]]:
    """Read a checkpoint written with `torch.save(..., _use_new_zipfile_serialization=False)`.

    The stream is: magic number, protocol version, sys_info, the main pickle (persistent ids
    ('storage', type, key, location, numel, view_metadata)), a pickle of the storage keys, then
    each storage as an 8-byte little-endian element count and its bytes. All of it goes through
    the restricted unpickler; the storages declared may not add up to more than the file holds."""
    size = path.stat().st_size
    src = str(path)
    storages: dict[str, SafeStorage] = {}
    declared = 0

    def load_storage(key: str, dtype: torch.dtype, numel: int, view: Any) -> SafeStorage:
        nonlocal declared
        if view is not None:
            raise CheckpointError(
                f"{path} uses storage views (written by torch < 1.0); load it with that torch and re-save it "
                f"with a current one; {_CONVERT}"
            )
        nbytes = numel * _itemsize(dtype)
        if key in storages:
            if storages[key].untyped.nbytes() != nbytes:
                raise _Bad(f"storage {key} is declared with two sizes")
            return SafeStorage(storages[key].untyped, dtype, numel)
        declared += nbytes + 8
        if declared > size:
            raise _corrupt(path, f"its tensors declare {declared} bytes but the file has {size}")
        storages[key] = SafeStorage(torch.UntypedStorage(nbytes), dtype, numel)
        return storages[key]

    with open(path, "rb") as raw_file:
        f: Any = _BoundedFile(raw_file, size)

        def scanned() -> bytes:
            start = f.tell()
            scan_pickle(f, path)
            f.seek(start)
            return f.peek(2)[:2]

        def plain() -> Any:
            head = scanned()
            return _unpickle(
                RestrictedUnpickler(f, source=src, protocol=pickle_protocol(head), storages=None), path)

        magic = plain()
        if isinstance(magic, bool) or magic != LEGACY_MAGIC:
            raise CheckpointError(
                f"{path} is a pickle but not a torch checkpoint (no torch magic number); "
                "pass a file saved by torch.save or safetensors"
            )
        version = plain()
        if isinstance(version, bool) or version != LEGACY_PROTOCOL:
            raise CheckpointError(
                f"{path} is a legacy torch file of an unknown protocol (not {LEGACY_PROTOCOL})")
        sys_info = plain()
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise CheckpointError(
                f"{path} was saved on a big-endian machine or without sys_info; "
                "re-save it on a little-endian one"
            )
        unpickler = RestrictedUnpickler(f, source=src, protocol=pickle_protocol(scanned()),
                                        storages=load_storage)
        obj = _unpickle(unpickler, path)
        keys = plain()
        if (not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages)
                or len(keys) != len(storages)):
            raise _corrupt(path, "its list of storages does not match the tensors in it")
        for key in keys:
            st = storages[key]
            raw = f.read(8)
            if len(raw) != 8:
                raise _corrupt(path, f"tensor data {key} is missing")
            (count,) = struct.unpack("<q", raw)
            nbytes = st.untyped.nbytes()
            if count * _itemsize(st.dtype) != nbytes:
                raise _corrupt(path, f"tensor data {key} has {count} elements, expected {st.numel}")
            if nbytes:
                got = f.readinto(torch.empty((0,), dtype=torch.uint8).set_(st.untyped).numpy().data)
                if got != nbytes:
                    raise _corrupt(path, f"tensor data {key} ends early")
        if f.read(1):
            raise _corrupt(path, "it has bytes after its last tensor")
    return obj, unpickler.opaque


def is_tar_head(path: Path) -> bool:
    """torch < 0.4 wrote tar archives (with 'storages', 'tensors' and 'pickle' members)."""
    try:
        with open(path, "rb") as f:
            f.seek(257)
            return f.read(5) == b"ustar"
    except OSError:
        return False


