"""drop_duplicate_tokens: DeepSpeed-TED's duplicate token dropping (DESIGN §2, DTD).

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
from .ffn_to_moe import MOE_META, moe_blocks
from .runner import PassContext

__all__ = ["drop_duplicate_tokens_pass"]

CAPACITY_DIM = 1  # of the [E, C, H] buffers around the all-to-alls


def drop_duplicate_tokens_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Rewrite every baseline TED MoE block into its DTD form (no-op unless T > 1, X > 1 and ctx.parallel.dtd)."""
    T, X = ctx.parallel.tensor, ctx.parallel.expert
    if not ctx.parallel.dtd or T == 1 or X == 1:
        return gm
    for roles in moe_blocks(gm.graph).values():
        _rewrite(gm.graph, roles, T)
    return gm


def _rewrite(graph: fx.Graph, roles: dict[str, fx.Node], T: int) -> None:
    dispatch, a2a_in, a2a_out = roles["dispatch"], roles["a2a_dispatch"], roles["a2a_combine"]
    f, reduce, experts_out = roles["tp_f"], roles["tp_reduce"], roles["experts_out"]

    def emit(before_or_after: str, anchor: fx.Node, target, args, role: str) -> fx.Node:
        ctx_mgr = graph.inserting_before(anchor) if before_or_after == "before" else graph.inserting_after(anchor)
        with ctx_mgr:
            node = graph.call_function(target, tuple(args))
        node.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack", {}))
        node.meta[MOE_META] = {**anchor.meta[MOE_META], "role": role}
        return node

    # 1. Capacity padded to a multiple of T.
    dispatch.kwargs = {**dispatch.kwargs, "pad_multiple": T}
    # 2-3. Slice before the dispatch all-to-all, gather after; f is no longer needed.
    sliced = emit("before", a2a_in, collectives.slice_for_rank, [dispatch, "tp", CAPACITY_DIM], "dtd_slice")
    a2a_in.replace_input_with(dispatch, sliced)
    gathered = emit("after", a2a_in, collectives.all_gather, [a2a_in, "tp", CAPACITY_DIM], "dtd_gather")
    for user in list(a2a_in.users):
        if user is not gathered:
            user.replace_input_with(a2a_in, gathered)
    f.replace_all_uses_with(f.args[0])
    graph.erase_node(f)
    # 4. FC2's all-reduce -> reduce-scatter of the capacity dim, after the return to source-major order.
    reduce.replace_all_uses_with(reduce.args[0])
    graph.erase_node(reduce)
    scattered = emit("after", experts_out, collectives.reduce_scatter, [experts_out, "tp", CAPACITY_DIM],
                     "dtd_reduce_scatter")
    for user in list(experts_out.users):
        if user is not scattered:
            user.replace_input_with(experts_out, scattered)
    # Its bias now sees one capacity slice per tensor rank: sum the bias gradient over "tp".
    bias = roles.get("expert_bias")
    if bias is not None:
        b2 = bias.args[1]
        whole = emit("before", bias, collectives.identity_fwd_all_reduce_bwd, [b2, "tp"], "dtd_bias_grad")
        bias.replace_input_with(b2, whole)
    # 5. Gather the returned slices for the replicated combine.
    back = emit("after", a2a_out, collectives.gather_replicated, [a2a_out, "tp", CAPACITY_DIM], "dtd_gather_out")
    for user in list(a2a_out.users):
        if user is not back:
            user.replace_input_with(a2a_out, back)
