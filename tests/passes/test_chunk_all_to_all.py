"""chunk_all_to_all in the pipeline, on simulated ranks (docs/parallelism.md, "Overlap").

The chunked rank graph computes what the unchunked one does, issues n times the expert all-to-alls with
1/n of the bytes each, in the pipelined order (every chunk's exchange in flight before the first chunk's
experts run), and refuses a block it cannot split.
"""

from __future__ import annotations

import pytest
import torch

import tedfx
from tedfx import collectives
from tedfx.moe import ops
from tedfx.passes.chunk_all_to_all import chunk_all_to_all_pass
from tedfx.passes.shard_experts import shard_experts_pass

from models import tiny_gpt

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, expert_noise=0.1)
"""The rank graphs' default (tests/passes/conftest.py): 16 tokens of a step make C = 10."""
DROPLESS = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False)


def _a2a_order(gm) -> list[str]:
    names = {collectives.all_to_all_start: "start", collectives.all_to_all_wait: "wait",
             ops.expert_fc1: "fc1", ops.capacity_cat: "cat"}
    return [names[n.target] for n in gm.graph.nodes if n.op == "call_function" and n.target in names]


@pytest.mark.parametrize("T,dtd,checkpointing", [(2, True, "none"), (1, True, "none"), (2, False, "block")])
def test_chunks_give_the_same_numbers_and_split_the_bytes(rank_graph, T, dtd, checkpointing) -> None:
    graphs = {n: rank_graph("gpt", tensor=T, expert=2, tp=T - 1, ep=1, dtd=dtd, a2a_chunks=n,
                            activation_checkpointing=checkpointing) for n in (1, 2)}
    order = _a2a_order(graphs[2].gm)
    # Per block: both chunks' exchanges start before the first chunk's experts; each chunk's experts send
    # their chunk back at once; the combine waits for both.
    block = ["start", "start", "wait", "fc1", "start", "wait", "fc1", "start", "wait", "wait", "cat"]
    if checkpointing != "none":  # the experts and the cat run inside checkpointed regions, between the exchanges
        block = [op for op in block if op in ("start", "wait")]
    assert order == block * 2, order

    torch.manual_seed(0)
    outs, grads, stats = {}, {}, {}
    for n, rank in graphs.items():
        stats[n] = collectives.CommStats()
        rank.gm.train()
        out = rank.forward(stats[n])
        out.float().square().mean().backward()
        outs[n] = out.detach()
        grads[n] = {k: p.grad.clone() for k, p in rank.gm.named_parameters() if p.grad is not None}
    if not (dtd and T > 1):
        # A simulated all-gather repeats this rank's slice instead of gathering the others': under DTD the
        # chunked and unchunked graphs repeat different slices, so their numbers compare only in a real run
        # (tests/test_parallel.py); without DTD the simulation is the same arithmetic for both.
        torch.testing.assert_close(outs[2], outs[1], rtol=1e-5, atol=1e-6)
        assert grads[2].keys() == grads[1].keys()
        for k in grads[1]:
            torch.testing.assert_close(grads[2][k], grads[1][k], rtol=1e-5, atol=1e-6, msg=k)
    # The same slots travel, C padded to a multiple of 2 (of 2 * T under DTD) instead of 1 (of T).
    B, S = graphs[1].inputs[0].shape
    C, multiple = MOE.capacity(B * S), (T if dtd else 1)
    padded = {1: ops.padded_capacity(C, multiple), 2: ops.padded_capacity(C, 2 * multiple)}
    for phase in ("forward", "backward"):
        assert stats[2].calls("all_to_all", "ep", phase) == 2 * stats[1].calls("all_to_all", "ep", phase) > 0
        assert stats[2].nbytes("all_to_all", "ep", phase) * padded[1] == \
            stats[1].nbytes("all_to_all", "ep", phase) * padded[2]


def test_capacity_is_padded_to_a_multiple_of_chunks_times_t(rank_graph) -> None:
    rank = rank_graph("gpt", tensor=2, expert=2, a2a_chunks=3)  # DTD: C padded to a multiple of 3 * 2
    dispatches = [n for n in rank.gm.graph.nodes if n.op == "call_function" and n.target is ops.dispatch]
    assert [d.kwargs["pad_multiple"] for d in dispatches] == [6, 6]
    stats = rank.step()
    assert stats.calls("all_to_all", "ep", "forward") == 3 * 2 * 2


