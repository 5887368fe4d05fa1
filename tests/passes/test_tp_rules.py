"""tp_rules.plan_tensor_parallel: which linears split how, from the rule table alone (no rewrite, no process).

On the captured test GPT (fused c_attn split into q, k, v) and HF Llama
(separate q/k/v, grouped-query attention, rotary embeddings, RMSNorm), dense
and after ffn_to_moe, and on small hand-written modules for single rules.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from tedfx.capture import capture
from tedfx.passes.graph import MOE_META, as_linear, module_path
from tedfx.passes.tp_rules import Placement, R, plan_tensor_parallel

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def linears(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Every linear of the graph by its weight's state-dict key."""
    return {lin.weight.target: n for n in gm.graph.nodes if (lin := as_linear(n)) is not None}


def weights(nodes) -> set[str]:
    return {as_linear(n).weight.target for n in nodes}


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


GPT_COLUMN = {f"h.{i}.{w}" for i in range(2) for w in ("attn.c_attn.weight", "mlp.c_fc.weight")}
GPT_ROW = {f"h.{i}.{w}" for i in range(2) for w in ("attn.c_proj.weight", "mlp.c_proj.weight")}
LLAMA = "model.layers.{}.{}_proj.weight"
LLAMA_COLUMN = {LLAMA.format(i, p) for i in range(2) for p in ("self_attn.q", "self_attn.k", "self_attn.v",
                                                                  "mlp.gate", "mlp.up")}
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
    assert plan.kv_slices == []


def test_kv_heads_not_divisible_stay_replicated_and_are_narrowed_per_rank(dense_graph) -> None:
    gm, _ = dense_graph("llama-kv1")  # one KV head cannot be split over T=2
    plan, notes = plan_tensor_parallel(gm, 2)
    by_weight = linears(gm)
    for i in range(2):
        assert by_weight[LLAMA.format(i, "self_attn.q")] in plan.column
        assert by_weight[LLAMA.format(i, "self_attn.k")] not in plan.column
        assert by_weight[LLAMA.format(i, "self_attn.v")] not in plan.column
        assert by_weight[LLAMA.format(i, "self_attn.o")] in plan.row
    assert sorted((n.name, i) for n, i in plan.kv_slices) == sorted(
        (n.name, i) for n in calls(gm, SDPA) for i in (1, 2))
    assert sum("kept replicated" in note for note in notes) == 5  # k, v of each block, and the LM head


# --- T not dividing the heads -------------------------------------------------------------------------


def test_fused_heads_not_divisible_is_a_value_error_naming_the_module(dense_graph) -> None:
    gm, _ = dense_graph("gpt")
    with pytest.raises(ValueError, match=r"ParallelConfig.tensor=3 cannot shard h\.0\.attn: split sizes "
                                         r"\[32, 32, 32\] are not divisible by T=3"):
        plan_tensor_parallel(gm, 3)


def test_query_heads_not_divisible_is_a_value_error_naming_the_module(dense_graph) -> None:
    gm, _ = dense_graph("llama")
    with pytest.raises(ValueError, match=r"cannot split the attention of model\.layers\.0\.self_attn: its 4 "
                                         r"query heads are not divisible by 3"):
        plan_tensor_parallel(gm, 3)


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
    with pytest.raises(ValueError, match=r"cannot split the attention of blocks\.0: its 6 query heads are not "
                                         r"divisible by 4"):
        plan_tensor_parallel(gm, 4)


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
        f"kept replicated ['{by_weight['up.weight'].name}']: no sharding rule for aten.layer_norm.default",
        f"kept replicated ['{by_weight['down.weight'].name}']: sharded value reaches an op that needs it whole",
    ]
    assert all(p.kind == "R" for p in plan.place.values())


def test_reshape_merging_the_sharded_dim_into_an_outer_one_keeps_it_replicated() -> None:
    gm = _capture(_MergedDims(), 2, 3, 8)
    plan, notes = plan_tensor_parallel(gm, 2)
    assert "up.weight" not in weights(plan.column)
    assert any("splits the sharded dim 2" in note for note in notes), notes
