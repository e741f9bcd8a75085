"""passes.move_biases, as fold_model runs it: the DWC biases into the output projections, and the
residual writers' biases to the end of their stage, exact on every SLAB family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fold_budget, images, run_cli, tiny_slab_models
from torch import nn

from slab_deploy.errors import CheckpointError
from slab_deploy.models import build_model, create_model
from slab_deploy.models.folded import FOLD_META_KEY
from slab_deploy.passes import fold as fold_pass
from slab_deploy.passes import fold_model, save_folded
from slab_deploy.passes.move_biases import move_biases
from slab_deploy.passes.repbn_to_affine import RepBNToAffine
from slab_deploy.passes.unwrap_prepbn import UnwrapPRepBN
from slab_deploy.weights import randomize_weights

FAMILIES = ["test_slab_deit", "test_slab_swin", "test_slab_pvt", "test_slab_cswin"]


def _block_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every residual block (a member of a ModuleList or Sequential of blocks)."""
    from slab_deploy.passes.move_biases import _BLOCKS

    got: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, n=n: got.__setitem__(n, out.detach()))
               for n, m in model.named_modules() if isinstance(m, _BLOCKS)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("name", FAMILIES)
def test_moved_biases_keep_logits_and_every_stage_output(name: str) -> None:
    model = randomize_weights(build_model(name), seed=21)
    kept, _ = fold_model(model, keep_biases=True)
    moved, report = fold_model(model)
    assert report.verified and report.biases_removed and not kept.fold_report.biases_removed
    # every SLA conv lost its bias (CSWin's LePE conv too), and nothing else has one it did not have
    sla = [n for n, m in moved.named_modules() if isinstance(getattr(m, "dwc", None), nn.Conv2d)]
    sla_convs = [f"{n}.{c}" for n in sla for c in ("dwc", "get_v") if hasattr(moved.get_submodule(n), c)]
    assert sla_convs and all(moved.get_submodule(n).bias is None for n in sla_convs)
    assert set(sla_convs) <= set(report.biases_removed)
    x = images(model, 3, 5)
    with torch.no_grad():
        ref = model(x)
        assert float((moved(x) - ref).abs().max()) <= fold_budget(ref)
    a, b = _block_outputs(kept, x), _block_outputs(moved, x)
    # A stage's last block writes the whole sum: its output is the folded model's. Inside a stage the
    # stream is offset by the biases written so far.
    last = {n for n in a if not any(o.rpartition(".")[0] == n.rpartition(".")[0]
                                     and int(o.rpartition(".")[2]) > int(n.rpartition(".")[2]) for o in a)}
    for n in last:
        assert float((a[n] - b[n]).abs().max()) <= fold_budget(a[n]), n
    inner = [n for n in a if n not in last]  # (the tiny PVT has one block per stage)
    assert any(float((a[n] - b[n]).abs().max()) > fold_budget(a[n]) for n in inner) or name == "test_slab_pvt"


@pytest.mark.parametrize("name", ["test_slab_deit", "test_slab_cswin"])
def test_moved_biases_behind_kept_affines(name: str) -> None:
    """Norms left as per-channel affines (a fold refused): the readers take the constant as the
    affine scales it."""
    model = randomize_weights(build_model(name), seed=22)
    model = RepBNToAffine(UnwrapPRepBN(model).model).model
    before = {n: m.bias.detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.bias is not None}
    x = images(model, 2, 6)
    with torch.no_grad():
        ref = model(x)
        moved = move_biases(model)
        assert moved.removed and float((model(x) - ref).abs().max()) <= fold_budget(ref)
    changed = [n for n, b in before.items() if model.get_submodule(n).bias is not None
               and not torch.equal(model.get_submodule(n).bias, b)]
    assert any(n.endswith(("qkv", "fc1")) for n in changed)


