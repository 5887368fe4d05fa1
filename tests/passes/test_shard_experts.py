"""shard_experts alone, on one rank's graph for (T, X) in {(1, 2), (2, 1), (2, 2)}, run in this process.

The pass is run by `run_passes` from `ctx.for_rank(parallel, coords)` on a deep
copy of the MoE graph (the attention stays unsharded), so every collective a
step issues comes from the MoE blocks. Checked: the local expert tensors and
their records, the inserted roles and their order, no collective on a size-1
axis, the per-expert numerics against the full graph, and the counted
collectives per step against what the roles imply.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import tedfx
from tedfx import collectives
from tedfx.moe import ops
from tedfx.passes.graph import MOE_META, Role, moe_blocks
from tedfx.passes.shard_experts import expert_splits, shard_experts_pass
from tedfx.sharding import ParamShard

E, K, H = 4, 2, 32
MOE = tedfx.MoEConfig(num_experts=E, top_k=K, expert_noise=0.1)
"""Noisy upcycling: every expert differs, so a rank holding the wrong ones shows."""
LAYOUTS = [(1, 2), (2, 1), (2, 2)]
FFN = {"gpt": (["h.0.mlp", "h.1.mlp"], ("w1", "b1", "w2", "b2"), 128),
       "llama": (["model.layers.0.mlp", "model.layers.1.mlp"], ("w1", "w3", "w2"), 64)}
SPLIT_DIMS = {"w1": 2, "b1": 1, "w3": 2, "b3": 1, "w2": 1}  # the F dim each tensor-parallel rank slices


def ranks(T: int, X: int) -> list[tuple[int, int]]:
    return [(t, x) for x in range(X) for t in range(T)]


def sharded(rank_graph, name: str, T: int, X: int, t: int, x: int, moe: tedfx.MoEConfig = MOE):
    return rank_graph(name, tensor=T, expert=X, tp=t, ep=x, passes=[shard_experts_pass], moe=moe)


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def capacity(rank) -> int:
    B, S = rank.inputs[0].shape
    return MOE.capacity(B * S)


# --- local expert tensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("T,X", LAYOUTS)
@pytest.mark.parametrize("name", list(FFN))
def test_each_rank_holds_its_experts_and_its_slice_of_f(rank_graph, name, T, X) -> None:
    paths, tensors, F = FFN[name]
    shapes = {"w1": (E // X, H, F // T), "b1": (E // X, F // T), "w3": (E // X, H, F // T),
              "b3": (E // X, F // T), "w2": (E // X, F // T, H), "b2": (E // X, H)}
    for t, x in ranks(T, X):
        rank = sharded(rank_graph, name, T, X, t, x)
        full, local = rank.full.state_dict(), rank.gm.state_dict()
        assert set(local) == set(full)
        for path in paths:
            for w in tensors:
                key = f"{path}.experts.{w}"
                assert tuple(local[key].shape) == shapes[w], key
                expected = full[key][x * E // X:(x + 1) * E // X]
                if w in SPLIT_DIMS:
                    expected = expected.chunk(T, dim=SPLIT_DIMS[w])[t]
                torch.testing.assert_close(local[key], expected, rtol=0, atol=0)
        others = [k for k in full if ".experts." not in k]
        assert all(torch.equal(local[k], full[k]) for k in others)  # router, attention, norms: untouched


@pytest.mark.parametrize("T,X", LAYOUTS + [(1, 1)])
def test_records_the_split_of_every_expert_tensor(rank_graph, T, X) -> None:
    rank = sharded(rank_graph, "gpt", T, X, T - 1, X - 1)
    paths, tensors, F = FFN["gpt"]
    full = rank.full.state_dict()
    splits = {"w1": [("ep", 0), ("tp", 2)], "b1": [("ep", 0), ("tp", 1)], "w2": [("ep", 0), ("tp", 1)],
              "b2": [("ep", 0)]}
    sizes = {"ep": X, "tp": T}
    expected = {}
    for path in paths:
        for w in tensors:
            key = f"{path}.experts.{w}"
            kept = tuple((axis, dim) for axis, dim in splits[w] if sizes[axis] > 1)  # size-1 axes split nothing
            assert expert_splits(w, sizes) == kept
            expected[key] = ParamShard(key, kept, None, tuple(full[key].shape))
    assert rank.ctx.records.shards == expected
    assert all(expected[k].local_shape(sizes) == tuple(v.shape) for k, v in rank.gm.state_dict().items()
               if k in expected)


# --- the rewritten block ------------------------------------------------------------------------------


@pytest.mark.parametrize("T,X", LAYOUTS)
@pytest.mark.parametrize("name", list(FFN))
def test_inserted_roles_in_order_and_on_their_axes(rank_graph, name, T, X) -> None:
    rank = sharded(rank_graph, name, T, X, 0, 0)
    blocks = moe_blocks(rank.gm.graph)
    assert list(blocks) == FFN[name][0]
    for path, roles in blocks.items():
        # The data path, node by node: what reads what.
        chain = [Role.DISPATCH]
        if X > 1:
            chain += [Role.A2A_DISPATCH, Role.EXPERTS_IN]
        if T > 1:
            chain += [Role.TP_F]
        chain += [Role.EXPERT_FC1, Role.EXPERT_FC2]
        if T > 1:
            chain += [Role.TP_REDUCE]
        if X > 1:
            chain += [Role.EXPERTS_OUT]
        if Role.EXPERT_BIAS in roles:
            chain += [Role.EXPERT_BIAS]
        if X > 1:
            chain += [Role.A2A_COMBINE]
        chain += [Role.COMBINE]
        for before, after in zip(chain, chain[1:]):
            assert roles[after].args[0] is roles[before], f"{path}: {after} does not read {before}"
        inserted = {Role.A2A_DISPATCH, Role.EXPERTS_IN, Role.TP_F, Role.TP_REDUCE, Role.EXPERTS_OUT,
                    Role.A2A_COMBINE, Role.AGREE_CAPACITY}
        assert {r for r in roles if r in inserted} == set(chain) & inserted  # capacity agreed only when dropless
        order = {n: i for i, n in enumerate(rank.gm.graph.nodes)}
        assert [order[roles[r]] for r in chain] == sorted(order[roles[r]] for r in chain)
        targets = {
            Role.A2A_DISPATCH: (collectives.all_to_all, ("ep",)),
            Role.EXPERTS_IN: (ops.experts_in, (X,)),
            Role.TP_F: (collectives.identity_fwd_all_reduce_bwd, ("tp",)),
            Role.TP_REDUCE: (collectives.all_reduce, ("tp",)),
            Role.EXPERTS_OUT: (ops.experts_out, (X,)),
            Role.A2A_COMBINE: (collectives.all_to_all, ("ep",)),
        }
        for role in set(chain) & set(targets):
            assert (roles[role].target, roles[role].args[1:]) == targets[role]
            assert roles[role].meta[MOE_META].path == path


@pytest.mark.parametrize("T,X", LAYOUTS)
def test_no_collective_on_a_size_1_axis(rank_graph, T, X) -> None:
    rank = sharded(rank_graph, "gpt", T, X, 0, 0)
    axes = {n.args[1] for n in rank.gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__module__", "").startswith(collectives.__name__)}
    assert axes == {axis for axis, size in (("tp", T), ("ep", X)) if size > 1}
    stats = rank.step()
    assert {row[1] for row in stats.table()} == axes


def test_one_rank_graph_is_the_moe_graph(rank_graph) -> None:
    rank = sharded(rank_graph, "gpt", 1, 1, 0, 0)
    assert rank.gm.code == rank.full.code
    assert rank.step().table() == []


def test_dropless_routing_agrees_on_the_capacity_where_dtd_splits_it(rank_graph) -> None:
    dropless = tedfx.MoEConfig(num_experts=E, top_k=K, drop_tokens=False)
    rank = sharded(rank_graph, "gpt", 2, 2, 0, 0, moe=dropless)  # dtd=True: capacity slots, which DTD splits
    for roles in moe_blocks(rank.gm.graph).values():
        assert Role.LOADS not in roles and "loads" not in roles[Role.DISPATCH].kwargs
        agree = roles[Role.AGREE_CAPACITY]
        assert agree.target is collectives.agree_max and agree.args == (roles[Role.CAPACITY], "ep")
        assert roles[Role.DISPATCH].args[3] is agree
    stats = rank.step()
    assert stats.calls("all_reduce", "ep", "forward") == 2  # one int per block
    assert stats.nbytes("all_reduce", "ep") == 2 * 8


@pytest.mark.parametrize("T,X,dtd", [(1, 2, True), (2, 1, True), (2, 2, False)])
def test_dropless_blocks_move_packed_rows(rank_graph, T, X, dtd) -> None:
    """Without DTD a dropless block keeps the packed layout: the loads go over "ep" first (E int64 per block),
    then the rows, S * K per rank, in blocks the loads size; nothing agrees on a capacity."""
    dropless = tedfx.MoEConfig(num_experts=E, top_k=K, drop_tokens=False)
    rank = rank_graph("gpt", tensor=T, expert=X, passes=[shard_experts_pass], moe=dropless, dtd=dtd)
    B, S = rank.inputs[0].shape
    H = 32  # tests/models.tiny_gpt
    for roles in moe_blocks(rank.gm.graph).values():
        loads = roles[Role.LOADS]
        assert Role.AGREE_CAPACITY not in roles and roles[Role.DISPATCH].kwargs["loads"] is loads
        if X > 1:
            exchange, a2a = roles[Role.EXCHANGE_LOADS], roles[Role.A2A_DISPATCH]
            assert exchange.target is collectives.exchange_loads and exchange.args == (loads, "ep")
            assert a2a.target is collectives.all_to_all_packed and a2a.args[2:] == (loads, exchange)
            assert roles[Role.EXPERT_FC1].kwargs["loads"] is roles[Role.LOCAL_LOADS]
            assert roles[Role.A2A_COMBINE].args[2:] == (exchange, loads)
    values = _values(rank, rank.gm)
    for roles in moe_blocks(rank.gm.graph).values():
        assert tuple(values[roles[Role.DISPATCH]].shape) == (B * S * K, H)  # sum of the loads, no padding
    stats = rank.step()
    assert stats.calls("all_reduce", "ep", "forward") == 0
    assert stats.calls("all_to_all", "ep", "forward") == (3 * 2 if X > 1 else 0)


# --- numerics -----------------------------------------------------------------------------------------


def _values(rank, gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad(), collectives.bind_axes(rank.axes()):
        interp.run(*rank.inputs)
    return interp.env


@pytest.mark.parametrize("T,X", LAYOUTS)
@pytest.mark.parametrize("name", list(FFN))
def test_each_rank_computes_its_experts_slice_of_the_full_block(rank_graph, name, T, X) -> None:
    """Block 0 sees the same tokens on every rank: expert group x's FC2 outputs, summed over the tensor
    ranks, are the full graph's FC2 outputs of experts E/X * x .. E/X * (x + 1)."""
    path = FFN[name][0][0]
    El = E // X
    partial = {}
    for t, x in ranks(T, X):
        rank = sharded(rank_graph, name, T, X, t, x)
        fc2 = moe_blocks(rank.gm.graph)[path][Role.EXPERT_FC2]
        y = _values(rank, rank.gm)[fc2]  # [E/X, X * C, H]: the local experts, the tokens of X groups
        assert y.shape == (El, X * capacity(rank), H)
        partial[t, x] = ops.experts_out(y, X)[x * El:(x + 1) * El]  # this group's own tokens
    full_fc2 = moe_blocks(rank.full.graph)[path][Role.EXPERT_FC2]
    full = _values(rank, rank.full)[full_fc2]
    for x in range(X):
        torch.testing.assert_close(sum(partial[t, x] for t in range(T)), full[x * El:(x + 1) * El],
                                   rtol=1e-5, atol=1e-6)
    if T > 1:
        assert not torch.allclose(partial[0, 0], full[:El], atol=1e-4)  # one tensor rank holds a partial sum


