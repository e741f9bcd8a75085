"""The language-model zoo: a registry of LLaMA-style decoders beside the vision one, and `create_llm`.

Language models take token ids, not images, so they live in their own registry (`list_llms`,
`get_llm_spec`) with the same shape as the vision one: typed entry functions decorated with
`@register_llm`, architecture visible in the body, a frozen `LLMSpec` per variant, duplicate names
refused, unknown names answered with close matches, tiny `test_` variants through the same code.

`create_llm` loads checkpoints exactly as `create_model` does: the safe reader
(`models.checkpoint.read_checkpoint`: no foreign code runs), the PRepBN-progress rule (a file saved
mid-schedule is refused unless `allow_unfinished_prepbn`), folded checkpoints rebuilt folded, and a
strict load whose error names the variant the file looks like.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from slab_deploy.errors import CheckpointError, ModelNotFoundError
from slab_deploy.models.checkpoint import (
    CheckpointInfo,
    check_prepbn_finished,
    read_checkpoint,
    strict_load,
)
from slab_deploy.models.folded import restore_folded_structure
from slab_deploy.models.layers import RepBN
from slab_deploy.models.llama import LlamaConfig, LlamaForCausalLM, LlamaPRepBN, rotary_inv_freq

_AUTHORS_SRC = "xinghaochen/SLAB llama/modeling/llama-350M/modeling_llama.py"
_HF_SRC = "huggingface/transformers LlamaForCausalLM"


@dataclass(frozen=True)
class LLMSpec:
    """What a language-model variant is, beyond its constructor."""

    name: str
    family: str  # "llama"
    norm: str  # "rmsnorm" | "prepbn"
    layout: str  # "authors" (the SLAB code's keys) | "hf" (Hugging Face's)
    source: str
    paper_throughput: float | None = None  # the paper's LLaMA-350M throughput (units unstated)
    paper_zero_shot_avg: float | None = None
    released: bool = False
    test: bool = False
    compare_with: tuple[str, ...] = ()

    @property
    def is_slab(self) -> bool:
        return self.norm == "prepbn"


@dataclass(frozen=True)
class _Entry:
    spec: LLMSpec
    fn: Callable[..., LlamaForCausalLM]


_REGISTRY: dict[str, _Entry] = {}


_Fn = Callable[..., LlamaForCausalLM]


def register_llm(**spec_fields: Any) -> Callable[[_Fn], _Fn]:
    """Register the decorated entry function under its own name, with an `LLMSpec`."""

    def deco(fn: Callable[..., LlamaForCausalLM]) -> Callable[..., LlamaForCausalLM]:
        name = spec_fields.pop("name", fn.__name__)
        if name in _REGISTRY:
            raise ValueError(f"language model {name!r} is registered twice")
        fields = dict(spec_fields)
        fields["compare_with"] = tuple(fields.get("compare_with", ()))
        _REGISTRY[name] = _Entry(LLMSpec(name=name, **fields), fn)
        return fn

    return deco


def list_llms(pattern: str = "*", *, include_test: bool = False) -> list[str]:
    """Registered language-model names matching the shell-style `pattern`, sorted."""
    names = [n for n, e in _REGISTRY.items() if include_test or not e.spec.test]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_llm_spec(name: str) -> LLMSpec:
    """The `LLMSpec` of `name`; unknown names raise `ModelNotFoundError` with close matches."""
    try:
        return _REGISTRY[name].spec
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(
            f"unknown language model {name!r}.{hint} Run `slab-deploy llm models` for the list."
        ) from None


def is_llm(name: str) -> bool:
    return name in _REGISTRY


def build_llm(name: str, seed: int = 0) -> LlamaForCausalLM:
    """Build `name` with seeded random initial weights (the same for every call with `seed`: an
    export, a check and a bench of the random model agree), in eval mode; `.spec` is its LLMSpec.

    PRepBN layers are as the authors initialise them (alpha and the BN affine zero, the schedule
    at its start), which makes every normalised tensor zero; `create_llm` without a checkpoint
    gives a usable random model instead (see `untrained_norms`)."""
    spec = get_llm_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _REGISTRY[name].fn()
    model.spec = spec  # type: ignore[assignment]
    return model.eval()


def llm_rows(pattern: str = "*", *, include_test: bool = False) -> list[dict[str, Any]]:
    """One row per registered language model: architecture, norm, layout, params (counted on the meta
    device) and the paper's figures. Plain JSON values."""
    rows = []
    for name in list_llms(pattern, include_test=include_test):
        s = get_llm_spec(name)
        with torch.device("meta"):
            m = _REGISTRY[name].fn()
        c = m.config
        rows.append({
            "name": name, "family": s.family, "norm": s.norm, "layout": s.layout,
            "hidden": c.hidden_size, "layers": c.num_layers, "heads": c.num_heads,
            "mlp": c.intermediate_size, "vocab": c.vocab_size,
            "params_m": round(sum(p.numel() for p in m.parameters()) / 1e6, 2),
            "paper_throughput": s.paper_throughput, "released": s.released,
        })
    return rows