def test_a_packed_dropless_block_cannot_be_chunked(rank_graph) -> None:
    with pytest.raises(ValueError, match=r"a2a_chunks=2: the MoE block h\.0\.mlp routes dropless in the packed "
                                         r"layout.*Use a2a_chunks=1"):
        rank_graph("gpt", tensor=1, expert=2, a2a_chunks=2, moe=DROPLESS)
    # Under DTD a dropless block keeps capacity slots, which split.
    rank = rank_graph("gpt", tensor=2, expert=2, a2a_chunks=2, moe=DROPLESS)
    assert _a2a_order(rank.gm).count("start") == 4 * 2


def test_chunks_without_expert_parallelism_warn(rank_graph) -> None:
    with pytest.warns(UserWarning, match=r"a2a_chunks=2 does nothing with expert=1"):
        rank = rank_graph("gpt", tensor=2, expert=1, a2a_chunks=2, moe=MOE)
    assert "start" not in _a2a_order(rank.gm)


def test_chunks_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match=r"ParallelConfig\.a2a_chunks=0 is invalid: expected an int >= 1"):
        tedfx.ParallelConfig(a2a_chunks=0)


def test_the_pass_alone_refuses_a_layout_with_nothing_to_overlap(rank_graph) -> None:
    with pytest.raises(RuntimeError, match=r"chunk_all_to_all needs a2a_chunks > 1 and X > 1, got a2a_chunks=2, X=1"):
        rank_graph("gpt", tensor=2, expert=1, passes=[shard_experts_pass, chunk_all_to_all_pass], a2a_chunks=2)


def test_explain_counts_the_chunks_and_says_so() -> None:
    model, (x,) = tiny_gpt()
    report = tedfx.explain(model, (x,), moe=MOE, parallel=tedfx.ParallelConfig(tensor=2, expert=2, a2a_chunks=2),
                           world_size=4)
    a2a = {row[2]: row[3] for row in report.comm_table if row[0] == "all_to_all"}
    assert a2a == {"forward": 2 * 2 * 2, "backward": 2 * 2 * 2}  # 2 blocks x 2 all-to-alls x 2 chunks
    assert "a2a_chunks=2: each MoE block's all-to-alls run in 2 chunks" in str(report)


def test_auto_chunks_only_where_the_all_to_all_crosses_nodes() -> None:
    """a2a_chunks="auto" (the default): 2 where an expert group spans nodes, else 1, and 1 where chunks do not
    apply (X = 1, dropless blocks in the packed layout); an explicit count stays."""
    par = tedfx.ParallelConfig(tensor=2, expert=2)
    assert par.a2a_chunks == "auto" and par.chunks == 1  # unresolved: one node
    across, why = par.resolve_a2a_chunks(4, 2)  # tensor groups {0,1} {2,3} in a node, expert groups across
    assert across.a2a_chunks == 2 and "cross nodes" in why
    assert par.resolve_a2a_chunks(4, 4)[0].a2a_chunks == 1
    assert par.resolve_a2a_chunks(4, None)[0].a2a_chunks == 1  # no node size known: one node
    assert tedfx.ParallelConfig(tensor=4).resolve_a2a_chunks(4, 2)[0].a2a_chunks == 1
    packed = tedfx.ParallelConfig(expert=4).resolve_auto(4, 2, drop_tokens=False)
    assert packed[0].a2a_chunks == 1 and "packed" in packed[2]
    assert par.resolve_auto(4, 2, drop_tokens=False)[0].a2a_chunks == 2  # DTD keeps capacity slots
    fixed = tedfx.ParallelConfig(tensor=2, expert=2, a2a_chunks=3)
    assert fixed.resolve_a2a_chunks(4, 2) == (fixed, "a2a_chunks=3 as configured")


def test_explain_resolves_auto_chunks_from_the_node_size() -> None:
    model, (x,) = tiny_gpt()
    calls = {}
    for per_node in (2, 4):
        parallel = tedfx.ParallelConfig(tensor=2, expert=2, ranks_per_node=per_node)
        report = tedfx.explain(model, (x,), moe=MOE, parallel=parallel, world_size=4)
        calls[per_node] = sum(row[3] for row in report.comm_table if row[0] == "all_to_all")
        assert f"a2a_chunks=auto -> {2 if per_node == 2 else 1}" in str(report)
    assert calls == {2: 2 * calls[4], 4: 2 * 2 * 2}  # 2 blocks x 2 all-to-alls x (1 | 2 chunks), forward and back
