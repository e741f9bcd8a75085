"""fold_llm: fold every PRepBN of a SLAB LLaMA into its consumers, verified on seeded token prompts.

The same pass as the vision models (`passes.fold.fold_model`: PRepBN -> RepBN -> affine, the
consumers found from the dataflow, each fold checked on the probe, the report), driven by token ids.
In a PRepBN LLaMA it folds each layer's `input_layernorm` into `q_proj`, `k_proj`, `v_proj`, its
`post_attention_layernorm` into `gate_proj` and `up_proj`, and the final `model.norm` into `lm_head`
(the fold the authors' `merge_bn` leaves out). RMSNorm baselines are reported as kept: their
statistics depend on the input.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from slab_deploy.models.folded import FoldReport
from slab_deploy.models.llama import LlamaForCausalLM
from slab_deploy.passes.fold import fold_model

PROBE_BATCH = 2
PROBE_TOKENS = 16


def token_probe(
    model: nn.Module, batch: int = PROBE_BATCH, tokens: int = PROBE_TOKENS, seed: int = 0
) -> torch.Tensor:
    """Seeded random token ids (batch, tokens) over the model's vocabulary, on the model's device."""
    vocab = int(cast(Any, model).config.vocab_size)  # a LlamaConfig
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.randint(0, vocab, (batch, tokens), generator=g).to(device)


def fold_llm(
    model: LlamaForCausalLM, *, probe: torch.Tensor | None = None, inplace: bool = False, verify: bool = True
) -> tuple[LlamaForCausalLM, FoldReport]:
    """Fold `model` (a registered LLaMA); returns (folded model, report). See `fold_model`."""
    probe = token_probe(model) if probe is None else probe
    folded, report = fold_model(model, probe=probe, inplace=inplace, verify=verify)
    return cast(LlamaForCausalLM, folded), report
