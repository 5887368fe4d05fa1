"""Projections written `x @ W.T` (+ bias) instead of F.linear are linears (passes/graph.py: fold_transposed_linears).

HF Falcon's FalconLinear computes `input @ self.weight.T + self.bias`: its MLP must convert to MoE
(tests/test_to_moe.py checks the upcycled model equals the dense one), and tensor parallelism must read
its attention projections as linears: split them or refuse loudly, naming them and the fix.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import tedfx
from tedfx.passes.graph import as_linear, fold_transposed_linears
from tedfx.pipeline import build_moe_graph, capture_dense, shard_for_rank
from tedfx.runtime.mesh import Layout

from models import tiny_falcon

aten = torch.ops.aten


class TransposedMLP(nn.Module):
    """An FFN whose projections are written four ways; `out` reuses fc1's transpose elsewhere."""

    def __init__(self, transpose: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(8, 16))
        self.transpose = transpose

    def t(self, w: torch.Tensor) -> torch.Tensor:
        return {"T": lambda: w.T, "t": w.t, "transpose": lambda: w.transpose(0, 1),
                "permute": lambda: w.permute(1, 0)}[self.transpose]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(x @ self.t(self.w1) + self.b1) @ self.t(self.w2)


@pytest.mark.parametrize("transpose", ["T", "t", "transpose", "permute"])
def test_a_matmul_by_a_transposed_weight_is_folded_into_a_linear(transpose):
    model, x = TransposedMLP(transpose), torch.randn(2, 3, 8)
    gm = tedfx.capture(model, (x,))
    assert fold_transposed_linears(gm) == 2
    linears = [as_linear(n) for n in gm.graph.nodes if as_linear(n) is not None]
    assert [(lin.node.target, lin.weight.target, lin.bias.target if lin.bias is not None else None,
             lin.transposed) for lin in linears] == \
        [(aten.linear.default, "w1", "b1", False), (aten.linear.default, "w2", None, False)]
    torch.testing.assert_close(gm(x), model(x))
    assert fold_transposed_linears(gm) == 0  # nothing left to fold


class _PromotedBias(nn.Module):
    """bf16 `x @ W.T` plus an fp32 bias: the add promotes to fp32, which aten.linear (one dtype) cannot do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T + self.b


def test_a_bias_of_another_dtype_stays_an_add_after_the_folded_projection():
    model, x = _PromotedBias(), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    gm = tedfx.capture(model, (x,))
    assert fold_transposed_linears(gm) == 1
    (lin,) = [as_linear(n) for n in gm.graph.nodes if as_linear(n) is not None]
    assert lin.weight.target == "w" and lin.bias is None
    out = gm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_falcon_converts_to_moe_with_every_projection_a_linear():
    model, inputs = tiny_falcon()
    gm = capture_dense(model.eval(), inputs)
    weights = {as_linear(n).weight.target for n in gm.graph.nodes if as_linear(n) is not None}
    assert {f"transformer.h.{i}.{p}.weight" for i in range(2) for p in
            ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "self_attention.query_key_value",
             "self_attention.dense")} <= weights
    _, ctx = build_moe_graph(model, inputs, moe=tedfx.MoEConfig(num_experts=4, top_k=2))
    assert [f.path for f in ctx.records.ffns] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def test_falcon_multi_query_tensor_parallel_refuses_its_attention_loudly_and_shards_with_it_replicated():
    """Multi-query Falcon views its fused query_key_value as (heads + 2, head_dim) and slices the one key and
    value off the end: no split of that dim gives each rank whole heads plus the shared key and value, so T=2
    names both projections of each layer and the fix; with them replicated, the MoE experts are split over "tp".
    (Grouped-KV and per-head Falcon shard: tests/passes/test_tp_rules_attention.py's zoo.)"""
    model, inputs = tiny_falcon()
    gm, ctx = build_moe_graph(model.eval(), inputs, moe=tedfx.MoEConfig(num_experts=4, top_k=2))
    par = tedfx.ParallelConfig(tensor=2)
    with pytest.raises(ValueError, match=re.escape(
            "tensor parallelism with ParallelConfig.tensor=2 would leave 4 projection(s) whole")) as e:
        shard_for_rank(gm, ctx, parallel=par, coords=Layout.build(2, par).coords(0))
    assert "transformer.h.0.self_attention.query_key_value (attention input projection)" in str(e.value)
    fix = "replicate=('transformer.h.*.self_attention.query_key_value', 'transformer.h.*.self_attention.dense')"
    assert fix in str(e.value)
    par = tedfx.ParallelConfig(tensor=2, replicate=("transformer.h.*.self_attention.query_key_value",
                                                    "transformer.h.*.self_attention.dense"))
    gm, ctx = build_moe_graph(model, inputs, moe=tedfx.MoEConfig(num_experts=4, top_k=2))
    rank_gm, rank_ctx = shard_for_rank(gm, ctx, parallel=par, coords=Layout.build(2, par).coords(0))
    splits = {k: s.splits for k, s in rank_ctx.records.shards.items()}
    for i in range(2):
        assert splits[f"transformer.h.{i}.mlp.experts.w1"] == (("tp", 2),), splits
        assert splits[f"transformer.h.{i}.mlp.experts.w2"] == (("tp", 1),), splits
    assert rank_gm.get_parameter("transformer.h.0.mlp.experts.w1").shape == (4, 32, 64)  # F = 128 over T = 2
