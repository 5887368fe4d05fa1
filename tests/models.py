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

from tedfx.models.nanogpt import GPT, MLP, Block, GPTConfig

__all__ = [
    "VOCAB", "HIDDEN", "tiny_gpt", "tiny_gpt_with_graph_breaks", "tiny_gpt2", "tiny_llama", "tiny_bert",
    "tiny_opt", "tiny_attention_only", "tiny_mlp_with_dropout", "BLOCK_STRUCTURES", "tiny_blocks",
    "tiny_explicit_encoder", "tiny_fused_qkv_encoder", "tiny_gpt_neox", "tiny_gqa", "tiny_phi3", "tiny_qwen3",
    "tiny_olmo2", "tiny_gptj", "tiny_t5",
    "tiny_dropout_lm",
    "untraceable",
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


class _BreakingBlock(Block):
    """A GPT block with a graph break between attention and MLP: dynamo compiles two graphs per block (shared
    by all blocks) and, the break being inside the model's loop over blocks, runs the rest of the model eagerly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        torch._dynamo.graph_break()
        return x + self.mlp(self.ln_2(x))


class _BreakingMLP(MLP):
    """An MLP with a graph break between its two projections: no graph holds the whole FFN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c_fc(x))
        torch._dynamo.graph_break()
        return self.dropout(self.c_proj(h))


def tiny_gpt_with_graph_breaks(n_layer: int = 4, *, inside_ffn: bool = False) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """tiny_gpt with a graph break in every block (between attention and MLP, or inside the MLP)."""
    model, inputs = tiny_gpt(n_layer=n_layer)
    for block in model.h:
        if inside_ffn:
            block.mlp.__class__ = _BreakingMLP
        else:
            block.__class__ = _BreakingBlock
    return model, inputs


def tiny_gpt2() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF GPT-2 (Conv1D projections, GELU spelled out as tanh arithmetic), FFN width 4 * 32."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS,
                                  n_head=HEADS, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), (_tokens(),)


def _hf_lm(name: str, **config) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF `{name}ForCausalLM` at the shared tiny sizes (hidden 32, 2 layers, 4 heads, FFN width 64), seeded."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        **config)
    return getattr(transformers, f"{name}ForCausalLM")(cfg), (_tokens(),)


def tiny_persimmon() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF Persimmon: fused query_key_value viewed as (heads, 3, head_dim), a LayerNorm over head_dim of each head's
    query and key (`qk_layernorm`), partial rotary; its norms' weights and biases drawn at random (HF sets 1 and 0,
    which would hide a norm weight applied to the wrong heads)."""
    model, inputs = _hf_lm("Persimmon", partial_rotary_factor=0.5, qk_layernorm=True, hidden_dropout=0.0,
                           attention_dropout=0.0, use_cache=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model, inputs


def tiny_codegen() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF CodeGen: fused qkv_proj laid out for its own model parallelism, (mp_num=4 blocks, q|v|k, local heads *
    head_dim), reshaped and split by it; 8 heads of 8 (2 per block), rotary on 4 dims, FFN width 4 * 64."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_positions=32, n_ctx=32, n_embd=64, n_layer=LAYERS, n_head=8,
                                     rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.CodeGenForCausalLM(cfg), (_tokens(),)


def tiny_mpt() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF MPT: fused Wqkv, attention written as matmuls with an ALiBi bias added to the scores, FFN width 2 * 32."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=2,
                                 max_seq_len=32, resid_pdrop=0.0, emb_pdrop=0.0, use_cache=False, bos_token_id=0,
                                 eos_token_id=0, pad_token_id=0)
    return transformers.MptForCausalLM(cfg), (_tokens(),)


def tiny_llama(kv_heads: int = 2) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF Llama (SwiGLU MLP, grouped-query attention with `kv_heads` KV heads, rotary embeddings), FFN width 64."""
    return _hf_lm("Llama", num_key_value_heads=kv_heads)


