"""LLaMA-style decoders: the RMSNorm original and SLAB's PRepBN LLaMA (paper section on language models).

One class, `LlamaForCausalLM`, covers both; `LlamaConfig.norm` picks the norm layer:

- `"rmsnorm"`: every norm is an RMSNorm; keys follow Hugging Face's `LlamaForCausalLM` exactly
  (`model.embed_tokens`, `model.layers.{i}.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
  input_layernorm, post_attention_layernorm}`, `model.norm`, `lm_head`; no rotary buffers saved).
- `"prepbn"`: every norm is the authors' PRepBN (`LlamaPRepBN`: RMSNorm -> RepBN on the flattened
  (B*T, C) tokens, BN eps 1e-6, counters ticking once per 16 training calls). Keys follow the
  authors' `llama/modeling/llama-350M/modeling_llama.py`: the same names, each norm with
  `num_step`, `warm`, `iter`, `total_step`, `norm1.weight`, `norm2.alpha`, `norm2.bn.*`, and a
  saved `self_attn.rotary_emb.inv_freq` per layer (a persistent buffer in their code).

Attention is softmax attention with rotary position embeddings (RoPE, the half-split rotation of
both codes) and an explicit key/value cache: `forward(input_ids, past)` runs the new tokens after
`past` (one (key, value) pair of shape (B, H, P, d) per layer) and returns logits and the cache
extended by them. Prompts in one batch share their length (no padding mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slab_deploy.models.layers import LinearNorm, RepBN

__all__ = [
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaPRepBN",
    "RMSNorm",
    "TokenRepBN",
]

LlamaNorm = Literal["rmsnorm", "prepbn"]
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture of a LLaMA-style decoder (the fields of Hugging Face's `LlamaConfig` used)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    norm: LlamaNorm = "rmsnorm"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    prepbn_warm: int = 10000  # the authors' LinearNorm(warm=10000, step=18000)
    prepbn_steps: int = 18000

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into {self.num_heads} heads "
                "of an even size (RoPE rotates pairs of channels)"
            )
        if self.norm not in ("rmsnorm", "prepbn"):
            raise ValueError(f"unknown norm {self.norm!r}; use rmsnorm or prepbn")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.RMSNorm):
    """LLaMA's RMSNorm (key `weight`), computed as Hugging Face does: the statistic and the scaling
    in fp32, the result cast back to the input dtype before the weight multiplies it."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + float(self.eps or 0.0))
        return self.weight * h.to(dtype)


class TokenRepBN(RepBN):
    """The LLaMA RepBN: `BN(x) + alpha * x` with BatchNorm1d on the tokens flattened to (B*T, C).

    The same function as the vision RepBN (statistics over batch and tokens), without the
    transposes. Initialised as the authors do: `alpha`, BN weight and bias all zero."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)
        nn.init.zeros_(self.alpha)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        y = self.bn(x.reshape(-1, c)).view(x.shape)
        return y + self.alpha * x


class LlamaPRepBN(LinearNorm):
    """The authors' LLaMA `LinearNorm(norm1=RMSNorm, norm2=RepBN, warm, step)`.

    Unlike the vision PRepBN, the counters move once per 16 training-mode calls: `num_step` cycles
    0..15, and when it is 0 `warm` (first) or `iter` (after the warm-up) counts down. Eval mode uses
    `norm2` alone, like every PRepBN, so the checkpoint rules of `models.checkpoint` apply as they are.
    """

    num_step: torch.Tensor

    def __init__(self, dim: int, eps: float = 1e-6, warm: int = 10000, step: int = 18000) -> None:
        super().__init__(
            dim, norm1=partial(RMSNorm, eps=eps), norm2=partial(TokenRepBN, eps=eps), warm=warm, step=step
        )
        self.register_buffer("num_step", torch.tensor(0))
        # The authors register num_step first: keep their state_dict order too.
        self._buffers = {"num_step": self._buffers.pop("num_step"), **self._buffers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.norm2(x)
        tick = bool(self.num_step % 16 == 0)
        if self.warm > 0:
            if tick:
                self.warm.copy_(self.warm - 1)
            out = self.norm1(x)
        else:
            lam = self.r0 * self.iter / self.total_step
            if self.iter > 0 and tick:
                self.iter.copy_(self.iter - 1)
            out = lam * self.norm1(x) + (1 - lam) * self.norm2(x)
        self.num_step.copy_((self.num_step + 1) % 16)
        return out


def _norm(cfg: LlamaConfig) -> nn.Module:
    if cfg.norm == "prepbn":
        return LlamaPRepBN(cfg.hidden_size, cfg.rms_norm_eps, cfg.prepbn_warm, cfg.prepbn_steps)
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class RotaryEmbedding(nn.Module):
    """RoPE frequencies `inv_freq[j] = theta ** (-2j / d)`; cos/sin of `position * inv_freq`, both halves."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float, persistent: bool) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, theta), persistent=persistent)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # (T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LlamaAttention(nn.Module):
    """Softmax attention with RoPE and a key/value cache (`q_proj`, `k_proj`, `v_proj`, `o_proj`)."""

    def __init__(self, cfg: LlamaConfig, *, rope_persistent: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, rope_persistent)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, ...]:
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, h, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, d).transpose(1, 2)
        cos, sin = self.rotary_emb(positions, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        scores = torch.matmul(q, k.transpose(2, 3)) * (d**-0.5)
        # Softmax in fp32 (both codes upcast); every row keeps its own position, so no row is all -inf.
        scores = scores.float().masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, h * d)
        return self.o_proj(out), k, v


