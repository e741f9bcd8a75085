"""The fold: structure (no norm left), numerics (exact within the fold tolerance), refusals, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fold_budget, images, norm_modules, slab_models, tiny_models, tiny_slab_models
from torch import nn

from slab_deploy.models import build_model, create_model, get_spec
from slab_deploy.models.layers import ChannelAffine, RepBN, prepbn
from slab_deploy.passes import fold_affine, fold_model, save_folded
from slab_deploy.weights import randomize_weights


def _check_fold(name: str, seeds: tuple[int, ...] = (0, 1), batches: tuple[int, ...] = (1, 3)) -> None:
    model = randomize_weights(build_model(name), seed=11)
    folded, report = fold_model(model)
    assert norm_modules(folded) == [], f"norm modules left in folded {name}"
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules()), [
        n.reason for n in report.norms if n.reason]
    assert report.folded == len(report.norms) > 0
    with torch.no_grad():
        for seed in seeds:
            for b in batches:
                x = images(model, b, seed)
                ref = model(x)
                delta = float((folded(x) - ref).abs().max())
                assert delta <= fold_budget(ref), f"{name} seed {seed} batch {b}: {delta:.3e}"


@pytest.mark.parametrize("name", tiny_slab_models())
def test_fold_tiny_variants(name: str) -> None:
    _check_fold(name, seeds=(0, 1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("name", slab_models())
def test_fold_full_size(name: str) -> None:
    _check_fold(name, seeds=(0, 1))


@pytest.mark.parametrize("name", [n for n in tiny_models() if get_spec(n).norm == "layernorm"])
def test_layernorm_baselines_are_left_alone(name: str) -> None:
    model = randomize_weights(build_model(name), seed=2)
    folded, report = fold_model(model)
    assert report.folded == 0 and all(n.action == "kept-layernorm" for n in report.norms)
    assert all("input" in n.reason for n in report.norms)
    x = images(model, 2, 0)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_fold_does_not_mutate_input_and_twice_is_noop() -> None:
    name = tiny_slab_models()[0]
    model = randomize_weights(build_model(name), seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, _ = fold_model(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again, report2 = fold_model(folded)
    assert report2.folded == 0 and not report2.changed
    x = images(model, 2, 0)
    with torch.no_grad():
        torch.testing.assert_close(again(x), folded(x), rtol=0, atol=0)
    inplace, _ = fold_model(model, inplace=True)
    assert inplace is model and norm_modules(model) == []


# ------------------------------------------------------------------------------------------ fold math


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Linear(6, 5, bias=False), nn.Conv2d(6, 4, 2, 2),
                                   nn.Conv1d(6, 3, 1)])
def test_fold_math_input_side(layer: nn.Module) -> None:
    torch.manual_seed(0)
    a, b = torch.rand(6) + 0.5, torch.randn(6)
    x = (torch.randn(2, 6, 4, 4) if isinstance(layer, nn.Conv2d)
         else (torch.randn(2, 6, 5) if isinstance(layer, nn.Conv1d) else torch.randn(3, 6)))
    shape = [1, -1] + [1] * (x.dim() - 2)
    want = layer(x * a.view(shape) + b.view(shape))
    w, c = fold_affine.fold_input_side(layer.weight, layer.bias, a, b)
    got = nn.functional.linear(x, w, c) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 5, 2, 2, bias=True),
                                   nn.Conv2d(3, 5, 3, 1, padding=1)])
def test_fold_math_output_side(layer: nn.Module) -> None:
    torch.manual_seed(1)
    a, b = torch.rand(5) + 0.5, torch.randn(5)
    if isinstance(layer, nn.Linear):
        x = torch.randn(3, 6)
        want = layer(x) * a + b
        w, c = fold_affine.fold_output_side(layer.weight, layer.bias, a, b)
        got = nn.functional.linear(x, w, c)
    else:
        nn.init.normal_(layer.bias)  # a non-zero conv bias: the term the authors' Swin fold drops
        x = torch.randn(2, 3, 6, 6)
        want = layer(x) * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        w, c = fold_affine.fold_output_side(layer.weight, layer.bias, a, b)
        got = layer._conv_forward(x, w, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _authors_patch_embed_fold(weight, bias, a, b):  # type: ignore[no-untyped-def]
    """The SLAB authors' Swin `PatchEmbed.merge_bn`: scales W but keeps the conv bias unscaled."""
    w = weight.double() * a.double().view([-1] + [1] * (weight.dim() - 1))
    c = (bias.double() if bias is not None else 0.0) + b.double()
    return w.to(weight.dtype), c.to(weight.dtype)


