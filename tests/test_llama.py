"""The LLaMA zoo: registry, key layouts, loading (safe reader, PRepBN progress), Hugging Face parity,
and the fold of every PRepBN (q/k/v, gate/up, final norm into lm_head)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slab_deploy.errors import CheckpointError, ModelNotFoundError, UnfinishedPRepBNError
from slab_deploy.models.folded import save_folded
from slab_deploy.models.layers import ChannelAffine, LinearNorm, RepBN
from slab_deploy.models.llama import LlamaPRepBN
from slab_deploy.models.llm import build_llm, create_llm, get_llm_spec, list_llms, register_llm
from slab_deploy.passes.fold_llm import fold_llm, token_probe
from slab_deploy.tolerances import tolerance_for


def randomise(model: torch.nn.Module, seed: int = 0, *, finished: bool = True) -> torch.nn.Module:
    """Seeded random norm weights, RepBN alpha and BN statistics (the authors initialise alpha and the
    BN affine at zero, which would make a fold trivially exact), and a finished PRepBN schedule."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.2)
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif n.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 2 + 0.2)
            elif finished and n.endswith((".warm", ".iter")):
                b.zero_()
    return model


def test_registry() -> None:
    assert list_llms() == ["llama_350m", "llama_small", "slab_llama_350m", "slab_llama_small"]
    assert set(list_llms("test_*", include_test=True)) == {"test_llama", "test_slab_llama"}
    assert get_llm_spec("slab_llama_350m").compare_with == ("llama_350m",)
    with pytest.raises(ModelNotFoundError, match="slab_llama_350m"):
        get_llm_spec("slab_llama_35m")
    with pytest.raises(ValueError, match="twice"):
        register_llm(name="test_llama", family="llama", norm="rmsnorm", layout="hf", source="")(
            lambda: build_llm("test_llama"))


def test_350m_config_and_params() -> None:
    with torch.device("meta"):
        slab, base = build_llm("slab_llama_350m"), build_llm("llama_350m")
    c = slab.config
    assert (c.hidden_size, c.num_layers, c.num_heads) == (1024, 18, 8)
    assert (c.intermediate_size, c.vocab_size) == (4096, 32000)
    assert (c.rms_norm_eps, c.prepbn_warm, c.prepbn_steps) == (1e-6, 10000, 18000)
    n_base = sum(p.numel() for p in base.parameters())
    # embeddings 2 x 32000 x 1024 + 18 x (4 x 1024^2 + 3 x 1024 x 4096) + norms: 368.1M (untied)
    assert n_base == 2 * 32000 * 1024 + 18 * (4 * 1024**2 + 3 * 1024 * 4096) + 37 * 1024
    norm = slab.model.layers[0].input_layernorm
    assert isinstance(norm, LlamaPRepBN)
    assert norm.norm2.bn.eps == 1e-6 and norm.norm1.eps == 1e-6


def _authors_layer_keys(i: int) -> set[str]:
    """The authors' key layout, written out from their modeling_llama.py."""
    p = f"model.layers.{i}."
    keys = {p + f"self_attn.{x}_proj.weight" for x in "qkvo"} | {p + "self_attn.rotary_emb.inv_freq"}
    keys |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    for n in ("input_layernorm", "post_attention_layernorm"):
        keys |= {p + n + "." + k for k in _prepbn_keys()}
    return keys


def _prepbn_keys() -> list[str]:
    return ["num_step", "warm", "iter", "total_step", "norm1.weight", "norm2.alpha", "norm2.bn.weight",
            "norm2.bn.bias", "norm2.bn.running_mean", "norm2.bn.running_var", "norm2.bn.num_batches_tracked"]


def test_prepbn_layout_is_the_authors() -> None:
    sd = build_llm("test_slab_llama").state_dict()
    want = {"model.embed_tokens.weight", "lm_head.weight"} | {"model.norm." + k for k in _prepbn_keys()}
    for i in range(2):
        want |= _authors_layer_keys(i)
    assert set(sd) == want
    # and in their order: per layer q, k, v, o, RoPE, then gate, down, up, then the two norms
    layer0 = [k[len("model.layers.0."):] for k in sd if k.startswith("model.layers.0.")]
    assert layer0[:8] == [*(f"self_attn.{x}_proj.weight" for x in "qkvo"), "self_attn.rotary_emb.inv_freq",
                          "mlp.gate_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"]
    assert list(sd)[0] == "model.embed_tokens.weight" and list(sd)[-1] == "lm_head.weight"
    assert [k.rsplit(".", 1)[-1] for k in sd if k.startswith("model.norm.")][:4] == [
        "num_step", "warm", "iter", "total_step"]  # their registration order
    assert all(sd[f"model.norm.{k}"].dtype == torch.int64
               for k in ("num_step", "warm", "iter", "total_step"))
    norm = build_llm("test_slab_llama").model.norm
    # the authors initialise alpha and the BN affine at zero
    assert not norm.norm2.alpha.detach().any() and not norm.norm2.bn.weight.detach().any()


