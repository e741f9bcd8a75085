"""DeiT zoo: what only DeiT does (pooling, the unused cls_token, SLA per head, embeddings at other
sizes, where each norm folds). The contracts every model meets (build, upstream key layout from the
SLAB authors' models and timm 0.4.12's VisionTransformer, paper figures, forward, fold) are in
tests/test_zoo.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import read_keys, tiny_fold, tiny_model

from slab_deploy.errors import UnsupportedInputError
from slab_deploy.models import build_model, get_spec, list_models
from slab_deploy.models.deit import SimplifiedLinearAttention, VisionTransformer
from slab_deploy.weights import randomize_weights

FULL = [
    "deit_demo",
    "deit_small",
    "deit_small_prepbn",
    "deit_tiny",
    "deit_tiny_prepbn",
    "slab_deit_demo",
    "slab_deit_small",
    "slab_deit_tiny",
]
DEMO_UPSTREAM = {"slab_deit_demo": "slab_deit_tiny", "deit_demo": "deit_tiny"}
TINY = [n for n in list_models("test_*", include_test=True) if get_spec(n).family == "deit"]
SLAB_TINY = [n for n in TINY if get_spec(n).norm != "layernorm"]


def tiny(name: str, seed: int = 0) -> VisionTransformer:
    model = randomize_weights(build_model(name), seed)
    assert isinstance(model, VisionTransformer)
    return model


def images(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *get_spec(name).input_size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_the_family() -> None:
    assert set(FULL) <= set(list_models())  # all registered full-size models: test_zoo's key files
    assert all(get_spec(n).family == "deit" for n in FULL)
    assert {"test_slab_deit", "test_deit_prepbn", "test_deit_linearnorm", "test_deit"} <= set(TINY)
    kinds = {(get_spec(n).norm, get_spec(n).attention) for n in TINY}
    assert {k[0] for k in kinds} == {"layernorm", "repbn", "prepbn"}
    assert {k[1] for k in kinds} == {("sla",), ("softmax",)}


@pytest.mark.parametrize("name", sorted(DEMO_UPSTREAM))
def test_demo_keys_follow_the_upstream_layout(name: str) -> None:
    depth = len(build_model(name).blocks)
    upstream = [k for k in read_keys(DEMO_UPSTREAM[name])
                if not k.startswith("blocks.") or int(k.split(".")[1]) < depth]
    assert list(read_keys(name)) == upstream
    spec = get_spec(name)
    assert spec.num_classes == 10 and spec.input_size == (3, 32, 32) and not spec.test
    assert set(spec.compare_with) <= set(list_models())


def test_spec_records_layout_and_schedule() -> None:
    assert get_spec("deit_tiny_prepbn").layout == "repbn"
    assert get_spec("deit_small_prepbn").prepbn_steps == 300000
    assert get_spec("slab_deit_tiny").prepbn_steps == 60000


def test_img_size_must_be_a_patch_multiple() -> None:
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
    model = tiny_model("test_slab_deit")
    attn = model.blocks[0].attn
    assert isinstance(attn, SimplifiedLinearAttention)
    x = torch.randn(2, model.patch_embed.num_patches, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_sla(attn, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SLAB_TINY)
def test_norms_fold_into_their_consumers(name: str) -> None:
    """Two norms per block and the final one, each into the Linear that reads it."""
    folded, report = tiny_fold(name)
    assert report.folded == 2 * len(folded.blocks) + 1
    into = {n.name: n.into for n in report.norms}
    assert into["norm"] == ["head"]
    assert into["blocks.0.norm1"] == ["blocks.0.attn.qkv"]
    assert into["blocks.0.norm2"] == ["blocks.0.mlp.fc1"]
