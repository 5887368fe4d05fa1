"""drop_duplicate_tokens: DeepSpeed-TED's duplicate token dropping (docs/parallelism.md, "DTD").

The T tensor ranks of a token group hold the same dispatch buffer, so in the
baseline each of them sends the same tokens through the expert all-to-all.
For every MoE block, on a mesh with T > 1 and X > 1:

1. dispatch pads the capacity C to a multiple of T;
2. before the dispatch all-to-all, each tensor rank keeps its 1/T slice of
   the capacity dim (no communication);
3. after it, an all-gather over "tp" restores the whole buffer for the
   column-parallel expert FC1 (so FC1's input gradient is summed by the
   gather's backward reduce-scatter, and Megatron's f is dropped);
4. FC2's all-reduce over "tp" becomes a reduce-scatter of the capacity dim,
   so each tensor rank sends back only its slice (FC2's bias, added to that
   slice, gets its gradient summed over "tp");
5. after the combine all-to-all, an all-gather over "tp" restores the
   buffer for the replicated combine (its backward takes the slice: every
   tensor rank already holds the whole gradient).

All-to-all bytes per rank fall by exactly T (C already a multiple of T).
"""

from __future__ import annotations

import torch.fx as fx

from .. import collectives
from .context import PassContext
from .graph import Axis, Role, insert, moe_blocks
from .runner import requires

__all__ = ["drop_duplicate_tokens_pass"]

CAPACITY_DIM = 1  # of the [E, C, H] buffers around the all-to-alls


@requires("shard_experts")
def drop_duplicate_tokens_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Rewrite every baseline TED MoE block into its DTD form (the pipeline runs it when T > 1 and X > 1)."""
    T, X = ctx.parallel.tensor, ctx.parallel.expert
    if T == 1 or X == 1:
        raise RuntimeError(f"duplicate token dropping needs T > 1 and X > 1, got T={T}, X={X}: there is no "
                           f"duplicate to drop (tedfx.pipeline leaves this pass out there).")
    for roles in moe_blocks(gm.graph).values():
        _rewrite(gm.graph, roles, T)
    return gm


def _rewrite(graph: fx.Graph, roles: dict[str, fx.Node], T: int) -> None:
    dispatch, a2a_in, a2a_out = roles[Role.DISPATCH], roles[Role.A2A_DISPATCH], roles[Role.A2A_COMBINE]
    f, reduce, experts_out = roles[Role.TP_F], roles[Role.TP_REDUCE], roles[Role.EXPERTS_OUT]

    # 1. Capacity padded to a multiple of T.
    dispatch.kwargs = {**dispatch.kwargs, "pad_multiple": T}
    # 2-3. Slice before the dispatch all-to-all, gather after; f is no longer needed.
    sliced = insert(a2a_in, collectives.slice_for_rank, (dispatch, Axis.TP, CAPACITY_DIM), before=True,
                    role=Role.DTD_SLICE)
    a2a_in.replace_input_with(dispatch, sliced)
    gathered = insert(a2a_in, collectives.all_gather, (a2a_in, Axis.TP, CAPACITY_DIM), role=Role.DTD_GATHER)
    _redirect(a2a_in, gathered)
    f.replace_all_uses_with(f.args[0])
    graph.erase_node(f)
    # 4. FC2's all-reduce -> reduce-scatter of the capacity dim, after the return to source-major order.
    reduce.replace_all_uses_with(reduce.args[0])
    graph.erase_node(reduce)
    scattered = insert(experts_out, collectives.reduce_scatter, (experts_out, Axis.TP, CAPACITY_DIM),
                       role=Role.DTD_REDUCE_SCATTER)
    _redirect(experts_out, scattered)
    # Its bias now sees one capacity slice per tensor rank: sum the bias gradient over "tp".
    bias = roles.get(Role.EXPERT_BIAS)
    if bias is not None:
        b2 = bias.args[1]
        whole = insert(bias, collectives.identity_fwd_all_reduce_bwd, (b2, Axis.TP), before=True,
                       role=Role.DTD_BIAS_GRAD)
        bias.replace_input_with(b2, whole)
    # 5. Gather the returned slices for the replicated combine.
    back = insert(a2a_out, collectives.gather_replicated, (a2a_out, Axis.TP, CAPACITY_DIM), role=Role.DTD_GATHER_OUT)
    _redirect(a2a_out, back)


def _redirect(node: fx.Node, replacement: fx.Node) -> None:
    """Every user of `node` but `replacement` reads `replacement` instead."""
    for user in list(node.users):
        if user is not replacement:
            user.replace_input_with(node, replacement)
