"""PVT zoo: what only PVT does (spatial reduction, heads, LayerNorm eps, position embeddings that
are not resized at their own size, linear attention per head, where each norm folds). The
contracts every model meets (build, upstream key layout from the SLAB authors' slab_pvt.py,
whai362/PVT v1 pvt.py and FLatten's flatten_pvt.py, paper figures, forward, fold) are in
tests/test_zoo.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_fold, tiny_model

from slab_deploy.errors import UnsupportedInputError
from slab_deploy.models import build_model, get_spec, list_models
from slab_deploy.models.layers import LinearNorm, focused_kernel
from slab_deploy.models.pvt import (
    FocusedLinearAttention,
    PyramidVisionTransformer,
    SimplifiedLinearAttention,
    SpatialReductionAttention,
)
from slab_deploy.weights import randomize_weights

FULL = [
    "flatten_pvt_tiny",
    "pvt_medium",
    "pvt_medium_prepbn",
    "pvt_small",
    "pvt_small_prepbn",
    "pvt_tiny",
    "pvt_tiny_prepbn",
    "slab_pvt_medium",
    "slab_pvt_small",
    "slab_pvt_tiny",
]
TINY = [n for n in list_models("test_*", include_test=True) if get_spec(n).family == "pvt"]
SLAB_TINY = [n for n in TINY if get_spec(n).norm != "layernorm"]


def tiny(name: str, seed: int = 0, **kwargs: object) -> PyramidVisionTransformer:
    model = randomize_weights(build_model(name, **kwargs), seed)
    assert isinstance(model, PyramidVisionTransformer)
    return model


def images(name: str, batch: int = 2, seed: int = 1, size: int | None = None) -> torch.Tensor:
    shape = get_spec(name).input_size if size is None else (3, size, size)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_the_family() -> None:
    assert sorted(n for n in list_models() if get_spec(n).family == "pvt") == FULL
    assert {"test_slab_pvt", "test_pvt_prepbn", "test_pvt", "test_flatten_pvt"} <= set(TINY)
    assert {get_spec(n).attention[0] for n in TINY} == {"sla", "softmax", "flatten"}
    assert get_spec("slab_pvt_tiny").compare_with == ("pvt_tiny", "flatten_pvt_tiny")
    assert get_spec("flatten_pvt_tiny").baseline_of == "flatten"


def test_spec_records_schedule() -> None:
    for name in FULL:
        spec = get_spec(name)
        assert spec.prepbn_steps == (300000 if spec.norm == "prepbn" else None), name


def test_spatial_reduction_only_in_softmax_stages() -> None:
    softmax = build_model("test_pvt_prepbn")
    for i, sr in enumerate((8, 4, 2, 1)):
        attn = getattr(softmax, f"block{i + 1}")[0].attn
        assert isinstance(attn, SpatialReductionAttention)
        assert (attn.sr is not None) == (sr > 1)
        if attn.sr is not None:
            assert attn.sr.stride == (sr, sr)
            assert isinstance(attn.norm, LinearNorm)
    sla = build_model("test_slab_pvt")
    for i in range(4):
        attn = getattr(sla, f"block{i + 1}")[0].attn
        assert isinstance(attn, SimplifiedLinearAttention)
        assert not hasattr(attn, "sr")


def test_heads() -> None:
    """SLAB-PVT: no final norm, mean of tokens. PVT v1: class token + final norm. FLatten-PVT:
    an unused final norm (kept for its checkpoints), mean of tokens."""
    slab = tiny_model("test_slab_pvt")
    assert slab.norm is None and slab.cls_token is None
    v1 = tiny("test_pvt")
    assert v1.pos_embed4.shape[1] == 2 * 2 + 1
    flat = tiny("test_flatten_pvt")
    x = images("test_pvt")
    with torch.no_grad():
        before_v1, before_flat = v1(x), flat(x)
        v1.cls_token.add_(1.0)
        v1.norm.weight.mul_(2.0)
        flat.norm.weight.mul_(2.0)
        after_v1, after_flat = v1(x), flat(x)
    assert (before_v1 - after_v1).abs().max() > 1e-3
    torch.testing.assert_close(before_flat, after_flat, rtol=0, atol=0)


def test_layernorm_eps_follow_upstream() -> None:
    """PVT v1 and FLatten: nn.LayerNorm() (eps 1e-5) in patch embeddings and spatial reduction,
    eps 1e-6 in blocks and the final norm."""
    for name in ("test_pvt", "test_flatten_pvt"):
        model = build_model(name)
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                aux = mod_name.startswith("patch_embed") or mod_name.endswith("attn.norm")
                assert mod.eps == (1e-5 if aux else 1e-6), (name, mod_name)


def test_same_size_pos_embed_resize_is_exact_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The authors resize stages 2-4's position embeddings to the size they already have: that is
    the identity, so it is skipped (no Resize in exports)."""
    model = tiny_model("test_pvt_prepbn")
    pe = model.pos_embed2
    same = F.interpolate(pe.reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear")
    torch.testing.assert_close(same.reshape(1, -1, 64).permute(0, 2, 1), pe, rtol=0, atol=0)
    calls: list[object] = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        model(images("test_pvt_prepbn"))
    assert calls == []


@pytest.mark.parametrize("name", ["test_pvt_prepbn", "test_pvt"])
def test_trained_pos_embed_resized_for_other_sizes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = tiny_model(name)
    model = build_model(name, img_size=96, pos_embed_img_size=64)
    model.load_state_dict(trained.state_dict(), strict=True)  # same shapes as the 64x64 model
    calls: list[object] = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        out = model(images(name, size=96))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert len(calls) == 4


@pytest.mark.parametrize("name", ["test_slab_pvt", "test_flatten_pvt"])
def test_linear_stages_cannot_resize(name: str) -> None:
    with pytest.raises(UnsupportedInputError, match="positional encoding"):
        build_model(name, img_size=96, pos_embed_img_size=64)
    assert build_model(name, img_size=96)(torch.randn(1, 3, 96, 96)).shape == (1, 1000)


def split(t: torch.Tensor, h: int, d: int) -> torch.Tensor:
    return t[..., h * d : (h + 1) * d]


def dwc(attn: torch.nn.Module, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    b, n, d = v.shape
    return attn.dwc(v.transpose(1, 2).reshape(b, d, *grid)).reshape(b, d, n).transpose(1, 2)


def reference_sla(attn: SimplifiedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[-1]
    heads, d = attn.num_heads, c // attn.num_heads
    q = F.relu(attn.q(x))
    k, v = attn.kv(x).split(c, dim=-1)
    k = F.relu(k + attn.positional_encoding)
    outs = []
    for h in range(heads):
        qh, kh, vh = split(q, h, d), split(k, h, d), split(v, h, d)
        den = (qh * kh.sum(dim=1, keepdim=True)).sum(-1, keepdim=True) + 1e-6
        outs.append((qh @ kh.transpose(1, 2)) @ vh / den + dwc(attn, vh, attn.resolution))
    return attn.proj(torch.cat(outs, dim=-1))


def reference_flatten(attn: FocusedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[1], x.shape[2]
    heads, d = attn.num_heads, c // attn.num_heads
    k, v = attn.kv(x).split(c, dim=-1)
    q = focused_kernel(attn.q(x), attn.scale, 3.0)
    k = focused_kernel(k + attn.positional_encoding, attn.scale, 3.0)
    outs = []
    for h in range(heads):
        qh, kh, vh = split(q, h, d), split(k, h, d), split(v, h, d)
        den = (qh * kh.mean(dim=1, keepdim=True)).sum(-1, keepdim=True) + 1e-6
        outs.append((qh @ kh.transpose(1, 2)) @ vh / n / den + dwc(attn, vh, attn.resolution))
    return attn.proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("name", ["test_slab_pvt", "test_flatten_pvt"])
def test_linear_attention_matches_reference_formula(name: str) -> None:
    model = tiny_model(name)
    attn = model.block2[0].attn
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(5))
    ref = reference_sla if name == "test_slab_pvt" else reference_flatten
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref(attn, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SLAB_TINY)
def test_norms_fold_into_their_consumers(name: str) -> None:
    """Patch embeddings fold on their output side; block norms into q and kv (and sr when present)."""
    _, report = tiny_fold(name)
    into = {n.name: (n.side, sorted(n.into)) for n in report.norms}
    assert into["patch_embed1.norm"] == ("output", ["patch_embed1.proj"])
    assert into["block4.0.norm1"] == ("input", ["block4.0.attn.kv", "block4.0.attn.q"])
    assert into["block4.0.norm2"] == ("input", ["block4.0.mlp.fc1"])
    if name == "test_pvt_prepbn":
        assert into["block1.0.norm1"] == ("input", ["block1.0.attn.q", "block1.0.attn.sr"])
        assert into["block1.0.attn.norm"] == ("input", ["block1.0.attn.kv"])