def tiny_qwen2() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF Qwen2 (biased q/k/v projections, SwiGLU MLP, grouped-query attention), FFN width 64."""
    return _hf_lm("Qwen2", num_key_value_heads=2)


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


# --- models written differently from ours: explicit attention, fused QKV, GQA, fused gate_up ----------


class _ExplicitAttention(nn.Module):
    """BERT-style attention as plain ops: q @ k^T / sqrt(d), masked_fill, softmax, dropout, @ v.

    With `bmm`, as fairseq and torch's own MultiheadAttention write it: batch and heads flattened into
    one dim of B * heads, and torch.bmm.
    """

    def __init__(self, hidden: int, heads: int, bmm: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.bmm = heads, hidden // heads, bmm
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, pad_B11S: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = (proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        if self.bmm:
            return self._bmm(q, k, v, pad_B11S)
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim ** 0.5)
        scores = scores.masked_fill(pad_B11S, -1e4)
        y = torch.matmul(self.drop(torch.softmax(scores, dim=-1)), v)
        return self.out(y.transpose(1, 2).reshape(B, S, H))

    def _bmm(self, q, k, v, pad_B11S):
        B, heads, S, d = q.shape
        q, k, v = (t.reshape(B * heads, S, d) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)) * d ** -0.5
        scores = scores.view(B, heads, S, S).masked_fill(pad_B11S, -1e4).view(B * heads, S, S)
        y = torch.bmm(torch.softmax(scores, dim=-1), v).view(B, heads, S, d)
        return self.out(y.transpose(1, 2).reshape(B, S, heads * d))


class _ExplicitEncoder(nn.Module):
    """A post-norm BERT-like encoder: padding mask from token 0, explicit attention, GELU MLP, LM head."""

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, layers: int = LAYERS, bmm: bool = False) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, hidden), nn.Embedding(32, hidden)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "attn": _ExplicitAttention(hidden, heads, bmm), "ln1": nn.LayerNorm(hidden),
            "fc1": nn.Linear(hidden, 2 * hidden), "fc2": nn.Linear(2 * hidden, hidden), "ln2": nn.LayerNorm(hidden),
        }) for _ in range(layers))
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        pad_B11S = (idx == 0)[:, None, None, :]
        for layer in self.layers:
            x = layer["ln1"](x + layer["attn"](x, pad_B11S))
            x = layer["ln2"](x + layer["fc2"](nn.functional.gelu(layer["fc1"](x))))
        return self.head(x)


def tiny_explicit_encoder(bmm: bool = False) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Explicit attention (matmul, masked_fill by a padding mask, softmax), FFN width 64; `bmm`: over
    batch * heads flattened, as fairseq writes it."""
    torch.manual_seed(0)
    return _ExplicitEncoder(bmm=bmm), (_tokens(),)


class _FusedQKVBlock(nn.Module):
    """timm's ViT block: qkv viewed (3, heads, head_dim) and unbound, q scaled, explicit softmax attention."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (hidden // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class _FusedQKVEncoder(nn.Module):
    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, layers: int = LAYERS) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 32, hidden))
        self.blocks = nn.ModuleList(_FusedQKVBlock(hidden, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[:, :idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_fused_qkv_encoder() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """ViT-style fused QKV: one linear H -> 3H viewed (3, heads, head_dim) and unbound; FFN width 128."""
    torch.manual_seed(0)
    return _FusedQKVEncoder(), (_tokens(),)


def tiny_gpt_neox() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF GPT-NeoX / Pythia: fused query_key_value viewed (heads, 3, head_dim), partial rotary, FFN width 128."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                                     max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(cfg), (_tokens(),)


class _GQABlock(nn.Module):
    """Causal GQA as plain ops: k, v repeated to the query heads by repeat_interleave, a sliced causal mask."""

    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k, self.v = (nn.Linear(hidden, kv_heads * self.head_dim, bias=False) for _ in range(2))
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate, self.up = nn.Linear(hidden, 2 * hidden, bias=False), nn.Linear(hidden, 2 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)
        self.register_buffer("causal", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k, v = (proj(h).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2) for proj in (self.k, self.v))
        k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        scores = scores.masked_fill(self.causal[:, :, :S, :S] == 0, float("-inf"))
        x = x + self.o((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, S, H))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class _GQADecoder(nn.Module):
    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, kv_heads: int = 2, layers: int = LAYERS) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.blocks = nn.ModuleList(_GQABlock(hidden, heads, kv_heads) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(hidden), nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_gqa(kv_heads: int = 2) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A GQA decoder with `kv_heads` KV heads expanded by repeat_interleave; SwiGLU FFN width 64."""
    torch.manual_seed(0)
    return _GQADecoder(kv_heads=kv_heads), (_tokens(),)


