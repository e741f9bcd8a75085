"""The trained demo models: the training script's PRepBN schedule runs to its end, its BatchNorm
re-estimation moves the running statistics to the data's, and the shipped checkpoints load, are
finished, small, 10-class, and give their recorded held-out accuracy on the shipped held-out set."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from slab_deploy.models import build_model, checkpoint_info, create_model, get_spec
from slab_deploy.models.layers import LinearNorm, RepBN
from slab_deploy.weights import randomize_weights

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "slab_deploy" / "data"
DEMO = ("slab_deit_demo", "deit_demo")
AUTHORS_KEYS = ["model", "optimizer", "lr_scheduler", "max_accuracy", "epoch", "config"]


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Training loops of tiny models: one thread is faster than two on a busy 2-core host (and as the
    script runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_demo() -> ModuleType:
    """tools/train_demo.py (outside the package import path), imported from its file."""
    if "train_demo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["train_demo"] = mod  # dataclasses resolve their module while the file runs
        spec.loader.exec_module(mod)
    return sys.modules["train_demo"]


def toy_data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 2.0 + 0.5, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("warm", [0, 2])
def test_prepbn_schedule_reaches_its_end(warm: int) -> None:
    td = train_demo()
    torch.manual_seed(0)
    model = build_model("test_slab_deit")
    x, y = toy_data()
    # 24 images, batch 8: 3 iterations an epoch, 2 epochs; the schedule takes half: T = 3.
    cfg = td.TrainConfig(epochs=2, batch=8, warmup_epochs=1, prepbn_fraction=0.5, prepbn_warm=warm,
                         recal_epochs=1)
    res = td.train_model(model, x, y, cfg, fill=torch.zeros(3))
    assert res.iterations == 6 and res.prepbn_steps == 3
    # lam = iter / T at each training forward: 1 through the LayerNorm-only warm-up, then linear to 0.
    expected = [1.0] * warm + [1.0, 2 / 3, 1 / 3] + [0.0] * (3 - warm)
    assert res.lambdas == pytest.approx(expected)
    norms = [m for m in model.modules() if isinstance(m, LinearNorm)]
    assert len(norms) == 2 * len(model.blocks) + 1
    assert all(int(m.iter) == 0 and int(m.warm) == 0 and int(m.total_step) == 3 for m in norms)
    assert td.prepbn_finished(model) and not model.training
    assert res.recal_batches == 3  # the final phase ran (one epoch of full batches)


def test_schedule_longer_than_training_is_refused() -> None:
    td = train_demo()
    x, y = toy_data()
    cfg = td.TrainConfig(epochs=1, batch=8, warmup_epochs=0, prepbn_fraction=1.0, prepbn_warm=1)
    with pytest.raises(ValueError, match="PRepBN needs 4 iterations but training has 3"):
        td.train_model(build_model("test_slab_deit"), x, y, cfg, fill=torch.zeros(3))


def test_bn_recalibration_moves_running_stats_to_the_data() -> None:
    td = train_demo()
    model = randomize_weights(build_model("test_slab_deit"), seed=1)  # running stats far from the data
    x, _ = toy_data(n=64, seed=2)
    bn = model.blocks[0].norm1.norm2.bn
    seen: list[torch.Tensor] = []
    hook = model.blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)  # the first norm's input does not depend on any BatchNorm's mode
    hook.remove()
    tokens = seen[0].reshape(-1, seen[0].shape[-1])
    mean, var = tokens.mean(0), tokens.var(0)
    params = {k: v.clone() for k, v in model.named_parameters()}
    counters = {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".iter", ".warm"))}
    before = ((bn.running_mean - mean).abs().max(), (bn.running_var - var).abs().max())
    steps = td.recalibrate_bn(model, x, epochs=10, batch=16, gen=torch.Generator().manual_seed(0))
    after = ((bn.running_mean - mean).abs().max(), (bn.running_var - var).abs().max())
    assert steps == 40
    assert after[0] < 0.05 * before[0] and after[1] < 0.05 * before[1], (before, after)
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())  # weights frozen
    assert all(torch.equal(v, counters[k]) for k, v in model.state_dict().items() if k in counters)
    assert not any(m.training for m in model.modules())


def test_shift_augmentation_keeps_content_and_fills_black() -> None:
    td = train_demo()
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = td.random_shift(x, 2, torch.Generator().manual_seed(0), torch.full((3,), -1.0))
    assert out.shape == x.shape
    for i in range(2):
        kept = out[i][out[i] != -1.0]
        assert kept.numel() >= 3 * 6 * 6 and set(kept.tolist()) <= set(x[i].flatten().tolist())


# ----------------------------------------------------------------------------------------------
# The shipped files


def summary() -> dict:
    return json.loads((DATA / "demo_models.json").read_text())


def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "digits_heldout.npz") as f:
        return f["images"], f["labels"].astype(np.int64)


def preprocess(images: np.ndarray, name: str) -> torch.Tensor:
    """The registered preprocessing of 8-bit RGB images: /255, then (x - mean) / std per channel."""
    spec = get_spec(name)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def test_shipped_files_match_the_summary() -> None:
    s = summary()
    files = [s["heldout"]["file"]] + [s["models"][n]["file"] for n in DEMO]
    for f in files:
        data = (DATA / f).read_bytes()
        assert len(data) <= 5 * 1024 * 1024, f
        sha = (s["heldout"]["sha256"] if f == s["heldout"]["file"]
               else s["models"][f.removesuffix(".pth")]["sha256"])
        assert hashlib.sha256(data).hexdigest() == sha, f
    images, labels = heldout()
    assert images.dtype == np.uint8 and images.shape == (s["heldout"]["count"], 32, 32, 3)
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 360 and counts.min() >= 35 and counts.max() <= 37  # stratified 20% of 1,797
    assert (images[..., 0] == images[..., 2]).all()  # grey digits replicated to RGB


@pytest.mark.parametrize("name", DEMO)
def test_shipped_checkpoint_gives_its_recorded_accuracy(name: str) -> None:
    path = DATA / f"{name}.pth"
    model = create_model(name, checkpoint=path)
    info = checkpoint_info(model)
    assert info is not None and sorted(info.top_level_keys) == sorted(AUTHORS_KEYS)
    assert "yacs.config.CfgNode" in info.opaque_objects
    assert info.num_classes == 10 and model.head.out_features == 10
    if get_spec(name).norm == "prepbn":
        assert info.prepbn and info.prepbn_finished
        steps = summary()["models"][name]["prepbn_steps"]
        assert steps == get_spec(name).prepbn_steps and all(s.total_step == steps for s in info.prepbn)
        assert any(isinstance(m, RepBN) for m in model.modules())
    images, labels = heldout()
    with torch.no_grad():
        pred = model(preprocess(images, name)).argmax(-1).numpy()
    correct = int((pred == labels).sum())
    rec = summary()["models"][name]
    assert correct == rec["heldout_correct"]
    assert 100.0 * correct / len(labels) == pytest.approx(rec["heldout_top1"]) and rec["heldout_top1"] > 90.0
    assert info.max_accuracy == pytest.approx(rec["heldout_top1"])
