"""Activation checkpointing as passes: activation_checkpoint, cache_all_to_all (CAC), outline_regions.

On (T, X) rank graphs built by the pipeline (`shard_for_rank`), stopped before
the pass under test with `skip`, then run in this process with simulated axes:
the regions each mode marks, the all-to-alls CAC takes out, the outlined
CheckpointRegions (sharing the rank graph's parameters), the numerics against
the same rank graph without checkpointing, and the all-to-alls of one step:
6 per MoE layer without CAC (forward, backward, recompute), 4 with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import tedfx
from tedfx import collectives
from tedfx.passes.checkpoint import CheckpointRegion, outline_regions_pass
from tedfx.passes.graph import MOE_META, REGION_META, Role, get_by_target, module_path, moe_blocks
from tedfx.passes.runner import run_passes

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, expert_noise=0.1)
BLOCKS = {"gpt": ["h.0", "h.1"], "llama": ["model.layers.0", "model.layers.1"]}
LAYERS = 2
MODES = ["block", "moe"]


def ckpt_rank(rank_graph, name: str, mode: str, *, cac: bool = True, T: int = 2, X: int = 2, t: int = 0,
              x: int = 0, skip: tuple[str, ...] = ()):
    return rank_graph(name, tensor=T, expert=X, tp=t, ep=x, activation_checkpointing=mode, cac=cac, skip=skip)


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def regions(gm: fx.GraphModule) -> dict[str, str | None]:
    return {n.name: n.meta.get(REGION_META) for n in gm.graph.nodes}


# --- activation_checkpoint ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_mode_makes_one_region_per_transformer_block(rank_graph, name) -> None:
    """One region per block, found from the graph (from one FFN's residual exit to the next) and named after
    its FFN: it holds the block's norms, attention and MoE block; embeddings and the head stay outside."""
    rank = ckpt_rank(rank_graph, name, "block", skip=("cache_all_to_all", "outline_regions"))
    gm = rank.gm
    assert rank.ctx.done[-1] == "activation_checkpoint"
    aten = torch.ops.aten
    anchors = (aten.scaled_dot_product_attention.default, aten.layer_norm.default, aten.rms_norm.default)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        path = module_path(node)
        block = next((b for b in BLOCKS[name] if path == b or path.startswith(b + ".")), None)
        if block is None and path:
            assert node.meta.get(REGION_META) is None, (node.name, path)  # embedding, final norm, head
        elif block is not None and (node.target in anchors or node.meta.get(MOE_META) is not None):
            assert node.meta.get(REGION_META) == f"block:{block}.mlp", (node.name, path)
    marked = {r for r in regions(gm).values() if r}
    assert marked == {f"block:{b}.mlp" for b in BLOCKS[name]}
    # Each block's region holds its attention, its MoE block and the collectives inserted into both.
    for b in BLOCKS[name]:
        inside = [n for n in gm.graph.nodes if n.meta.get(REGION_META) == f"block:{b}.mlp"]
        targets = {n.target for n in inside}
        assert {torch.ops.aten.scaled_dot_product_attention.default, collectives.all_reduce,
                collectives.all_to_all, collectives.all_gather} <= targets
        assert sum(n.target is collectives.all_to_all for n in inside) == 2


@pytest.mark.parametrize("name", list(BLOCKS))
def test_moe_mode_marks_only_the_moe_blocks(rank_graph, name) -> None:
    gm = ckpt_rank(rank_graph, name, "moe", skip=("cache_all_to_all", "outline_regions")).gm
    for node in gm.graph.nodes:
        tag = node.meta.get(MOE_META)
        moe_call = tag is not None and node.op in ("call_function", "call_module")
        assert node.meta.get(REGION_META) == (f"moe:{tag.path}" if moe_call else None), node.name
    paths = list(moe_blocks(gm.graph))
    assert {r for r in regions(gm).values() if r} == {f"moe:{p}" for p in paths}
    for roles in moe_blocks(gm.graph).values():  # the inserted collectives are recomputed with their block
        for role in (Role.A2A_DISPATCH, Role.A2A_COMBINE, Role.DTD_GATHER, Role.DTD_REDUCE_SCATTER):
            assert roles[role].meta[REGION_META] == f"moe:{roles[role].meta[MOE_META].path}"


# --- cache_all_to_all ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cac_takes_exactly_the_all_to_alls_out_of_their_regions(rank_graph, mode) -> None:
    marked = ckpt_rank(rank_graph, "gpt", mode, skip=("cache_all_to_all", "outline_regions")).gm
    cached = ckpt_rank(rank_graph, "gpt", mode, skip=("outline_regions",)).gm
    before, after = regions(marked), regions(cached)
    a2a = {n.name for n in calls(cached, collectives.all_to_all)}
    assert len(a2a) == 2 * LAYERS
    assert all(before[n] is not None and after[n] is None for n in a2a)
    assert {n: r for n, r in after.items() if n not in a2a} == {n: r for n, r in before.items() if n not in a2a}


# --- outline_regions ----------------------------------------------------------------------------------


def _outlined(rank_graph, name: str, mode: str, cac: bool):
    """The rank graph before outline_regions, the state it had, and the graph after (the same module)."""
    rank = ckpt_rank(rank_graph, name, mode, cac=cac, skip=("outline_regions",))
    state = rank.gm.state_dict(keep_vars=True)
    params = list(rank.gm.parameters())
    run_passes(rank.gm, [outline_regions_pass], ctx=rank.ctx)
    return rank, state, params


@pytest.mark.parametrize("cac", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_outlined_regions_use_the_rank_graph_s_own_parameters(rank_graph, mode, cac) -> None:
    rank, state, params = _outlined(rank_graph, "gpt", mode, cac)
    gm = rank.gm
    after = gm.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is state[k] for k in state)  # same keys, same objects
    assert [id(p) for p in gm.parameters()] == [id(p) for p in params]
    names = rank.ctx.records.regions
    outlined = {n: m for n, m in gm.named_children() if isinstance(m, CheckpointRegion)}
    assert list(outlined) == names and len(names) == LAYERS * (3 if cac else 1)  # CAC splits at 2 all-to-alls
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in outlined] == names
    shared = 0
    for region in outlined.values():
        assert not list(region.parameters())  # held outside the module tree: nothing counted twice
        for node in region.region.graph.nodes:
            if node.op == "get_attr":
                assert get_by_target(region.region, node.target) is get_by_target(gm, node.target)
                shared += 1
    assert shared >= LAYERS * 4  # at least every expert tensor is read inside a region
    # Nothing marked is left in the rank graph; the all-to-alls are outside the regions exactly with CAC.
    assert not [n for n in gm.graph.nodes if REGION_META in n.meta]
    inside = sum(len(calls(r.region, collectives.all_to_all)) for r in outlined.values())
    assert (len(calls(gm, collectives.all_to_all)), inside) == ((2 * LAYERS, 0) if cac else (0, 2 * LAYERS))
    gm.eval()
    assert not any(r.region.training for r in outlined.values())
    gm.train()
    assert all(r.region.training for r in outlined.values())


