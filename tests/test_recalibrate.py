"""recalibrate: re-estimating the RepBN (BatchNorm) statistics of an unfolded SLAB checkpoint on images.

The statistics are checked against the BatchNorm inputs themselves (collected with hooks) and
against a shift of the images whose effect on the first BatchNorm is known in closed form; the
written file against the input file (every other tensor, the config, the optimizer state, the
zip records); the command line for its one-line refusals and for what it leaves on disk.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import run_cli

from slab_deploy import datasets
from slab_deploy.errors import ArtifactError, ConfigError
from slab_deploy.models import build_model, create_model, preprocessing
from slab_deploy.passes import fold_model
from slab_deploy.passes.recalibrate import (
    BN_BUFFERS,
    RecalibrateBN,
    batchnorms,
    recalibrate_checkpoint,
    reestimate_bn_statistics,
)
from slab_deploy.tolerances import tolerance_for
from slab_deploy.weights import random_checkpoint, randomize_weights

EPS32 = float(torch.finfo(torch.float32).eps)
DEMO = "slab_deit_demo"
DEMO_CKPT = Path(datasets.DATA) / f"{DEMO}.pth"


def write_images(folder: Path, *, classes: int = 0, per_class: int = 4, size: int = 40, level: int = 128,
                 seed: int = 0) -> Path:
    """PNG files written by PIL: flat (classes=0) or one sub-folder per class; pixel values spread
    around `level`, so the folder's mean is known to be away from the checkpoint's statistics."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    dirs = [folder / str(c) for c in range(classes)] if classes else [folder]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pix = np.clip(rng.normal(level, 40, (size, size + 3 * i, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pix).save(d / f"img{i}.png")
    return folder


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the suite runs beside other work on 2 cores, where 2 threads oversubscribe."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------- the statistics


@pytest.mark.parametrize("name", ["test_slab_deit", "test_slab_swin", "test_slab_pvt", "test_deit_prepbn"])
def test_running_stats_equal_the_statistics_of_the_bn_inputs(name: str) -> None:
    model = randomize_weights(build_model(name), seed=3)  # randomised statistics, far from these images
    size = model.spec.input_size[1:]
    x = torch.randn(10, 3, *size, generator=torch.Generator().manual_seed(4)) * 0.7 + 0.5  # batches 4, 4, 2
    seen: dict[str, list[torch.Tensor]] = {n: [] for n, _ in batchnorms(model)}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen[n].append(a[0].detach().double()))
             for n, m in batchnorms(model)]
    before = {n: (m.running_mean.clone(), m.running_var.clone())  # type: ignore[union-attr]
              for n, m in batchnorms(model)}
    RecalibrateBN(model, x, batch_size=4, seed=0, inplace=True)
    for h in hooks:
        h.remove()
    for n, m in batchnorms(model):
        batches = seen[n]
        assert [b.shape[0] for b in batches] == [4, 4, 2]
        # (C, all tokens)
        tokens = torch.cat([b.transpose(0, 1).reshape(b.shape[1], -1) for b in batches], dim=1)
        mean = tokens.mean(1)  # every image has the same token count, so this is the image-weighted mean
        weights = torch.tensor([b.shape[0] for b in batches], dtype=torch.float64) / len(x)
        var = sum(w * b.transpose(0, 1).reshape(b.shape[1], -1).var(1)
                  for w, b in zip(weights, batches, strict=True))
        # float32 bound: each of the 3 cumulative updates and the batch reductions round at a few eps of
        # the largest input (x 32 for headroom); before recalibration the statistics are far outside it
        scale = float(tokens.abs().max())
        tol_mean, tol_var = 32 * len(batches) * EPS32 * scale, 32 * len(batches) * EPS32 * scale**2
        rm, rv = m.running_mean.double(), m.running_var.double()  # type: ignore[union-attr]
        assert float((rm - mean).abs().max()) <= tol_mean, n
        assert float((rv - var).abs().max()) <= tol_var, n
        assert float((before[n][0].double() - mean).abs().max()) > 100 * tol_mean, n
        assert int(m.num_batches_tracked) == 3  # type: ignore[arg-type]
        assert not m.training
    assert not any(mod.training for mod in model.modules())


