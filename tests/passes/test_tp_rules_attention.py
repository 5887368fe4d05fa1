"""Tensor-parallel rules on models written differently from ours, in one process (docs/parallelism.md).

Tier (a): capture a model, convert it to MoE, plan and rewrite it for every rank of one
tensor group, and check which projections were split and how: attention as plain ops
(matmul, masked_fill, softmax, scaling, the causal-mask slice), fused QKV viewed
(3, heads, head_dim) and unbound (timm) or (heads, 3, head_dim) (GPT-NeoX), fused QKV
sliced (Phi-3), GQA expanded by repeat_interleave, fused gate_up chunked (Phi-3).

`lockstep` then runs the T rank graphs side by side, node by node, computing each
collective from the ranks' values (all-reduce = sum, all-gather = cat, ...): the
tensor-parallel forward is compared with the single-process MoE model exactly, without
processes. tests/test_parallel.py runs the same models on real process groups for
gradients and optimizer steps.

Also here: the loud error when tensor parallelism would leave a projection whole, and
ParallelConfig.replicate, the opt-out that keeps named projections whole.
"""

from __future__ import annotations

import copy
import functools
import operator
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
from torch import nn

import tedfx
from tedfx import collectives, pipeline
from tedfx._compat import pytree
from tedfx.passes.shard_tensor_parallel import shard_tensor_parallel_pass
from tedfx.passes.tp_plan import plan_tensor_parallel
from tedfx.passes.tp_rules import node_ndim
from tedfx.predict import simulated_axes
from tedfx.runtime.mesh import Layout
from tedfx.sharding import shard_tensor, unshard_tensor

from models import (
    tiny_codegen,
    tiny_explicit_encoder,
    tiny_falcon,
    tiny_fused_qkv_encoder,
    tiny_gpt,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_gptj,
    tiny_gqa,
    tiny_llama,
    tiny_mpt,
    tiny_olmo2,
    tiny_persimmon,
    tiny_phi3,
    tiny_qwen3,
    tiny_t5,
)

aten = torch.ops.aten
MOE = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False)

_T5_ATTENTION = ("encoder.block.{}.layer.0.SelfAttention", "decoder.block.{}.layer.0.SelfAttention",
                 "decoder.block.{}.layer.1.EncDecAttention")
_T5_COLUMN = tuple(f"{a}.{p}" for a in _T5_ATTENTION for p in "qkv")
_T5_ROW = tuple(f"{a}.o" for a in _T5_ATTENTION)


def _padded(model: nn.Module, inputs: tuple, kwargs: dict) -> tuple[nn.Module, tuple, dict]:
    """The builder's model with an `attention_mask` that pads the last 2 tokens of the first sequence."""
    mask = torch.ones_like(inputs[0])
    mask[0, -2:] = 0
    return model, inputs, {**kwargs, "attention_mask": mask}


