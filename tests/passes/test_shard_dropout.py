"""shard_dropout: one dropout mask per shard, one mask for replicated activations, replayed by recompute.

Tier (a): rank graphs built in this process for each simulated coordinate (SimulatedAxis binds "tp" and
"ep" without processes), run with the same torch seed, as the tensor ranks of a token group run. The
masks are read from every dropout node's input and output. The multi-process and statistical checks
are in tests/test_parallel_semantics.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.fx as fx

import tedfx
from tedfx import collectives, pipeline, rng
from tedfx.collectives import SimulatedAxis
from tedfx.passes.runner import run_passes
from tedfx.passes.shard_dropout import shard_dropout_pass
from tedfx.passes.shard_experts import shard_experts_pass
from tedfx.passes.shard_tensor_parallel import shard_tensor_parallel_pass

from models import tiny_dropout_lm, tiny_gpt

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)
SHARDED = {"dropout_1": ("tp",), "scaled_dot_product_attention": ("tp",), "dropout_default": ("ep", "tp")}
"""tests/models.tiny_dropout_lm at T=2, X=2: v projection (column-parallel), attention weights (local heads),
the experts' F/T slices (other experts on each expert rank too)."""
REPLICATED = ("dropout", "dropout_2")
"""The embedding's and the row-parallel output's dropout, after the all-reduce."""


@functools.cache
def _moe_graph(builder):
    model, inputs = builder()
    gm, ctx = pipeline.build_moe_graph(model, inputs, moe=MOE)
    return gm, ctx, inputs


def _rank_graph(builder, T: int, X: int, t: int = 0, x: int = 0, skip: tuple[str, ...] = (),
                checkpointing: str = "none"):
    gm, ctx, inputs = _moe_graph(builder)
    parallel = tedfx.ParallelConfig(tensor=T, expert=X, activation_checkpointing=checkpointing)
    rank_gm, rank_ctx = pipeline.shard_for_rank(gm, ctx, parallel=parallel, coords={"edp": 0, "ep": x, "tp": t},
                                                skip=skip)
    axes = {"tp": SimulatedAxis(T, t) if T > 1 else None, "ep": SimulatedAxis(X, x) if X > 1 else None,
            "edp": None, "dp": None}
    return rank_gm, rank_ctx, inputs, axes


def _masks(rank_gm: fx.GraphModule, inputs: tuple, axes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """{dropout node: which of its (nonzero) inputs it zeroed}, for one forward at torch seed `seed`."""
    torch.manual_seed(seed)
    interp = fx.Interpreter(rank_gm, garbage_collect_values=False)
    with torch.no_grad(), collectives.bind_axes(axes):
        interp.run(*inputs)
    return {n.name: (interp.env[n] == 0) & (interp.env[n.args[0]] != 0)
            for n in rank_gm.graph.nodes if n.op == "call_function" and n.target in rng.DROPOUT_OPS}


def _rank_masks(builder, T: int, X: int, skip: tuple[str, ...] = (), **coords: int) -> dict[str, torch.Tensor]:
    rank_gm, _, inputs, axes = _rank_graph(builder, T, X, skip=skip, **coords)
    return _masks(rank_gm, inputs, axes)


def test_sharded_dropouts_are_rewritten_and_replicated_ones_kept():
    rank_gm, rank_ctx, _, _ = _rank_graph(tiny_dropout_lm, T=2, X=2)
    nodes = {n.name: n for n in rank_gm.graph.nodes}
    for name, axes in SHARDED.items():
        assert nodes[name].target in (rng.sharded_dropout, rng.sharded_attention), name
        assert nodes[name].kwargs["axes"] == axes, name
    for name in REPLICATED:
        assert nodes[name].target is torch.ops.aten.dropout.default, name
    assert sorted(rank_ctx.records.sharded_dropouts) == sorted(f"{n} ({', '.join(a)})" for n, a in SHARDED.items())


def test_the_pass_runs_by_name_after_the_sharding_passes():
    gm, ctx, _ = _moe_graph(tiny_dropout_lm)
    rank_ctx = ctx.for_rank(tedfx.ParallelConfig(tensor=2), {"edp": 0, "ep": 0, "tp": 1})
    rank_gm = run_passes(copy.deepcopy(gm), [shard_tensor_parallel_pass, shard_experts_pass, shard_dropout_pass],
                         ctx=rank_ctx)
    targets = {n.name: n.target for n in rank_gm.graph.nodes}
    assert targets["dropout_default"] is rng.sharded_dropout and targets["dropout"] is torch.ops.aten.dropout.default
    with pytest.raises(Exception, match="shard_dropout requires \\['shard_experts'\\]"):
        run_passes(copy.deepcopy(gm), [shard_dropout_pass], ctx=ctx.for_rank(tedfx.ParallelConfig(tensor=2),
                                                                               {"edp": 0, "ep": 0, "tp": 0}))


@pytest.mark.parametrize("T, X", [(2, 1), (1, 2)])
def test_masks_differ_between_shards_and_agree_on_replicated_activations(T, X):
    masks = [_rank_masks(tiny_dropout_lm, T, X, **({"t": i} if T > 1 else {"x": i})) for i in range(2)]
    sharded = ["dropout_default"] + (["dropout_1"] if T > 1 else [])
    for name in sharded:
        a, b = masks[0][name], masks[1][name]
        assert a.shape == b.shape and not torch.equal(a, b), f"{name}: every shard drew the same mask"
        for m in (a, b):
            assert 0.15 < m.float().mean() < 0.45, f"{name}: dropped {m.float().mean():.2f}, p = 0.3"
    for name in REPLICATED + (() if T > 1 else ("dropout_1",)):
        assert torch.equal(masks[0][name], masks[1][name]), f"{name}: replicated activation dropped differently"


def test_without_the_pass_every_shard_draws_the_same_mask():
    """The bug the pass fixes, shown on the same graphs: columns j and j + F/T dropped together."""
    masks = [_rank_masks(tiny_dropout_lm, 2, 1, skip=("shard_dropout",), t=t) for t in range(2)]
    assert torch.equal(masks[0]["dropout_default"], masks[1]["dropout_default"])
    assert torch.equal(masks[0]["dropout_1"], masks[1]["dropout_1"])


def test_attention_dropout_draws_per_shard_and_keeps_the_default_generator_in_step():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g) for _ in range(3))
    outs, states = [], []
    for t in (0, 1, 0):
        torch.manual_seed(5)
        with collectives.bind_axes({"tp": SimulatedAxis(2, t)}):
            outs.append(rng.sharded_attention(q, k, v, None, 0.5, True, axes=("tp",)))
        states.append(torch.get_rng_state())
    assert not torch.equal(outs[0], outs[1]), "both shards drew the same attention-dropout mask"
    assert torch.equal(outs[0], outs[2]), "the same shard and seed drew a different mask"
    assert torch.equal(states[0], states[1]), "the shards left the default generator in different states"
    torch.manual_seed(5)
    torch.randint(0, 2**62, (1,))
    assert torch.equal(states[0], torch.get_rng_state()), "a sharded draw must consume exactly one seed"


