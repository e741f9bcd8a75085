"""DeiT zoo: every variant builds and runs, full-size variants have the upstream state_dict layout
(fingerprints in tests/data/keys, written from the SLAB authors' models and timm 0.4.12's
VisionTransformer), and the attention and pooling do what the authors' code does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slab_deploy.errors import UnsupportedInputError
from slab_deploy.models import build_model, get_spec, list_models
from slab_deploy.models.deit import SimplifiedLinearAttention, VisionTransformer
from slab_deploy.models.layers import LinearNorm
from slab_deploy.passes.fold import fold_model
from slab_deploy.weights import randomize_weights

KEYS = Path(__file__).parent / "data" / "keys"
FULL = [
    "deit_small",
    "deit_small_prepbn",
    "deit_tiny",
    "deit_tiny_prepbn",
    "slab_deit_small",
    "slab_deit_tiny",
]
TINY = [n for n in list_models("test_*", include_test=True) if get_spec(n).family == "deit"]
SLAB_TINY = [n for n in TINY if get_spec(n).norm != "layernorm"]


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    return {k: "x".join(str(s) for s in v.shape) or "scalar" for k, v in model.state_dict().items()}


def read_keys(name: str) -> dict[str, str]:
    lines = (KEYS / f"{name}.txt").read_text().splitlines()
    return dict(line.rsplit(" ", 1) for line in lines if line)


def tiny(name: str, seed: int = 0) -> VisionTransformer:
    model = randomize_weights(build_model(name), seed)
    assert isinstance(model, VisionTransformer)
    return model


def images(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *get_spec(name).input_size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_the_family() -> None:
    assert sorted(n for n in list_models() if get_spec(n).family == "deit") == FULL
    assert {"test_slab_deit", "test_deit_prepbn", "test_deit_linearnorm", "test_deit"} <= set(TINY)
    kinds = {(get_spec(n).norm, get_spec(n).attention) for n in TINY}
    assert {k[0] for k in kinds} == {"layernorm", "repbn", "prepbn"}
    assert {k[1] for k in kinds} == {("sla",), ("softmax",)}


@pytest.mark.parametrize("name", FULL)
def test_state_dict_matches_upstream_layout(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name)
    assert fingerprint(model) == read_keys(name)


@pytest.mark.parametrize("name", FULL)
def test_parameter_count_matches_paper(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    paper = get_spec(name).paper_params_m
    assert paper is not None
    assert params_m == pytest.approx(paper, rel=5e-3)


def prepbn_steps(model: torch.nn.Module) -> set[int]:
    return {int(m.total_step) for m in model.modules() if isinstance(m, LinearNorm)}


def test_spec_records_layout_and_schedule() -> None:
    assert get_spec("deit_tiny_prepbn").layout == "repbn"
    assert get_spec("deit_small_prepbn").prepbn_steps == 300000
    assert get_spec("slab_deit_tiny").prepbn_steps == 60000
    for name in TINY:
        spec = get_spec(name)
        expected = {spec.prepbn_steps} if spec.norm == "prepbn" else set()
        assert prepbn_steps(build_model(name)) == expected, name


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward(name: str) -> None:
    model = tiny(name)
    with torch.no_grad():
        out = model(images(name))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()
    assert build_model(name, num_classes=7)(images(name)).shape == (2, 7)


@pytest.mark.parametrize("name", TINY)
def test_samples_do_not_mix_across_the_batch(name: str) -> None:
    model = tiny(name)
    x = images(name, batch=3)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_forward(name: str) -> None:
    model = build_model(name).eval()
    spec = get_spec(name)
    assert prepbn_steps(model) == ({spec.prepbn_steps} if spec.norm == "prepbn" else set())
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_wrong_input_size_is_refused() -> None:
    model = build_model("test_deit")
    with pytest.raises(UnsupportedInputError, match="built for"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(UnsupportedInputError, match="multiple of the patch size"):
        build_model("test_deit", img_size=36)


def test_other_img_size_builds_matching_embeddings() -> None:
    model = build_model("test_slab_deit", img_size=48)
    assert model.pos_embed.shape == (1, 36, 32)
    assert model.blocks[0].attn.positional_encoding.shape == (1, 36, 32)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 1000)


def test_avg_pool_keeps_cls_token_unused() -> None:
    """SLAB-DeiT owns a cls_token (its checkpoints carry one) but never reads it."""
    model = tiny("test_slab_deit")
    x = images("test_slab_deit")
    assert model.pos_embed.shape[1] == model.patch_embed.num_patches
    with torch.no_grad():
        before = model(x)
        model.cls_token.add_(1.0)
        after = model(x)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_token_pool_reads_cls_token() -> None:
    model = tiny("test_deit_prepbn")
    x = images("test_deit_prepbn")
    assert model.pos_embed.shape[1] == model.patch_embed.num_patches + 1
    with torch.no_grad():
        before = model(x)
        model.cls_token.add_(1.0)
        after = model(x)
    assert (before - after).abs().max() > 1e-3


def reference_sla(attn: SimplifiedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """SLA written out per head: out_i = (sum_j (q_i.k_j) v_j) / (q_i . sum_j k_j + 1e-6) + DWC(v)."""
    b, n, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    q, k, v = attn.qkv(x).split(c, dim=-1)
    q, k = F.relu(q), F.relu(k + attn.positional_encoding)
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        num = (qh @ kh.transpose(1, 2)) @ vh
        den = (qh * kh.sum(dim=1, keepdim=True)).sum(-1, keepdim=True) + 1e-6
        gh, gw = attn.grid
        conv = attn.dwc(vh.transpose(1, 2).reshape(b, d, gh, gw)).reshape(b, d, n).transpose(1, 2)
        outs.append(num / den + conv)
    return attn.proj(torch.cat(outs, dim=-1))


def test_sla_matches_reference_formula() -> None:
    model = tiny("test_slab_deit")
    attn = model.blocks[0].attn
    assert isinstance(attn, SimplifiedLinearAttention)
    x = torch.randn(2, model.patch_embed.num_patches, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_sla(attn, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SLAB_TINY)
def test_every_norm_folds(name: str) -> None:
    """Only commuting ops sit between each norm and its consumers, so every norm folds."""
    model = tiny(name)
    folded, report = fold_model(model)
    assert report.kept == 0
    assert report.folded == 2 * len(model.blocks) + 1
    assert report.max_rel_delta < 1e-5
    into = {n.name: n.into for n in report.norms}
    assert into["norm"] == ["head"]
    assert into["blocks.0.norm1"] == ["blocks.0.attn.qkv"]
    assert into["blocks.0.norm2"] == ["blocks.0.mlp.fc1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_exports_with_dynamic_batch(name: str) -> None:
    model = tiny(name)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (images(name),), dynamic_shapes={"x": {0: batch}})
    x = images(name, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