def test_authors_patch_embedding_formula_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    name = next(n for n in tiny_slab_models() if get_spec(n).family == "swin")
    model = randomize_weights(build_model(name), seed=7)
    x = images(model, 2, 0)
    with torch.no_grad():
        ref = model(x)
    monkeypatch.setattr(fold_affine, "fold_output_side", _authors_patch_embed_fold)
    wrong, _ = fold_model(model, verify=False)
    with torch.no_grad():
        delta = float((wrong(x) - ref).abs().max())
    assert delta > fold_budget(ref), "the wrong formula went unnoticed: the test fixture is too weak"
    # and the pass's own verification refuses it, keeping the norm as an explicit affine
    guarded, report = fold_model(model)
    kept = [n for n in report.norms if n.action == "kept-affine"]
    assert kept and all("moved the logits" in n.reason for n in kept)
    with torch.no_grad():
        assert float((guarded(x) - ref).abs().max()) <= fold_budget(ref)


# ------------------------------------------------------------------------------------------ refusals


class _Padded(nn.Module):
    """norm -> zero pad -> Linear (like Swin window padding), plus a residual use."""

    def __init__(self) -> None:
        super().__init__()
        self.img_size = 8
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.norm1 = prepbn(1e-6, 10)(8)
        self.qkv = nn.Linear(8, 8)
        self.norm2 = RepBN(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, 4, 8)
        h = self.norm1(x).view(-1, 2, 2, 8)
        h = nn.functional.pad(h, (0, 0, 0, 1, 0, 1))  # zeros are not mapped by the affine
        h = self.qkv(h.reshape(h.shape[0], -1, 8))[:, :4]
        x = x + h
        return self.head(self.norm2(x).mean(1))


def test_padding_is_refused_and_kept_exact() -> None:
    torch.manual_seed(0)
    model = randomize_weights(_Padded().eval(), seed=3)
    folded, report = fold_model(model)
    by_name = {n.name: n for n in report.norms}
    assert by_name["norm1"].action == "kept-affine" and "ConstantPadNd" in by_name["norm1"].reason
    assert by_name["norm2"].action == "folded"
    assert isinstance(folded.norm1, ChannelAffine) and not any(isinstance(m, RepBN) for m in folded.modules())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert float((folded(x) - ref).abs().max()) <= fold_budget(ref)


def test_swin_padding_input_size() -> None:
    """A Swin input size that forces window padding: the padded norms stay as explicit affines."""
    name = next(n for n in tiny_slab_models() if get_spec(n).family == "swin")
    size = _padding_size(name)
    if size is None:
        pytest.skip(f"{name} has no input size that forces window padding")
    model = randomize_weights(build_model(name, img_size=size), seed=5)
    folded, report = fold_model(model)
    kept = [n for n in report.norms if n.action == "kept-affine"]
    assert kept and all("ConstantPadNd" in n.reason for n in kept)
    x = images(model, 2, 1)
    with torch.no_grad():
        ref = model(x)
        assert float((folded(x) - ref).abs().max()) <= fold_budget(ref)


def _padding_size(name: str) -> int | None:
    base = build_model(name)
    native = base.img_size if isinstance(base.img_size, int) else base.img_size[0]
    for size in range(native + 4, native * 2, 4):
        try:
            m = build_model(name, img_size=size)
        except Exception:
            continue
        if any(getattr(mod, "needs_padding", False) is True for mod in m.modules()):
            return size
    return None


# ----------------------------------------------------------------------------------------- folded checkpoints


def test_folded_checkpoint_roundtrip(tmp_path: Path) -> None:
    from slab_deploy.weights import random_checkpoint

    name = next(n for n in tiny_slab_models() if get_spec(n).family == "swin")
    ckpt = random_checkpoint(name, tmp_path / "src.pth", seed=9)
    model = create_model(name, ckpt)
    folded, report = fold_model(model)
    out = save_folded(folded, tmp_path / "folded.pt", source_sha256=model.checkpoint_info.sha256)
    loaded = create_model(name, out)
    assert loaded.checkpoint_info.folded is not None
    assert norm_modules(loaded) == []
    assert loaded.fold_report.folded == report.folded
    x = images(model, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)
    _, again = fold_model(loaded)
    assert again.folded == 0
    other = next(n for n in tiny_slab_models() if n != name)
    from slab_deploy.errors import CheckpointError

    with pytest.raises(CheckpointError, match=f"folded {name} checkpoint"):
        create_model(other, out)