# --- a step -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,X", LAYOUTS)
@pytest.mark.parametrize("name", list(FFN))
def test_a_step_counts_the_collectives_the_roles_imply(rank_graph, name, T, X) -> None:
    rank = sharded(rank_graph, name, T, X, T - 1, X - 1)
    stats = rank.step()
    blocks = moe_blocks(rank.gm.graph).values()
    count = {role: sum(role in roles for roles in blocks) for role in Role}
    C = capacity(rank)
    buffer = E * C * H * 4  # [E, C, H] sent whole by the all-to-alls; [E/X, X*C, H] reduced over "tp"
    expected = []
    if X > 1:
        a2a = count[Role.A2A_DISPATCH] + count[Role.A2A_COMBINE]
        assert a2a == 4  # two blocks
        expected += [("all_to_all", "ep", phase, a2a, a2a * buffer) for phase in ("forward", "backward")]
    if T > 1:
        expected += [("all_reduce", "tp", "forward", count[Role.TP_REDUCE], count[Role.TP_REDUCE] * buffer),
                     ("all_reduce", "tp", "backward", count[Role.TP_F], count[Role.TP_F] * buffer)]
        assert count[Role.TP_REDUCE] == count[Role.TP_F] == 2
    assert stats.table() == sorted(expected, key=lambda r: (r[0], r[1], ("forward", "backward").index(r[2])))
    shapes = {(c.kind, c.shape) for c in stats.trace}
    assert shapes == ({("all_to_all", (E, C, H))} if X > 1 else set()) | (
        {("all_reduce", (E // X, X * C, H))} if T > 1 else set())
    assert all(p.grad is not None for p in rank.gm.parameters())


# --- errors -------------------------------------------------------------------------------------------


def test_experts_not_divisible_by_x_is_a_value_error(rank_graph) -> None:
    with pytest.raises(ValueError, match=r"MoEConfig.num_experts=3 is not divisible by ParallelConfig.expert=2") \
            as info:
        sharded(rank_graph, "gpt", 1, 2, 0, 0, moe=tedfx.MoEConfig(num_experts=3, top_k=2))
    assert info.value.__notes__ == ["(found by the tedfx pass shard_experts)"]


def test_ffn_width_not_divisible_by_t_is_a_value_error(rank_graph) -> None:
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.experts\.w1: FFN width 128 is not divisible by "
                                         r"ParallelConfig.tensor=3") as info:
        sharded(rank_graph, "gpt", 3, 1, 0, 0)
    assert info.value.__notes__ == ["(found by the tedfx pass shard_experts)"]