def test_rmsnorm_layout_is_hugging_face() -> None:
    sd = build_llm("test_llama").state_dict()
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        want |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        want |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        want |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    assert set(sd) == want


def test_prepbn_schedule_ticks_every_16_calls() -> None:
    norm = LlamaPRepBN(8, warm=2, step=3).train()
    x = torch.randn(2, 3, 8)
    seen = []
    for _ in range(16 * 6):
        norm(x)
        seen.append((int(norm.warm), int(norm.iter)))
    # warm counts down on calls 1 and 17 (num_step 0), then iter on calls 33, 49, 65; then it stays 0
    assert seen[0] == (1, 3) and seen[15] == (1, 3) and seen[16] == (0, 3) and seen[31] == (0, 3)
    assert seen[32] == (0, 2) and seen[48] == (0, 1) and seen[64] == (0, 0) and seen[-1] == (0, 0)
    assert int(norm.num_step) == 0
    # finished: training output is RepBN alone, eval output is RepBN (running statistics)
    norm.eval()
    assert torch.equal(norm(x), norm.norm2(x))


def test_kv_cache_matches_full_forward() -> None:
    m = randomise(build_llm("test_slab_llama"))
    x = token_probe(m, 2, 12, seed=3)
    with torch.no_grad():
        full = m(x)
        l1, past = m(x[:, :7], use_cache=True)
        l2, past = m(x[:, 7:10], past, use_cache=True)
        l3, _ = m(x[:, 10:], past, use_cache=True)
    tol = tolerance_for("fold", "fp32").max_rel
    assert tol is not None
    got = torch.cat([l1, l2, l3], dim=1)
    assert float((got - full).abs().max()) <= tol * float(full.abs().max())


# ------------------------------------------------------------------------------------------------ loading


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(sd, path)
    return path


def test_unfinished_prepbn_is_refused(tmp_path: Path) -> None:
    m = randomise(build_llm("test_slab_llama"), finished=False)  # warm 10000, iter 18000: as built
    ckpt = _save(m.state_dict(), tmp_path / "mid.pth")
    with pytest.raises(UnfinishedPRepBNError, match="10000 LayerNorm-only warm-up steps left"):
        create_llm("test_slab_llama", ckpt)
    got = create_llm("test_slab_llama", ckpt, allow_unfinished_prepbn=True)
    assert int(got.model.norm.warm) == 10000


@pytest.mark.parametrize("fmt", ["training-dict", "legacy", "safetensors"])
def test_finished_checkpoint_loads_exactly(fmt: str, tmp_path: Path) -> None:
    m = randomise(build_llm("test_slab_llama"), seed=4)
    if fmt == "training-dict":
        ckpt = _save({"model": m.state_dict(), "epoch": 3}, tmp_path / "done.pth")
    elif fmt == "legacy":
        ckpt = tmp_path / "done.pth"
        torch.save(m.state_dict(), ckpt, _use_new_zipfile_serialization=False)
    else:
        st = pytest.importorskip("safetensors.torch")
        ckpt = tmp_path / "model.safetensors"
        st.save_file(m.state_dict(), str(ckpt))
    got = create_llm("test_slab_llama", ckpt)
    info = got.checkpoint_info
    assert info is not None and info.layout == "prepbn" and info.prepbn_finished and len(info.prepbn) == 5
    x = token_probe(m)
    with torch.no_grad():
        assert torch.equal(got(x), m(x))


