"""Bad input costs nothing: hostile and broken checkpoints give one line, exit 1, nothing written,
and bounded memory. The hostile files come from tests/fixtures_hostile.py (no honest producer
writes them)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from fixtures_hostile import StorageRef, TensorCall, pickle_bytes, tensor, write_zip, zip_bomb
from helpers import run_cli

from slab_deploy.errors import CheckpointError
from slab_deploy.models import build_model, create_model
from slab_deploy.models._safe_pickle import MAX_PICKLE_BYTES
from slab_deploy.models.checkpoint import read_checkpoint
from slab_deploy.weights import random_checkpoint, randomize_weights

SLAB = "test_slab_swin"
ROOT = Path(__file__).resolve().parent.parent
FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)  # one storage of 4 float32


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ zip bombs


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.pth", 128 << 20)
    assert bomb.stat().st_size < 1 << 20
    code = textwrap.dedent(
        f"""
        import resource, sys
        from slab_deploy.errors import CheckpointError
        from slab_deploy.models.checkpoint import read_checkpoint
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_checkpoint({str(bomb)!r})
        except CheckpointError as exc:
            print("refused:", exc)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("grew_kib", after - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "inflate" in out.stdout and "more than 20x" in out.stdout
    grew = int(out.stdout.split("grew_kib")[1])
    assert grew < 32 << 10, f"reading a 128 MiB bomb grew the process by {grew} KiB"


def test_pickle_entry_bounds(tmp_path: Path) -> None:
    # a data.pkl that declares more than any checkpoint's pickle needs
    big = write_zip(tmp_path / "big.pth", None, {}, pkl=pickle_bytes(b"\x00" * (MAX_PICKLE_BYTES + 16)),
                    deflate=("data.pkl",))
    with pytest.raises(CheckpointError, match="its pickle declares"):
        read_checkpoint(big)
    # a data.pkl that inflates more than an honest one can
    padded = write_zip(tmp_path / "pad.pth", None, {}, pkl=pickle_bytes(b"\x00" * (8 << 20)),
                       deflate=("data.pkl",))
    with pytest.raises(CheckpointError, match="data.pkl would inflate"):
        read_checkpoint(padded)


def test_storage_sizes_must_match_their_declaration(tmp_path: Path) -> None:
    ref = StorageRef("0", 8)  # declares 8 floats, the entry holds 4
    p = write_zip(tmp_path / "short.pth", {"w": tensor(ref, 0, (4,), (1,))}, {"0": FLOATS})
    with pytest.raises(CheckpointError, match="tensor data 0 has 16 bytes, expected 32"):
        read_checkpoint(p)
    p = write_zip(tmp_path / "missing.pth", {"w": tensor(StorageRef("7", 4), 0, (4,), (1,))}, {"0": FLOATS})
    with pytest.raises(CheckpointError, match="no data for storage 7"):
        read_checkpoint(p)


def test_pickle_opcodes_that_ask_for_memory(tmp_path: Path) -> None:
    # CPython's C unpickler sizes its memo by the largest index: LONG_BINPUT 2**31 alone asks for 16 GiB
    p = write_zip(tmp_path / "memo.pth", None, {}, pkl=b"\x80\x02}r\xff\xff\xff\x7f.")
    with pytest.raises(CheckpointError, match="memo entry 2147483647 after 2 opcodes"):
        read_checkpoint(p)
    # a length of 2**62 in the legacy stream: read(n) on a file would allocate n bytes first
    legacy = tmp_path / "l.pth"
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    head = legacy.read_bytes()
    three = head[: head.index(b"u.", head.index(b"type_sizes")) + 2]
    (tmp_path / "len.pth").write_bytes(three + b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"abc")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "len.pth")


# -------------------------------------------------------------------------------------------- tensor rebuilds