# Per model: (builder, column-parallel modules, row-parallel modules) of every layer at T = 2.
ZOO: dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]] = {
    "explicit": (tiny_explicit_encoder, ("layers.{}.attn.query", "layers.{}.attn.key", "layers.{}.attn.value"),
                 ("layers.{}.attn.out",)),
    "fused_qkv": (tiny_fused_qkv_encoder, ("blocks.{}.qkv",), ("blocks.{}.proj",)),
    "neox": (tiny_gpt_neox, ("gpt_neox.layers.{}.attention.query_key_value",), ("gpt_neox.layers.{}.attention.dense",)),
    "gqa": (tiny_gqa, ("blocks.{}.q", "blocks.{}.k", "blocks.{}.v"), ("blocks.{}.o",)),
    "phi3": (tiny_phi3, ("model.layers.{}.self_attn.qkv_proj",), ("model.layers.{}.self_attn.o_proj",)),
    # Per-head q/k RMSNorm: a mean over head_dim, after a cast export checks with _assert_tensor_metadata.
    "qwen3": (tiny_qwen3, tuple(f"model.layers.{{}}.self_attn.{p}_proj" for p in "qkv"),
              ("model.layers.{}.self_attn.o_proj",)),
    # Rotary's rotate_every_two: torch.stack((-x2, x1), dim=-1).flatten(-2) of each head.
    "gptj": (tiny_gptj, tuple(f"transformer.h.{{}}.attn.{p}_proj" for p in ("q", "k", "v")),
             ("transformer.h.{}.attn.out_proj",)),
    # Encoder-decoder with a per-head relative position bias computed whole: each rank narrows it to its heads,
    # as the attention mask of sdpa or as the operand added to the scores of attention written with matmuls.
    "t5": (tiny_t5, _T5_COLUMN, _T5_ROW),
    "t5_eager": (functools.partial(tiny_t5, "eager"), _T5_COLUMN, _T5_ROW),
    "t5_eager_padded": (lambda: _padded(*tiny_t5("eager")), _T5_COLUMN, _T5_ROW),  # a mask read from an input
    # Fused query_key_value viewed as (KV groups, queries per group + 2, head_dim); each group's key and value
    # picked by index ([-2], [-1]) and broadcast_to the queries: split in contiguous blocks of groups.
    "falcon_grouped": (functools.partial(tiny_falcon, True), ("transformer.h.{}.self_attention.query_key_value",),
                       ("transformer.h.{}.self_attention.dense",)),
    # CodeGen's qkv_proj in (mp_num, q|v|k, local dims) blocks; MPT's ALiBi bias added to scores from matmuls.
    "codegen": (tiny_codegen, ("transformer.h.{}.attn.qkv_proj",), ("transformer.h.{}.attn.out_proj",)),
    "mpt": (tiny_mpt, ("transformer.blocks.{}.attn.Wqkv",), ("transformer.blocks.{}.attn.out_proj",)),
    # A LayerNorm over head_dim of each head's query and key (weights drawn at random).
    "persimmon": (tiny_persimmon, ("model.layers.{}.self_attn.query_key_value",), ("model.layers.{}.self_attn.dense",)),
    # One key and value per head: the fused output viewed as (heads, 3, head_dim), as GPT-NeoX does.
    "falcon_per_head": (functools.partial(tiny_falcon, multi_query=False),
                        ("transformer.h.{}.self_attention.query_key_value",),
                        ("transformer.h.{}.self_attention.dense",)),
}


@functools.cache
def _moe_graph(builder: Callable, layers: Any = "all", **kwargs) -> tuple[fx.GraphModule, Any, tuple]:
    """The MoE graph and its inputs, keyword inputs last (a builder may return them third, as tiny_t5 does)."""
    model, inputs, *example_kwargs = builder(**kwargs)
    example_kwargs = example_kwargs[0] if example_kwargs else {}
    moe = MOE if layers == "all" else tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False, layers=layers)
    gm, ctx = pipeline.build_moe_graph(model.eval(), inputs, moe=moe, example_kwargs=example_kwargs)
    return gm.eval(), ctx, (*inputs, *example_kwargs.values())


def _ranks(builder: Callable, T: int, *, layers: Any = "all", replicate: tuple[str, ...] = (), **kwargs):
    """Every rank's graph and pass context of one tensor group of degree T."""
    gm, ctx, _ = _moe_graph(builder, layers, **kwargs)
    parallel = tedfx.ParallelConfig(tensor=T, replicate=replicate)
    return [pipeline.shard_for_rank(gm, ctx, parallel=parallel, coords={"tp": t, "ep": 0, "edp": 0})
            for t in range(T)]


_COLLECTIVES: dict[Callable, Callable[[list, fx.Node], list]] = {
    collectives.all_reduce: lambda xs, n: [sum(xs)] * len(xs),
    collectives.identity_fwd_all_reduce_bwd: lambda xs, n: xs,
    collectives.slice_for_rank: lambda xs, n: [x.chunk(len(xs), n.args[2])[t] for t, x in enumerate(xs)],
    collectives.all_gather: lambda xs, n: [torch.cat(xs, n.args[2])] * len(xs),
    collectives.gather_replicated: lambda xs, n: [torch.cat(xs, n.args[2])] * len(xs),
    collectives.reduce_scatter: lambda xs, n: list(sum(xs).chunk(len(xs), n.args[2])),
    collectives.agree_max: lambda xs, n: [max(xs)] * len(xs),
}


