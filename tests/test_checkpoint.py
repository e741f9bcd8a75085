"""Checkpoint formats, strict loading, layout remapping, PRepBN progress and bad input."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from slab_deploy.errors import CheckpointError, UnfinishedPRepBNError
from slab_deploy.models import build_model, create_model
from slab_deploy.models.checkpoint import detect_variants, read_checkpoint
from slab_deploy.weights import random_checkpoint, randomize_weights, save_authors_checkpoint

SLAB = "test_slab_swin"  # LinearNorm layout
PLAIN = "test_swin_prepbn"  # plain RepBN layout
LN = "test_swin"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def slab_model() -> torch.nn.Module:
    return randomize_weights(build_model(SLAB), seed=3)


def test_authors_training_file_roundtrip(tmp_path: Path, slab_model: torch.nn.Module) -> None:
    path = save_authors_checkpoint(tmp_path / "ckpt.pth", slab_model.state_dict(), model_name=SLAB)
    sd, info = read_checkpoint(path)
    assert info.entry == "model" and "training checkpoint" in info.format
    assert info.opaque_objects == ["yacs.config.CfgNode"]
    assert set(info.top_level_keys) >= {"model", "optimizer", "lr_scheduler", "max_accuracy", "epoch",
                                        "config"}
    assert info.layout == "prepbn" and info.prepbn and info.prepbn_finished
    m = create_model(SLAB, path)
    _same_weights(m, slab_model)


def test_bare_state_dict_module_prefix_and_safetensors(tmp_path: Path, slab_model: torch.nn.Module) -> None:
    sd = slab_model.state_dict()
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in ("bare.pth", "ddp.pth", "wrapped.pth", "w.safetensors"):
        m = create_model(SLAB, tmp_path / name)
        _same_weights(m, slab_model)
    assert read_checkpoint(tmp_path / "ddp.pth")[1].stripped_prefix == "module."
    assert read_checkpoint(tmp_path / "w.safetensors")[1].format == "safetensors"


def test_ema_weights(tmp_path: Path) -> None:
    path = random_checkpoint(SLAB, tmp_path / "ema.pth", seed=1, with_ema=True)
    plain = create_model(SLAB, path)
    ema = create_model(SLAB, path, ema=True)
    assert read_checkpoint(path)[1].has_ema
    assert not torch.equal(plain.head.weight, ema.head.weight)
    no_ema = random_checkpoint(SLAB, tmp_path / "noema.pth", seed=1)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        create_model(SLAB, no_ema, ema=True)


def test_num_classes_from_head(tmp_path: Path) -> None:
    path = random_checkpoint(SLAB, tmp_path / "c10.pth", seed=2, num_classes=10)
    m = create_model(SLAB, path)
    assert m.head.out_features == 10
    x = torch.randn(2, 3, *_size(m))
    assert m(x).shape == (2, 10)


def _size(m: torch.nn.Module) -> tuple[int, int]:
    s = getattr(m, "img_size", None) or m.spec.input_size[1]
    return tuple(s) if isinstance(s, (tuple, list)) else (s, s)  # type: ignore[return-value]


def _to_plain_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    prefixes = {k[: -len("total_step")] for k in sd if k.endswith(".total_step")}
    for k, v in sd.items():
        p = next((p for p in prefixes if k.startswith(p)), None)
        if p is None:
            out[k] = v
        elif k.startswith(p + "norm2."):
            out[p + k[len(p + "norm2.") :]] = v
    return out


def _to_linearnorm_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    prefixes = {k[: -len("alpha")] for k in sd if k.endswith(".alpha")}
    for k, v in sd.items():
        p = next((p for p in prefixes if k == p + "alpha" or k.startswith(p + "bn.")), None)
        if p is None:
            out[k] = v
            continue
        out[p + "norm2." + k[len(p) :]] = v
        c = sd[p + "bn.weight"].numel()
        out[p + "norm1.weight"], out[p + "norm1.bias"] = torch.ones(c), torch.zeros(c)
        out[p + "warm"], out[p + "iter"], out[p + "total_step"] = (torch.tensor(0), torch.tensor(0),
                                                                   torch.tensor(60000))
    return out


def test_layout_remap_both_directions(tmp_path: Path, slab_model: torch.nn.Module) -> None:
    # LinearNorm model <- plain-RepBN-layout file
    p = tmp_path / "plain.pth"
    torch.save(_to_plain_layout(slab_model.state_dict()), p)
    assert read_checkpoint(p)[1].layout == "repbn"
    m = create_model(SLAB, p)
    assert "RepBN -> LinearNorm" in m.checkpoint_info.remapped
    x = torch.randn(2, 3, *_size(m))
    with torch.no_grad():
        torch.testing.assert_close(m(x), slab_model(x), rtol=0, atol=0)
    # plain-RepBN model <- LinearNorm-layout file
    plain = randomize_weights(build_model(PLAIN), seed=5)
    q = tmp_path / "lin.pth"
    torch.save(_to_linearnorm_layout(plain.state_dict()), q)
    assert read_checkpoint(q)[1].layout == "prepbn"
    back = create_model(PLAIN, q)
    assert "LinearNorm -> RepBN" in back.checkpoint_info.remapped
    with torch.no_grad():
        torch.testing.assert_close(back(x), plain(x), rtol=0, atol=0)


def test_unfinished_prepbn_is_refused_with_progress(tmp_path: Path) -> None:
    path = random_checkpoint(SLAB, tmp_path / "mid.pth", seed=4, prepbn_iter=15000)
    with pytest.raises(UnfinishedPRepBNError) as ei:
        create_model(SLAB, path)
    msg = str(ei.value)
    assert "--allow-unfinished-prepbn" in msg and "iter 15000" in msg and "%" in msg
    m = create_model(SLAB, path, allow_unfinished_prepbn=True)
    assert not m.checkpoint_info.prepbn_finished
    warm = random_checkpoint(SLAB, tmp_path / "warm.pth", seed=4, prepbn_warm=10)
    with pytest.raises(UnfinishedPRepBNError, match="warm-up"):
        create_model(SLAB, warm)


def test_wrong_variant_names_the_right_one(tmp_path: Path) -> None:
    path = random_checkpoint(LN, tmp_path / "ln.pth", seed=1)
    with pytest.raises(CheckpointError) as ei:
        create_model(SLAB, path)
    msg = str(ei.value)
    assert "does not fit" in msg and "missing keys" in msg and f"--model {LN}" in msg
    assert detect_variants(read_checkpoint(path)[0], include_test=True) == [LN]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(os.urandom(4096)), "not a PyTorch"),
        (lambda p: p.write_text("hello: world\n"), "not a PyTorch"),
    ],
)
def test_bad_files(tmp_path: Path, make, match: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "bad.pth"
    make(p)
    with pytest.raises(CheckpointError, match=match):
        create_model(SLAB, p)


def test_truncated_file(tmp_path: Path) -> None:
    good = random_checkpoint(SLAB, tmp_path / "good.pth", seed=1)
    data = good.read_bytes()
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        create_model(SLAB, bad)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil()}, p)
    with pytest.raises(CheckpointError, match=r"asks to call (posix|os)\.system"):
        read_checkpoint(p)


def test_zip_without_torch_pickle(tmp_path: Path) -> None:
    p = tmp_path / "x.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(p)


def test_legacy_pickle_of_foreign_object(tmp_path: Path) -> None:
    p = tmp_path / "legacy.pth"
    buf = io.BytesIO()
    pickle.dump({"model": _Evil()}, buf, protocol=2)
    p.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"asks to call (posix|os)\.system"):
        read_checkpoint(p)
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil()}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"asks to call (posix|os)\.system"):
        read_checkpoint(p)
    p.write_bytes(pickle.dumps({"model": {}}, protocol=2))
    with pytest.raises(CheckpointError, match="no torch magic number"):
        read_checkpoint(p)


def test_non_weights_object(tmp_path: Path) -> None:
    p = tmp_path / "list.pth"
    torch.save([1, 2, 3], p)
    with pytest.raises(CheckpointError, match="not model weights"):
        read_checkpoint(p)
