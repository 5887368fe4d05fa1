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

import ast
import copy
import re

import pytest
import torch
import torch.fx as fx
from torch import nn

import tedfx
from tedfx import collectives
from tedfx.capture import capture
from tedfx.passes.context import PassContext
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


def tp_rank(rank_graph, name: str, t: int, moe: tedfx.MoEConfig = MOE_LAYER_1, tensor: int = T,
            replicate: tuple[str, ...] = ()):
    return rank_graph(name, tensor=tensor, expert=1, tp=t, passes=[shard_tensor_parallel_pass], moe=moe,
                      replicate=replicate)


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
    issued = {n.target.__name__ for n in gm.graph.nodes
              if getattr(n.target, "__module__", "").startswith(collectives.__name__)}
    assert issued <= names


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
    notes = rank.ctx.records.tp_notes
    assert [n for n in notes if "narrowed to this rank's share" in n] == [
        f"{sdpa.name}: replicated operand {i} narrowed to this rank's share" for sdpa in sdpas for i in (1, 2)]
    # The loud check lets k_proj and v_proj stay whole for this reason only, and says so.
    assert [n for n in notes if "kept whole" in n] == [
        f"model.layers.{i}.self_attn.{p}_proj: kept whole, its 1 KV heads do not divide by T=2; each rank narrows "
        f"its value to its query heads' share" for i in range(2) for p in "kv"]


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


def suggested_replicate(message: str, tensor: int) -> tuple[str, ...]:
    """The ParallelConfig.replicate the loud error suggests."""
    (globs,) = re.findall(rf"ParallelConfig\(tensor={tensor}, replicate=(\(.*\))\)\.$", message)
    return ast.literal_eval(globs)


_HEADS = r"\(size {n}, e\.g\. the number of attention heads\) is not divisible by T={T} \(at \w+ in {block}\)"
_LLAMA_ATTN = r"model\.layers\.{i}\.self_attn\."
LEFT_WHOLE = {
    # GPT at T=3: c_attn's q | k | v chunks of 32 features (4 heads of 8) and dense FFN 0's 128 features.
    "gpt": (3, [r"h\.{i}\.attn\.c_attn \(attention input projection\): chunks \[32, 32, 32\] of a fused "
                r"projection are not divisible by T=3 \(at \w+ in h\.{i}\.attn\)",
                r"h\.{i}\.attn\.c_proj \(attention output projection\): its input comes from h\.{i}\.attn\.c_attn, "
                r"left whole",
                r"h\.0\.mlp\.c_fc \(projection of the dense FFN h\.0\.mlp\): its 128 output features are not "
                r"divisible by T=3",
                r"h\.0\.mlp\.c_proj \(projection of the dense FFN h\.0\.mlp\): its input comes from h\.0\.mlp\.c_fc"],
            ("h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"), []),
    # Llama at T=8: q_proj's 32 features divide, its 4 heads do not, nor the 2 KV heads of k_proj and v_proj;
    # dense FFN 0 (64 wide) splits.
    "llama": (8, [_LLAMA_ATTN + r"q_proj \(attention input projection\): dim 2 of shape \(\w+, \w+, 4, 8\) "
                  + _HEADS.format(n=4, T=8, block=_LLAMA_ATTN[:-2]),
                  *(_LLAMA_ATTN + p + r"_proj \(attention input projection\): dim 2 of shape \(\w+, \w+, 2, 8\) "
                    + _HEADS.format(n=2, T=8, block=_LLAMA_ATTN[:-2]) for p in "kv"),
                  _LLAMA_ATTN + r"o_proj \(attention output projection\): its input comes from "],
              tuple(f"model.layers.*.self_attn.{p}_proj" for p in "qkvo"),
              [LLAMA.format(0, "mlp.gate"), LLAMA.format(0, "mlp.up")]),
}