def test_a_move_that_moves_the_logits_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    def misread(model: nn.Module):  # type: ignore[no-untyped-def]
        out = move_biases(model)
        fc1 = next(m for n, m in model.named_modules() if n.endswith("mlp.fc1"))
        fc1.bias.data += 1.0
        return out

    model = randomize_weights(build_model("test_slab_deit"), seed=23)
    kept, _ = fold_model(model, keep_biases=True)
    monkeypatch.setattr(fold_pass, "move_biases", misread)
    folded, report = fold_model(model)
    assert report.verified and report.biases_removed == []
    # every bias is back as the fold left it, bit for bit
    want, got = kept.state_dict(), folded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = images(model, 2, 7)
    with torch.no_grad():
        ref = model(x)
        assert float((folded(x) - ref).abs().max()) <= fold_budget(ref)


def test_folded_checkpoints_with_moved_biases_load_back(tmp_path: Path) -> None:
    name = "test_slab_cswin"
    folded, report = fold_model(randomize_weights(build_model(name), seed=24))
    out = save_folded(folded, tmp_path / "f.pt")
    meta = torch.load(out, weights_only=True)[FOLD_META_KEY]
    assert meta["format"] == 2 and meta["biases_removed"] == report.biases_removed
    loaded = create_model(name, out)
    assert loaded.fold_report.biases_removed == report.biases_removed
    x = images(folded, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)
    # a name that has no bias to remove is refused as a damaged file
    payload = torch.load(out, weights_only=True)
    payload[FOLD_META_KEY]["biases_removed"] = ["stage1.0.norm1"]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="fold the original checkpoint again"):
        create_model(name, tmp_path / "bad.pt")


def test_format_1_folded_checkpoints_still_load(tmp_path: Path) -> None:
    """What slab-deploy wrote before biases moved: format 1, no `biases_removed`."""
    name = "test_slab_swin"
    folded, _ = fold_model(randomize_weights(build_model(name), seed=25), keep_biases=True)
    out = save_folded(folded, tmp_path / "f.pt")
    payload = torch.load(out, weights_only=True)
    payload[FOLD_META_KEY]["format"] = 1
    del payload[FOLD_META_KEY]["biases_removed"]
    payload[FOLD_META_KEY]["report"].pop("biases_removed")
    torch.save(payload, tmp_path / "v1.pt")
    loaded = create_model(name, tmp_path / "v1.pt")
    x = images(folded, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)


def test_every_tiny_slab_model_moves_something() -> None:
    """Guards the pass's view of the zoo: a family whose blocks it stops recognising shows up here."""
    for name in tiny_slab_models():
        _, report = fold_model(randomize_weights(build_model(name), seed=26))
        assert report.biases_removed, name


def test_two_branch_sla_blocks_move_each_branch_into_its_columns() -> None:
    """CSWin stripes in two branches (no zoo model has SLA there yet): each branch's conv biases
    land in the projection columns that read that branch."""
    from slab_deploy.models.cswin import CSWinBlock

    block = randomize_weights(CSWinBlock(32, 8, 4, 2, "sla", nn.LayerNorm).eval(), seed=27)
    assert block.num_branches == 2
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ref = block(x)
        moved = move_biases(block)
        assert len(moved.removed) == 4
        assert all(a.dwc.bias is None and a.get_v.bias is None for a in block.attns)
        assert float((block(x) - ref).abs().max()) <= fold_budget(ref)


def test_fold_cli_moves_biases_unless_told_to_keep_them(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    for flags, moved in (([], True), (["--keep-biases"], False)):
        out = tmp_path / f"f{len(flags)}.pt"
        args = ["fold", "--model", "test_slab_deit", "-o", str(out), *flags]
        code, text, _ = run_cli(args, capsys, monkeypatch)
        assert code == 0 and ("bias adds moved" in text) == moved
        meta = torch.load(out, weights_only=True)[FOLD_META_KEY]
        assert bool(meta["biases_removed"]) == moved
    # a folded file matches no variant's keys; inspect names the model its fold metadata gives
    code, text, _ = run_cli(["inspect", str(out)], capsys, monkeypatch)
    assert code == 0 and "test_slab_deit, from its fold metadata" in " ".join(text.split())
