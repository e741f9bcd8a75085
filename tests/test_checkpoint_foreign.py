"""Baseline checkpoints as users get them: timm's hub files and Microsoft Swin's release files.

The files in tests/data/foreign/ were written by timm's and Microsoft's own code (see
tests/fixtures_foreign.py, which also recorded the logits each producer's model gives); here
they must load into the zoo's matching variant and give those logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slab_deploy.errors import CheckpointError
from slab_deploy.models import create_model
from slab_deploy.models.checkpoint import detect_variants, read_checkpoint
from slab_deploy.tolerances import tolerance_for

DATA = Path(__file__).parent / "data" / "foreign"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(DATA / "expected.pt", weights_only=True)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    tol = tolerance_for("fold", "fp32").max_rel
    assert tol is not None
    err = float((got - want).abs().max())
    assert err <= tol * float(want.abs().max()), err


@pytest.mark.parametrize("tag, model, x", [("timm_swin", "test_swin", "swin_input"),
                                           ("timm_deit", "test_deit", "deit_input")])
@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_timm_hub_files_load_and_compute_the_same(  # type: ignore[no-untyped-def]
        tag: str, model: str, x: str, filename: str, expected) -> None:
    path = DATA / tag / filename
    sd, info = read_checkpoint(path)
    assert detect_variants(sd, include_test=True) == [model]
    m = create_model(model, path)
    assert m.head.out_features == 10
    if tag == "timm_swin":
        assert ("timm key names" in m.checkpoint_info.remapped
                and "computed from the architecture" in m.checkpoint_info.remapped)
    with torch.no_grad():
        _close(m(expected[x]), expected[f"{tag}_logits"])


def test_microsoft_swin_release_file_with_and_without_buffers(  # type: ignore[no-untyped-def]
        tmp_path: Path, expected) -> None:
    path = DATA / "ms_swin" / "ckpt.pth"
    sd, info = read_checkpoint(path)
    assert info.entry == "model" and any(k.endswith("attn_mask") for k in sd)
    m = create_model("test_swin", path)
    assert m.checkpoint_info.remapped == ""  # the buffers it carries are the ones the zoo computes
    with torch.no_grad():
        _close(m(expected["swin_input"]), expected["ms_swin_logits"])
    stripped = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    torch.save({"model": stripped}, tmp_path / "stripped.pth")
    m2 = create_model("test_swin", tmp_path / "stripped.pth")
    assert "computed from the architecture" in m2.checkpoint_info.remapped
    with torch.no_grad():
        _close(m2(expected["swin_input"]), expected["ms_swin_logits"])
    # a buffer that disagrees with the architecture is named, not loaded
    bad = dict(sd)
    k = next(k for k in sd if k.endswith("relative_position_index"))
    bad[k] = sd[k].flip(0)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=f"buffer {k} differs"):
        create_model("test_swin", tmp_path / "bad.pth")


def test_baseline_file_given_to_a_slab_model_names_the_baseline() -> None:
    with pytest.raises(CheckpointError, match="--model test_swin"):
        create_model("test_slab_swin", DATA / "timm_swin" / "model.safetensors")
    with pytest.raises(CheckpointError, match="--model test_deit"):
        create_model("test_slab_deit", DATA / "timm_deit" / "pytorch_model.bin")