@pytest.mark.parametrize("name", list(LEFT_WHOLE))
def test_heads_not_divisible_by_t_is_a_value_error_from_the_pass(rank_graph, name) -> None:
    tensor, lines, replicate, split_anyway = LEFT_WHOLE[name]
    whole = len({line.format(i=i) for line in lines for i in range(2)})
    with pytest.raises(ValueError, match=rf"ParallelConfig\.tensor={tensor} would leave {whole} projection\(s\) "
                                         rf"whole") as info:
        tp_rank(rank_graph, name, 0, tensor=tensor)
    assert info.value.__notes__ == ["(found by the tedfx pass shard_tensor_parallel)"]
    message = str(info.value)
    for line in {line.format(i=i) for line in lines for i in range(2)}:
        assert re.search("^  - " + line, message, re.M), (line, message)
    assert suggested_replicate(message, tensor) == replicate
    # The fix it suggests works: exactly those projections stay whole, said so; the rest still splits.
    rank = tp_rank(rank_graph, name, 0, tensor=tensor, replicate=replicate)
    assert sum("as ParallelConfig.replicate asks" in n for n in rank.ctx.records.tp_notes) == whole
    assert rank.ctx.records.tp_column == split_anyway


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
    with pytest.raises(ValueError, match=r"ParallelConfig\.tensor=3 would leave 2 projection\(s\) whole") as info:
        run_passes(copy.deepcopy(moe_gm), [shard_tensor_parallel_pass], ctx=ctx)
    assert info.value.__notes__ == ["(found by the tedfx pass shard_tensor_parallel)"]
    message = str(info.value)
    assert re.search(r"^  - mlps\.0\.0 \(projection of the dense FFN mlps\.0\): its 16 output features are not "
                     r"divisible by T=3 \(at \w+ in mlps\.0\.0\)$", message, re.M), message
    assert "\n  - mlps.0.2 (projection of the dense FFN mlps.0): its input comes from mlps.0.0, left whole\n" in message
    assert suggested_replicate(message, 3) == ("mlps.*.0", "mlps.*.2")
    # Taking that fix: the FFN stays whole on every rank, said so, and nothing is split.
    ctx = moe_ctx.for_rank(tedfx.ParallelConfig(tensor=3, replicate=("mlps.*.0", "mlps.*.2")),
                           {"edp": 0, "ep": 0, "tp": 0})
    gm = run_passes(copy.deepcopy(moe_gm), [shard_tensor_parallel_pass], ctx=ctx)
    assert (ctx.records.tp_column, ctx.records.tp_row) == ([], [])
    assert [n for n in ctx.records.tp_notes if "kept whole" in n] == [
        f"mlps.0.{i}: kept whole, as ParallelConfig.replicate asks" for i in (0, 2)]
    assert tuple(gm.state_dict()["mlps.0.0.weight"].shape) == (16, 8)
    # With T=2 the same graph splits: up column-parallel, down row-parallel.
    ctx = moe_ctx.for_rank(tedfx.ParallelConfig(tensor=2), {"edp": 0, "ep": 0, "tp": 1})
    gm = run_passes(copy.deepcopy(moe_gm), [shard_tensor_parallel_pass], ctx=ctx)
    assert (ctx.records.tp_column, ctx.records.tp_row) == (["mlps.0.0.weight"], ["mlps.0.2.weight"])
    assert tuple(gm.state_dict()["mlps.0.0.weight"].shape) == (8, 8)


class _FlattenedMlp(nn.Module):
    """An MLP whose hidden activation is flattened with the sequence dim, [B, 3, 16] -> [B, 48], and back."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.up(x)).reshape(x.shape[0], 3 * 16) * 2.0
        return self.down(h.reshape(x.shape[0], 3, 16))


def test_a_shard_in_outer_blocks_divides_the_flattened_size_and_the_partial_sums_add_up() -> None:
    """Each rank's [B, 48] holds 3 blocks of 8 features, [B, 24]: both reshapes are divided, and the
    ranks' partial sums of `down` add up to the full graph's output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    full = capture(_FlattenedMlp(), (x,), dynamic=False)
    partials = []
    for t in range(T):
        ctx = PassContext(moe=tedfx.MoEConfig(num_experts=2, top_k=1), parallel=tedfx.ParallelConfig(tensor=T),
                          coords={"edp": 0, "ep": 0, "tp": t})
        gm = shard_tensor_parallel_pass(copy.deepcopy(full), ctx=ctx)
        assert (ctx.records.tp_column, ctx.records.tp_row) == (["up.weight"], ["down.weight"])
        assert [n.args[1] for n in calls(gm, torch.ops.aten.reshape.default)] == [[2, 24], [2, 3, 8]]
        (reduce,) = calls(gm, collectives.all_reduce)
        partials.append(_values(gm, (x,), t)[reduce.args[0]])
    with torch.no_grad():
        expected = full(x)
    bias = full.get_parameter("down.bias").detach()
    torch.testing.assert_close(partials[0] + partials[1] + bias, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(partials[0] + bias, expected, atol=1e-3)