@pytest.mark.parametrize("name", ["test_slab_deit", "test_slab_swin", "test_slab_pvt", "test_slab_cswin"])
def test_folded_models_feed_linears_row_major(name: str) -> None:
    """With the norms folded away nothing re-lays-out the residual stream: the token layout after
    each patch embedding must be row-major, or every Linear reads a transposed input (slow GEMMs,
    strided adds on GPUs)."""
    m, _ = fold_model(randomize_weights(create_model(name), seed=0))
    bad: list[str] = []

    def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = "") -> None:
        if args[0].dim() == 3 and not args[0].is_contiguous():
            bad.append(name)

    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n))
    with torch.no_grad():
        m(torch.randn(2, *get_spec(name).input_size))
    assert not bad, bad


# ------------------------------------------------------------------------------------------ NaN safety


def test_nan_logits_refuse_the_fold_and_the_cli_writes_nothing(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    """NaN compares false with every budget: a model whose logits are NaN cannot verify a fold, and
    the report must not say `max |delta| nan` as if all were well."""
    from helpers import run_cli

    from slab_deploy.errors import FoldError
    from slab_deploy.weights import save_authors_checkpoint

    name = "test_slab_deit"
    model = randomize_weights(build_model(name), seed=5)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(FoldError, match="NaN/Inf logits"):
        fold_model(model)
    ckpt = save_authors_checkpoint(tmp_path / "nan.pth", model.state_dict(), model_name=name)
    out = tmp_path / "folded.pt"
    code, _, err = run_cli(["fold", "-m", name, "-c", str(ckpt), "-o", str(out)], capsys, monkeypatch)
    # the checkpoint reader names the NaN tensor before the fold is reached
    assert code == 1 and "NaN or Inf weights in head.weight" in err and "Traceback" not in err
    assert not out.exists()


def test_a_fold_that_makes_nan_is_reverted(monkeypatch: pytest.MonkeyPatch) -> None:
    import slab_deploy.passes.fold as fold_mod

    name = "test_slab_deit"
    model = randomize_weights(build_model(name), seed=6)
    real = fold_mod.apply_fold
    poisoned = []

    def nan_fold(m, fold):  # type: ignore[no-untyped-def]
        added = real(m, fold)
        if not poisoned:
            poisoned.append(fold.norm)
        if fold.norm == poisoned[0]:  # this fold writes a NaN into its target, every time it is applied
            with torch.no_grad():
                m.get_submodule(fold.modules[0]).weight.view(-1)[0] = float("nan")
        return added

    monkeypatch.setattr(fold_mod, "apply_fold", nan_fold)
    folded, report = fold_model(model)
    by_name = {n.name: n for n in report.norms}
    assert (by_name[poisoned[0]].action == "kept-affine"
            and "moved the logits by nan" in by_name[poisoned[0]].reason)
    assert report.verified and report.max_abs_delta == report.max_abs_delta  # finite, not NaN
    x = images(model, 2, 1)
    with torch.no_grad():
        ref = model(x)
        assert float((folded(x) - ref).abs().max()) <= fold_budget(ref)


def test_zero_scale_channels_keep_the_local_check_finite() -> None:
    """gamma = 0 and alpha = 0 give a == 0 on a channel: exact to fold, and its per-norm delta must
    still be a number (dividing by a there made it NaN)."""
    name = "test_slab_deit"
    model = randomize_weights(build_model(name), seed=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RepBN):
                m.bn.weight[:3] = 0.0
                m.alpha.zero_()
    folded, report = fold_model(model)
    deltas = [n.max_abs_delta for n in report.norms if n.action == "folded"]
    assert deltas and all(d is not None and d == d and d < float("inf") for d in deltas)
    assert report.verified


def test_unverified_summary_says_so() -> None:
    """With verify=False a NaN delta is reported as NOT VERIFIED, never as a plain number."""
    name = "test_slab_deit"
    model = randomize_weights(build_model(name), seed=9)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    _, report = fold_model(model, verify=False)
    assert (not report.verified and "NOT VERIFIED" in report.summary()
            and report.to_dict()["verified"] is False)
