"""shard_tensor_parallel alone, on one rank's graph (coords {"tp": t}), run in this process.

The pass is run by `run_passes` from `ctx.for_rank(ParallelConfig(tensor=2), coords)`
on a deep copy of the MoE graph, with nothing else sharded. Its axes are bound
to `SimulatedAxis(2, t)`: the forward and backward run, and each collective is
counted. Checked: which weights hold which slice, where the collectives sit and
how many, the divided shape constants, the per-layer numerics (the two ranks'
partial sums of the first row-parallel linear add up to the full graph's), and
the step's CommStats against the graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import tedfx
from tedfx import collectives
from tedfx.passes.graph import as_linear
from tedfx.passes.runner import run_passes
from tedfx.passes.shard_tensor_parallel import shard_tensor_parallel_pass
from tedfx.pipeline import build_moe_graph
from tedfx.sharding import ParamShard

T = 2
MOE_LAYER_1 = tedfx.MoEConfig(num_experts=4, top_k=2, expert_noise=0.1, layers=[1])
"""FFN 0 stays dense, so block 0 has two column inputs (attention, MLP) and two row-parallel linears."""

GPT_COLUMN = {"h.0.attn.c_attn.weight": (32, 32, 32), "h.1.attn.c_attn.weight": (32, 32, 32),
              "h.0.mlp.c_fc.weight": None}
GPT_ROW = ["h.0.attn.c_proj.weight", "h.0.mlp.c_proj.weight", "h.1.attn.c_proj.weight"]
LLAMA = "model.layers.{}.{}_proj.weight"
LLAMA_ATTN = ("self_attn.q", "self_attn.k", "self_attn.v")
LLAMA_COLUMN = {LLAMA.format(0, p): None for p in LLAMA_ATTN + ("mlp.gate", "mlp.up")} | {
    LLAMA.format(1, p): None for p in LLAMA_ATTN}
LLAMA_ROW = [LLAMA.format(0, "self_attn.o"), LLAMA.format(0, "mlp.down"), LLAMA.format(1, "self_attn.o")]
KV1_COLUMN = {k: v for k, v in LLAMA_COLUMN.items() if "k_proj" not in k and "v_proj" not in k}
CASES = {"gpt": (GPT_COLUMN, GPT_ROW), "llama": (LLAMA_COLUMN, LLAMA_ROW), "llama-kv1": (KV1_COLUMN, LLAMA_ROW)}


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def tp_rank(rank_graph, name: str, t: int, moe: tedfx.MoEConfig = MOE_LAYER_1, tensor: int = T):
    return rank_graph(name, tensor=tensor, expert=1, tp=t, passes=[shard_tensor_parallel_pass], moe=moe)


def local_rows(full: torch.Tensor, t: int, chunks: tuple[int, ...] | None, dim: int = 0) -> torch.Tensor:
    """Rank t's 1/T of `full` along `dim`, chunk by chunk for a fused projection."""
    pieces = full.split(list(chunks), dim=dim) if chunks else [full]
    return torch.cat([p.chunk(T, dim=dim)[t] for p in pieces], dim=dim)


# --- weights and records ------------------------------------------------------------------------------