def lockstep(gms: list[fx.GraphModule], inputs: tuple) -> list[Any]:
    """Run the T rank graphs of one tensor group together; each collective combines the ranks' values."""
    interpreters = [fx.Interpreter(gm) for gm in gms]
    for it in interpreters:
        it.args_iter = iter(pytree.tree_leaves(inputs))
    with torch.no_grad(), collectives.bind_axes(simulated_axes(Layout.build(len(gms), tedfx.ParallelConfig(
            tensor=len(gms))), 0)):
        for nodes in zip(*(gm.graph.nodes for gm in gms)):
            combine = _COLLECTIVES.get(nodes[0].target)
            if nodes[0].op == "output" or combine is None:
                values = [it.run_node(n) for it, n in zip(interpreters, nodes)]
                if nodes[0].op == "output":
                    return values
            else:
                values = combine([it.env[n.args[0]] for it, n in zip(interpreters, nodes)], nodes[0])
            for it, n, v in zip(interpreters, nodes, values):
                it.env[n] = v
    raise AssertionError("graph without output")


def _assert_ranks_compute_the_reference(builder: Callable, ranks, layers: Any = "all", **kwargs) -> None:
    gm, _, inputs = _moe_graph(builder, layers, **kwargs)
    with torch.no_grad():
        expected = pytree.tree_leaves(fx.Interpreter(gm).run(*pytree.tree_leaves(inputs)))
    for t, out in enumerate(lockstep([g for g, _ in ranks], inputs)):
        for got, want in zip(pytree.tree_leaves(out), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {t}: {m}")


def _split(ctx) -> tuple[set[str], set[str]]:
    """(column-parallel, row-parallel) module paths recorded by shard_tensor_parallel."""
    return ({w.rpartition(".")[0] for w in ctx.records.tp_column}, {w.rpartition(".")[0] for w in ctx.records.tp_row})


def _assert_shards_reassemble(builder: Callable, ranks, layers: Any = "all", **kwargs) -> None:
    """Every rank holds 1/T of each split tensor, and the shards reassemble the full one exactly."""
    gm, _, _ = _moe_graph(builder, layers, **kwargs)
    T = len(ranks)
    full = dict(gm.state_dict())
    sizes = {"tp": T, "ep": 1, "edp": 1}
    for name, spec in ranks[0][1].records.shards.items():
        if "tp" not in (axis for axis, _ in spec.splits):
            continue
        coords = [{"tp": t, "ep": 0, "edp": 0} for t in range(T)]
        local = {tuple(c[axis] for axis, _ in spec.splits): g.get_parameter(name).detach()
                 for c, (g, _) in zip(coords, ranks)}
        assert all(x.numel() * T == full[name].numel() for x in local.values()), name
        for c, (g, _) in zip(coords, ranks):
            torch.testing.assert_close(g.get_parameter(name).detach(), shard_tensor(full[name], spec, c, sizes))
        torch.testing.assert_close(unshard_tensor(local, spec, sizes), full[name], rtol=0, atol=0)


# --- the zoo at T = 2: every attention projection split, the ranks compute the reference ------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_every_attention_projection_is_split_and_the_ranks_compute_the_reference(name):
    builder, column, row = ZOO[name]
    ranks = _ranks(builder, 2)
    for _, ctx in ranks:
        assert _split(ctx) == ({c.format(i) for c in column for i in range(2)}, {r.format(i) for r in row for i in
                                                                                 range(2)})
    _assert_shards_reassemble(builder, ranks)
    _assert_ranks_compute_the_reference(builder, ranks)


def test_fused_qkv_is_split_per_chunk_or_per_head_group():
    """timm's (3, heads, d) view needs q, k and v split on their own; GPT-NeoX's (heads, 3, d) view keeps each
    head's q, k, v adjacent, so contiguous blocks of heads are right; Phi-3 slices q | k | v (GQA sizes)."""
    chunks = {name: {k: s.chunks for k, s in _ranks(ZOO[name][0], 2)[0][1].records.shards.items() if "qkv" in k
                     or "query_key_value" in k} for name in ("fused_qkv", "neox", "phi3")}
    assert chunks["fused_qkv"] == {f"blocks.{i}.qkv.{p}": (32, 32, 32) for i in range(2) for p in ("weight", "bias")}
    assert set(chunks["neox"].values()) == {None} and len(chunks["neox"]) == 4
    assert chunks["phi3"] == {f"model.layers.{i}.self_attn.qkv_proj.weight": (32, 16, 16) for i in range(2)}


def test_phi3_slices_of_the_fused_qkv_become_local_slices():
    gm, _ = _ranks(tiny_phi3, 2)[1]
    qkv = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("0.self_attn.qkv_proj.weight"))
    (linear,) = qkv.users
    bounds = sorted((n.args[2], min(n.args[3], 64)) for n in linear.users if n.target is aten.slice.Tensor)
    assert bounds == [(0, 16), (16, 24), (24, 64)]  # q | k | v of the rank's 2 heads and 1 KV head