def test_a_known_shift_of_the_images_moves_the_first_mean_by_the_embedding_of_the_shift() -> None:
    """SLAB-DeiT's first BatchNorm reads patch_embed(x) + pos_embed; the patch conv has stride =
    kernel and no padding, so shifting every pixel of channel c by d_c moves that BatchNorm's input,
    and so its mean, by W.sum((2, 3)) @ d exactly, and leaves its variance where it was."""
    model = randomize_weights(build_model("test_slab_deit"), seed=5)
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    d = torch.tensor([0.8, -1.5, 2.0])
    plain = RecalibrateBN(model, x, batch_size=5).model
    shifted = RecalibrateBN(model, x + d.view(1, 3, 1, 1), batch_size=5).model
    w = model.patch_embed.proj.weight.detach().double().sum((2, 3))
    expect = w @ d.double()
    bn0 = {n: m for n, m in batchnorms(plain)}["blocks.0.norm1.norm2.bn"]
    bn1 = {n: m for n, m in batchnorms(shifted)}["blocks.0.norm1.norm2.bn"]
    moved = bn1.running_mean.double() - bn0.running_mean.double()  # type: ignore[union-attr]
    scale = float(bn1.running_mean.abs().max() + bn1.running_var.sqrt().max())  # type: ignore[union-attr]
    assert float(expect.abs().mean()) > 0.1  # a shift that moves the mean far beyond the bound below
    assert float((moved - expect).abs().max()) <= 256 * EPS32 * scale
    var0, var1 = bn0.running_var.double(), bn1.running_var.double()  # type: ignore[union-attr]
    assert float(((var1 - var0).abs() / var0).max()) <= 1e-4  # fp32 cancellation in sum(x^2) - n mean^2


def test_only_the_batchnorm_buffers_change() -> None:
    model = randomize_weights(build_model("test_slab_swin"), seed=1)
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2)) + 1.0
    out = RecalibrateBN(model, x, batch_size=4).model
    bn_keys = {f"{n}.{b}" for n, _ in batchnorms(model) for b in BN_BUFFERS}
    old, new = model.state_dict(), out.state_dict()
    assert set(old) == set(new) and bn_keys <= set(old)
    for k in old:
        if k in bn_keys:
            assert not torch.equal(old[k], new[k]), k
        else:
            assert torch.equal(old[k], new[k]) and old[k].dtype == new[k].dtype, k  # bit-identical
    assert out is not model and not any(m.training for m in out.modules())


def test_continued_mode_keeps_the_checkpoint_statistics_and_momentum() -> None:
    model = randomize_weights(build_model("test_slab_deit"), seed=1)
    bn = batchnorms(model)[0][1]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    old = bn.running_mean.clone()  # type: ignore[union-attr]
    seen: list[torch.Tensor] = []
    h = bn.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    assert reestimate_bn_statistics(model, [x], cumulative=False) == 1
    h.remove()
    batch_mean = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1).mean(1)
    torch.testing.assert_close(bn.running_mean, 0.9 * old + 0.1 * batch_mean, rtol=0, atol=64 * EPS32 * 10)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 1001  # type: ignore[arg-type]


