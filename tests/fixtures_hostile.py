"""Hostile checkpoint files for the reader's bounds tests: built with the zip and pickle modules,
since no honest producer writes them. Each one declares what a torch checkpoint declares
(persistent ids, `_rebuild_tensor_v2` calls) and lies about sizes, offsets or compression."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch


class StorageRef:
    """Pickled as the persistent id ('storage', <torch storage class>, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int, storage_type: Any = torch.FloatStorage) -> None:
        self.pid = ("storage", storage_type, key, "cpu", numel)


class TensorCall:
    """Pickled as torch._utils._rebuild_tensor_v2(*args)."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


def tensor(ref: Any, offset: Any, size: Any, stride: Any) -> TensorCall:
    return TensorCall(ref, offset, size, stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, StorageRef) else None


def pickle_bytes(obj: Any, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_zip(path: Path, obj: Any, storages: dict[str, bytes], *, deflate: tuple[str, ...] = (),
              pkl: bytes | None = None) -> Path:
    """A torch-zip layout (`archive/data.pkl`, `archive/data/<key>`); entries named in `deflate`
    compressed."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes(obj) if pkl is None else pkl,
                   compress_type=zipfile.ZIP_DEFLATED if "data.pkl" in deflate else zipfile.ZIP_STORED)
        z.writestr("archive/version", "3\n")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw,
                       compress_type=zipfile.ZIP_DEFLATED if key in deflate else zipfile.ZIP_STORED)
    return path


def zip_bomb(path: Path, nbytes: int, *, entry: str = "0") -> Path:
    """A torch zip whose storage entry `entry` is `nbytes` of deflated zeros (about nbytes/1000 on
    disk) and whose pickle declares exactly that storage: only the inflation ratio gives it away."""
    ref = StorageRef("0", nbytes // 4)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes({"w": tensor(ref, 0, (nbytes // 4,), (1,))}))
        z.writestr("archive/version", "3\n")
        info = zipfile.ZipInfo(f"archive/data/{entry}")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
            f.write(bytes(nbytes % len(chunk)))
    return path