def tiny_phi3(kv_heads: int = 2) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF Phi-3: fused qkv_proj sliced into q, k, v (GQA) and fused gate_up_proj chunked; FFN width 64."""
    return _hf_lm("Phi3", num_key_value_heads=kv_heads, original_max_position_embeddings=32)


def tiny_qwen3() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF Qwen3: per-head RMSNorm of q and k (weight of size head_dim), GQA, SwiGLU MLP, FFN width 64."""
    return _hf_lm("Qwen3", num_key_value_heads=2, head_dim=HIDDEN // HEADS)


def tiny_olmo2() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF OLMo2: RMSNorm of the whole projected q and k (across all heads), SwiGLU MLP, FFN width 64."""
    return _hf_lm("Olmo2", num_key_value_heads=HEADS)


def tiny_gptj() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF GPT-J: rotary on the first rotary_dim of each head, rotate_every_two by torch.stack; FFN width 128."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                  rotary_dim=4, bos_token_id=0, eos_token_id=0)
    return transformers.GPTJForCausalLM(cfg), (_tokens(),)


def tiny_falcon(new_decoder_architecture: bool = False, bias: bool = True,
                multi_query: bool = True) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """HF Falcon: FalconLinear projects by `input @ self.weight.T` (+ bias), not F.linear; fused query_key_value
    (the old architecture: multi-query, or with `multi_query=False` one key and value per head viewed as
    (heads, 3, head_dim); the new one: grouped KV heads), GELU MLP of width 4 * hidden."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_kv_heads=2 if new_decoder_architecture else None,
                                    new_decoder_architecture=new_decoder_architecture, bias=bias, alibi=False,
                                    multi_query=multi_query,
                                    max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return transformers.FalconForCausalLM(cfg), (_tokens(),)


def tiny_t5(attention: str = "sdpa") -> tuple[nn.Module, tuple[torch.Tensor], dict[str, object]]:
    """HF T5 (encoder-decoder: the decoder's residual stream starts after the encoder's, cross-attention reads
    the encoder's output; a per-head relative position bias computed once, added to every attention's scores),
    FFN width 64; `attention="eager"` writes attention with matmuls. Returns the keyword inputs as a third item:
    `decoder_input_ids` and `use_cache=False` (T5 returns its KV cache otherwise)."""
    import transformers

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=64, num_layers=LAYERS,
                                num_decoder_layers=LAYERS, num_heads=HEADS, dropout_rate=0.0, use_cache=False,
                                decoder_start_token_id=0, pad_token_id=0, attn_implementation=attention)
    decoder_input_ids = _tokens(1)[:, :6].contiguous()
    return transformers.T5ForConditionalGeneration(cfg), (_tokens(),), {"decoder_input_ids": decoder_input_ids,
                                                                        "use_cache": False}


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


# --- four ways to hold transformer blocks (activation checkpointing must find one region per block) ------------


def _gpt_cfg(**kwargs):
    from tedfx.models.nanogpt import GPTConfig

    return GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=LAYERS, n_head=HEADS, n_embd=HIDDEN, **kwargs)


class _Embed(nn.Module):
    """Token + position embedding, as nanoGPT adds them."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(32, HIDDEN)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))


class _DictBlocks(nn.Module):
    """Blocks in an nn.ModuleDict whose own forward is never called: the parent runs attn and mlp itself."""

    def __init__(self) -> None:
        super().__init__()
        from tedfx.models.nanogpt import Block

        cfg = _gpt_cfg()
        self.embed = _Embed()
        self.blocks = nn.ModuleDict({f"layer{i}": Block(cfg) for i in range(LAYERS)})
        self.ln_f = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for name in self.blocks:
            block = self.blocks[name]
            x = x + block.attn(block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        return self.head(self.ln_f(x))


class _NestedFFNBlock(nn.Module):
    """The FFN two modules down: block.ffn (norm + residual) -> ffn.inner (the MLP)."""

    class FFN(nn.Module):
        def __init__(self, cfg) -> None:
            super().__init__()
            from tedfx.models.nanogpt import MLP

            self.norm = nn.LayerNorm(HIDDEN)
            self.inner = MLP(cfg)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.inner(self.norm(x))

    def __init__(self, cfg) -> None:
        super().__init__()
        from tedfx.models.nanogpt import CausalSelfAttention

        self.ln = nn.LayerNorm(HIDDEN)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = self.FFN(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x + self.attn(self.ln(x)))


class _NestedFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = _gpt_cfg()
        self.embed = _Embed()
        self.layers = nn.ModuleList(_NestedFFNBlock(cfg) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _FlatBlock(nn.Module):
    """A block with its FFN projections directly on it (as OPT's decoder layer holds fc1 and fc2)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from tedfx.models.nanogpt import CausalSelfAttention

        self.ln_1 = nn.LayerNorm(HIDDEN)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.fc2 = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln_2(x))))


class _SequentialBlocks(nn.Module):
    """Named blocks in one nn.Sequential, called once: `self.blocks(x)`."""

    def __init__(self) -> None:
        super().__init__()
        from collections import OrderedDict

        cfg = _gpt_cfg()
        self.embed = _Embed()
        self.blocks = nn.Sequential(OrderedDict((f"block_{i}", _FlatBlock(cfg)) for i in range(LAYERS)))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(idx)))


BLOCK_STRUCTURES = {
    "module_list": lambda: tiny_gpt()[0],
    "module_dict": _DictBlocks,
    "nested_ffn": _NestedFFN,
    "sequential": _SequentialBlocks,
}
"""A 2-layer GPT (attention + FFN per block, hidden 32, 4 heads) in four module structures."""


def tiny_blocks(structure: str) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """One of BLOCK_STRUCTURES, seeded, with example tokens [2, 8]."""
    torch.manual_seed(0)
    return BLOCK_STRUCTURES[structure](), (_tokens(),)


class _BranchesOnValues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def untraceable() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A model torch.export cannot trace: it branches on the value of its input."""
    return _BranchesOnValues(), (torch.ones(2, 4),)