def test_a_model_without_batchnorm_is_refused() -> None:
    with pytest.raises(ConfigError, match="no BatchNorm"):
        RecalibrateBN(build_model("test_deit"), torch.zeros(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ the file


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema"])
def test_output_is_the_input_file_with_new_bn_buffers_and_folds(tmp_path: Path, legacy: bool,
                                                                ema: bool) -> None:
    src = random_checkpoint("test_slab_deit", tmp_path / "in.pth", seed=2, with_ema=True, legacy=legacy)
    imgs = write_images(tmp_path / "imgs", classes=3, level=200)
    rep = recalibrate_checkpoint("test_slab_deit", src, tmp_path / "out.pth", images=imgs, batch_size=4,
                                 ema=ema)
    state, other = ("state_dict_ema", "model") if ema else ("model", "state_dict_ema")
    assert rep.state == state and any(other in n for n in rep.notes)
    # read as the authors' code reads it: torch.load executing the pickle (yacs is installed here)
    a, b = torch.load(src, weights_only=False), torch.load(tmp_path / "out.pth", weights_only=False)
    assert type(b["config"]).__module__ == "yacs.config" and b["config"] == a["config"]
    assert list(a) == list(b) and all(a[k] == b[k] for k in ("epoch", "max_accuracy", "lr_scheduler"))
    ta, tb = (dict(_tensors({k: v for k, v in a.items() if k != state})),
              dict(_tensors({k: v for k, v in b.items() if k != state})))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # optimizer, other weights
    bn_keys = {f"{n}.{x}" for n, _ in batchnorms(build_model("test_slab_deit")) for x in BN_BUFFERS}
    for k, v in a[state].items():
        assert torch.equal(v, b[state][k]) != (k in bn_keys), k
    # exactly the statistics RecalibrateBN gives on the same images
    model = create_model("test_slab_deit", src, ema=ema)
    pics = datasets.image_folder(imgs, preprocessing(model), limit=2048)
    want = RecalibrateBN(model, torch.from_numpy(pics.x), batch_size=4).model
    got = create_model("test_slab_deit", tmp_path / "out.pth", ema=ema)
    for k, v in want.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    folded, report = fold_model(got)
    x = torch.from_numpy(pics.x)
    with torch.no_grad():
        ref, out = got(x), folded(x)
    budget = tolerance_for("fold", "fp32").max_rel
    assert budget is not None and float((ref - out).abs().max()) <= budget * float(ref.abs().max())
    if not legacy:  # the zip records other than the patched storages are byte for byte the input's
        with zipfile.ZipFile(src) as za, zipfile.ZipFile(tmp_path / "out.pth") as zb:
            assert [i.filename for i in za.infolist()] == [i.filename for i in zb.infolist()]
            differ = [n for n in za.namelist() if za.read(n) != zb.read(n)]  # zipfile checks each CRC-32
        assert len(differ) == len(bn_keys) and all("/data/" in f for f in differ)
        assert (tmp_path / "out.pth").stat().st_size == src.stat().st_size


@pytest.mark.parametrize("saved, loaded", [("test_deit_prepbn", "test_deit_linearnorm"),
                                           ("test_deit_linearnorm", "test_deit_prepbn")])
def test_safetensors_in_the_other_repbn_layout(tmp_path: Path, saved: str, loaded: str) -> None:
    """A plain-RepBN file (X.bn.*) loaded as a LinearNorm model (X.norm2.bn.*) and the reverse: the
    statistics are written back under the file's own keys."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    sd = randomize_weights(build_model(saved), seed=4).state_dict()
    src = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(src), metadata={"note": "kept"})
    imgs = write_images(tmp_path / "imgs", level=60)
    rep = recalibrate_checkpoint(loaded, src, tmp_path / "o.safetensors", images=imgs, batch_size=3)
    assert rep.before is None and any("no labels" in n for n in rep.notes)
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        assert f.metadata() == {"note": "kept"} and set(f.keys()) == {f"module.{k}" for k in sd}
        changed = {k for k in sd if not torch.equal(f.get_tensor(f"module.{k}"), sd[k])}
    assert changed == {k for k in sd if k.endswith(BN_BUFFERS)}  # under the file's own keys
    plain = create_model("test_deit_prepbn", tmp_path / "o.safetensors").state_dict()
    linear = create_model("test_deit_linearnorm", tmp_path / "o.safetensors").state_dict()
    bn = [k for k in plain if k.endswith(BN_BUFFERS)]
    assert bn and all(torch.equal(plain[k], linear[k.replace(".bn.", ".norm2.bn.")]) for k in bn)


def test_interrupt_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slab_deploy.weights.patch as patch
    from slab_deploy.utils import Interrupted

    src = random_checkpoint("test_slab_deit", tmp_path / "in.pth", seed=0)
    imgs = write_images(tmp_path / "imgs", classes=2)
    out = tmp_path / "out.pth"
    out.write_bytes(b"an earlier file")
    real = patch._patch_zip

    def interrupted(path: Path, *a: Any) -> None:
        real(path, *a)  # the temporary file is fully patched when the signal arrives
        raise Interrupted(2)

    monkeypatch.setattr(patch, "_patch_zip", interrupted)
    with pytest.raises(Interrupted):
        recalibrate_checkpoint("test_slab_deit", src, out, images=imgs, force=True)
    assert out.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "in.pth", "out.pth"]  # no .partial left


def test_written_file_that_does_not_read_back_is_not_kept(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import slab_deploy.weights.patch as patch

    src = random_checkpoint("test_slab_deit", tmp_path / "in.pth", seed=0)
    imgs = write_images(tmp_path / "imgs")
    monkeypatch.setattr(patch, "_patch_zip", lambda *a: None)  # a writer that forgot to write
    with pytest.raises(ArtifactError, match="changed more \\(or less\\) than asked"):
        recalibrate_checkpoint("test_slab_deit", src, tmp_path / "out.pth", images=imgs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "in.pth"]


# ------------------------------------------------------------------------------------------------ the command


def _one_line_error(code: int, err: str, match: str) -> None:
    assert code == 1, err
    assert match in err and "Traceback" not in err, err
    # one message (rich may wrap it)
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) <= 3, err


def test_cli_refusals(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    src = random_checkpoint("test_slab_deit", tmp_path / "in.pth", seed=0)
    imgs = write_images(tmp_path / "imgs", classes=2)
    (tmp_path / "empty").mkdir()
    ln = random_checkpoint("test_deit", tmp_path / "ln.pth", seed=0)
    unfinished = random_checkpoint("test_slab_deit", tmp_path / "unf.pth", seed=0, prepbn_iter=100)
    out = tmp_path / "out.pth"
    base = ["recalibrate", "-m", "test_slab_deit", "-c", str(src), "-o", str(out)]
    cases = [
        (base, "pass --images DIR"),
        ([*base, "--images", str(tmp_path / "empty")], "holds no"),
        ([*base, "--images", str(tmp_path / "nowhere")], "is not a directory"),
        (["recalibrate", "-m", "test_deit", "-c", str(ln), "-o", str(out), "--images", str(imgs)],
         "no BatchNorm"),
        (["recalibrate", "-m", "test_slab_deit", "-c", str(unfinished), "-o", str(out),
          "--images", str(imgs)],
         "saved before PRepBN finished"),
        ([*base, "--images", str(imgs), "--eval-images", str(write_images(tmp_path / "flat"))],
         "has no class folders"),
        ([*base, "--images", str(imgs), "--batch-size", "0"], "--batch-size 0"),
        ([*base, "--images", str(imgs), "--img-size", "48"], "this checkpoint fits --img-size 32"),
        (["recalibrate", "-m", "test_slab_deit", "-c", str(src), "-o", str(src), "--images", str(imgs),
          "--force"],
         "is the input checkpoint"),
    ]
    for args, match in cases:
        code, _, err = run_cli(args, capsys, monkeypatch)
        _one_line_error(code, err, match)
        assert not out.exists() and not list(tmp_path.glob(".*partial"))
    link = tmp_path / "link.pth"
    link.hardlink_to(src)
    code, _, err = run_cli([*base[:-1], str(link), "--images", str(imgs), "--force"], capsys, monkeypatch)
    _one_line_error(code, err, "is the input checkpoint")
    out.write_bytes(b"keep me")
    code, _, err = run_cli([*base, "--images", str(imgs)], capsys, monkeypatch)
    _one_line_error(code, err, "pass --force")
    assert out.read_bytes() == b"keep me"
    code, _, err = run_cli([*base, "--images", str(imgs), "--force"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["recalibrate", "-m", "test_slab_deit", "-c", str(unfinished),
                            "-o", str(tmp_path / "u.pth"), "--images", str(imgs),
                            "--allow-unfinished-prepbn", "--json"], capsys, monkeypatch)
    assert code == 0, err


def test_cli_on_the_demo_model_and_its_held_out_digits(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    recorded = datasets.demo_models()[DEMO]
    out = tmp_path / "demo.pth"
    t0 = time.perf_counter()
    code, stdout, err = run_cli(["recalibrate", "-m", DEMO, "-c", str(DEMO_CKPT), "-o", str(out), "--json"],
                                capsys, monkeypatch)
    seconds = time.perf_counter() - t0
    assert code == 0, err
    rep = json.loads(stdout)
    assert seconds < 10, seconds
    assert rep["images"] == recorded["heldout_count"] and rep["eval_on_calibration_images"]
    assert rep["before"]["correct"] == recorded["heldout_correct"]  # the shipped file as recorded
    assert rep["statistics"]["count"] == 9 and 0 < rep["statistics"]["max_mean_shift"] < math.inf
    model = create_model(DEMO, out)
    held = datasets.demo_heldout(DEMO, preprocessing(model))
    with torch.no_grad():
        pred = model(torch.from_numpy(held.x)).argmax(-1).numpy()
        pred_before = create_model(DEMO, DEMO_CKPT)(torch.from_numpy(held.x)).argmax(-1).numpy()
    assert rep["after"]["correct"] == int((pred == held.labels).sum())  # what the written file gives
    assert rep["changed_predictions"] == int((pred != pred_before).sum())
    # held-out mode: statistics from a labelled folder of the digits, top-1 on the shipped set elsewhere
    from PIL import Image

    with np.load(datasets.DATA / "digits_heldout.npz") as f:
        pics, labels = f["images"][:60], f["labels"][:60]
    for i, (p, y) in enumerate(zip(pics, labels, strict=True)):
        (tmp_path / "digits" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(tmp_path / "digits" / str(y) / f"{i}.png")
    code, stdout, err = run_cli(["recalibrate", "-m", DEMO, "-c", str(DEMO_CKPT),
                                 "-o", str(tmp_path / "b.pth"), "--images", str(tmp_path / "digits"),
                                 "--eval-images", str(tmp_path / "digits")],
                                capsys, monkeypatch)
    assert code == 0, err
    assert "top-1" in stdout and "calibration images themselves" not in stdout and "BatchNorm" in stdout


def test_help_needs_no_torch() -> None:
    code = ("import sys; sys.argv = ['slab-deploy', 'recalibrate', '--help']\n"
            "import atexit; atexit.register(lambda: print('torch' in sys.modules))\n"
            "from slab_deploy.cli import main\nmain()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0 and "--eval-images" in r.stdout
            and r.stdout.strip().endswith("False")), r.stdout + r.stderr