@pytest.mark.parametrize("t", range(T))
@pytest.mark.parametrize("name", list(CASES))
def test_column_weights_hold_their_rows_and_row_weights_their_columns(rank_graph, name, t) -> None:
    rank = tp_rank(rank_graph, name, t)
    column, row = CASES[name]
    full, local = rank.full.state_dict(), rank.gm.state_dict()
    assert set(local) == set(full)  # the state dict keeps its keys
    for w, chunks in column.items():
        assert local[w].shape[0] == full[w].shape[0] // T
        torch.testing.assert_close(local[w], local_rows(full[w], t, chunks), rtol=0, atol=0)
        b = w.replace("weight", "bias")
        if b in full:
            torch.testing.assert_close(local[b], local_rows(full[b], t, chunks), rtol=0, atol=0)
    for w in row:
        torch.testing.assert_close(local[w], full[w].chunk(T, dim=1)[t], rtol=0, atol=0)
        b = w.replace("weight", "bias")
        if b in full:  # added after the all-reduce: whole on every rank
            torch.testing.assert_close(local[b], full[b], rtol=0, atol=0)
    sharded = set(column) | set(row) | {w.replace("weight", "bias") for w in column if w.replace("weight", "bias")
                                        in full}
    for key in set(full) - sharded:  # embeddings, norms, LM head, router, experts: untouched
        torch.testing.assert_close(local[key], full[key], rtol=0, atol=0)
    assert all(p.requires_grad for p in rank.gm.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_records_name_every_split(rank_graph, name) -> None:
    rank = tp_rank(rank_graph, name, 1)
    column, row = CASES[name]
    records, full = rank.ctx.records, rank.full.state_dict()
    assert sorted(records.tp_column) == sorted(column) and records.tp_row == row
    expected = {w: ParamShard(w, (("tp", 0),), chunks, tuple(full[w].shape)) for w, chunks in column.items()}
    expected |= {b: ParamShard(b, (("tp", 0),), chunks, tuple(full[b].shape))
                 for w, chunks in column.items() if (b := w.replace("weight", "bias")) in full}
    expected |= {w: ParamShard(w, (("tp", 1),), None, tuple(full[w].shape)) for w in row}
    assert records.shards == expected
    assert rank.ctx.done[-1] == "shard_tensor_parallel"


def test_tied_embedding_and_lm_head_stay_whole_and_one_parameter(rank_graph) -> None:
    rank = tp_rank(rank_graph, "gpt", 1)
    assert rank.gm.wte.weight is rank.gm.lm_head.weight
    assert rank.gm.lm_head.weight.shape == rank.full.lm_head.weight.shape


# --- the graph ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_one_all_reduce_per_row_linear_and_one_f_per_distinct_column_input(rank_graph, name) -> None:
    rank = tp_rank(rank_graph, name, 0)
    gm = rank.gm
    column, row = CASES[name]
    reduces = calls(gm, collectives.all_reduce)
    fs = calls(gm, collectives.identity_fwd_all_reduce_bwd)
    assert all(n.args[1] == "tp" for n in reduces + fs)
    # Each all-reduce sums a bias-free partial product of a row-parallel weight; the bias comes after.
    partial_weights = [as_linear(n.args[0]).weight.target for n in reduces]
    assert partial_weights == row and all(as_linear(n.args[0]).bias is None for n in reduces)
    for n in reduces:
        bias = as_linear(n.args[0]).weight.target.replace("weight", "bias")
        adds = [u for u in n.users if u.target is torch.ops.aten.add.Tensor and u.args[1].target == bias]
        assert len(adds) == (bias in gm.state_dict()) and (not adds or len(n.users) == 1)
    # Megatron's f: one per distinct input, and every column linear reads one.
    col_nodes = [n for n in gm.graph.nodes if (lin := as_linear(n)) is not None and lin.weight.target in column]
    assert len(col_nodes) == len(column)
    assert all(as_linear(n).x in fs for n in col_nodes)
    assert len(fs) == len({as_linear(n).x for n in col_nodes}) == 3  # attention 0, MLP 0, attention 1
    # Nothing collective inside the MoE block (shard_experts' job) and no other axis.
    names = {"all_reduce", "identity_fwd_all_reduce_bwd", "slice_for_rank"}
    assert {n.target.__name__ for n in gm.graph.nodes if getattr(n.target, "__module__", "") == collectives.__name__} \
        <= names


def test_shape_constants_of_sharded_dims_are_divided(rank_graph) -> None:
    gm = tp_rank(rank_graph, "gpt", 0).gm
    splits = calls(gm, torch.ops.aten.split.Tensor)
    assert [s.args[1:] for s in splits] == [(16, 2), (16, 2)]  # q | k | v of 16 features each per rank
    views = calls(gm, torch.ops.aten.view.default)
    # Per block: q, k, v to [B, S, 2 heads, 8], and back to [B, S, 16].
    assert [v.args[1][2:] for v in views] == [[2, 8]] * 3 + [[16]] + [[2, 8]] * 3 + [[16]]


def test_grouped_query_repeat_is_divided(rank_graph) -> None:
    gm = tp_rank(rank_graph, "llama", 0).gm  # 4 query heads, 2 KV heads: each rank has 1 KV head for 2 queries
    expands = [n.args[1][1:3] for n in calls(gm, torch.ops.aten.expand.default) if len(n.args[1]) == 5]
    assert expands == [[1, 2]] * 4
    reshapes = [n.args[1][1] for n in calls(gm, torch.ops.aten.reshape.default) if len(n.args[1]) == 4
                and n.args[0].target is torch.ops.aten.expand.default]
    assert reshapes == [2] * 4


def test_kv_heads_that_do_not_divide_are_narrowed_to_the_rank_s_query_heads(rank_graph) -> None:
    rank = tp_rank(rank_graph, "llama-kv1", 1)
    slices = calls(rank.gm, collectives.slice_for_rank)
    sdpas = calls(rank.gm, torch.ops.aten.scaled_dot_product_attention.default)
    assert len(sdpas) == 2 and all(s.args[1:] == ("tp", 1) for s in slices)
    for i, sdpa in enumerate(sdpas):  # k and v of each attention, narrowed on the heads dim
        assert sdpa.args[1:3] == tuple(slices[2 * i:2 * i + 2])
    assert sum("narrowed to this rank's query heads" in n for n in rank.ctx.records.tp_notes) == 4


# --- running it ---------------------------------------------------------------------------------------


def _values(gm: fx.GraphModule, inputs, t: int) -> dict[fx.Node, torch.Tensor]:
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad(), collectives.bind_axes({"tp": collectives.SimulatedAxis(T, t), "ep": None}):
        interp.run(*inputs)
    return interp.env


@pytest.mark.parametrize("name", list(CASES))
def test_partial_sums_of_the_ranks_add_up_to_the_full_projection(rank_graph, name) -> None:
    """Block 0 sees the same replicated input on every rank, so its first row-parallel output is exact."""
    ranks = [tp_rank(rank_graph, name, t) for t in range(T)]
    first_row = CASES[name][1][0]
    partials = []
    for t, rank in enumerate(ranks):
        reduce = calls(rank.gm, collectives.all_reduce)[0]
        partials.append(_values(rank.gm, rank.inputs, t)[reduce.args[0]])
    (full_node,) = [n for n in rank.full.graph.nodes if (lin := as_linear(n)) and lin.weight.target == first_row]
    expected = _values(rank.full, rank.inputs, 0)[full_node]
    bias = rank.full.state_dict().get(first_row.replace("weight", "bias"), 0)
    torch.testing.assert_close(partials[0] + partials[1] + bias, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(partials[0], expected, atol=1e-3)  # each rank alone holds only a part


@pytest.mark.parametrize("name", list(CASES))
def test_a_step_runs_and_counts_what_the_graph_holds(rank_graph, name) -> None:
    rank = tp_rank(rank_graph, name, 1)
    stats = rank.step()
    gm = rank.gm
    reduces, fs = calls(gm, collectives.all_reduce), calls(gm, collectives.identity_fwd_all_reduce_bwd)
    slices = calls(gm, collectives.slice_for_rank)
    B, S = rank.inputs[0].shape
    hidden_bytes = B * S * 32 * 4
    assert stats.table() == sorted(
        [("all_reduce", "tp", "forward", len(reduces), len(reduces) * hidden_bytes),
         ("all_reduce", "tp", "backward", len(fs), len(fs) * hidden_bytes)]
        + ([("all_gather", "tp", "backward", len(slices), len(slices) * B * 2 * S * 8 * 4)] if slices else []),
        key=lambda row: (row[0], row[1], ("forward", "backward").index(row[2])))
    # Every parameter got a gradient of its local shape; the output is the full vocabulary.
    assert all(p.grad is not None and p.grad.shape == p.shape for p in gm.parameters() if p.requires_grad)
    assert rank.forward().shape[-1] == 100


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,message", [
    ("gpt", r"cannot shard h\.0\.attn: split sizes \[32, 32, 32\] are not divisible by T=3"),
    ("llama", r"cannot split the attention of model\.layers\.0\.self_attn: its 4 query heads are not divisible"),
], ids=["gpt", "llama"])
def test_heads_not_divisible_by_t_is_a_value_error_from_the_pass(rank_graph, name, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        tp_rank(rank_graph, name, 0, tensor=3)
    assert info.value.__notes__ == ["(found by the tedfx pass shard_tensor_parallel)"]


class _TwoMlps(nn.Module):
    """Two residual MLPs of width 16 on hidden 8, no attention: only the dense FFN's width meets T."""

    def __init__(self) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mlp in self.mlps:
            x = x + mlp(x)
        return x


def test_dense_ffn_width_not_divisible_by_t_is_a_value_error_from_the_pass() -> None:
    torch.manual_seed(0)
    model, inputs = _TwoMlps(), (torch.randn(2, 3, 8),)
    moe_gm, moe_ctx = build_moe_graph(model, inputs, moe=tedfx.MoEConfig(num_experts=2, top_k=1, layers=[1]))
    assert "mlps.0.0.weight" in moe_gm.state_dict()  # FFN 0 stays dense: tensor parallelism splits it
    ctx = moe_ctx.for_rank(tedfx.ParallelConfig(tensor=3), {"edp": 0, "ep": 0, "tp": 0})
    with pytest.raises(ValueError, match=r"ParallelConfig.tensor=3 cannot split mlps\.0\.0\.weight of shape "
                                         r"\(16, 8\) along dim 0: not divisible by 3") as info:
        run_passes(copy.deepcopy(moe_gm), [shard_tensor_parallel_pass], ctx=ctx)
    assert info.value.__notes__ == ["(found by the tedfx pass shard_tensor_parallel)"]
    # With T=2 the same graph splits: up column-parallel, down row-parallel.
    ctx = moe_ctx.for_rank(tedfx.ParallelConfig(tensor=2), {"edp": 0, "ep": 0, "tp": 1})
    gm = run_passes(copy.deepcopy(moe_gm), [shard_tensor_parallel_pass], ctx=ctx)
    assert (ctx.records.tp_column, ctx.records.tp_row) == (["mlps.0.0.weight"], ["mlps.0.2.weight"])
    assert tuple(gm.state_dict()["mlps.0.0.weight"].shape) == (8, 8)