@pytest.mark.parametrize("T", [2, 4])
def test_bmm_attention_over_batch_times_heads(T):
    """fairseq-style attention: (B, heads, S, d) -> (B * heads, S, d), torch.bmm, and back. The shard of
    the heads stays inside each batch's block of the flattened dim (its `outer` blocks are B)."""
    gm, _, _ = _moe_graph(tiny_explicit_encoder, bmm=True)
    plan, _ = plan_tensor_parallel(gm, T)
    bmms = [n for n in gm.graph.nodes if n.target is aten.bmm.default]
    assert len(bmms) == 4 and all(plan.place[n].dim == 0 and plan.place[n].outer != 1 for n in bmms)
    ranks = _ranks(tiny_explicit_encoder, T, bmm=True)
    assert _split(ranks[0][1]) == ({f"layers.{i}.attn.{p}" for i in range(2) for p in ("query", "key", "value")},
                                   {f"layers.{i}.attn.out" for i in range(2)})
    # The flattened size B * heads is symbolic: each rank divides it by T in the graph.
    assert sum(n.target is operator.floordiv for n in ranks[0][0].graph.nodes) >= 2
    _assert_ranks_compute_the_reference(tiny_explicit_encoder, ranks, bmm=True)


def test_qwen3_per_head_norm_keeps_the_heads_sharded_and_checks_this_ranks_sizes():
    """Qwen3's q/k RMSNorm reduces over head_dim only, so each rank normalises its own heads; the metadata check
    export puts before its cast, were it to carry the whole tensor's sizes and strides, checks this rank's."""
    gm, ctx, _ = _moe_graph(tiny_qwen3)
    plan, _ = plan_tensor_parallel(gm, 2)
    means = [n for n in gm.graph.nodes if n.target is aten.mean.dim and node_ndim(n) == 4]
    assert len(means) == 4 and {(plan.place[n].kind, plan.place[n].dim) for n in means} == {("S", 2)}
    # Before and after each norm's float32 cast: q (4 heads) and k (2 KV heads) of both layers.
    checks = [n.name for n in gm.graph.nodes if n.target is aten._assert_tensor_metadata.default
              and plan.place[n.args[0]].kind == "S"]
    assert len(checks) == 8 and {n.name: d for n, d in plan.asserts.items()} == dict.fromkeys(checks, 2)
    sized = copy.deepcopy(gm)
    for n in sized.graph.nodes:
        if n.name in checks:  # the whole (B, S, heads, head_dim) tensor's sizes and strides, as ints
            heads = n.args[0].meta["val"].shape[2]
            n.kwargs = {**n.kwargs, "size": [2, 8, heads, 8], "stride": [64 * heads, 8 * heads, 8, 1]}
    sized.recompile()
    parallel = tedfx.ParallelConfig(tensor=2)
    ranks = [pipeline.shard_for_rank(sized, ctx, parallel=parallel, coords={"tp": t, "ep": 0, "edp": 0})
             for t in range(2)]
    local = [n for n in ranks[0][0].graph.nodes if n.name in checks]
    assert sorted(n.args[1] for n in local) == [[2, 8, 1, 8]] * 4 + [[2, 8, 2, 8]] * 4
    assert all(n.args[2] is None and "stride" not in n.kwargs for n in local)
    # The norm weight scales this rank's heads only: Megatron's f sums its gradient over "tp".
    gm0 = ranks[0][0]
    for name in ("q_norm", "k_norm"):
        weights = [n for n in gm0.graph.nodes if n.op == "get_attr" and n.target.endswith(f"{name}.weight")]
        assert len(weights) == 2
        for w in weights:
            assert [u.target for u in w.users] == [collectives.identity_fwd_all_reduce_bwd], (w, list(w.users))
    _assert_ranks_compute_the_reference(tiny_qwen3, ranks)  # the checks run, on every rank's local tensors


