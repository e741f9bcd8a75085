"""Fuzz the checkpoint reader: damaged and hostile variants of real torch.save files must end in a
CheckpointError or a clean read: no other exception, no code run, no file written, bounded memory.

Bounded in time: a few hundred examples per test, no deadline per example, no example database.
"""

from __future__ import annotations

import io
import os
import resource
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slab_deploy.errors import CheckpointError
from slab_deploy.models.checkpoint import read_checkpoint
from slab_deploy.weights import authors_config

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Globals a hostile pickle might name; inserted as GLOBAL opcodes at random places.
_DANGEROUS = [b"cos\nsystem\n", b"cposix\nsystem\n", b"c__builtin__\neval\n", b"cbuiltins\nexec\n",
              b"csubprocess\nPopen\n", b"ctorch\nload\n", b"c__builtin__\ngetattr\n",
              b"cbuiltins\n__import__\n", b"ccopy_reg\n_reconstructor\n", b"c__builtin__\nset\n",
              b"ctorch._utils\n_rebuild_tensor_v2\n"]


def _payload() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
          "n.iter": torch.tensor(0), "n.total_step": torch.tensor(60000), "h": torch.arange(6).view(2, 3).t()}
    return {"model": sd, "config": authors_config("test_slab_deit"), "epoch": 3, "max_accuracy": 0.5,
            "optimizer": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4)}},
                          "param_groups": [{"params": [0]}]}}


@pytest.fixture(scope="module")
def originals() -> dict[str, bytes]:
    out = {}
    for name, kw in {"zip": {}, "zip4": {"pickle_protocol": 4},
                     "legacy": {"_use_new_zipfile_serialization": False}}.items():
        buf = io.BytesIO()
        torch.save(_payload(), buf, **kw)  # type: ignore[arg-type]
        out[name] = buf.getvalue()
    with tempfile.TemporaryDirectory() as d:  # first reads import the reader's own lazy modules
        for name, data in out.items():
            (Path(d) / name).write_bytes(data)
            read_checkpoint(Path(d) / name)
    return out


@st.composite
def _mutations(draw: st.DrawFn, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "global", "int"]))
        pos = draw(st.integers(0, max(len(b) - 1, 0)))
        if kind == "flip" and b:
            b[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del b[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "global":
            b[pos:pos] = draw(st.sampled_from(_DANGEROUS))
        elif kind == "int":  # a large LONG/BININT where a size or offset may be
            b[pos:pos] = draw(st.sampled_from([b"J\xff\xff\xff\x7f", b"J\xff\xff\xff\xff",
                                               b"\x8a\x08" + b"\xff" * 7 + b"\x7f"]))
    return bytes(b)


def _rezip(original: bytes, pkl: bytes) -> bytes:
    """The zip with its data.pkl replaced (valid CRCs, so the pickle itself is what is fuzzed)."""
    src = zipfile.ZipFile(io.BytesIO(original))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info, pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def _main_pickle(original: bytes) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(original))
    return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


@pytest.fixture
def guarded(monkeypatch) -> Iterator[list[str]]:  # type: ignore[no-untyped-def]
    """Records any call of the functions a hostile pickle would reach for."""
    calls: list[str] = []
    import subprocess

    # builtins.eval/exec stay as they are: hypothesis itself uses them (the reader resolves no
    # builtin but inert constructors; _check also asserts that a read imports no module).
    for mod, name in [(os, "system"), (os, "execv"), (subprocess, "Popen"), (torch, "load")]:
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: calls.append(_n))
    yield calls


def _check(data: bytes, tmp: Path, calls: list[str]) -> None:
    p = tmp / "f.pth"
    p.write_bytes(data)
    before = sorted(os.listdir(tmp))
    modules = set(sys.modules)
    try:
        read_checkpoint(p)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    # a pickle that imported something would show here (zipfile may load a codec for file names)
    assert {m for m in set(sys.modules) - modules if not m.startswith("encodings.")} == set()
    assert sorted(os.listdir(tmp)) == before
    assert calls == []


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.parametrize("which", ["zip", "zip4"])
def test_fuzz_the_pickle_inside_a_valid_zip(  # type: ignore[no-untyped-def]
        originals, guarded, which: str) -> None:
    original = originals[which]
    pkl = _main_pickle(original)
    rss = _rss_kib()

    with tempfile.TemporaryDirectory() as d:

        @FUZZ
        @given(_mutations(pkl))
        def run(mutated: bytes) -> None:
            _check(_rezip(original, mutated), Path(d), guarded)

        run()
    assert _rss_kib() - rss < 256 << 10


def test_fuzz_whole_files(originals, guarded) -> None:  # type: ignore[no-untyped-def]
    rss = _rss_kib()
    with tempfile.TemporaryDirectory() as d:

        @FUZZ
        @given(st.sampled_from(["zip", "legacy"]).flatmap(lambda k: _mutations(originals[k])))
        def run(mutated: bytes) -> None:
            _check(mutated, Path(d), guarded)

        run()
    assert _rss_kib() - rss < 256 << 10


def test_fuzz_the_legacy_pickle_region(originals, guarded) -> None:  # type: ignore[no-untyped-def]
    legacy = originals["legacy"]
    head = legacy[: len(legacy) - 200]  # the pickles; the raw storages are the last bytes
    with tempfile.TemporaryDirectory() as d:

        @FUZZ
        @given(_mutations(head))
        def run(mutated: bytes) -> None:
            _check(mutated + legacy[len(head) :], Path(d), guarded)

        run()


def test_the_unmutated_files_read(originals, tmp_path: Path) -> None:
    for name, data in originals.items():
        (tmp_path / name).write_bytes(data)
        sd, info = read_checkpoint(tmp_path / name)
        assert (torch.equal(sd["h"], torch.arange(6).view(2, 3).t())
                and info.opaque_objects == ["yacs.config.CfgNode"])
