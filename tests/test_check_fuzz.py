"""Fuzzing the readers of untrusted files behind `check` (manifest.json, --replay io.npz).

Whatever the bytes: an ArtifactError with one line or a validated result, never another exception,
never code run from the file, never a file written, and bounded memory. Bounded in time:
a fixed number of examples per test, no deadline per example.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slab_deploy.check import MAX_INPUTS, check_graph, read_manifest, read_replay
from slab_deploy.choices import EXPORT_PRECISIONS
from slab_deploy.errors import ArtifactError
from slab_deploy.export.api import export_model
from slab_deploy.weights import random_checkpoint

NAME = "test_slab_deit"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
MEMORY_BOUND = 64 << 20  # Python-level peak over a whole fuzz run


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    export_model(NAME, random_checkpoint(NAME, d / "c.pth", seed=1), d / "art")
    return d / "art"


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_size) for p in root.rglob("*"))


@contextmanager
def _bounded_memory() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak {peak >> 20} MiB"


# ------------------------------------------------------------------------------ manifest.json

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_names = st.sampled_from([
    "model.onnx", "model.unsimplified.onnx", "../outside.onnx", "/etc/hostname", "a/../../outside.onnx",
    "sub/../model.onnx", "", ".", "..", "link.onnx", "missing.onnx", "model.onnx\x00", "\\model.onnx",
    "manifest.json", "./model.onnx",
]) | st.text(max_size=30) | _json
_manifests = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from([NAME, "test_slab_pvt", ""]) | _json,
    "onnx": _names,
    "unsimplified_onnx": _names,
    "precision": st.fixed_dictionaries(
        {}, optional={"mode": st.sampled_from(["fp32", "fp16", "int8"]) | _json}) | _json,
    "status": _json,
})


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


def _manifest_world(export_dir: Path, manifest: bytes, check: bool = True) -> None:
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        art = root / "art"
        art.mkdir()
        for f in ("model.onnx", "model.unsimplified.onnx"):
            os.link(export_dir / f, art / f) if hasattr(os, "link") else shutil.copy(export_dir / f, art / f)
        shutil.copy(export_dir / "model.onnx", root / "outside.onnx")
        (art / "link.onnx").symlink_to(root / "outside.onnx")
        (art / "sub").mkdir()
        (art / "manifest.json").write_bytes(manifest)
        before = _listing(root)
        try:
            man = read_manifest(art)
        except ArtifactError as exc:
            assert len(str(exc).splitlines()) == 1
        else:
            assert isinstance(man.model, str) and man.model and man.precision in EXPORT_PRECISIONS
            for p in (man.deployed, man.unsimplified):
                assert p is None or p.resolve().is_relative_to(art.resolve()), p
            if check:
                for p in (man.deployed, man.unsimplified):
                    if p is None:
                        continue
                    try:
                        check_graph(p, man, (3, 32, 32), 1000)
                    except ArtifactError as exc:
                        assert len(str(exc).splitlines()) == 1
        assert _listing(root) == before, "the reader wrote or removed a file"


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_structure(export_dir: Path, data: st.DataObject) -> None:
    m = data.draw(_manifests | _json)
    with _bounded_memory():
        _manifest_world(export_dir, json.dumps(m).encode())


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, 4000), raw=st.none() | st.binary(max_size=2000))
def test_fuzz_manifest_bytes(export_dir: Path, edits: list[tuple[int, int]], cut: int | None,
                             raw: bytes | None) -> None:
    real = (export_dir / "manifest.json").read_bytes()
    with _bounded_memory():
        _manifest_world(export_dir, raw if raw is not None else _mutate(real, edits, cut), check=False)


# ------------------------------------------------------------------------------ --replay io.npz


def _real_npz() -> bytes:
    """An io.npz as `check --report` writes it: np.savez_compressed of the inputs and outputs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, inputs=x, reference=rng.normal(size=(2, 1000)).astype(np.float32),
                        ort_cpu_fp32=rng.normal(size=(2, 1000)).astype(np.float32))
    return buf.getvalue()


_REAL_NPZ = _real_npz()


def _replay_world(payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        path = root / "io.npz"
        path.write_bytes(payload)
        before = _listing(root)
        try:
            x = read_replay(path)
        except ArtifactError as exc:
            assert len(str(exc).splitlines()) == 1
        else:
            assert x.dtype == np.float32 and x.ndim == 4 and 1 <= x.shape[0] <= MAX_INPUTS
            assert x.flags.c_contiguous and bool(np.isfinite(x).all())
        assert _listing(root) == before, "the reader wrote or removed a file"


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.integers(0, len(_REAL_NPZ)), raw=st.none() | st.binary(max_size=4000))
def test_fuzz_replay_bytes(edits: list[tuple[int, int]], cut: int | None, raw: bytes | None) -> None:
    with _bounded_memory():
        _replay_world(raw if raw is not None else _mutate(_REAL_NPZ, edits, cut))


_dtypes = (hnp.floating_dtypes() | hnp.integer_dtypes() | hnp.complex_number_dtypes() | hnp.boolean_dtypes()
           | hnp.unicode_string_dtypes(max_len=3) | hnp.byte_string_dtypes(max_len=3)
           | hnp.datetime64_dtypes())


@FUZZ
@given(arr=hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)),
       key=st.sampled_from(["inputs", "inputs", "x"]), compressed=st.booleans(), fortran=st.booleans())
def test_fuzz_replay_arrays(arr: np.ndarray, key: str, compressed: bool, fortran: bool) -> None:
    """Arrays of every dtype and shape, written by numpy's own savez."""
    buf = io.BytesIO()
    a = np.asfortranarray(arr) if fortran else arr
    (np.savez_compressed if compressed else np.savez)(buf, **{key: a})
    with _bounded_memory():
        _replay_world(buf.getvalue())


@FUZZ
@given(shape=st.lists(st.integers(-2, 1 << 40), min_size=0, max_size=5),
       descr=st.sampled_from(["<f4", ">f8", "<f2", "|O", "<i4", "V8"]), extra=st.integers(0, 256))
def test_fuzz_replay_headers(shape: list[int], descr: str, extra: int) -> None:
    """.npy headers that lie about the shape: no allocation beyond the bytes that are there."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, z.open("inputs.npy", "w") as f:
        header = io.BytesIO()
        try:
            np.lib.format.write_array_header_1_0(
                header, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
        except ValueError:
            header = io.BytesIO(b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n")
        f.write(header.getvalue() + b"\0" * extra)
    with _bounded_memory():
        _replay_world(buf.getvalue())
