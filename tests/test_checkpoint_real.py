"""The authors' training files as their producers write them: real yacs, real AdamW, torch.save's
protocols and its legacy format, EMA; and the pickle name mapping that makes them readable."""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from yacs.config import CfgNode

from slab_deploy.models import build_model, create_model
from slab_deploy.models._safe_pickle import _ALLOWED, OpaqueObject, RestrictedUnpickler, pickle_protocol
from slab_deploy.models.checkpoint import read_checkpoint
from slab_deploy.weights import (
    authors_config,
    ema_state_dict,
    random_checkpoint,
    randomize_weights,
    save_authors_checkpoint,
)

SLAB = "test_slab_swin"


def _globals(data: bytes) -> set[str]:
    """The globals a pickle names, as written (GLOBAL and STACK_GLOBAL)."""
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(str(arg).replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
    return names


def _main_pickle(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return randomize_weights(build_model(SLAB), seed=11).state_dict()


def test_real_cfgnode_carries_a_set() -> None:
    cfg = authors_config(SLAB)
    assert type(cfg) is CfgNode and cfg.is_frozen()
    assert (isinstance(cfg.__dict__["__deprecated_keys__"], set)
            and cfg.MODEL.SWIN_HR.__dict__["__new_allowed__"])
    assert (cfg.MODEL.NAME == SLAB and cfg.TRAIN.CLIP_GRAD is None
            and cfg.TRAIN.OPTIMIZER.BETAS == (0.9, 0.999))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_authors_training_file_as_torch_saves_it(  # type: ignore[no-untyped-def]
        tmp_path: Path, weights, protocol: int, legacy: bool) -> None:
    path = save_authors_checkpoint(
        tmp_path / "ckpt.pth", weights, model_name=SLAB, pickle_protocol=protocol, legacy=legacy
    )
    raw = path.read_bytes()
    if protocol == 2:  # what used to be refused: a real CfgNode's set, under its Python 2 name
        assert b"__builtin__\nset" in (raw if legacy else _main_pickle(path))
    if not legacy:
        assert pickle_protocol(_main_pickle(path)[:2]) == protocol
        assert "yacs.config.CfgNode" in _globals(_main_pickle(path))
    sd, info = read_checkpoint(path)
    assert info.format == ("torch-legacy" if legacy else "torch-zip") + " (training checkpoint)"
    assert info.opaque_objects == ["yacs.config.CfgNode"] and info.epoch == 300 and info.max_accuracy == 0.0
    assert set(info.top_level_keys) == {"model", "optimizer", "lr_scheduler", "max_accuracy", "epoch",
                                        "config"}
    assert sd.keys() == weights.keys() and all(torch.equal(sd[k], weights[k]) for k in sd)
    m = create_model(SLAB, path)
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())


def test_the_rest_of_the_file_is_read_as_data(  # type: ignore[no-untyped-def]
        tmp_path: Path, weights) -> None:
    from slab_deploy.models._safe_pickle import load_zip_checkpoint

    path = save_authors_checkpoint(tmp_path / "ckpt.pth", weights, model_name=SLAB, scaler=True)
    obj, _ = load_zip_checkpoint(path)
    cfg = obj["config"]
    assert (isinstance(cfg, OpaqueObject) and cfg["MODEL"]["NAME"] == SLAB
            and cfg["TRAIN"]["OPTIMIZER"]["BETAS"] == (0.9, 0.999))
    assert cfg.__dict__["_state"]["__deprecated_keys__"] == set()
    opt = obj["optimizer"]
    n_params = len(opt["param_groups"][0]["params"]) + len(opt["param_groups"][1]["params"])
    assert n_params == len(list(build_model(SLAB).parameters())) == len(opt["state"])
    assert opt["param_groups"][1]["weight_decay"] == 0.0 and opt["param_groups"][0]["betas"] == (0.9, 0.999)
    first = opt["state"][0]
    assert float(first["step"]) == 1.0 and first["exp_avg"].abs().sum() > 0
    assert (obj["lr_scheduler"]["t_initial"] == 300 * 1251
            and obj["lr_scheduler"]["base_values"] == [5e-4, 5e-4])
    assert obj["scaler"]["scale"] == 65536.0


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_ema_checkpoint(tmp_path: Path, weights, legacy: bool) -> None:  # type: ignore[no-untyped-def]
    ema = ema_state_dict(weights, seed=5)
    path = save_authors_checkpoint(tmp_path / "ema.pth", weights, model_name=SLAB, ema=ema, legacy=legacy)
    _, info = read_checkpoint(path)
    assert info.has_ema and {"state_dict_ema", "max_accuracy_e"} <= set(info.top_level_keys)
    m = create_model(SLAB, path, ema=True)
    assert m.checkpoint_info.entry == "state_dict_ema"
    assert all(torch.equal(v, ema[k]) for k, v in m.state_dict().items())
    assert not torch.equal(m.head.weight, weights["head.weight"])
    assert torch.equal(ema[next(k for k in ema if k.endswith("attn_mask"))],
                       weights[next(k for k in ema if k.endswith("attn_mask"))])


def test_inspect_reads_a_real_yacs_file(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    path = random_checkpoint(SLAB, tmp_path / "ckpt.pth", seed=2)
    code, out, err = run_cli(["inspect", str(path), "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert '"yacs.config.CfgNode"' in out and '"training checkpoint' not in err


def test_default_weights_are_written_by_the_real_producers(  # type: ignore[no-untyped-def]
        tmp_path: Path, monkeypatch) -> None:
    from slab_deploy.weights import default_checkpoint

    monkeypatch.setenv("SLAB_DEPLOY_CACHE", str(tmp_path / "cache"))
    path = default_checkpoint("test_slab_deit")
    assert path.parent == tmp_path / "cache"
    assert b"__builtin__\nset" in _main_pickle(path)
    _, info = read_checkpoint(path)
    assert info.opaque_objects == ["yacs.config.CfgNode"] and "optimizer" in info.top_level_keys


# ------------------------------------------------------------------------------------------------ names


def _load(data: bytes) -> object:
    return RestrictedUnpickler(io.BytesIO(data), source="x", protocol=pickle_protocol(data[:2]),
                               storages=None).load()


def test_every_allowed_global_resolves_under_its_python2_name() -> None:
    reverse_names = {v: k for k, v in _compat_pickle.NAME_MAPPING.items()}
    reverse_modules = {v: k for k, v in _compat_pickle.IMPORT_MAPPING.items()}
    checked = 0
    for (module, name), target in _ALLOWED.items():
        py2 = reverse_names.get((module, name)) or (reverse_modules.get(module, module), name)
        u = RestrictedUnpickler(io.BytesIO(b""), source="x", protocol=2, storages=None)
        assert u.find_class(*py2) is target, py2
        checked += py2 != (module, name)
    assert checked >= 6  # builtins.* (__builtin__), copyreg (copy_reg) ... really went through the mapping


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_values_and_a_cfgnode_at_every_protocol(protocol: int) -> None:
    values = {"s": {1, 2}, "f": frozenset({3}), "o": OrderedDict(a=1), "c": 1 + 2j, "sl": slice(1, 5, 2),
              "b": b"\x00\xff"}
    assert _load(pickle.dumps(values, protocol=protocol)) == values
    cfg = authors_config(SLAB)
    got = _load(pickle.dumps(cfg, protocol=protocol))
    assert isinstance(got, OpaqueObject) and got["MODEL"]["NAME"] == SLAB
    assert got.__dict__.get("_state", {}).get("__deprecated_keys__", set()) == set()


def test_numpy_scalar_accuracy_at_protocol_2() -> None:
    np = pytest.importorskip("numpy")
    got = _load(pickle.dumps({"max_accuracy": np.float64(81.25), "epoch": np.int64(3)}, protocol=2))
    assert got == {"max_accuracy": 81.25, "epoch": 3}
