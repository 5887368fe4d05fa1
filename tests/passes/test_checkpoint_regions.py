"""activation_checkpoint: one region per transformer block, whatever module holds the blocks.

Tier (a) of the tests (docs/architecture.md, "Tests"): capture a tiny model, run the pipeline
for one rank's coordinates without processes, and read the regions the pass marked. The
four block structures of tests/models.BLOCK_STRUCTURES (ModuleList; ModuleDict driven by the
parent's forward; FFN nested two modules down; named blocks in one Sequential) must each give
one region per block holding that block's attention and its whole MoE block. The
communication follows from it: with T=2 X=2 a step issues 4 all-to-alls per MoE layer with
CAC and 6 without (the recomputation of a region sends its 2 again), counted on rank graphs
against simulated axes (tedfx.predict). A world-4 run of the ModuleDict model is in the
parity cases (tests/parallel_cases.py).
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tedfx
from tedfx import collectives
from tedfx.axes import GROUP_AXES
from tedfx.passes.checkpoint import (
    CheckpointRegion,
    NoCheckpointRegionError,
    activation_checkpoint_pass,
    cache_all_to_all_pass,
    outline_regions_pass,
)
from tedfx.passes.graph import FFN_EXIT_META, MOE_META, REGION_META
from tedfx.passes.runner import run_passes
from tedfx.pipeline import build_moe_graph, shard_for_rank
from tedfx.predict import predict_rank
from tedfx.runtime.mesh import Layout

from models import BLOCK_STRUCTURES, HIDDEN, LAYERS, VOCAB, tiny_blocks, tiny_t5

SDPA = torch.ops.aten.scaled_dot_product_attention.default
MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
STRUCTURES = list(BLOCK_STRUCTURES)


@functools.cache
def _moe_graph(structure: str, layers: str = "all"):
    model, inputs = tiny_blocks(structure)
    moe = MOE if layers == "all" else tedfx.MoEConfig(num_experts=4, top_k=2, layers=layers)
    gm, ctx = build_moe_graph(model, inputs, moe=moe)
    return gm, ctx, inputs


def _marked(structure: str, *, T: int = 1, X: int = 1, cac: bool = False, layers: str = "all", **kwargs):
    """The rank-0 graph with its regions marked but not yet outlined."""
    gm, ctx, inputs = _moe_graph(structure, layers)
    par = tedfx.ParallelConfig(tensor=T, expert=X, activation_checkpointing="block", cac=cac, **kwargs)
    layout = Layout.build(T * X, par)
    rank_gm, _ = shard_for_rank(gm, ctx, parallel=par, coords=layout.coords(0), skip=("outline_regions",))
    return rank_gm


def _regions(gm) -> dict[str, list]:
    regions: dict[str, list] = {}
    for node in gm.graph.nodes:
        if REGION_META in node.meta:
            regions.setdefault(node.meta[REGION_META], []).append(node)
    return regions


def _assert_one_region_per_block(gm, ffn_paths: list[str]) -> None:
    regions = _regions(gm)
    assert list(regions) == [f"block:{p}" for p in ffn_paths], list(regions)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    for (name, nodes), path in zip(regions.items(), ffn_paths):
        # Contiguous: between its first and last node every call is in the region.
        first, last = order[nodes[0]], order[nodes[-1]]
        strays = [n.name for n in calls if first < order[n] < last and n.meta.get(REGION_META) != name]
        assert not strays, f"{name} is not contiguous: {strays}"
        attention = [n for n in nodes if n.target is SDPA]
        assert len(attention) == 1, f"{name} holds {len(attention)} attentions"
        block = [n for n in calls if getattr(n.meta.get(MOE_META), "path", None) == path]
        assert block and all(n in nodes for n in block), f"{name} misses nodes of its MoE block {path}"
    # The embedding and the LM head belong to no block.
    for node in calls:
        if node.target in (torch.ops.aten.embedding.default,) or node is calls[-1]:
            assert REGION_META not in node.meta, f"{node.name} was put in {node.meta[REGION_META]}"


@pytest.mark.parametrize("structure", STRUCTURES)
def test_one_region_per_block(structure):
    gm = _marked(structure)
    _, ctx, _ = _moe_graph(structure)
    _assert_one_region_per_block(gm, [b.path for b in ctx.records.moe_blocks])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_cac_issues_4_all_to_alls_per_moe_layer_instead_of_6(structure):
    gm, ctx, inputs = _moe_graph(structure)
    counts = {}
    for cac in (True, False):
        par = tedfx.ParallelConfig(tensor=2, expert=2, activation_checkpointing="block", cac=cac)
        pred = predict_rank(gm, ctx, parallel=par, layout=Layout.build(4, par), rank=0, example_inputs=inputs)
        counts[cac] = sum(calls for kind, _, _, calls, _ in pred.comm.table() if kind == "all_to_all")
        regions = [n for n in pred.graph.graph.nodes if n.op == "call_module" and n.target.startswith("checkpoint")]
        # CAC cuts each block's region around its 2 all-to-alls: 3 outlined pieces per block, else 1.
        assert len(regions) == LAYERS * (3 if cac else 1), (cac, [n.target for n in regions])
    assert counts == {True: 4 * LAYERS, False: 6 * LAYERS}, counts


def test_regions_with_tensor_and_expert_sharding_still_hold_whole_blocks():
    gm = _marked("module_dict", T=2, X=2, cac=False)
    _, ctx, _ = _moe_graph("module_dict")
    _assert_one_region_per_block(gm, [b.path for b in ctx.records.moe_blocks])


@pytest.mark.parametrize("T", [1, 2])
def test_dense_ffn_layers_are_blocks_too(T):
    """layers="every_other": block 0 keeps its dense FFN and is still one region, also when tensor parallelism
    rewrites that FFN's last projection (its exit mark moves to the all-reduced output)."""
    gm = _marked("nested_ffn", T=T, X=2, layers="every_other")
    regions = _regions(gm)
    assert list(regions) == ["block:layers.0.ffn.inner", "block:layers.1.ffn.inner"]
    assert Counter(n.meta.get(REGION_META) for n in gm.graph.nodes if n.target is SDPA) == {
        "block:layers.0.ffn.inner": 1, "block:layers.1.ffn.inner": 1}
    linears = [n for n in regions["block:layers.0.ffn.inner"] if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 4  # attention's c_attn and c_proj, the dense FFN's c_fc and c_proj


def test_a_lost_ffn_exit_mark_raises_instead_of_merging_two_blocks():
    gm, ctx, _ = _moe_graph("module_list")
    lost = copy.deepcopy(gm)
    exit_ = next(n for n in lost.graph.nodes if n.meta.get(FFN_EXIT_META) == "h.0.mlp")
    del exit_.meta[FFN_EXIT_META]
    with pytest.raises(NoCheckpointRegionError, match=r"exits of the FFNs \['h\.0\.mlp'\] are not marked"):
        activation_checkpoint_pass(lost, ctx=ctx, mode="block")


def _step(structure: str, checkpointing: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one training step of the world-1 rank graph (every axis one rank)."""
    gm, ctx, inputs = _moe_graph(structure)
    par = tedfx.ParallelConfig(activation_checkpointing=checkpointing)
    rank_gm, _ = shard_for_rank(gm, ctx, parallel=par, coords=Layout.build(1, par).coords(0))
    rank_gm.train()
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    with collectives.bind_axes(dict.fromkeys(GROUP_AXES)):
        loss = F.cross_entropy(rank_gm(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in rank_gm.named_parameters()}


@pytest.mark.parametrize("structure", ["module_dict", "sequential"])
def test_checkpointed_step_computes_the_same_loss_and_gradients(structure):
    loss, grads = _step(structure, "none")
    ckpt_loss, ckpt_grads = _step(structure, "block")
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    assert grads.keys() == ckpt_grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_three_passes_by_name_mark_cut_and_outline():
    """On an X=2 rank graph: activation_checkpoint marks both blocks, cache_all_to_all takes the 4 all-to-alls
    out, outline_regions moves the 3 pieces of each block into CheckpointRegions that hold no all-to-all."""
    gm, ctx, inputs = _moe_graph("module_dict")
    par = tedfx.ParallelConfig(expert=2)
    rank_gm, rank_ctx = shard_for_rank(gm, ctx, parallel=par, coords=Layout.build(2, par).coords(0))
    a2a = [n for n in rank_gm.graph.nodes if n.target is collectives.all_to_all]
    assert len(a2a) == 2 * LAYERS
    rank_gm = run_passes(rank_gm, [functools.partial(activation_checkpoint_pass, mode="block")], ctx=rank_ctx)
    assert {n.meta.get(REGION_META) for n in a2a} == {"block:blocks.layer0.mlp", "block:blocks.layer1.mlp"}
    rank_gm = run_passes(rank_gm, [cache_all_to_all_pass], ctx=rank_ctx)
    assert all(REGION_META not in n.meta for n in a2a)
    rank_gm = run_passes(rank_gm, [outline_regions_pass], ctx=rank_ctx)
    assert len(rank_ctx.records.regions) == 3 * LAYERS
    for name in rank_ctx.records.regions:
        region = rank_gm.get_submodule(name)
        assert isinstance(region, CheckpointRegion)
        assert not any(n.target is collectives.all_to_all for n in region.region.graph.nodes)
    assert sum(n.target is collectives.all_to_all for n in rank_gm.graph.nodes) == 2 * LAYERS


# --- blocks named by module path ------------------------------------------------------------------------


def test_named_blocks_of_a_module_dict():
    """The ModuleDict's blocks are never called; naming them still gives one region each, residual adds included."""
    gm = _marked("module_dict", checkpoint_blocks=("blocks.*",))
    regions = _regions(gm)
    assert list(regions) == ["block:blocks.layer0", "block:blocks.layer1"]
    for name, nodes in regions.items():
        assert sum(n.target is SDPA for n in nodes) == 1
        assert sum(n.target is torch.ops.aten.add.Tensor for n in nodes) >= 1  # the residual add after attn


def test_named_blocks_that_match_nothing_raise_naming_the_model_and_the_fix():
    with pytest.raises(NoCheckpointRegionError) as info:
        _marked("module_dict", checkpoint_blocks=("layers.*",))
    message = str(info.value)
    assert "_DictBlocks" in message and "'layers.*'" in message
    assert "blocks.layer0" in message  # where the FFNs are: what to name instead
    assert "leave checkpoint_blocks empty" in message


class _TwoFFNsPerBlock(nn.Module):
    """Each block runs two FFNs on the same input and adds both: no residual add separates them."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(HIDDEN)
            self.mlp_a = nn.Sequential(nn.Linear(HIDDEN, 64), nn.GELU(), nn.Linear(64, HIDDEN))
            self.mlp_b = nn.Sequential(nn.Linear(HIDDEN, 64), nn.ReLU(), nn.Linear(64, HIDDEN))

        def forward(self, x):
            h = self.ln(x)
            a = self.mlp_a(h)
            b = self.mlp_b(h)
            return x + a + b

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(self.Block() for _ in range(2))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_blocks_the_structure_cannot_separate_raise_and_named_blocks_fix_it():
    torch.manual_seed(0)
    model = _TwoFFNsPerBlock()
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    gm, ctx = build_moe_graph(model, (tokens,), moe=MOE)
    coords = {"edp": 0, "ep": 0, "tp": 0}
    with pytest.raises(NoCheckpointRegionError) as info:
        shard_for_rank(gm, ctx, parallel=tedfx.ParallelConfig(activation_checkpointing="block"), coords=coords)
    message = str(info.value)
    assert "_TwoFFNsPerBlock" in message and "layers.0.mlp_b" in message and "checkpoint_blocks=" in message, message
    named = tedfx.ParallelConfig(activation_checkpointing="block", checkpoint_blocks=("layers.*",))
    rank_gm, _ = shard_for_rank(gm, ctx, parallel=named, coords=coords, skip=("outline_regions",))
    regions = _regions(rank_gm)
    assert list(regions) == ["block:layers.0", "block:layers.1"]
    blocks = [b.path for b in ctx.records.moe_blocks]
    assert len(blocks) == 4
    for i, nodes in enumerate(regions.values()):
        moe_paths = sorted({n.meta[MOE_META].path for n in nodes if MOE_META in n.meta})
        assert moe_paths == blocks[2 * i:2 * i + 2], (i, moe_paths, blocks)


# --- an encoder-decoder, and what no block holds ------------------------------------------------------


@functools.cache
def _t5_graph(keyword: str):
    """HF T5 captured with `decoder_input_ids`, or with `labels` (T5 then shifts them right with in-place ops
    that export keeps: `fill_` and `masked_fill_` on a tensor made after the encoder's last block)."""
    model, inputs, kwargs = tiny_t5()
    kwargs = {keyword: kwargs["decoder_input_ids"], "use_cache": False}
    gm, ctx = build_moe_graph(model, inputs, moe=MOE, example_kwargs=kwargs)
    return gm, ctx


@pytest.mark.parametrize("keyword", ["decoder_input_ids", "labels"])
def test_an_encoder_decoders_blocks_hold_every_attention_and_projection(keyword):
    """The decoder's residual stream starts after the encoder's last block, not from it: decoder block 0 still
    holds its self-attention, and each decoder block its cross-attention's keys and values of the encoder's
    output. Only the LM head is in no block; no in-place op of the label shift is recomputed."""
    gm, ctx = _t5_graph(keyword)
    par = tedfx.ParallelConfig(activation_checkpointing="block")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="activation_checkpointing")
        rank_gm, _ = shard_for_rank(gm, ctx, parallel=par, coords={"edp": 0, "ep": 0, "tp": 0},
                                    skip=("outline_regions",))
    regions = _regions(rank_gm)
    paths = [b.path for b in ctx.records.moe_blocks]
    assert paths == ["encoder.block.0.layer.1.DenseReluDense", "encoder.block.1.layer.1.DenseReluDense",
                     "decoder.block.0.layer.2.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense"]
    assert list(regions) == [f"block:{p}" for p in paths]
    assert [sum(n.target is SDPA for n in nodes) for nodes in regions.values()] == [1, 1, 2, 2]
    linear = torch.ops.aten.linear.default
    assert [sum(n.target is linear for n in nodes) for nodes in regions.values()] == [4, 4, 8, 8]
    left = [n for n in rank_gm.graph.nodes if n.target is linear and REGION_META not in n.meta]
    assert [n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0] for n in left] == ["lm_head"]
    in_place = [n for n in rank_gm.graph.nodes if getattr(n.target, "_schema", None) is not None
                and n.target._schema.is_mutable]
    shift = {torch.ops.aten.fill_.Tensor, torch.ops.aten.masked_fill_.Scalar}
    assert (keyword == "labels") == shift.issubset(n.target for n in in_place), [n.target for n in in_place]
    assert all(REGION_META not in n.meta for n in in_place), [n.name for n in in_place]


def test_an_encoder_decoder_trained_with_labels_gets_the_same_step_with_block_checkpointing():
    """T5 with labels: the step with block checkpointing computes the loss and gradients of the step without
    (it failed in backward when the label shift's `fill_` was recomputed inside decoder block 0)."""
    import torch.distributed as dist

    results = {}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for checkpointing in ("none", "block"):
            model, (ids,), kwargs = tiny_t5()
            labels = kwargs["decoder_input_ids"]
            pm = tedfx.parallelize(model, (ids,), example_kwargs={"labels": labels, "use_cache": False}, moe=MOE,
                                   parallel=tedfx.ParallelConfig(activation_checkpointing=checkpointing))
            loss = pm(ids, labels=labels, use_cache=False).loss
            loss.backward()
            results[checkpointing] = loss.detach(), {n: p.grad for n, p in pm.named_parameters()}
    finally:
        dist.destroy_process_group()
    (loss, grads), (ckpt_loss, ckpt_grads) = results["none"], results["block"]
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    assert grads.keys() == ckpt_grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


class _SharedMemoryBlocks(nn.Module):
    """Blocks 1 and 2 both read one projection of a memory input, computed between blocks 0 and 1: it belongs
    to no block, so block checkpointing keeps its activation."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(HIDDEN)
            self.mlp = nn.Sequential(nn.Linear(HIDDEN, 64), nn.GELU(), nn.Linear(64, HIDDEN))

        def forward(self, x, memory=None):
            if memory is not None:
                x = x + memory
            return x + self.mlp(self.ln(x))

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.memory_proj = nn.Linear(HIDDEN, HIDDEN)
        self.layers = nn.ModuleList(self.Block() for _ in range(3))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, idx, memory):
        x = self.layers[0](self.embed(idx))
        m = self.memory_proj(memory)
        x = self.layers[1](x, m)
        return self.head(self.layers[2](x, m))


def test_a_matmul_between_blocks_in_none_warns_naming_its_module_and_named_blocks_take_it():
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    gm, ctx = build_moe_graph(_SharedMemoryBlocks(), (tokens, torch.randn(2, 8, HIDDEN)), moe=MOE)
    coords = {"edp": 0, "ep": 0, "tp": 0}
    with pytest.warns(UserWarning, match=r"1 matmul\(s\) of _SharedMemoryBlocks .* in no block.*memory_proj\. "
                                         r".*checkpoint_blocks="):
        shard_for_rank(gm, ctx, parallel=tedfx.ParallelConfig(activation_checkpointing="block"), coords=coords,
                       skip=("outline_regions",))
    named = tedfx.ParallelConfig(activation_checkpointing="block", checkpoint_blocks=("layers.*", "memory_proj"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="activation_checkpointing")
        rank_gm, _ = shard_for_rank(gm, ctx, parallel=named, coords=coords, skip=("outline_regions",))
    assert list(_regions(rank_gm)) == ["block:layers.0", "block:memory_proj", "block:layers.1", "block:layers.2"]


class _CountingBlocks(nn.Module):
    """Each block reads a buffer, then counts its call on it in place (a tensor made outside the block)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(HIDDEN)
            self.attn = nn.Linear(HIDDEN, HIDDEN)
            self.mlp = nn.Sequential(nn.Linear(HIDDEN, 64), nn.ReLU(), nn.Linear(64, HIDDEN))
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            x = x + self.attn(self.ln(x) * (1 + self.calls))
            self.calls.add_(1)
            return x + self.mlp(x)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(self.Block() for _ in range(2))

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return x


def test_an_in_place_write_after_a_read_in_a_block_is_not_moved_before_the_read():
    """The write stays out of the block (recomputing it would count twice) and the block starts after it, so
    the graph computes what it did: the attention left out is named in the warning. Named blocks would
    recompute the write: refused."""
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    gm, ctx = build_moe_graph(_CountingBlocks().eval(), (tokens,), moe=tedfx.MoEConfig(num_experts=2, top_k=1,
                                                                                       drop_tokens=False))
    with torch.no_grad():
        expected = copy.deepcopy(gm)(tokens)
    marked = copy.deepcopy(gm)
    with pytest.warns(UserWarning, match=r"in no block.*layers\.1\.attn.*writes in place"):
        activation_checkpoint_pass(marked, ctx=ctx, mode="block")
    marked.recompile()
    add_ = [n for n in marked.graph.nodes if n.target is torch.ops.aten.add_.Tensor]
    assert len(add_) == 2 and all(REGION_META not in n.meta for n in add_)
    with torch.no_grad():
        torch.testing.assert_close(marked(tokens), expected, rtol=0, atol=0)
    with pytest.raises(NoCheckpointRegionError, match=r"block 'layers\.0' of _CountingBlocks writes in place a "
                                                      r"tensor made outside it \(aten\.add_\.Tensor at layers\.0\)"):
        activation_checkpoint_pass(copy.deepcopy(gm), ctx=ctx, mode="block", blocks=("layers.*",))


def test_moe_mode_makes_one_region_per_moe_block():
    gm, ctx, _ = _moe_graph("sequential")
    marked = activation_checkpoint_pass(copy.deepcopy(gm), ctx=ctx, mode="moe")
    regions = _regions(marked)
    assert list(regions) == [f"moe:{b.path}" for b in ctx.records.moe_blocks]
    assert all(not any(n.target is SDPA for n in nodes) for nodes in regions.values())


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, value", [
    (dict(activation_checkpointing="moe", checkpoint_blocks=("h.*",)), "('h.*',)"),
    (dict(activation_checkpointing="block", checkpoint_blocks="h.*"), "'h.*'"),
    (dict(activation_checkpointing="block", checkpoint_blocks=("",)), "('',)"),
])
def test_checkpoint_blocks_is_validated(kwargs, value):
    with pytest.raises(ValueError, match=re.escape(f"ParallelConfig.checkpoint_blocks={value} is invalid")):
        tedfx.ParallelConfig(**kwargs)


def test_checkpoint_blocks_list_becomes_a_tuple():
    par = tedfx.ParallelConfig(activation_checkpointing="block", checkpoint_blocks=["h.*"])
    assert par.checkpoint_blocks == ("h.*",)
    hash(par)
