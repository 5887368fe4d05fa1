"""chunk_all_to_all: overlap the expert all-to-alls with expert compute (docs/parallelism.md, "Overlap").

With `ParallelConfig.a2a_chunks = n > 1`, for every MoE block on a mesh with X > 1:

1. dispatch pads the capacity C to a multiple of n (of n * T under DTD);
2. the path from the dispatch buffer to the combine (DTD's slice and gathers,
   the all-to-alls, experts_in/out, the expert projections and their
   tensor-parallel collectives, the bias) is copied once per chunk of the
   capacity dim; every op on it treats capacity slots independently, so the
   chunks' results, concatenated, are the unchunked block's;
3. each all-to-all becomes `all_to_all_start` ... `all_to_all_wait`, in this
   order:

       start(in_0), ..., start(in_n-1)
       for i: wait(in_i), experts(i), start(out_i)
       for i: wait(out_i)
       concatenate the chunks -> combine

   so the exchange of chunk i + 1 runs while the experts compute chunk i. In
   the backward the wait's reverse exchange starts at once and the start's
   backward waits for it, so chunk i's expert backward overlaps with the
   exchanges of the others.

The bytes and the all-to-all count per chunk add up to the unchunked block's
(n times the calls, 1/n of the bytes each). Dropless blocks in the packed
layout have no capacity dim to split: the pass refuses them, naming the block.
"""

from __future__ import annotations

import torch.fx as fx

from .. import collectives
from ..moe import ops
from .context import PassContext
from .graph import Axis, Role, insert, moe_blocks
from .runner import requires

__all__ = ["chunk_all_to_all_pass"]


@requires("shard_experts")
def chunk_all_to_all_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Split every MoE block's expert path into `ctx.parallel.a2a_chunks` pipelined chunks."""
    n, X = ctx.parallel.chunks, ctx.parallel.expert
    if n == 1 or X == 1:
        raise RuntimeError(f"chunk_all_to_all needs a2a_chunks > 1 and X > 1, got a2a_chunks={n}, X={X}: there "
                           f"is no all-to-all to overlap (tedfx.pipeline leaves this pass out there).")
    for path, roles in moe_blocks(gm.graph).items():
        if Role.LOADS in roles:
            raise ValueError(
                f"ParallelConfig.a2a_chunks={n}: the MoE block {path or '<root>'} routes dropless in the packed "
                f"layout, which has no capacity dim to split into chunks (docs/moe.md, \"Dropless: the packed "
                f"layout\"). Use a2a_chunks=1, or capacity-bound routing (MoEConfig.drop_tokens=True).")
        _chunk_block(gm.graph, roles, n)
    gm.graph.eliminate_dead_code()
    return gm


def _chunk_block(graph: fx.Graph, roles: dict[str, fx.Node], n: int) -> None:
    dispatch, combine = roles[Role.DISPATCH], roles[Role.COMBINE]
    a2a_in, a2a_out = roles[Role.A2A_DISPATCH], roles[Role.A2A_COMBINE]
    path = _data_path(dispatch, combine)
    before, middle, after = _split_at(path, a2a_in, a2a_out)

    dispatch.kwargs = {**dispatch.kwargs, "pad_multiple": dispatch.kwargs.get("pad_multiple", 1) * n}
    # What the path reads besides the buffer (expert weights, the bias's gradient all-reduce) moves up, in
    # order, so that every chunk's copy comes after it.
    cursor = dispatch
    for node in _between(dispatch, combine):
        if node not in path:
            cursor.append(node)
            cursor = node

    def emit(target, args, like: fx.Node, role: Role) -> fx.Node:
        nonlocal cursor
        cursor = insert(cursor, target, args, like=like, role=role)
        return cursor

    def copy(node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        nonlocal cursor
        with graph.inserting_after(cursor):
            cursor = graph.node_copy(node, lambda a: env.get(a, a))
        env[node] = cursor
        return cursor

    envs: list[dict[fx.Node, fx.Node]] = []
    starts_in = []
    for i in range(n):
        env = {dispatch: emit(ops.capacity_chunk, (dispatch, i, n), dispatch, Role.A2A_CHUNK)}
        for node in before:
            copy(node, env)
        starts_in.append(emit(collectives.all_to_all_start, (env.get(a2a_in.args[0], a2a_in.args[0]), Axis.EP),
                              a2a_in, Role.A2A_DISPATCH))
        envs.append(env)
    starts_out = []
    for env, start in zip(envs, starts_in):
        env[a2a_in] = emit(collectives.all_to_all_wait, (start,), a2a_in, Role.A2A_DISPATCH_WAIT)
        for node in middle:
            copy(node, env)
        starts_out.append(emit(collectives.all_to_all_start, (env[a2a_out.args[0]], Axis.EP), a2a_out,
                               Role.A2A_COMBINE))
    outputs = []
    for env, start in zip(envs, starts_out):
        env[a2a_out] = emit(collectives.all_to_all_wait, (start,), a2a_out, Role.A2A_COMBINE_WAIT)
        for node in after:
            copy(node, env)
        outputs.append(env[combine.args[0]])
    joined = emit(ops.capacity_cat, (outputs,), combine, Role.A2A_CHUNK)
    combine.replace_input_with(combine.args[0], joined)
    for node in reversed(path):
        graph.erase_node(node)


def _between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    nodes, node = [], first.next
    while node is not last:
        nodes.append(node)
        node = node.next
    return nodes


def _data_path(dispatch: fx.Node, combine: fx.Node) -> list[fx.Node]:
    """The nodes from the dispatch buffer to the combine's input, in graph order (both ends excluded)."""
    reached = {dispatch}
    path = []
    for node in _between(dispatch, combine):
        if any(a in reached for a in node.all_input_nodes):
            reached.add(node)
            path.append(node)
    inside = set(path) | {combine}
    for node in path:
        leaks = [u for u in node.users if u not in inside]
        if leaks:
            raise RuntimeError(f"chunk_all_to_all: {node.name} on the expert path of the MoE block feeds "
                               f"{leaks[0].name} outside it; the block cannot be split into chunks.")
    if combine.args[0] not in reached:
        raise RuntimeError(f"chunk_all_to_all: {combine.name} does not read the expert path of its block.")
    return path


def _split_at(path: list[fx.Node], a2a_in: fx.Node, a2a_out: fx.Node) -> tuple[list, list, list]:
    """(before the dispatch all-to-all, between the two, after the combine all-to-all)."""
    if a2a_in.target is not collectives.all_to_all or a2a_out.target is not collectives.all_to_all:
        raise RuntimeError(f"chunk_all_to_all: expected the block's all-to-alls, found {a2a_in.target} and "
                           f"{a2a_out.target}.")
    i, j = path.index(a2a_in), path.index(a2a_out)
    return path[:i], path[i + 1:j], path[j + 1:]