@pytest.mark.parametrize(
    "args, why",
    [
        ((0, (8,), (1,)), "reaches element 7 of a storage of 4"),  # size past the storage
        ((3, (2,), (1,)), "reaches element 4 of a storage of 4"),  # offset past the storage
        ((9, (0,), (1,)), "lies past its storage"),
        ((-1, (2,), (1,)), "negative storage offset"),
        ((0, (2,), (-1,)), "negative entry"),
        ((0, (-2,), (1,)), "negative entry"),
        ((0, (2, 2), (1,)), "but stride"),
        ((0, (1 << 40,), (0,)), "claims 1099511627776 elements"),
        ((0, (2,), ("1",)), "not an integer"),
        ((0.5, (2,), (1,)), "not an integer"),
        ((0, tuple([1] * 65), tuple([1] * 65)), "at most 64"),
    ],
)
def test_tensor_rebuilds_are_checked(tmp_path: Path, args: tuple, why: str) -> None:  # type: ignore[type-arg]
    p = write_zip(tmp_path / "t.pth", {"w": tensor(StorageRef("0", 4), *args)}, {"0": FLOATS})
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(p)
    assert why in str(ei.value)


@pytest.mark.parametrize("storage", [[1, 2, 3], 7, "0", None])
def test_tensor_from_something_that_is_not_a_storage(tmp_path: Path, storage: object) -> None:
    p = write_zip(tmp_path / "t.pth", {"w": TensorCall(storage, 0, (2,), (1,), False, OrderedDict())}, {})
    with pytest.raises(CheckpointError, match="not a storage of this file"):
        read_checkpoint(p)


def test_a_pickle_cannot_set_a_tensors_state(tmp_path: Path) -> None:
    """BUILD into a rebuilt tensor would call Tensor.__setstate__ -> set_(), which grows storages
    unchecked."""

    class Built:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            ref = StorageRef("0", 4)
            return (torch._utils._rebuild_tensor_v2, (ref, 0, (2,), (1,), False, OrderedDict()),
                    (tensor(ref, 0, (1,), (1,)), 0, (1 << 30,), (1,)))

    p = write_zip(tmp_path / "t.pth", None, {"0": FLOATS}, pkl=pickle_bytes({"w": Built()}))
    with pytest.raises(CheckpointError, match="set a tensor's state"):
        read_checkpoint(p)


def test_a_good_hand_made_file_reads(tmp_path: Path) -> None:
    """The hostile builder writes what torch reads: the refusals above are about the lies alone."""
    p = write_zip(tmp_path / "ok.pth", {"w": tensor(StorageRef("0", 4), 1, (3,), (1,))}, {"0": FLOATS})
    assert torch.load(p, weights_only=True)["w"].tolist() == [2.0, 3.0, 4.0]
    sd, _ = read_checkpoint(p)
    assert sd["w"].tolist() == [2.0, 3.0, 4.0]


# ------------------------------------------------------------------------------------------------ legacy


def _legacy(tmp_path: Path) -> Path:
    p = tmp_path / "legacy.pth"
    torch.save({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}, p,
               _use_new_zipfile_serialization=False)
    return p


def test_legacy_file_bounds(tmp_path: Path) -> None:
    p = _legacy(tmp_path)
    sd, info = read_checkpoint(p)
    assert (info.format == "torch-legacy" and sd["a"].tolist() == list(range(6))
            and sd["b"].tolist() == [1, 1, 1])
    data = p.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="ends early"):
        read_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "tail.pth").write_bytes(data + b"\x00")
    with pytest.raises(CheckpointError, match="bytes after its last tensor"):
        read_checkpoint(tmp_path / "tail.pth")
    # a storage that declares more bytes than the file holds is refused before anything is allocated
    big = data.replace(b"K\x06", b"J\x00\x00\x00\x40", 1)  # numel 6 -> 2**30 in the persistent id
    assert big != data
    (tmp_path / "big.pth").write_bytes(big)
    with pytest.raises(CheckpointError, match="declare .* bytes but the file has"):
        read_checkpoint(tmp_path / "big.pth")


# ------------------------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return randomize_weights(build_model(SLAB), seed=4).state_dict()


