"""The collective-order check, without processes: it passes on real layouts and catches tampered graphs."""

from __future__ import annotations

import pytest
import torch.fx as fx

import tedfx
from tedfx import collectives
from tedfx.api import check_collective_order
from tedfx.check import CollectiveOrderError, compare_traces
from tedfx.pipeline import build_moe_graph, param_shards, shard_for_rank
from tedfx.predict import simulate_step
from tedfx.runtime.mesh import Layout
from tedfx.sharding import tensor_whole

from models import tiny_gpt

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt()


@pytest.mark.parametrize("T,X,world", [(2, 2, 4), (2, 2, 8), (1, 4, 4)])
def test_every_layout_agrees(gpt, T, X, world):
    model, inputs = gpt
    traces = check_collective_order(model, inputs, moe=MOE, parallel=tedfx.ParallelConfig(tensor=T, expert=X),
                                    world_size=world)
    assert set(traces) == set(range(world))
    # Every rank issues expert all-to-alls: 2 per MoE block forward and 2 backward.
    assert all(sum(c.kind == "all_to_all" for c in t) == 4 * 2 for t in traces.values())


def _traces(gpt, tamper_rank: int | None, tamper) -> tuple[dict, Layout]:
    model, inputs = gpt
    parallel = tedfx.ParallelConfig(tensor=2, expert=2)
    layout = Layout.build(4, parallel)
    moe_gm, moe_ctx = build_moe_graph(model, inputs, moe=MOE)
    traces = {}
    for rank in range(4):
        gm, ctx = shard_for_rank(moe_gm, moe_ctx, parallel=parallel, coords=layout.coords(rank))
        if rank == tamper_rank:
            tamper(gm)
            gm.recompile()
        traces[rank] = simulate_step(gm, layout=layout, rank=rank, bucket_mb=25.0,
                                     tensor_whole=tensor_whole(param_shards(gm, ctx)), example_inputs=inputs).trace
    return traces, layout


def _nodes(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _drop_combine_all_to_all(gm: fx.GraphModule) -> None:
    node = _nodes(gm, collectives.all_to_all)[-1]
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _swap_tp_collectives(gm: fx.GraphModule) -> None:
    # The first tensor-parallel all-reduce becomes an all-gather + slice of the same tensor (same result
    # on one rank, a different collective for its group).
    node = _nodes(gm, collectives.all_reduce)[0]
    with gm.graph.inserting_after(node):
        gathered = gm.graph.call_function(collectives.all_gather, (node.args[0], "tp", 0))
    with gm.graph.inserting_after(gathered):
        sliced = gm.graph.call_function(collectives.slice_for_rank, (gathered, "tp", 0))
    node.replace_all_uses_with(sliced)
    gm.graph.erase_node(node)


def test_untampered_traces_agree(gpt):
    traces, layout = _traces(gpt, None, None)
    assert compare_traces(traces, layout) == []


def test_missing_all_to_all_is_named(gpt):
    traces, layout = _traces(gpt, 2, _drop_combine_all_to_all)
    mismatches = compare_traces(traces, layout)
    ep = [m for m in mismatches if m.axis == "ep"]
    assert ep and ep[0].group == (0, 2) and ep[0].rank == 2
    assert ep[0].reference_call.kind == "all_to_all"
    with pytest.raises(CollectiveOrderError, match=r"group ep \[0, 2\]"):
        raise CollectiveOrderError(mismatches)


def test_swapped_collective_is_named(gpt):
    traces, layout = _traces(gpt, 1, _swap_tp_collectives)
    tp = [m for m in compare_traces(traces, layout) if m.axis == "tp"]
    assert len(tp) == 1 and tp[0].group == (0, 1) and tp[0].index == 0
    assert tp[0].reference_call.kind == "all_reduce" and tp[0].call.kind == "all_gather"
    assert "call #0 is all_reduce" in str(tp[0]) and "all_gather" in str(tp[0])