def test_rope_buffers_are_checked_and_filled(tmp_path: Path) -> None:
    m = randomise(build_llm("test_slab_llama"))
    sd = m.state_dict()
    no_rope = {k: v for k, v in sd.items() if not k.endswith("inv_freq")}
    got = create_llm("test_slab_llama", _save(no_rope, tmp_path / "a.pth"))
    assert "2 RoPE frequency buffers computed" in got.checkpoint_info.remapped
    bad = dict(sd)
    key = "model.layers.1.self_attn.rotary_emb.inv_freq"
    bad[key] = sd[key] * 2
    with pytest.raises(CheckpointError, match="not the RoPE frequencies"):
        create_llm("test_slab_llama", _save(bad, tmp_path / "b.pth"))
    # the RMSNorm twin keeps no RoPE buffers: a file that has them (older Hugging Face) loads once checked
    twin = build_llm("test_llama")
    old = dict(twin.state_dict())
    old["model.layers.0.self_attn.rotary_emb.inv_freq"] = sd["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "checked" in create_llm("test_llama", _save(old, tmp_path / "c.pth")).checkpoint_info.remapped


def test_wrong_variant_names_the_right_one(tmp_path: Path) -> None:
    ckpt = _save(build_llm("test_llama").state_dict(), tmp_path / "twin.pth")
    with pytest.raises(CheckpointError, match="looks like test_llama: pass --model test_llama"):
        create_llm("test_slab_llama", ckpt)


# -------------------------------------------------------------------------------------------- Hugging Face


def _hf_twin(seed: int = 0):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is not installed")
    c = build_llm("test_llama").config
    cfg = transformers.LlamaConfig(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_heads, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
        attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():  # the RMSNorm weights too (they start at one)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return hf


def test_hugging_face_state_dict_loads_strict_with_equal_logits() -> None:
    hf = _hf_twin()
    ours = build_llm("test_llama")
    assert list(ours.state_dict()) == list(hf.state_dict())  # the same keys in the same order
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = token_probe(ours, 2, 9, seed=1)
    tol = tolerance_for("fold", "fp32").max_rel
    assert tol is not None
    with torch.no_grad():
        ref = hf(x).logits
        assert float((ours(x) - ref).abs().max()) <= tol * float(ref.abs().max())
        want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)[:, x.shape[1]:]
        got, _ = ours.generate_greedy(x, 8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["save_pretrained", "torch.save"])
def test_hugging_face_files_load_through_the_safe_reader(fmt: str, tmp_path: Path) -> None:
    hf = _hf_twin(seed=2)
    if fmt == "save_pretrained":
        pytest.importorskip("safetensors")
        hf.save_pretrained(tmp_path)
        ckpt = tmp_path / "model.safetensors"
    else:
        ckpt = tmp_path / "pytorch_model.bin"
        torch.save(hf.state_dict(), ckpt)
    got = create_llm("test_llama", ckpt)
    x = token_probe(got, 1, 6, seed=5)
    with torch.no_grad():
        assert torch.equal(got(x), hf(x).logits)


# ------------------------------------------------------------------------------------------------ fold


def test_fold_targets_and_exactness() -> None:
    m = randomise(build_llm("test_slab_llama"), seed=7)
    folded, rep = fold_llm(m)
    assert rep.verified and rep.folded == 5 and rep.kept == 0
    into = {n.name: n.into for n in rep.norms}
    p = "model.layers.1."
    assert into[p + "input_layernorm"] == [p + f"self_attn.{x}_proj" for x in "kqv"]
    assert into[p + "post_attention_layernorm"] == [p + "mlp.gate_proj", p + "mlp.up_proj"]
    assert into["model.norm"] == ["lm_head"]
    assert not [n for n, x in folded.named_modules()
                if isinstance(x, (LinearNorm, RepBN, ChannelAffine, torch.nn.modules.batchnorm._BatchNorm,
                                  torch.nn.RMSNorm))]
    # exact on other prompts than the probe, and greedy decoding with the cache keeps every token
    x = token_probe(m, 3, 10, seed=11)
    tol = tolerance_for("fold", "fp32").max_rel
    assert tol is not None
    with torch.no_grad():
        ref, got = m(x), folded(x)
        assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())
        assert torch.equal(m.generate_greedy(x, 6)[0], folded.generate_greedy(x, 6)[0])


def test_fold_of_a_wrong_formula_would_fail() -> None:
    """The randomised statistics make the fold far from an identity: dropping the bias term of the
    final norm's fold (what a W-only merge does) moves the logits well beyond the tolerance."""
    m = randomise(build_llm("test_slab_llama"), seed=8)
    folded, _ = fold_llm(m)
    x = token_probe(m)
    with torch.no_grad():
        ref = m(x)
        folded.lm_head.bias = None
        tol = tolerance_for("fold", "fp32").max_rel
        assert tol is not None
        assert float((folded(x) - ref).abs().max()) > 100 * tol * float(ref.abs().max())


def test_rmsnorm_twin_reports_kept_norms() -> None:
    _, rep = fold_llm(build_llm("test_llama"))
    assert rep.folded == 0 and rep.kept == 5
    assert {n.kind for n in rep.norms} == {"rmsnorm"} and "RMSNorm statistics" in rep.norms[0].reason


def test_folded_checkpoint_round_trip(tmp_path: Path) -> None:
    m = randomise(build_llm("test_slab_llama"), seed=9)
    folded, _ = fold_llm(m)
    path = save_folded(folded, tmp_path / "folded.pt")
    got = create_llm("test_slab_llama", path)
    x = token_probe(m)
    with torch.no_grad():
        assert torch.equal(got(x), folded(x))
    with pytest.raises(CheckpointError, match="folded test_slab_llama checkpoint, not test_llama"):
        create_llm("test_llama", path)


def test_random_models_stay_in_fp16_range() -> None:
    """Without a checkpoint (what `llm bench` measures), the 350M pair's logits are finite in fp16 and
    of the embeddings' scale: with alpha 1 each of the SLAB model's 37 norms doubled the residual
    stream (logits ~1e11 in fp32, inf in fp16), and the bench measured nothing."""
    g = torch.Generator().manual_seed(7)
    for name in ("slab_llama_350m", "llama_350m"):
        m = create_llm(name)
        ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=g)
        with torch.no_grad():
            ref = m(ids)
            half = m.half()(ids).float()
        assert float(ref.abs().max()) < 100.0, name
        assert torch.isfinite(half).all(), name