# ------------------------------------------------------------------------------------------------ loading


def _rope_keys(sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], cfg: LlamaConfig,
               source: str) -> tuple[dict[str, torch.Tensor], str]:
    """RoPE frequencies are computed from the architecture: a file that saved them (the authors'
    code, Hugging Face before 4.31) must hold exactly those values; the model's own fill what the
    file lacks, and saved ones the model does not keep are dropped once checked."""
    want = rotary_inv_freq(cfg.head_dim, cfg.rope_theta)
    out = dict(sd)
    checked = 0
    for k in [k for k in sd if k.endswith("rotary_emb.inv_freq")]:
        v = sd[k]
        if tuple(v.shape) != tuple(want.shape) or not torch.allclose(v.float(), want, rtol=1e-6, atol=0):
            raise CheckpointError(
                f"{source}: {k} is not the RoPE frequencies of this architecture (head size {cfg.head_dim}, "
                f"theta {cfg.rope_theta:g}); check that the checkpoint belongs to this model")
        checked += 1
        if k not in own:
            del out[k]
    filled = 0
    for k, v in own.items():
        if k.endswith("rotary_emb.inv_freq") and k not in out:
            out[k] = v.detach().clone()
            filled += 1
    notes = []
    if checked:
        notes.append(f"{checked} saved RoPE frequency buffers checked against the architecture")
    if filled:
        notes.append(f"{filled} RoPE frequency buffers computed from the architecture")
    return out, "; ".join(notes)


def detect_llms(sd: Mapping[str, torch.Tensor], *, include_test: bool = False) -> list[str]:
    """Registered language models whose keys and shapes (RoPE buffers aside) equal `sd`'s."""

    def canon(d: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in d.items() if not k.endswith("rotary_emb.inv_freq")}

    target = canon(sd)
    hits = []
    for name in list_llms(include_test=include_test):
        with torch.device("meta"):
            fp = canon(_REGISTRY[name].fn().state_dict())
        if fp == target:
            hits.append(name)
    return hits


