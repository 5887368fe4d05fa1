"""Tiny models shared by the tests: each builder returns `(model, example_inputs)`.

Every builder seeds its own weights and inputs, so two calls give the same
model. HF models are built from configs (no download); sizes are the smallest
that still exercise the real modules: 2 layers, hidden 32, 4 heads, vocab 100.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from tedfx.models.nanogpt import GPT, GPTConfig

__all__ = [
    "VOCAB", "HIDDEN", "tiny_gpt", "tiny_gpt2", "tiny_llama", "tiny_bert", "tiny_opt",
    "tiny_attention_only", "tiny_mlp_with_dropout", "tiny_dropout_lm",
]

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
BATCH, SEQ = 2, 8


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _quiet_transformers() -> None:
    """Tiny vocabularies make transformers warn about the default special token ids."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def tiny_gpt(activation: str = "gelu", *, n_layer: int = LAYERS, n_embd: int = HIDDEN, dropout: float = 0.0,
             bias: bool = True) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The test GPT of tedfx.models.nanogpt (FFN width 4 * n_embd)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=n_layer, n_head=HEADS, n_embd=n_embd,
                    dropout=dropout, bias=bias, activation=activation)
    return GPT(cfg), (_tokens(),)


def tiny_gpt2() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF GPT-2 (Conv1D projections, GELU spelled out as tanh arithmetic), FFN width 4 * 32."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS,
                                  n_head=HEADS, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), (_tokens(),)


def tiny_llama(kv_heads: int = 2) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF Llama (SwiGLU MLP, grouped-query attention with `kv_heads` KV heads, rotary embeddings), FFN width 64."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                                   max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg), (_tokens(),)


def tiny_bert() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF BERT for masked LM (intermediate.dense -> gelu -> output.dense; an MLM head with a LayerNorm)."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=32,
                                  pad_token_id=0)
    return transformers.BertForMaskedLM(cfg), (_tokens(),)


def tiny_opt() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF OPT (fc1 -> relu -> fc2 directly under the decoder layer), FFN width 64."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=64,
                                 num_attention_heads=HEADS, max_position_embeddings=32, word_embed_proj_dim=HIDDEN,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return transformers.OPTForCausalLM(cfg), (_tokens(),)


class _AttentionOnly(nn.Module):
    """Embedding -> fused qkv -> split -> sdpa -> out projection -> LM head: no FFN anywhere."""

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(VOCAB, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        B, S, H = x.shape
        q, k, v = (t.view(B, S, self.heads, H // self.heads).transpose(1, 2) for t in self.qkv(x).split(H, dim=2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(B, S, H))
        return self.head(x)


def tiny_attention_only() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A model with attention and projections but no FFN."""
    torch.manual_seed(0)
    return _AttentionOnly(), (_tokens(),)


class _DropoutMLP(nn.Module):
    """x + fc2(dropout(gelu(fc1(x)))): dropout *between* the activation and fc2, as BART and T5 place it."""

    def __init__(self, hidden: int = HIDDEN, width: int = 64, p: float = 0.25) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, hidden)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(nn.functional.gelu(self.fc1(x))))


def tiny_mlp_with_dropout(p: float = 0.25) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """One residual MLP on float inputs [2, 8, 32] with dropout p before fc2."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(0))
    return _DropoutMLP(p=p), (x,)


class _DropoutLM(nn.Module):
    """A one-block LM with dropout on every kind of activation tensor parallelism meets.

    embed -> dropout (replicated) -> attention whose v projection (column-parallel) is dropped out and whose
    sdpa drops attention weights (local heads) -> out (row-parallel) -> dropout (replicated) -> MLP with
    dropout between the activation and fc2 (an expert's F/T slice once it is an MoE block) -> LM head.
    """

    def __init__(self, p: float, hidden: int = HIDDEN, heads: int = HEADS, width: int = 64) -> None:
        super().__init__()
        self.p, self.heads = p, heads
        self.embed = nn.Embedding(VOCAB, hidden)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, width), nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, VOCAB, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(idx))
        B, S, H = x.shape
        q, k, v = (t.view(B, S, self.heads, H // self.heads).transpose(1, 2)
                   for t in (self.q(x), self.k(x), self.drop(self.v(x))))
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0,
                                                       is_causal=True)
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(B, S, H)))
        x = x + self.fc2(self.drop(nn.functional.gelu(self.fc1(x))))
        return self.head(x)


def tiny_dropout_lm(p: float = 0.3) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """`_DropoutLM` with dropout p everywhere (train mode), on tokens [2, 8]."""
    torch.manual_seed(0)
    return _DropoutLM(p), (_tokens(),)


_captures: dict[tuple, tuple[nn.Module, nn.Module]] = {}


def cached_capture(real):
    """A drop-in for `tedfx.capture` that captures each (model, input shapes) once and returns deep copies.

    Capturing is the slow step and does not depend on the MoE or parallel config, so tests that run
    many pipelines on one model rerun only the passes and the runtime, which are what they test.
    """

    def cached(model, example_inputs, example_kwargs=None, **kwargs):
        shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs)
        key = (id(model), model.training, shapes, repr(example_kwargs), repr(kwargs))
        if key not in _captures:  # the model is kept with its capture, so its id stays unique
            _captures[key] = (model, real(model, example_inputs, example_kwargs, **kwargs))
        return copy.deepcopy(_captures[key][1])

    return cached


def patch_capture(setattr_fn) -> None:
    """Point every tedfx module's `capture` at the cached one, through `setattr_fn(module, name, value)`."""
    import sys

    import tedfx

    real = tedfx.capture
    cached = cached_capture(real)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("tedfx") and getattr(module, "capture", None) is real:
            setattr_fn(module, "capture", cached)