@pytest.mark.parametrize("builder, mode", [(tiny_dropout_lm, "moe"), (functools.partial(tiny_gpt, dropout=0.3),
                                                                       "block")])
def test_activation_checkpointing_recomputes_the_same_masks(builder, mode):
    """Recomputed masks that differed from the forward's would change every gradient."""
    grads = []
    for checkpointing in ("none", mode):
        rank_gm, _, inputs, axes = _rank_graph(builder, 2, 2, t=1, x=1, checkpointing=checkpointing)
        if checkpointing != "none":
            assert any(type(m).__name__ == "CheckpointRegion" for m in rank_gm.modules())
        torch.manual_seed(3)
        with collectives.bind_axes(axes):
            out = rank_gm(*inputs)
        out.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in rank_gm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_eval_mode_switches_the_sharded_ops_off_and_train_mode_back_on():
    rank_gm, _, inputs, axes = _rank_graph(tiny_dropout_lm, 2, 2)
    rank_gm.eval()
    nodes = {n.name: n for n in rank_gm.graph.nodes}
    assert nodes["dropout_default"].args[2] is False and nodes["scaled_dot_product_attention"].args[4] == 0.0
    before = torch.get_rng_state()
    with torch.no_grad(), collectives.bind_axes(axes):
        a, b = rank_gm(*inputs), rank_gm(*inputs)
    assert torch.equal(a, b) and torch.equal(before, torch.get_rng_state()), "eval mode drew random numbers"
    rank_gm.train()
    nodes = {n.name: n for n in rank_gm.graph.nodes}
    assert nodes["dropout_default"].args[2] is True and nodes["scaled_dot_product_attention"].args[4] == 0.3
    assert nodes["dropout_default"].target is rng.sharded_dropout


def test_a_sharded_op_without_bound_axes_says_how_to_bind_them():
    x = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="no mesh axes bound"):
        rng.sharded_dropout(x, 0.5, True, axes=("tp",))
    with collectives.bind_axes({"tp": None}):  # one rank: plain dropout
        torch.manual_seed(0)
        y = rng.sharded_dropout(x, 0.5, True, axes=("tp",))
    torch.manual_seed(0)
    torch.randint(0, 2**62, (1,))
    assert torch.equal(y, torch.ops.aten.dropout.default(x, 0.5, True))


def test_shard_dropout_context_record_is_node_free():
    _, rank_ctx, _, _ = _rank_graph(tiny_dropout_lm, 2, 1)
    copy_ = rank_ctx.for_rank(tedfx.ParallelConfig(tensor=2), {"edp": 0, "ep": 0, "tp": 0})
    assert copy_.records.sharded_dropouts == rank_ctx.records.sharded_dropouts
    assert all(isinstance(s, str) for s in copy_.records.tp_sharded_dropouts + copy_.records.sharded_dropouts)