def test_nan_and_inf_weights_are_named_and_nothing_is_written(  # type: ignore[no-untyped-def]
        tmp_path: Path, weights, capsys, monkeypatch) -> None:
    sd = {k: v.clone() for k, v in weights.items()}
    sd["layers.0.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    sd["head.weight"][1, :3] = float("inf")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError,
                       match=r"NaN or Inf weights in layers\.0\.blocks\.0\.attn\.qkv\.weight \(1 of"):
        create_model(SLAB, tmp_path / "nan.pth")
    out = tmp_path / "folded.pt"
    code, _, err = run_cli(["fold", "-m", SLAB, "-c", str(tmp_path / "nan.pth"), "-o", str(out)], capsys,
                           monkeypatch)
    line = _one_line(err)
    assert code == 1 and "head.weight (3 of" in line and not out.exists()


@pytest.mark.parametrize(
    "value, why",
    [
        (torch.tensor([0, 0, 0]), "has shape \\[3\\]"),
        (torch.tensor(float("nan")), "NaN or Inf"),
        (torch.tensor(1.5), "is 1.5, not a whole number"),
        (torch.tensor([]), "has shape \\[0\\]"),
    ],
)
def test_broken_prepbn_counters(  # type: ignore[no-untyped-def]
        tmp_path: Path, weights, value: torch.Tensor, why: str, capsys, monkeypatch) -> None:
    sd = dict(weights)
    key = next(k for k in sd if k.endswith(".iter"))
    sd[key] = value
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=why):
        read_checkpoint(tmp_path / "c.pth")
    code, _, err = run_cli(["inspect", str(tmp_path / "c.pth")], capsys, monkeypatch)
    assert code == 1 and (key in _one_line(err) or "NaN" in err)


@pytest.mark.parametrize(
    "meta, why",
    [("{not json", "is not JSON"), ("[1, 2]", "is a list, not a dict"),
     ('{"model": "x"}', "no integer 'format'"),
     ('{"format": 1, "model": "m", "folded": [3]}', "non-name entry")],
)
def test_bad_fold_metadata_in_safetensors(  # type: ignore[no-untyped-def]
        tmp_path: Path, weights, meta: str, why: str, capsys, monkeypatch) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "f.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(p), metadata={"slab_deploy": meta})
    with pytest.raises(CheckpointError, match=why):
        read_checkpoint(p)
    code, _, err = run_cli(["inspect", str(p)], capsys, monkeypatch)
    assert code == 1 and "fold the original checkpoint again" in _one_line(err)


def test_fold_metadata_naming_modules_the_model_lacks(  # type: ignore[no-untyped-def]
        tmp_path: Path, weights) -> None:
    meta = {"format": 1, "model": SLAB, "folded": ["no.such.module"], "biases_added": []}
    torch.save({"slab_deploy": meta, "model": dict(weights)}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError):
        create_model(SLAB, tmp_path / "f.pt")


# ------------------------------------------------------------------------------------------------ cache


def test_unwritable_cache_falls_back_then_names_the_variable(  # type: ignore[no-untyped-def]
        tmp_path: Path, monkeypatch, capsys) -> None:
    from slab_deploy.weights import default as defaults

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SLAB_DEPLOY_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = defaults.default_checkpoint("test_slab_deit")
    assert path.is_relative_to(tmp_path / "tmp") and read_checkpoint(path)[1].opaque_objects
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))
    with pytest.raises(CheckpointError, match="set SLAB_DEPLOY_CACHE to a writable directory"):
        defaults.default_checkpoint("test_slab_pvt")
    out = tmp_path / "folded.pt"
    code, _, err = run_cli(["fold", "-m", "test_slab_pvt", "-o", str(out)], capsys, monkeypatch)
    assert code == 1 and "SLAB_DEPLOY_CACHE" in _one_line(err) and not out.exists()
    assert (tmp_path / "tmp" / f"slab-deploy-{os.getuid()}" / path.name).is_file()


def test_fold_writes_nothing_for_a_refused_file(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    good = random_checkpoint(SLAB, tmp_path / "g.pth", seed=1)
    data = bytearray(good.read_bytes())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data[: len(data) // 3]))
    out = tmp_path / "folded.pt"
    code, _, err = run_cli(["fold", "-m", SLAB, "-c", str(bad), "-o", str(out)], capsys, monkeypatch)
    assert code == 1 and "truncated or corrupt" in _one_line(err)
    assert sorted(os.listdir(tmp_path)) == ["bad.pth", "g.pth"]
    json.dumps(err)  # plain text