def _step(rank) -> tuple[torch.Tensor, dict[str, torch.Tensor], collectives.CommStats]:
    rank.gm.zero_grad(set_to_none=True)
    stats = collectives.CommStats()
    rank.gm.train()
    torch.manual_seed(0)  # the same dropout masks and routing noise in both graphs
    out = rank.forward(stats)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in rank.gm.named_parameters()}, stats


NOISY = tedfx.MoEConfig(num_experts=4, top_k=2, expert_noise=0.1, noisy_gate="jitter")


@pytest.mark.parametrize("cac", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,moe", [("gpt-dropout", NOISY), ("llama", MOE)], ids=["gpt-dropout", "llama"])
def test_checkpointed_step_equals_the_plain_one(rank_graph, name, moe, mode, cac) -> None:
    """With dropout and routing noise too: the recomputation draws what the forward drew."""
    plain_out, plain_grads, plain_stats = _step(rank_graph(name, tensor=2, expert=2, tp=1, ep=1, moe=moe))
    out, grads, stats = _step(rank_graph(name, tensor=2, expert=2, tp=1, ep=1, moe=moe,
                                         activation_checkpointing=mode, cac=cac))
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    assert set(grads) == set(plain_grads)
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], rtol=1e-6, atol=1e-7, msg=n)
    # Forward and backward communicate the same; checkpointing only adds the recomputation.
    for phase in ("forward", "backward"):
        assert [r for r in stats.table() if r[2] == phase] == [r for r in plain_stats.table() if r[2] == phase]
    assert plain_stats.calls(phase="recompute") == 0 < stats.calls(phase="recompute")


@pytest.mark.parametrize("T,X", [(1, 2), (2, 2)])
@pytest.mark.parametrize("mode", MODES)
def test_six_all_to_alls_per_moe_layer_without_cac_and_four_with_it(rank_graph, mode, T, X) -> None:
    per_phase = {}
    for cac in (False, True):
        stats = ckpt_rank(rank_graph, "gpt", mode, cac=cac, T=T, X=X).step()
        per_phase[cac] = {p: stats.calls("all_to_all", "ep", p) for p in ("forward", "backward", "recompute")}
        one = {c.nbytes for c in stats.trace if c.kind == "all_to_all"}
        assert len(one) == 1  # every all-to-all moves one buffer's bytes, whatever its phase
    assert per_phase[False] == {"forward": 2 * LAYERS, "backward": 2 * LAYERS, "recompute": 2 * LAYERS}
    assert per_phase[True] == {"forward": 2 * LAYERS, "backward": 2 * LAYERS, "recompute": 0}
    assert sum(per_phase[False].values()) == 6 * LAYERS and sum(per_phase[True].values()) == 4 * LAYERS