def test_gptj_rotary_stack_keeps_the_heads_sharded():
    gm, _, _ = _moe_graph(tiny_gptj)
    plan, _ = plan_tensor_parallel(gm, 2)
    stacks = [n for n in gm.graph.nodes if n.target is aten.stack.default]
    assert len(stacks) == 4 and {(plan.place[n].kind, plan.place[n].dim) for n in stacks} == {("S", 2)}
    flats = [n for n in gm.graph.nodes if n.target is aten.flatten.using_ints]
    assert len(flats) == 4 and {(plan.place[n].kind, plan.place[n].dim) for n in flats} == {("S", 2)}
    assert not set(flats) & set(plan.shape_edits)  # flatten's sizes come from its input


def test_olmo2_norm_across_all_heads_all_reduces_its_statistics_and_the_ranks_compute_the_reference():
    """OLMo2 normalises the whole projected q and k (hidden-size RMSNorm across the heads): each rank takes
    the mean of squares of its heads, all-reduced over "tp" and divided by T, and narrows the norm weight
    (hidden size) to its heads."""
    ranks = _ranks(tiny_olmo2, 2)
    column, row = (tuple(f"model.layers.{{}}.self_attn.{p}_proj" for p in "qkv"), ("model.layers.{}.self_attn.o_proj",))
    for gm, ctx in ranks:
        assert _split(ctx) == ({c.format(i) for c in column for i in range(2)}, {r.format(i) for r in row for i in
                                                                                 range(2)})
        means = [n for n in gm.graph.nodes if n.target is aten.mean.dim
                 and "_norm" in n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0]]
        assert len(means) == 4  # q_norm and k_norm of 2 layers
        for mean in means:
            (reduced,) = mean.users
            assert reduced.target is collectives.all_reduce
            (divided,) = reduced.users
            assert divided.target is aten.div.Tensor and divided.args[1] == 2
    _assert_ranks_compute_the_reference(tiny_olmo2, ranks)


# --- GQA and MQA: k/v split when the KV heads divide T, else narrowed per rank ----------------------------


@pytest.mark.parametrize("builder, kwargs, T", [(tiny_gqa, {}, 4), (tiny_gqa, {"kv_heads": 1}, 2),
                                                (tiny_llama, {"kv_heads": 1}, 2)],
                         ids=["gqa-2kv-T4", "gqa-1kv-T2", "llama-1kv-T2"])
def test_kv_heads_not_divisible_by_T_stay_whole_and_each_rank_narrows_them(builder, kwargs, T):
    ranks = _ranks(builder, T, **kwargs)
    column, row = _split(ranks[0][1])
    assert all(p.endswith((".q", ".q_proj")) for p in column) and len(column) == 2
    notes = ranks[0][1].records.tp_notes
    kv = [n for n in notes if "KV heads do not divide" in n]
    assert len(kv) == 4 and all(f"by T={T}" in n for n in kv), notes
    assert sum("narrowed to this rank's share" in n for n in notes) == 4
    _assert_ranks_compute_the_reference(builder, ranks, **kwargs)


