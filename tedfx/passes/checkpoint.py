"""Activation checkpointing as graph passes, and DeepSpeed-TED's communication-aware variant (CAC).

Three passes, in order (docs/parallelism.md, "Activation checkpointing and CAC"):
1. `activation_checkpoint_pass` marks each node with the region it is
   recomputed in (graph.REGION_META): one region per transformer block
   (mode "block") or per MoE block (mode "moe").
2. `cache_all_to_all_pass` (ParallelConfig.cac) takes the expert all-to-alls
   out of their regions, which splits a region around them. Their outputs
   become inputs of the next region, which checkpointing saves anyway, so the
   recomputation reuses them instead of communicating again: 4 all-to-alls
   per MoE block per step instead of 6. With DTD this saves the slice that
   came out of the all-to-all, before its all-gather (1/T of the buffer).
3. `outline_regions_pass` moves each region into its own GraphModule, called
   through `torch.utils.checkpoint` (non-reentrant, RNG state preserved, so
   dropout draws the same masks when recomputed).

The outlined GraphModules share the parameters of the rank's graph (same
Parameter objects); the rank's state dict and parameters do not change.
"""

from __future__ import annotations

import operator
from typing import Literal

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

from .. import collectives
from ..capture import TedGraphModule
from .context import PassContext
from .graph import MOE_META, REGION_META
from .runner import requires

__all__ = ["CheckpointRegion", "activation_checkpoint_pass", "cache_all_to_all_pass", "outline_regions_pass"]


@requires("ffn_to_moe")
def activation_checkpoint_pass(gm: fx.GraphModule, *, ctx: PassContext,
                               mode: Literal["block", "moe"] = "block") -> fx.GraphModule:
    """Mark the nodes of each transformer block (mode "block") or MoE block ("moe") as one checkpointed region."""
    if mode == "moe":
        for node in gm.graph.nodes:
            tag = node.meta.get(MOE_META)
            if tag is not None and node.op in ("call_function", "call_module"):
                node.meta[REGION_META] = f"moe:{tag.path}"
        return gm
    ffn_paths = [r.path for r in ctx.records.moe_blocks] + [f.path for f in ctx.records.ffns]
    blocks = sorted({_block_path(p) for p in ffn_paths}, key=len, reverse=True)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        paths = {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}
        block = next((b for b in blocks if b in paths), None)
        if block is not None:
            node.meta[REGION_META] = f"block:{block}"
    return gm


@requires("activation_checkpoint", "shard_experts")
def cache_all_to_all_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """CAC: keep the expert all-to-alls out of checkpointed regions, so recomputation reuses their outputs."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is collectives.all_to_all:
            node.meta.pop(REGION_META, None)
    return gm


class CheckpointRegion(nn.Module):
    """Calls an outlined region through non-reentrant activation checkpointing.

    The region's GraphModule is held outside the module tree, so its shared
    parameters appear once in the rank's state dict.
    """

    def __init__(self, region: fx.GraphModule, name: str) -> None:
        super().__init__()
        self.__dict__["region"] = region
        self.name = name

    def train(self, mode: bool = True) -> "CheckpointRegion":
        super().train(mode)
        self.region.train(mode)
        return self

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.region, *args, use_reentrant=False,
                                                 context_fn=collectives.checkpoint_contexts)


@requires("activation_checkpoint")
def outline_regions_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Move every marked region into a CheckpointRegion; a region split by CAC becomes several."""
    runs: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    for node in gm.graph.nodes:
        region = node.meta.get(REGION_META)
        if region is not None and current and current[0].meta.get(REGION_META) == region:
            current.append(node)
            continue
        if node.op == "get_attr" and current:
            continue  # parameters are read inside the outlined region; they do not end a run
        if current:
            runs.append(current)
        current = [node] if region is not None else []
    if current:
        runs.append(current)
    outlined = []
    for i, run in enumerate(runs):
        if len(run) > 1 or run[0].op != "get_attr":
            outlined.append(_outline(gm, run, f"checkpoint_{i}"))
    ctx.records.regions = outlined
    return gm


def _outline(gm: fx.GraphModule, nodes: list[fx.Node], name: str) -> str:
    """Replace `nodes` (consecutive in graph order) by one call of a CheckpointRegion."""
    inside = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def arg(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":  # read the parameter inside the region
            env[n] = graph.get_attr(n.target)
        else:
            inputs.append(n)
            env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
        return env[n]

    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                arg(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    region = TedGraphModule(gm, graph, class_name=name)  # train()/eval() flips its dropout too
    gm.add_submodule(name, CheckpointRegion(region, name))

    last = nodes[-1]
    with gm.graph.inserting_after(last):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta["nn_module_stack"] = dict(last.meta.get("nn_module_stack", {}))
    anchor = call
    for i, n in enumerate(outputs):
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.call_function(operator.getitem, (call, i))
        anchor.meta = {k: v for k, v in n.meta.items() if k != REGION_META}
        n.replace_all_uses_with(anchor, delete_user_cb=lambda user: user not in inside)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return name


def _block_path(ffn_path: str) -> str:
    """The transformer block of an FFN: its parent module ("h.0.mlp" -> "h.0"), or the FFN itself when
    the FFN's projections sit directly in the block (BERT: "encoder.layer.0")."""
    parent, _, last = ffn_path.rpartition(".")
    return ffn_path if last.isdigit() or not parent else parent
