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

Transformer blocks are found from the graph, not from module paths, because
models hold their blocks in every way (ModuleList, ModuleDict driven by the
parent's forward, Sequential, FFNs nested in wrappers). A block ends at its
FFN's exit residual: the `add` that puts the FFN's output back on the residual
stream. Block k spans the nodes after block k-1's end up to its own end that
depend on block k-1's end or on an earlier block; block 0 starts where the
residual stream enters the first block (walking back from its end through the
residual adds), and so does a second stream (an encoder-decoder's decoder).
Nodes in that span used by the block alone are recomputed with it; the others
that do not depend on the stream (masks, rotary tables, positions) move before
the block, so each block is one contiguous region. In-place writes to tensors
made outside a block stay out of it (docs/parallelism.md, "Blocks from the
graph").
`ParallelConfig.checkpoint_blocks` names the blocks by module path instead.

The outlined GraphModules share the parameters of the rank's graph (same
Parameter objects); the rank's state dict and parameters do not change.
"""

from __future__ import annotations

import fnmatch
import operator
import warnings
from typing import Literal, Sequence

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

from .. import collectives
from .._compat import known_equal
from ..capture import TedGraphModule
from .context import PassContext
from .graph import FFN_EXIT_META, MOE_META, REGION_META
from .runner import requires

__all__ = ["CheckpointRegion", "NoCheckpointRegionError", "activation_checkpoint_pass", "cache_all_to_all_pass",
           "outline_regions_pass"]

aten = torch.ops.aten
_CALLS = ("call_function", "call_module", "call_method")
_MAX_HOPS = 8
"""Longest chain of one-input ops walked between an FFN's exit and its residual add (dropout, all-reduce, scale)."""


class NoCheckpointRegionError(ValueError):
    """Activation checkpointing was asked for, but the graph gives no region to checkpoint."""


@requires("ffn_to_moe")
def activation_checkpoint_pass(gm: fx.GraphModule, *, ctx: PassContext, mode: Literal["block", "moe"] = "block",
                               blocks: Sequence[str] = ()) -> fx.GraphModule:
    """Mark the nodes of each transformer block (mode "block") or MoE block ("moe") as one checkpointed region.

    Args:
        gm: an MoE graph (ffn_to_moe has marked every FFN's exit), possibly sharded.
        ctx: the pass context; `records.ffns` says which FFN exits the graph must still mark.
        mode: "block", one region per transformer block; "moe", one per MoE block.
        blocks: with mode "block", module-path patterns of the blocks (`ParallelConfig.checkpoint_blocks`);
            empty: found from the graph's structure (module docstring).

    Raises:
        NoCheckpointRegionError: no region found, naming the model and what to set instead.
    """
    if mode == "moe":
        regions = _moe_regions(gm)
    elif blocks:
        regions = _named_regions(gm, tuple(blocks))
    else:
        regions = _structural_regions(gm, [f.path for f in ctx.records.ffns])
    for name, nodes in regions.items():
        for node in nodes:
            node.meta[REGION_META] = name
    return gm


def _model_name(gm: fx.GraphModule) -> str:
    return gm.meta.get("tedfx_model", type(gm).__name__)


def _moe_regions(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    regions: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        tag = node.meta.get(MOE_META)
        if tag is not None and node.op in _CALLS:
            regions.setdefault(f"moe:{tag.path}", []).append(node)
    if not regions:
        raise NoCheckpointRegionError(
            f"activation_checkpointing='moe' found no MoE block in the graph of {_model_name(gm)}: nothing would be "
            f"recomputed. Convert at least one FFN (MoEConfig.layers) or set activation_checkpointing='none'.")
    return regions


# --- blocks from the graph's structure ------------------------------------------------------------------


def _structural_regions(gm: fx.GraphModule, ffn_paths: list[str]) -> dict[str, list[fx.Node]]:
    """One region per FFN: from the previous FFN's exit residual (or the stream's entry) to its own."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    exits = [n for n in gm.graph.nodes if FFN_EXIT_META in n.meta]
    unmarked = sorted(set(ffn_paths) - {e.meta[FFN_EXIT_META] for e in exits})
    if not exits or unmarked:
        # Two blocks would silently merge into one region: a rewrite lost the mark (graph.FFN_EXIT_META).
        raise _no_block_error(gm, f"the exits of the FFNs {unmarked or ffn_paths} are not marked in the graph")
    ends = [_exit_residual(e) for e in exits]
    regions: dict[str, list[fx.Node]] = {}
    earlier: set[fx.Node] = set()  # the nodes of the blocks before
    for k, (exit_, end) in enumerate(zip(exits, ends)):
        if k and order[exit_] <= order[ends[k - 1]]:
            raise _no_block_error(
                gm, f"FFN {exit_.meta[FFN_EXIT_META]!r} runs before the residual add of FFN "
                    f"{exits[k - 1].meta[FFN_EXIT_META]!r} ({ends[k - 1].name}), so no boundary separates them")
        entry, walked = _stream_entry(end, order)
        if k == 0:
            after, seeds = entry, {entry} if entry is not None else None
        elif ends[k - 1] in walked:
            after, seeds = ends[k - 1], {ends[k - 1]} | earlier
        else:  # a second stream starts here (an encoder-decoder's decoder): the block is on both
            after, seeds = ends[k - 1], {ends[k - 1], *([entry] if entry is not None else []), *earlier}
        nodes = _stream_span(after, end, seeds)
        if exit_ not in nodes:
            raise _no_block_error(gm, f"FFN {exit_.meta[FFN_EXIT_META]!r} does not depend on the residual stream "
                                      f"that enters its block ({after.name if after is not None else 'the inputs'})")
        regions[f"block:{exit_.meta[FFN_EXIT_META]}"] = nodes
        earlier.update(nodes)
    _warn_uncovered(gm, regions, order)
    return regions


_MATMULS = (aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
            aten.baddbmm.default, aten.einsum.default, aten.scaled_dot_product_attention.default)


def _warn_uncovered(gm: fx.GraphModule, regions: dict[str, list[fx.Node]], order: dict[fx.Node, int]) -> None:
    """Warn when matmuls lie between the first and the last block but in none: their activations are kept,
    so checkpointing saves less memory than asked (the numbers stay right)."""
    inside = {n for nodes in regions.values() for n in nodes}
    first = min(order[n] for n in inside)
    last = max(order[n] for n in inside)
    left = [n for n in gm.graph.nodes
            if first < order[n] < last and n not in inside and n.op == "call_function" and n.target in _MATMULS]
    if left:
        where = sorted({_module_path(n) for n in left})
        warnings.warn(
            f"activation_checkpointing='block': {len(left)} matmul(s) of {_model_name(gm)} between its first and "
            f"last transformer block are in no block, so their activations are kept instead of recomputed: "
            f"{', '.join(where)}. They depend neither on the residual stream entering their block nor on an "
            f"earlier block, or their block writes in place, after them, a tensor made outside it (a counter "
            f"buffer's add_), so it starts after that write. Name the blocks by module path to include them, "
            f"e.g. ParallelConfig(activation_checkpointing='block', checkpoint_blocks=('layers.*',)), or write "
            f"such a tensor out of place.", stacklevel=2)


def _module_path(node: fx.Node) -> str:
    """The innermost module a node runs in ('(top level)' for the model's own forward)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return (stack[-1][0] if stack else "") or "(top level)"


def _exit_residual(exit_: fx.Node) -> fx.Node:
    """The `add` that puts the FFN's output back on the residual stream, through one-input ops
    (dropout, scaling, a tensor-parallel all-reduce); the exit itself when there is none."""
    node = exit_
    for _ in range(_MAX_HOPS):
        if len(node.users) != 1:
            break
        user = next(iter(node.users))
        if user.op == "call_function" and user.target is aten.add.Tensor:
            return user
        if _tensor_inputs(user) != [node]:
            break
        node = user
    return exit_


def _stream_entry(end: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node | None, set[fx.Node]]:
    """Where the residual stream that reaches `end` enters the graph's blocks: walk back from `end` through
    residual adds (and the norms, dropouts and views between them) until the stream comes from something else
    (an embedding). Returns that node (None if `end` is no residual add) and every node walked through."""
    entry, node, walked = None, end, {end}
    while (stream := _residual_input(node, order)) is not None:
        entry = node = stream
        walked.add(node)
        for _ in range(_MAX_HOPS):  # a post-norm block (BERT) has a LayerNorm between its residual adds
            inputs = _tensor_inputs(node)
            if len(inputs) != 1 or not _same_numel(node, inputs[0]):
                break
            node = inputs[0]
            walked.add(node)
    return entry, walked


def _residual_input(node: fx.Node, order: dict[fx.Node, int]) -> fx.Node | None:
    """For a residual add `x + f(x)`, x (the operand the other one is computed from); else None."""
    if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if _is_ancestor(a, b, order):
        return a
    if _is_ancestor(b, a, order):
        return b
    return None


def _is_ancestor(a: fx.Node, b: fx.Node, order: dict[fx.Node, int]) -> bool:
    stack, seen = [b], {b}
    while stack:
        for n in stack.pop().all_input_nodes:
            if n is a:
                return True
            if n not in seen and order.get(n, -1) > order.get(a, -1):
                seen.add(n)
                stack.append(n)
    return False


def _stream_span(after: fx.Node | None, end: fx.Node, seeds: set[fx.Node] | None) -> list[fx.Node]:
    """The calls after `after` up to `end` that depend on a seed or on parameters only (all calls when seeds is
    None). The others in that span (masks, positions) move before the first of them: a contiguous region."""
    first = after.next if after is not None else next(iter(end.graph.nodes))
    span = []
    node = first
    while True:
        span.append(node)
        if node is end:
            break
        node = node.next
    inside: set[fx.Node] = set()
    for n in span:
        inputs = n.all_input_nodes
        # On the stream, or computed from parameters alone (an expert bias's tensor-parallel identity).
        if n.op in _CALLS and _owns_what_it_writes(n, inside) and (
                seeds is None or any(a in seeds or a in inside for a in inputs)
                or all(a.op == "get_attr" or a in inside for a in inputs)):
            inside.add(n)
    for n in reversed(span):  # used by the block alone (keys and values of an encoder's output): recomputed too
        if (n.op in _CALLS and n not in inside and n.users and all(u in inside for u in n.users)
                and _owns_what_it_writes(n, inside)):
            inside.add(n)
    for n in reversed(span):  # read by an in-place op left out (it writes a tensor from before): left out too
        if n in inside and any(u in span and u not in inside for u in n.users):
            inside.discard(n)
    while (write := _write_after_read(span, inside)) is not None:
        # The write moves before the block below, so the block's earlier read would see the written value:
        # the block starts after the write instead.
        for n in span[:span.index(write)]:
            inside.discard(n)
    region = [n for n in span if n in inside]
    if region:
        later = set(span[span.index(region[0]) + 1:])
        for n in span:
            if n in later and n.op in _CALLS and n not in inside:
                for a in n.all_input_nodes:  # a parameter read further down moves up with its user
                    if a in later:
                        later.discard(a)
                        region[0].prepend(a)
                later.discard(n)
                region[0].prepend(n)
    return region


def _owns_what_it_writes(node: fx.Node, inside: set[fx.Node]) -> bool:
    """False for an in-place op that writes a tensor made outside the region (HF T5 fills its shifted labels
    with `fill_` and `masked_fill_`): recomputing it would write that tensor again."""
    return all(w in inside for w in _written(node))


def _written(node: fx.Node) -> list[fx.Node]:
    """The graph values an in-place op writes (none for any other node)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.is_mutable:
        return []
    written = [node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
               for i, arg in enumerate(schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
    return [w for w in written if isinstance(w, fx.Node)]


def _storage(node: fx.Node) -> fx.Node:
    """The node whose tensor `node` is a view of, or that an in-place op returned (itself for any other)."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            break
        node = node.args[0]
    return node


def _write_after_read(span: list[fx.Node], inside: set[fx.Node]) -> fx.Node | None:
    """The last in-place op left out of the region that writes a tensor a region node before it reads (moving
    it before the region would reorder that read and the write), else None."""
    clash, reads = None, set()
    for n in span:
        if n in inside:
            reads.update(_storage(a) for a in n.all_input_nodes)
        elif _written(n) and any(_storage(w) in reads for w in _written(n)):
            clash = n
    return clash


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's inputs that are computed (not parameters or buffers read with get_attr)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _same_numel(a: fx.Node, b: fx.Node) -> bool:
    """Both values are tensors of as many elements: a norm, a dropout, a view (not an embedding lookup)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and known_equal(va.numel(), vb.numel())


def _no_block_error(gm: fx.GraphModule, detail: str) -> NoCheckpointRegionError:
    return NoCheckpointRegionError(
        f"activation_checkpointing='block' cannot split the graph of {_model_name(gm)} into transformer blocks: "
        f"{detail}. "
        f"Name the blocks by module path, e.g. ParallelConfig(activation_checkpointing='block', "
        f"checkpoint_blocks=('layers.*',)), or checkpoint each MoE block with activation_checkpointing='moe'.")


# --- blocks named by module path ------------------------------------------------------------------------


def _named_regions(gm: fx.GraphModule, patterns: tuple[str, ...]) -> dict[str, list[fx.Node]]:
    """One region per module matching a pattern ("*" matches one path component): the calls from the first
    node run inside that module to the last, including the parent's ops between them (residual adds)."""
    calls = [n for n in gm.graph.nodes if n.op in _CALLS]
    paths_of = {n: _stack_paths(n) for n in calls}
    known = set().union(*paths_of.values()) if paths_of else set()
    matched = {p for p in known if any(_path_matches(p, pat) for pat in patterns)}
    blocks = [p for p in matched if not any(p.startswith(q + ".") for q in matched)]
    unused = [pat for pat in patterns if not any(_path_matches(p, pat) for p in known)]
    if unused:
        ffn_parents = sorted({p for n in gm.graph.nodes if FFN_EXIT_META in n.meta
                              for p in _ancestors(n.meta[FFN_EXIT_META])})
        raise NoCheckpointRegionError(
            f"ParallelConfig.checkpoint_blocks={patterns!r}: {unused!r} matches no module run by "
            f"{_model_name(gm)}, so nothing would be recomputed there. Modules that hold an FFN: "
            f"{', '.join(ffn_parents) or '(none)'}. Name each transformer block's module path, '*' for one "
            f"path component (e.g. 'h.*'), or leave checkpoint_blocks empty to find the blocks from the graph.")
    position = {n: i for i, n in enumerate(calls)}
    members = {b: [n for n in calls if b in paths_of[n]] for b in blocks}
    regions: dict[str, list[fx.Node]] = {}
    taken: dict[fx.Node, str] = {}
    for block in sorted(blocks, key=lambda b: position[members[b][0]]):  # graph order, not "h.10" < "h.2"
        span = calls[position[members[block][0]]:position[members[block][-1]] + 1]
        clash = next((taken[n] for n in span if n in taken), None)
        if clash is not None:
            raise NoCheckpointRegionError(
                f"ParallelConfig.checkpoint_blocks={patterns!r}: the blocks {clash!r} and {block!r} of "
                f"{_model_name(gm)} interleave in the graph, so they cannot be recomputed one after the other; "
                f"name modules that run one after another.")
        writes = [n for n in span if not _owns_what_it_writes(n, set(span))]
        if writes:
            raise NoCheckpointRegionError(
                f"ParallelConfig.checkpoint_blocks={patterns!r}: block {block!r} of {_model_name(gm)} writes in "
                f"place a tensor made outside it ({', '.join(f'{n.target} at {_module_path(n)}' for n in writes)}), "
                f"which recomputing the block would write a second time. Write it out of place, or leave "
                f"checkpoint_blocks empty to find the blocks from the graph (they leave such writes out).")
        taken.update(dict.fromkeys(span, block))
        regions[f"block:{block}"] = span
    return regions


def _stack_paths(node: fx.Node) -> set[str]:
    """Every module a node runs inside, with the parents of each (a ModuleDict's block is never called itself)."""
    return {a for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path for a in _ancestors(path)}


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _path_matches(path: str, pattern: str) -> bool:
    parts, pats = path.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pats))


_EXPERT_ALL_TO_ALLS = (collectives.all_to_all, collectives.all_to_all_packed, collectives.exchange_loads,
                       collectives.all_to_all_start, collectives.all_to_all_wait)
"""The collectives CAC keeps out of checkpointed regions (the packed layout's load exchange with its rows)."""


@requires("activation_checkpoint", "shard_experts")
def cache_all_to_all_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """CAC: keep the expert all-to-alls out of checkpointed regions, so recomputation reuses their outputs."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _EXPERT_ALL_TO_ALLS:
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