@torch.no_grad()
def untrained_norms(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Give the PRepBN layers of a randomly initialised model a finished schedule and an identity RepBN
    (alpha 0, BN weight 1, bias 0, default running statistics): every norm passes its input through,
    so a random model's activations stay at the scale of its embeddings. For speed measurements and
    smoke tests without a checkpoint; the same model every time.

    Alpha 1 (the BN plus the input) doubles the residual stream at each of the 37 norms of the 350M:
    ~1e11, past the fp16 range. Fixed statistics estimated on random tokens do not make a stable random
    model either (its SwiGLU blocks amplify every input the statistics were not taken on: 1e12 in
    slab_llama_small)."""
    for m in model.modules():
        if isinstance(m, LlamaPRepBN):
            m.warm.zero_()
            m.iter.zero_()
            rep = cast(RepBN, m.norm2)
            rep.alpha.fill_(0.0)
            rep.bn.weight.fill_(1.0)
            rep.bn.bias.zero_()
            rep.bn.reset_running_stats()
    return model


def create_llm(name: str, checkpoint: str | Path | None = None, *, allow_unfinished_prepbn: bool = False,
               ema: bool = False) -> LlamaForCausalLM:
    """Build language model `name` in eval mode; with `checkpoint`, load it strictly (see module doc);
    without, seeded random weights (`build_llm`, then `untrained_norms`): the same model every time.
    The returned module carries `.spec` (LLMSpec) and `.checkpoint_info` (CheckpointInfo or None)."""
    spec = get_llm_spec(name)
    model = build_llm(name)
    info: CheckpointInfo | None = None
    if checkpoint is None:
        untrained_norms(model)
    else:
        sd, info = read_checkpoint(checkpoint, ema=ema)
        src = str(checkpoint)
        if info.folded is not None:
            if info.folded.get("model") != name:
                raise CheckpointError(
                    f"{checkpoint} is a folded {info.folded.get('model')} checkpoint, not {name}: "
                    f"pass --model {info.folded.get('model')}")
            try:
                restore_folded_structure(model, info.folded)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"{checkpoint}: its fold metadata does not describe {name} ({exc.__class__.__name__}: "
                    f"{str(exc)[:120]}); fold the original checkpoint again") from None
        else:
            check_prepbn_finished(info, allow_unfinished=allow_unfinished_prepbn)
        sd, note = _rope_keys(sd, model.state_dict(), model.config, src)
        info.remapped = "; ".join(n for n in (info.remapped, note) if n)

        def guess(d: Mapping[str, torch.Tensor]) -> list[str]:
            return detect_llms(d, include_test=spec.test)

        strict_load(model, sd, source=src, model_name=name, guess=guess)
    model.checkpoint_info = info  # type: ignore[assignment]
    return cast(LlamaForCausalLM, model.eval())


# ------------------------------------------------------------------------------------------------ the zoo


@register_llm(family="llama", norm="prepbn", layout="authors", source=_AUTHORS_SRC, paper_throughput=50.4,
              paper_zero_shot_avg=49.78, compare_with=("llama_350m",))
def slab_llama_350m(**kwargs: Any) -> LlamaForCausalLM:
    """LLaMA-350M with PRepBN in place of every RMSNorm (the paper's SLAB LLaMA)."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=1024, num_layers=18, num_heads=8, intermediate_size=4096,
                                        vocab_size=32000, norm="prepbn", prepbn_warm=10000,
                                        prepbn_steps=18000, **kwargs))


@register_llm(family="llama", norm="rmsnorm", layout="hf", source=_HF_SRC, paper_throughput=44.0,
              paper_zero_shot_avg=49.32)
def llama_350m(**kwargs: Any) -> LlamaForCausalLM:
    """LLaMA-350M with RMSNorm: the paper's baseline, in Hugging Face's layout."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=1024, num_layers=18, num_heads=8, intermediate_size=4096,
                                        vocab_size=32000, norm="rmsnorm", **kwargs))


@register_llm(family="llama", norm="prepbn", layout="authors", source=_AUTHORS_SRC,
              compare_with=("llama_small",))
def slab_llama_small(**kwargs: Any) -> LlamaForCausalLM:
    """A 66M-parameter PRepBN LLaMA (not in the paper): the 350M's shape at half the width and under half
    the depth, for measurements on small CPUs."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,
                                        vocab_size=32000, norm="prepbn", prepbn_warm=10000,
                                        prepbn_steps=18000, **kwargs))


@register_llm(family="llama", norm="rmsnorm", layout="hf", source=_HF_SRC)
def llama_small(**kwargs: Any) -> LlamaForCausalLM:
    """The RMSNorm twin of slab_llama_small (not in the paper)."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,
                                        vocab_size=32000, norm="rmsnorm", **kwargs))


@register_llm(family="llama", norm="prepbn", layout="authors", source=_AUTHORS_SRC, test=True,
              compare_with=("test_llama",))
def test_slab_llama(**kwargs: Any) -> LlamaForCausalLM:
    """Tiny PRepBN LLaMA for tests (2 layers, hidden 64)."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                        vocab_size=256, norm="prepbn", prepbn_warm=10000,
                                        prepbn_steps=18000, **kwargs))


@register_llm(family="llama", norm="rmsnorm", layout="hf", source=_HF_SRC, test=True)
def test_llama(**kwargs: Any) -> LlamaForCausalLM:
    """Tiny RMSNorm LLaMA for tests (2 layers, hidden 64)."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                        vocab_size=256, norm="rmsnorm", **kwargs))