def test_repeat_interleave_and_plain_attention_ops_keep_the_heads_dim_sharded():
    gm, _, _ = _moe_graph(tiny_gqa)
    plan, _ = plan_tensor_parallel(gm, 2)
    ops = {aten.repeat_interleave.self_int, aten.matmul.default, aten.softmax.int, aten.masked_fill.Scalar}
    placed = {(n.target, plan.place[n].kind, plan.place[n].dim) for n in gm.graph.nodes if n.target in ops}
    assert placed == {(op, "S", 1) for op in ops}
    scaled = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor and n.args[0].target is aten.matmul.default]
    assert len(scaled) == 2 and all(plan.place[n].dim == 1 for n in scaled)
    # The causal mask is sliced to the sequence from a replicated buffer: it stays replicated.
    masks = [n.args[1] for n in gm.graph.nodes if n.target is aten.masked_fill.Scalar]
    assert len(masks) == 2 and all(plan.place[m].kind == "R" for m in masks)
    assert plan.narrow == []


# --- dense FFNs left dense by MoEConfig.layers are split too ----------------------------------------------


def test_a_dense_fused_gate_up_is_split_per_half():
    ranks = _ranks(tiny_phi3, 2, layers=(1,))
    column, row = _split(ranks[0][1])
    assert "model.layers.0.mlp.gate_up_proj" in column and "model.layers.0.mlp.down_proj" in row
    assert ranks[0][1].records.shards["model.layers.0.mlp.gate_up_proj.weight"].chunks == (64, 64)
    _assert_shards_reassemble(tiny_phi3, ranks, layers=(1,))
    _assert_ranks_compute_the_reference(tiny_phi3, ranks, layers=(1,))


def test_fused_qkv_at_T4_one_head_per_rank():
    ranks = _ranks(tiny_fused_qkv_encoder, 4)
    assert _split(ranks[0][1])[0] == {"blocks.0.qkv", "blocks.1.qkv"}
    _assert_ranks_compute_the_reference(tiny_fused_qkv_encoder, ranks)


# --- rules that must refuse ---------------------------------------------------------------------------------