class LlamaMLP(nn.Module):
    """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`, no biases."""

    def __init__(self, hidden: int, intermediate: int, *, authors_order: bool = False) -> None:
        super().__init__()
        # Registration order only decides the state_dict's key order: the authors' code registers
        # down_proj before up_proj, Hugging Face's after.
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        if authors_order:
            self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        if not authors_order:
            self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, *, authors_layout: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rope_persistent=authors_layout)
        self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, authors_order=authors_layout)
        self.input_layernorm = _norm(cfg)
        self.post_attention_layernorm = _norm(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, ...]:
        a, k, v = self.self_attn(self.input_layernorm(x), positions, allowed, past)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class LlamaModel(nn.Module):
    """The decoder stack (`embed_tokens`, `layers`, `norm`): Hugging Face's `LlamaModel` keys."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        # PRepBN models take the authors' layout (inv_freq saved, their key order), RMSNorm ones HF's
        authors = cfg.norm == "prepbn"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, authors_layout=authors) for _ in range(cfg.num_layers)]
        )
        self.norm = _norm(cfg)


class LlamaForCausalLM(nn.Module):
    """A LLaMA decoder with an untied `lm_head`.

    `forward(input_ids)` returns logits (B, T, vocab); `forward(input_ids, past, use_cache=True)`
    returns (logits, present) with `present` the cache extended by the new tokens;
    `last_only=True` computes the logits of the last position only (B, 1, vocab), what decoding
    needs (the prefill of a long prompt then skips the lm_head of every other token).
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        past: KVCache | None = None,
        *,
        use_cache: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        t = input_ids.shape[1]
        p = 0 if not past else past[0][0].shape[2]
        positions = torch.arange(t, device=input_ids.device) + p
        keys = torch.arange(p + t, device=input_ids.device)
        allowed = keys[None, :] <= positions[:, None]  # (T, P+T): causal over the cache and the new tokens
        x = self.model.embed_tokens(input_ids)
        present: KVCache = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, positions, allowed, past[i] if past else None)
            present.append((k, v))
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.model.norm(x))
        return (logits, present) if use_cache else logits

    @torch.no_grad()
    def generate_greedy(
        self, input_ids: torch.Tensor, new_tokens: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy decoding with the cache: (tokens (B, new_tokens), last-position logits of every step)."""
        logits, past = self(input_ids, None, use_cache=True, last_only=True)  # type: ignore[misc]
        steps = [logits[:, -1].float()]
        tokens = [steps[-1].argmax(-1)]
        for _ in range(new_tokens - 1):
            logits, past = self(tokens[-1][:, None], past, use_cache=True, last_only=True)  # type: ignore[misc]
            steps.append(logits[:, -1].float())
            tokens.append(steps[-1].argmax(-1))
        return torch.stack(tokens, dim=1), steps


def _init_weights(m: nn.Module) -> None:
    """Hugging Face's LLaMA initialisation: normal(0, 0.02) Linear and Embedding weights."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
