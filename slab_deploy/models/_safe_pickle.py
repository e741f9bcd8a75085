"""Read PyTorch checkpoint files without executing foreign code.

The SLAB authors' training files carry a pickled `yacs.config.CfgNode` beside the tensors, so
`torch.load(weights_only=True)` refuses them, and a full unpickle would import yacs and could run
any code the file names. This module reads torch's zip format itself with a restricted unpickler:
tensors are rebuilt, known data-only containers (yacs CfgNode, argparse/SimpleNamespace) become
inert `OpaqueObject`s that run nothing, and any other global the pickle names is refused.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from slab_deploy.errors import CheckpointError

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}

# Data-only containers seen in training checkpoints: rebuilt as inert objects.
_OPAQUE = {
    ("yacs.config", "CfgNode"),
    ("argparse", "Namespace"),
    ("types", "SimpleNamespace"),
}


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


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any, *state: Any) -> torch.Tensor:
    return data  # a plain tensor is all a state_dict needs


def _rebuild_numpy_scalar(dtype: Any, data: bytes) -> Any:
    import numpy as np

    return np.frombuffer(data, dtype=dtype)[0]


class _StorageMarker:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor rebuilders, plain containers and inert configs."""

    def __init__(self, data: io.BytesIO, zf: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(data)
        self._zf = zf
        self._prefix = prefix
        self._source = source
        self._storages: dict[str, torch.UntypedStorage] = {}
        self.opaque: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageMarker(_STORAGE_DTYPES[name])
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return torch._utils._rebuild_tensor_v2
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch", "Size"):
            return torch.Size
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}[name]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _rebuild_numpy_scalar
        if module == "numpy" and name == "dtype":
            import numpy as np

            return np.dtype
        if (module, name) in _OPAQUE:
            self.opaque.append(f"{module}.{name}")
            return _opaque_class(module, name)
        raise CheckpointError(
            f"{self._source} asks to call {module}.{name} when unpickled; refusing to execute code from a "
            "checkpoint. If you trust the file, re-save just its tensors: "
            "torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth')"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"{self._source}: unknown persistent id {pid!r}; not a torch checkpoint")
        _, marker, key, _location, numel = pid
        dtype = marker.dtype if isinstance(marker, _StorageMarker) else None
        if dtype is None:
            raise CheckpointError(f"{self._source}: unsupported storage type {marker!r}")
        if key not in self._storages:
            raw = self._zf.read(f"{self._prefix}data/{key}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise CheckpointError(
                    f"{self._source} is truncated or corrupt (tensor data {key} has {len(raw)} bytes, "
                    f"expected {numel * itemsize}); download it again and compare its sha256"
                )
            self._storages[key] = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=self._storages[key], dtype=dtype, _internal=True)


def load_zip_checkpoint(path: Path) -> tuple[Any, list[str]]:
    """Unpickle torch's zip checkpoint at `path` safely. Returns (object, opaque class names)."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({exc}); download it again and compare its sha256"
        ) from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl inside)")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            data = zf.read(pkl[0])
            unpickler = RestrictedUnpickler(io.BytesIO(data), zf, prefix, str(path))
            obj = unpickler.load()
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError, OSError) as exc:
            raise CheckpointError(
                f"{path} is truncated or corrupt ({exc.__class__.__name__}: {exc}); download it again"
            ) from None
        return obj, unpickler.opaque
