"""A plain decoder-only transformer described by its shape: what `tedfx.plan` builds presets from.

GPT style (`ffn_kind="gelu"`: LayerNorm, learned positions, GELU FFN, biases, tied
embedding) or Llama style (`ffn_kind="swiglu"`: RMSNorm, no position table, SwiGLU
FFN, no biases, grouped-query attention with `kv_heads` < `heads`, untied head).
Llama's rotary embedding is left out: it holds no parameter and sends nothing, so it
changes neither the memory nor the communication a layout needs, only a little compute.
Built on the meta device, a model of any size costs nothing
(`with torch.device("meta"): Decoder(cfg)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Decoder", "DecoderConfig"]


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """The shape of a decoder-only transformer."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None: as many as `heads`."""
    ffn: int
    """FFN width F."""
    ffn_kind: Literal["gelu", "swiglu"] = "gelu"
    vocab: int
    seq: int
    """Sequence length (the learned position table's size for the GPT style)."""

    def __post_init__(self) -> None:
        kv = self.kv_heads if self.kv_heads is not None else self.heads
        for name in ("layers", "hidden", "heads", "ffn", "vocab", "seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderConfig.{name}={value!r} is invalid: expected an int >= 1.")
        if self.hidden % self.heads or self.heads % kv:
            raise ValueError(f"DecoderConfig: hidden={self.hidden} must be a multiple of heads={self.heads}, and "
                             f"heads a multiple of kv_heads={kv}.")
        if self.ffn_kind not in ("gelu", "swiglu"):
            raise ValueError(f"DecoderConfig.ffn_kind={self.ffn_kind!r} is invalid: expected 'gelu' or 'swiglu'.")
        object.__setattr__(self, "kv_heads", kv)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        bias = cfg.ffn_kind == "gelu"
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden, bias=bias)
        self.k = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(cfg.hidden, cfg.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k, v = (proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2) for proj in (self.k, self.v))
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, S, H))


class FFN(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.glu = cfg.ffn_kind == "swiglu"
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=not self.glu)
        self.gate = nn.Linear(cfg.hidden, cfg.ffn, bias=False) if self.glu else None
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=not self.glu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        norm = nn.RMSNorm if cfg.ffn_kind == "swiglu" else nn.LayerNorm
        self.norm1, self.attn = norm(cfg.hidden), Attention(cfg)
        self.norm2, self.ffn = norm(cfg.hidden), FFN(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Decoder(nn.Module):
    """forward(idx [B, S] int64) -> logits [B, S, vocab]."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        gpt = cfg.ffn_kind == "gelu"
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq, cfg.hidden) if gpt else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden) if gpt else nn.RMSNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if gpt:
            self.head.weight = self.embed.weight  # tied, as GPT-2/3

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