class _Refusals(nn.Module):
    """Each branch's projection reaches an op its shard cannot pass."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax, self.a, self.b, self.unbind, self.sliced, self.stacked, self.normed, self.picked, \
            self.masked, self.heads = (nn.Linear(8, 16) for _ in range(10))
        self.out = nn.Linear(12, 8)  # row-parallel on the slices, so only the slices' bounds can fail

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s, h, n = self.sliced(x), self.stacked(x), self.normed(x)
        return (torch.softmax(self.softmax(x), dim=-1).sum(-1),
                (self.a(x) @ self.b(x).transpose(-1, -2)).sum(-1),
                self.unbind(x).unbind(-1)[0],
                self.out(s[..., :12] + s[..., 4:]),
                torch.stack((h, torch.cat((x, x), -1)), dim=-1),  # a shard stacked with a replicated tensor
                n / n.abs().amax(-1, keepdim=True),  # a max over all the features
                self.picked(x)[:, :, [0, 5]],  # features picked by index: positions in the whole dim
                self.masked(x).view(2, 3, 4, 4)[x[..., :4] > 0],  # a boolean mask spans several dims
                torch.cat([h * (i + 1) for i, h in enumerate(self.heads(x).view(2, 3, 4, 4).split(1, dim=2))], 2))


def test_ops_a_shard_cannot_pass_keep_their_projections_replicated_with_the_reason():
    from tedfx.capture import capture

    gm = capture(_Refusals(), (torch.randn(2, 3, 8),))
    plan, _ = plan_tensor_parallel(gm, 2)
    assert not plan.column and not plan.row
    reasons = {n.args[1].target.rpartition(".")[0]: r for n, r in plan.reasons.items()}
    assert reasons["softmax"].startswith("softmax over the sharded dim")
    assert reasons["a"].startswith("matmul contracts the sharded dim") and reasons["b"] == reasons["a"]
    assert reasons["unbind"].startswith("unbind or select along the sharded dim")
    assert reasons["sliced"].startswith("slice [0:12] spans several chunks of a fused projection")
    assert reasons["stacked"].startswith("stack of operands with different placements")
    assert reasons["normed"].startswith("aten.amax.default over the sharded dim 2: its statistics need the whole "
                                        "features")
    assert reasons["picked"].startswith("indexing the sharded dim")
    assert reasons["masked"].startswith("indexing a sharded tensor with a boolean mask")
    # StableLM's qk_layernorm: the heads split one by one, each normalized by its own module.
    assert reasons["heads"].startswith("split of a sharded dim that is not a projection's whole output features "
                                       "(the heads split apart")


# --- the loud error, and the opt-out ------------------------------------------------------------------------


def test_a_projection_left_whole_raises_naming_it_why_and_the_fix():
    gm, ctx, _ = _moe_graph(tiny_explicit_encoder)
    rank_ctx = ctx.for_rank(tedfx.ParallelConfig(tensor=8), {"tp": 0, "ep": 0, "edp": 0})
    with pytest.raises(ValueError) as info:
        shard_tensor_parallel_pass(copy.deepcopy(gm), ctx=rank_ctx)  # 4 heads cannot split 8 ways
    message = str(info.value)
    assert "ParallelConfig.tensor=8 would leave 8 projection(s) whole" in message
    for i in range(2):
        for p in ("query", "key", "value"):
            assert f"layers.{i}.attn.{p} (attention input projection): dim 2 of shape" in message
            assert "(size 4, e.g. the number of attention heads) is not divisible by T=8" in message
        assert f"layers.{i}.attn.out (attention output projection): its input comes from" in message
    assert "replicate=('layers.*.attn.query', 'layers.*.attn.key', 'layers.*.attn.value', 'layers.*.attn.out')" \
        in message


def test_replicate_keeps_the_named_projections_whole_and_the_ranks_still_compute_the_reference():
    ranks = _ranks(tiny_explicit_encoder, 8, replicate=("layers.*.attn.*",))
    for _, ctx in ranks:
        assert _split(ctx) == (set(), set())
        assert sum("as ParallelConfig.replicate asks" in n for n in ctx.records.tp_notes) == 8
    _assert_ranks_compute_the_reference(tiny_explicit_encoder, ranks)


def _seeded(cls: type[nn.Module]) -> Callable:
    """A builder of a model of this file, as tests/models.py builders: seeded weights and a token batch."""

    def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
        torch.manual_seed(0)
        return cls(), (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)

    return build


class _BroadcastMQA(nn.Module):
    """Multi-query attention by broadcasting: one k/v head of shape (B, 1, S, d) against 4 query heads."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.q, self.o = nn.Linear(32, 32), nn.Linear(32, 32)
        self.k, self.v = nn.Linear(32, 8), nn.Linear(32, 8)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, idx):
        x = self.embed(idx)
        B, S, _ = x.shape
        q = self.q(x).view(B, S, 4, 8).transpose(1, 2)
        k, v = (proj(x).view(B, S, 1, 8).transpose(1, 2) for proj in (self.k, self.v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
        x = x + self.o((probs @ v).transpose(1, 2).reshape(B, S, 32))
        return x + self.mlp(x)


_broadcast_mqa = _seeded(_BroadcastMQA)


def test_a_replicated_operand_a_sharded_matmul_broadcasts_gets_its_gradient_summed_over_tp():
    """k and v kept whole (one KV head) and broadcast over the 2 ranks' query heads: each rank's gradient of
    them is its heads' share, so Megatron's f (all-reduce in backward) sits before each, as before the q/k norm
    weights of Qwen3; the forward still computes the reference."""
    ranks = _ranks(_broadcast_mqa, 2, replicate=("k", "v"))
    for gm, _ in ranks:
        matmuls = [n for n in gm.graph.nodes if n.target is aten.matmul.default]
        assert len(matmuls) == 2
        for node, operand in zip(matmuls, (1, 1)):  # q @ k^T: k^T; probs @ v: v
            f = node.args[operand]
            assert f.target is collectives.identity_fwd_all_reduce_bwd, (node.name, f.target)
    _assert_ranks_compute_the_reference(_broadcast_mqa, ranks)


class _LearnedBiasAttention(nn.Module):
    """sdpa with a learned bias of shape (1, 1, S, S), scaled, broadcast over every head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.qkv, self.o = nn.Linear(32, 96), nn.Linear(32, 32)
        self.bias = nn.Parameter(torch.randn(1, 1, 8, 8) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, idx):
        x = self.embed(idx)
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias * 2)
        x = x + self.o(y.transpose(1, 2).reshape(B, S, 32))
        return x + self.mlp(x)


_learned_bias = _seeded(_LearnedBiasAttention)


def test_a_learned_attention_bias_broadcast_over_the_heads_gets_its_gradient_summed_over_tp():
    ranks = _ranks(_learned_bias, 2)
    for gm, _ in ranks:
        (sdpa,) = [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
        assert sdpa.args[3].target is collectives.identity_fwd_all_reduce_bwd
    _assert_ranks_compute_the_reference(_learned_bias, ranks)


class _FusedQKVSeparateBias(nn.Module):
    """A fused q | k | v projection without bias, its bias a parameter added before the split into q, k, v."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.qkv = nn.Linear(32, 96, bias=False)
        self.qkv_bias = nn.Parameter(torch.randn(96))
        self.o = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, idx):
        x = self.embed(idx)
        B, S, _ = x.shape
        q, k, v = (self.qkv(x) + self.qkv_bias).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(y.transpose(1, 2).reshape(B, S, 32))
        return x + self.mlp(x)


_fused_qkv_separate_bias = _seeded(_FusedQKVSeparateBias)


def test_a_bias_added_to_a_fused_projection_is_narrowed_per_chunk_as_its_weight_is_split():
    ranks = _ranks(_fused_qkv_separate_bias, 2)
    assert ranks[0][1].records.shards["qkv.weight"].chunks == (32, 32, 32)
    assert "add: replicated operand 1 narrowed to this rank's share of each of the chunks (32, 32, 32)" \
        in ranks[0][1].records.tp_notes
    _assert_ranks_compute_the_reference(_fused_qkv_separate_bias, ranks)


def test_a_dense_ffn_projection_left_whole_raises_too():
    # Keeping fc1 of the dense FFN whole leaves fc2 nothing to be row-parallel on: named, with its FFN.
    with pytest.raises(ValueError, match=r"layers\.0\.fc2 \(projection of the dense FFN layers\.0\)"):
        _ranks(tiny_explicit_encoder, 2, layers=(1,), replicate=("layers.0.fc1",))


def test_replicate_pattern_matching_nothing_raises():
    with pytest.raises(ValueError, match=r"ParallelConfig\.replicate pattern 'layer.\*.attn' matches no linear"):
        _ranks(tiny_explicit_encoder, 2, replicate=("layer.*.attn",))


def test_replicate_must_be_a_tuple_of_globs():
    with pytest.raises(ValueError, match=r"ParallelConfig\.replicate='layers\.\*' is invalid"):
        tedfx.ParallelConfig(tensor=2, replicate="layers.*")
    assert tedfx.ParallelConfig(replicate=["a.*"]).replicate == ("a.*",)


@pytest.mark.parametrize("builder, kwargs", [(tiny_gpt, {}), (tiny_gpt2, {}), (tiny_llama, {})],
                         ids=["gpt", "hf-gpt2", "hf-llama"])
def test_models_that_split_fully_raise_nothing(builder, kwargs):
    ranks = _ranks(builder, 2, **kwargs)
    column, row = _split(ranks[0][1])
    assert len(column) >= 2 and len(row) == 2
    assert not any("kept whole" in n for n in ranks[0][1].records.tp_notes)


def test_the_placement_of_a_getitem_follows_its_tuple():
    # unbind of timm's (3, B, heads, S, d) view: each of q, k, v is sharded on its heads dim (1).
    gm, _, _ = _moe_graph(tiny_fused_qkv_encoder)
    plan, _ = plan_tensor_parallel(gm, 2)
    items = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].target is aten.unbind.int]
    assert len(items) == 6 and {(plan.place[n].kind, plan.place[n].dim) for n in items} == {("S", 1)}
