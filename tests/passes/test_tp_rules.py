"""tp_plan.plan_tensor_parallel: which linears split how, from the rule table alone (no rewrite, no process).

On the captured test GPT (fused c_attn split into q, k, v) and HF Llama
(separate q/k/v, grouped-query attention, rotary embeddings, RMSNorm), dense
and after ffn_to_moe, and on small hand-written modules for single rules.
"""

from __future__ import annotations

import ast
import re

import pytest
import torch
import torch.fx as fx
from torch import nn

from tedfx.capture import capture
from tedfx.passes.graph import MOE_META, as_linear, module_path
from tedfx.passes.tp_plan import check_nothing_left_whole, kept_whole_by_config, plan_tensor_parallel, propagate
from tedfx.passes.tp_rules import Fail, Placement, R

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def linears(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Every linear of the graph by its weight's state-dict key."""
    return {lin.weight.target: n for n in gm.graph.nodes if (lin := as_linear(n)) is not None}


def weights(nodes) -> set[str]:
    return {as_linear(n).weight.target for n in nodes}


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def left_whole(gm: fx.GraphModule, T: int, count: int) -> str:
    """The loud error for the `count` projections a plan at degree T leaves whole; the ParallelConfig.replicate
    it suggests must then plan without raising, keeping exactly the projections it named whole."""
    plan, _ = plan_tensor_parallel(gm, T)
    with pytest.raises(ValueError, match=rf"ParallelConfig\.tensor={T} would leave {count} projection\(s\) whole"
                       ) as info:
        check_nothing_left_whole(gm, plan, T, allowed=frozenset())
    message = str(info.value)
    named = re.findall(r"^  - (\S+) \(", message, flags=re.M)
    assert len(named) == count, message
    (globs,) = re.findall(rf"ParallelConfig\(tensor={T}, replicate=(\(.*\))\)\.$", message)
    kept = kept_whole_by_config(gm, ast.literal_eval(globs))
    plan, _ = plan_tensor_parallel(gm, T, keep_whole=kept)
    notes = check_nothing_left_whole(gm, plan, T, allowed=kept)
    assert sorted(n.split(":")[0] for n in notes if "as ParallelConfig.replicate asks" in n) == sorted(named)
    return message


GPT_COLUMN = {f"h.{i}.{w}" for i in range(2) for w in ("attn.c_attn.weight", "mlp.c_fc.weight")}
GPT_ROW = {f"h.{i}.{w}" for i in range(2) for w in ("attn.c_proj.weight", "mlp.c_proj.weight")}
LLAMA = "model.layers.{}.{}_proj.weight"
LLAMA_ATTN = ("self_attn.q", "self_attn.k", "self_attn.v")
LLAMA_COLUMN = {LLAMA.format(i, p) for i in range(2) for p in LLAMA_ATTN + ("mlp.gate", "mlp.up")}
LLAMA_ROW = {LLAMA.format(i, p) for i in range(2) for p in ("self_attn.o", "mlp.down")}


# --- the captured models ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,column,row", [("gpt", GPT_COLUMN, GPT_ROW), ("llama", LLAMA_COLUMN, LLAMA_ROW)])
def test_qkv_and_up_column_out_and_down_row(dense_graph, name, column, row) -> None:
    gm, _ = dense_graph(name)
    code = gm.code
    plan, notes = plan_tensor_parallel(gm, 2)
    assert gm.code == code  # planning never edits the graph
    assert weights(plan.column) == column and weights(plan.row) == row
    assert all(plan.column[n] == frozenset({n}) for n in plan.column)  # each column linear seeds itself
    for n in plan.column:  # column outputs are split on their features, row outputs are whole again
        assert plan.place[n] == Placement("S", n.meta["val"].dim() - 1, frozenset({n}))
    assert all(plan.place[n] is R or plan.place[n].kind == "R" for n in plan.row)
    # The LM head was tried as column-parallel and given up at the graph's output: one note says so.
    (head,) = [n for w, n in linears(gm).items() if w == "lm_head.weight"]
    assert head not in plan.column and plan.place[head].kind == "R"
    assert notes == [f"kept replicated ['{head.name}']: sharded value reaches an op that needs it whole"]


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_embeddings_norms_and_residual_stream_stay_replicated(dense_graph, name) -> None:
    gm, _ = dense_graph(name)
    plan, _ = plan_tensor_parallel(gm, 2)
    embeddings = calls(gm, aten.embedding.default)
    norms = [n for n in gm.graph.nodes if n.op == "call_function"
             and ("norm" in (last := module_path(n).rsplit(".", 1)[-1]) or last.startswith("ln_"))]
    assert embeddings and len(norms) >= 3  # the norm ops of two blocks and the final norm
    assert all(plan.place[n].kind == "R" for n in embeddings + norms)
    # Every sharded value lies inside attention or the MLP, between a column and a row linear.
    sharded = [n for n, p in plan.place.items() if p.kind == "S"]
    assert sharded and all({"attn", "self_attn", "mlp"} & set(module_path(n).split(".")) for n in sharded)
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert plan.place[output].kind == "R"


def test_moe_blocks_are_left_to_shard_experts(moe_graph) -> None:
    gm, _, _ = moe_graph("gpt")
    plan, _ = plan_tensor_parallel(gm, 2)
    assert weights(plan.column) == {f"h.{i}.attn.c_attn.weight" for i in range(2)}
    assert weights(plan.row) == {f"h.{i}.attn.c_proj.weight" for i in range(2)}
    moe = [n for n in gm.graph.nodes if MOE_META in n.meta]
    assert moe and all(plan.place.get(n, R).kind == "R" for n in moe)


def test_fused_projection_split_records_per_chunk_sizes(dense_graph) -> None:
    gm, _ = dense_graph("gpt")
    plan, _ = plan_tensor_parallel(gm, 2)
    by_weight = linears(gm)
    for i in range(2):
        c_attn = by_weight[f"h.{i}.attn.c_attn.weight"]
        assert plan.chunks[c_attn] == (32, 32, 32)  # q | k | v, each split over T on its own
        (split,) = c_attn.users
        assert split.target is aten.split.Tensor and plan.shape_edits[split] == (1, -1)
    assert set(plan.chunks) == {by_weight[f"h.{i}.attn.c_attn.weight"] for i in range(2)}  # c_fc is not fused


def test_reshape_of_a_sharded_dim_divides_its_shape_constant(dense_graph) -> None:
    gm, _ = dense_graph("gpt")
    plan, _ = plan_tensor_parallel(gm, 2)
    views = calls(gm, aten.view.default)
    # Per block: q, k, v [B, S, 32] -> [B, S, 4 heads, 8] and back [B, S, 4, 8] -> [B, S, 32]: the heads dim
    # (position 2 of the size list) is divided; batch, sequence and head size are not.
    assert {n: plan.shape_edits.get(n) for n in views} == {n: (1, 2) for n in views} and len(views) == 8
    for sdpa in calls(gm, SDPA):
        q, k, v = sdpa.args[:3]
        assert [plan.place[a].dim for a in (q, k, v, sdpa)] == [1, 1, 1, 1]  # heads, after the transposes


def test_grouped_query_attention_divides_kv_heads_and_their_repeat(dense_graph) -> None:
    gm, _ = dense_graph("llama")  # 4 query heads, 2 KV heads, T=2: one KV head per rank
    plan, _ = plan_tensor_parallel(gm, 2)
    expands = calls(gm, aten.expand.default)
    kv = [n for n in expands if plan.place.get(n, R).kind == "S"]
    assert len(kv) == 4 and all(plan.shape_edits[n] == (1, 1) for n in kv)  # [B, 2 kv, 2 rep, S, D]
    by_weight = linears(gm)
    assert all(by_weight[LLAMA.format(i, p)] in plan.column for i in range(2) for p in LLAMA_ATTN)
    assert plan.narrow == []  # k and v are split, so nothing replicated is narrowed per rank


def test_kv_heads_not_divisible_stay_replicated_and_are_narrowed_per_rank(dense_graph) -> None:
    gm, _ = dense_graph("llama-kv1")  # one KV head cannot be split over T=2
    plan, notes = plan_tensor_parallel(gm, 2)
    by_weight = linears(gm)
    for i in range(2):
        assert by_weight[LLAMA.format(i, "self_attn.q")] in plan.column
        assert by_weight[LLAMA.format(i, "self_attn.k")] not in plan.column
        assert by_weight[LLAMA.format(i, "self_attn.v")] not in plan.column
        assert by_weight[LLAMA.format(i, "self_attn.o")] in plan.row
    # Each attention narrows its replicated k (argument 1) and v (argument 2) on the heads dim (1).
    assert sorted((n.name, i, d) for n, i, d in plan.narrow) == sorted(
        (n.name, i, 1) for n in calls(gm, SDPA) for i in (1, 2))
    assert sum("kept replicated" in note for note in notes) == 5  # k, v of each block, and the LM head
    # The loud check exempts exactly those k/v projections, saying why, and raises nothing.
    exempt = check_nothing_left_whole(gm, plan, 2, allowed=frozenset())
    assert exempt == [f"model.layers.{i}.self_attn.{p}_proj: kept whole, its 1 KV heads do not divide by T=2; "
                      f"each rank narrows its value to its query heads' share" for i in range(2) for p in "kv"]


# --- T not dividing the heads -------------------------------------------------------------------------


def test_fused_heads_not_divisible_is_a_value_error_naming_the_module(dense_graph) -> None:
    gm, _ = dense_graph("gpt")  # c_attn's q | k | v chunks of 32 features (4 heads of 8) over T=3
    plan, _ = plan_tensor_parallel(gm, 3)  # planning alone keeps c_attn replicated, with the reason
    assert not {f"h.{i}.attn.c_attn.weight" for i in range(2)} & weights(plan.column)
    message = left_whole(gm, 3, count=4)
    for i in range(2):
        assert re.search(rf"^  - h\.{i}\.attn\.c_attn \(attention input projection\): chunks \[32, 32, 32\] of a "
                         rf"fused projection are not divisible by T=3 \(at \w+ in h\.{i}\.attn\)$", message, re.M)
        assert f"  - h.{i}.attn.c_proj (attention output projection): its input comes from h.{i}.attn.c_attn, " \
               f"left whole" in message
    assert "ParallelConfig(tensor=3, replicate=('h.*.attn.c_attn', 'h.*.attn.c_proj'))" in message


def test_query_heads_not_divisible_is_a_value_error_naming_the_module(dense_graph) -> None:
    gm, _ = dense_graph("llama")  # T=8 divides the 32 features of q_proj but not its 4 heads
    message = left_whole(gm, 8, count=8)
    for i in range(2):
        assert re.search(rf"^  - model\.layers\.{i}\.self_attn\.q_proj \(attention input projection\): dim 2 of "
                         rf"shape \(\w+, \w+, 4, 8\) \(size 4, e\.g\. the number of attention heads\) is not divisible "
                         rf"by T=8 \(at \w+ in model\.layers\.{i}\.self_attn\)$", message, re.M)
        assert f"  - model.layers.{i}.self_attn.o_proj (attention output projection): its input comes from" in message
    assert "replicate=('model.layers.*.self_attn.q_proj', 'model.layers.*.self_attn.k_proj', " \
           "'model.layers.*.self_attn.v_proj', 'model.layers.*.self_attn.o_proj')" in message


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = (p(x).view(B, S, self.heads, H // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(1, 2).reshape(B, S, H))


class _Blocks(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Attention(hidden, heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def _capture(module: nn.Module, *shape: int) -> fx.GraphModule:
    torch.manual_seed(0)
    return capture(module, (torch.randn(*shape),), dynamic=False)


def test_hand_written_attention_six_heads_over_four() -> None:
    gm = _capture(_Blocks(hidden=24, heads=6), 2, 3, 24)
    plan, _ = plan_tensor_parallel(gm, 2)  # 6 heads split over 2: fine
    assert weights(plan.column) == {f"blocks.0.{p}.weight" for p in "qkv"}
    assert weights(plan.row) == {"blocks.0.out.weight"}
    message = left_whole(gm, 4, count=4)  # 6 heads over 4: q, k, v and out stay whole, loudly
    for p in "qkv":
        assert f"  - blocks.0.{p} (attention input projection): dim 2 of shape (2, 3, 6, 4) (size 6, e.g. the " \
               f"number of attention heads) is not divisible by T=4 (at " in message
    assert "  - blocks.0.out (attention output projection): its input comes from " in message
    assert "replicate=('blocks.*.q', 'blocks.*.k', 'blocks.*.v', 'blocks.*.out')" in message


# --- single rules on hand-written modules -------------------------------------------------------------


class _NormBetween(nn.Module):
    """linear -> layer_norm -> linear: no rule passes a shard through a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x)))


class _MergedDims(nn.Module):
    """An MLP whose hidden activation is flattened with the sequence dim: the sharded dim is not outermost."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(3 * 16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.up(x))  # [B, 3, 16]
        return self.down(h.reshape(x.shape[0], 3 * 16))


class _MergedAndSplitBack(nn.Module):
    """The same flattening, undone before the down projection: the shard crosses both reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.up(x)).reshape(x.shape[0], 3 * 16) * 2.0  # [B, 48]
        return self.down(h.reshape(x.shape[0], 3, 16))


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


def test_mlp_is_column_then_row() -> None:
    gm = _capture(_Mlp(), 2, 3, 8)
    plan, notes = plan_tensor_parallel(gm, 2)
    assert weights(plan.column) == {"up.weight"} and weights(plan.row) == {"down.weight"} and notes == []
    (gelu,) = calls(gm, aten.gelu.default)
    assert plan.place[gelu].kind == "S" and plan.place[gelu].dim == 2


def test_a_norm_keeps_both_linears_replicated_with_notes() -> None:
    gm = _capture(_NormBetween(), 2, 3, 8)
    plan, notes = plan_tensor_parallel(gm, 2)
    assert plan.column == {} and plan.row == []
    by_weight = linears(gm)
    assert notes == [
        f"kept replicated ['{by_weight['up.weight'].name}']: aten.layer_norm.default over the sharded dim 2: its "
        f"statistics need the whole features",
        f"kept replicated ['{by_weight['down.weight'].name}']: sharded value reaches an op that needs it whole",
    ]
    assert all(p.kind == "R" for p in plan.place.values())


def test_reshape_merging_the_sharded_dim_into_an_outer_one_keeps_it_replicated() -> None:
    """[B, 3, 16] -> [B, 48]: the shard passes the reshape as 3 `outer` blocks (8 of each position's 16 features
    per rank), which a linear cannot read row-parallel, so `up` stays replicated, blamed on `down`."""
    gm = _capture(_MergedDims(), 2, 3, 8)
    by_weight = linears(gm)
    up, down = by_weight["up.weight"], by_weight["down.weight"]
    with pytest.raises(Fail) as info:
        propagate(gm, {up}, 2)
    assert (info.value.node, info.value.seeds) == (down, frozenset({up}))
    assert info.value.reason == "linear input sharded on a non-feature dim or in blocks"
    plan, notes = plan_tensor_parallel(gm, 2)
    assert plan.column == {} and plan.row == [] and all(p.kind == "R" for p in plan.place.values())
    assert plan.reasons[up] == f"linear input sharded on a non-feature dim or in blocks (at {down.name} in down)"
    assert notes[0] == f"kept replicated ['{up.name}']: linear input sharded on a non-feature dim or in blocks"


def test_reshape_merging_the_sharded_dim_carries_it_in_outer_blocks_until_it_is_split_back() -> None:
    gm = _capture(_MergedAndSplitBack(), 2, 3, 8)
    plan, notes = plan_tensor_parallel(gm, 2)
    assert weights(plan.column) == {"up.weight"} and weights(plan.row) == {"down.weight"} and notes == []
    (up,) = plan.column
    merged, back = calls(gm, aten.reshape.default)
    (scaled,) = calls(gm, aten.mul.Tensor)
    # [B, 3, 16] S(2) -> [B, 48] S(1) in 3 blocks (each rank: its 8 features of each position) -> [B, 3, 16] S(2).
    assert plan.place[merged] == plan.place[scaled] == Placement("S", 1, frozenset({up}), outer=3)
    assert plan.place[back] == Placement("S", 2, frozenset({up}))
    assert plan.shape_edits[merged] == (1, 1) and plan.shape_edits[back] == (1, 2)  # 48 -> 24, 16 -> 8
