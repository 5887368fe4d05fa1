"""shard_experts: expert parallelism over "ep", each expert tensor-sliced over "tp" (docs/parallelism.md).

For every MoE block, for the rank at (x, t):
1. Keep E/X experts (block x of the expert dim) and, of each, its 1/T slice
   of F: w1/w3 [E/X, H, F/T], b1/b3 [E/X, F/T], w2 [E/X, F/T, H]; b2 [E/X, H]
   stays whole and is added after the tensor-parallel sum.
2. Rewrite the block into the baseline TED layer:
       dispatch -> all_to_all(ep) -> experts_in -> f(tp) -> expert_fc1 -> expert_fc2
       -> all_reduce(tp) -> experts_out -> expert_bias -> all_to_all(ep) -> combine
   where f is identity forward / all-reduce backward (fc1 is column-parallel).
   Collectives on an axis of size 1 are not emitted.

Dropless blocks use the packed layout (docs/moe.md, "Dropless: the packed
layout"): first an int all-to-all tells each rank how many rows it receives
per local expert (exchange_loads), then the all-to-alls move exactly those
rows (all_to_all_packed), and experts_in/out reorder them by a rank's loads.
Where DTD will split the capacity dim (T > 1, X > 1, dtd), a dropless block
keeps capacity slots instead: the expert group agrees on its largest
capacity (one int max-all-reduce), so every rank exchanges buffers of one size.

The inserted nodes carry their `Role` (graph.MOE_META) so that
drop_duplicate_tokens and cache_all_to_all can find them.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .. import collectives
from ..moe import ops
from ..moe.experts import EXPERT_TENSORS, ExpertWeights
from ..sharding import ParamShard, shard_tensor
from .context import PassContext
from .graph import Axis, Role, get_by_target, insert, moe_blocks, set_by_target
from .runner import requires

__all__ = ["dtd_applies", "expert_splits", "shard_experts_pass"]

# (axis, dim) splits of each stacked expert tensor, before dropping size-1 axes.
_SPLITS = {
    "w1": (("ep", 0), ("tp", 2)), "b1": (("ep", 0), ("tp", 1)),
    "w3": (("ep", 0), ("tp", 2)), "b3": (("ep", 0), ("tp", 1)),
    "w2": (("ep", 0), ("tp", 1)), "b2": (("ep", 0),),
}


def expert_splits(name: str, sizes: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """The splits of expert tensor `name` ("w1", ...) on a mesh with these axis sizes."""
    return tuple((axis, dim) for axis, dim in _SPLITS[name] if sizes[axis] > 1)


@requires("ffn_to_moe")
def shard_experts_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Shard every MoE block's experts for the rank at ctx.coords."""
    T, X = ctx.parallel.tensor, ctx.parallel.expert
    E = ctx.moe.num_experts
    if E % X:
        raise ValueError(f"MoEConfig.num_experts={E} is not divisible by ParallelConfig.expert={X}; "
                         f"each expert-parallel rank must hold the same number of experts.")
    sizes = {"ep": X, "tp": T}
    coords = {"ep": ctx.coords.get("ep", 0), "tp": ctx.coords.get("tp", 0)}
    for roles in moe_blocks(gm.graph).values():
        owner = None
        for name in EXPERT_TENSORS:
            if name in roles:
                target = roles[name].target
                owner = gm.get_submodule(target.rpartition(".")[0])
                ctx.records.shards[target] = _slice_expert_param(gm, owner, target, name, sizes, coords,
                                                                 materialize=ctx.materialize)
        if owner is not None:
            owner.init = None  # every tensor is this rank's own now: drop the recipe (it reads the dense model)
        if Role.LOADS in roles and dtd_applies(ctx.parallel):
            _unpack(gm.graph, roles)
        if Role.LOADS in roles:
            _rewrite_packed_block(roles, T, X)
        else:
            _rewrite_block(gm, roles, T, X, ctx.moe.drop_tokens)
    return gm


def dtd_applies(parallel) -> bool:
    """Whether drop_duplicate_tokens runs for this layout (tedfx.pipeline.parallel_passes asks the same)."""
    return parallel.dtd is True and parallel.tensor > 1 and parallel.expert > 1


def _unpack(graph: fx.Graph, roles: dict[str, fx.Node]) -> None:
    """A dropless block back to capacity slots (C = the largest load), which DTD splits."""
    for node in roles.values():
        if "loads" in node.kwargs:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "loads"}
    graph.erase_node(roles.pop(Role.LOADS))


def _rewrite_packed_block(roles: dict[str, fx.Node], T: int, X: int) -> None:
    """The baseline TED layer on the packed layout: the rows move in blocks of the sizes the loads give."""
    dispatch, fc1, fc2, loads = roles[Role.DISPATCH], roles[Role.EXPERT_FC1], roles[Role.EXPERT_FC2], roles[Role.LOADS]
    bias = roles.get(Role.EXPERT_BIAS)
    x, local = dispatch, loads
    if X > 1:
        recv = insert(dispatch, collectives.exchange_loads, (loads, Axis.EP), role=Role.EXCHANGE_LOADS)
        x = insert(recv, collectives.all_to_all_packed, (dispatch, Axis.EP, loads, recv), role=Role.A2A_DISPATCH)
        x = insert(x, ops.experts_in, (x, X), {"loads": recv}, role=Role.EXPERTS_IN)
        local = insert(x, ops.local_loads, (recv,), role=Role.LOCAL_LOADS)
        for node in (fc1, fc2):
            node.kwargs = {**node.kwargs, "loads": local}
    if T > 1:
        x = insert(local if X > 1 else x, collectives.identity_fwd_all_reduce_bwd, (x, Axis.TP), role=Role.TP_F)
    fc1.replace_input_with(dispatch, x)

    y = fc2
    if T > 1:
        y = insert(y, collectives.all_reduce, (y, Axis.TP), role=Role.TP_REDUCE)
    if X > 1:
        y = insert(y, ops.experts_out, (y, X), {"loads": recv}, role=Role.EXPERTS_OUT)
    if bias is not None:
        bias.replace_input_with(fc2, y)
        if X > 1:
            bias.kwargs = {**bias.kwargs, "loads": recv}  # rows in (source, expert) blocks
        y = bias
    if X > 1:
        y = insert(y, collectives.all_to_all_packed, (y, Axis.EP, recv, loads), role=Role.A2A_COMBINE)
    combine = roles[Role.COMBINE]
    combine.replace_input_with(combine.args[0], y)


def _slice_expert_param(gm, owner: ExpertWeights, target, name, sizes, coords, *, materialize: bool) -> ParamShard:
    full = get_by_target(gm, target)
    F_dim = dict(_SPLITS[name]).get("tp")
    if F_dim is not None and full.shape[F_dim] % sizes["tp"]:
        raise ValueError(f"{target}: FFN width {full.shape[F_dim]} is not divisible by ParallelConfig.tensor="
                         f"{sizes['tp']}; choose T dividing the FFN width.")
    spec = ParamShard(target, expert_splits(name, sizes), None, tuple(full.shape))
    if not materialize:
        local = torch.empty(spec.local_shape(sizes), dtype=full.dtype, device="meta")  # the shard's shape only
    elif full.is_meta:
        # Materialise only this rank's experts, each only its 1/T of F, from the block's recipe.
        local_shape = spec.local_shape(sizes)
        E_local = local_shape[0]
        first = coords["ep"] * E_local if ("ep", 0) in spec.splits else 0
        slices = {}
        if ("tp", F_dim) in spec.splits:
            width = local_shape[F_dim]
            slices[F_dim] = (coords["tp"] * width, (coords["tp"] + 1) * width)
        local = owner.init.materialize(name, range(first, first + E_local), slices)
    else:
        local = shard_tensor(full.detach(), spec, coords, sizes)
    set_by_target(gm, target, nn.Parameter(local, requires_grad=full.requires_grad))
    return spec


def _rewrite_block(gm: fx.GraphModule, roles: dict[str, fx.Node], T: int, X: int, drop_tokens: bool) -> None:
    dispatch, fc1, fc2, combine = roles[Role.DISPATCH], roles[Role.EXPERT_FC1], roles[Role.EXPERT_FC2], \
        roles[Role.COMBINE]

    # Dropless capacities follow each token group's largest load: the expert group agrees on the largest.
    if X > 1 and not drop_tokens:
        capacity = dispatch.args[3]
        agreed = insert(dispatch, collectives.agree_max, (capacity, Axis.EP), before=True, role=Role.AGREE_CAPACITY)
        dispatch.replace_input_with(capacity, agreed)

    # Into the experts: dispatch -> all_to_all(ep) -> experts_in -> f(tp) -> fc1.
    x = dispatch
    if X > 1:
        x = insert(x, collectives.all_to_all, (x, Axis.EP), role=Role.A2A_DISPATCH)
        x = insert(x, ops.experts_in, (x, X), role=Role.EXPERTS_IN)
    if T > 1:
        x = insert(x, collectives.identity_fwd_all_reduce_bwd, (x, Axis.TP), role=Role.TP_F)
    fc1.replace_input_with(dispatch, x)

    # Out of the experts: fc2 -> all_reduce(tp) -> experts_out -> bias -> all_to_all(ep) -> combine.
    bias = roles.get(Role.EXPERT_BIAS)
    y = fc2
    if T > 1:
        y = insert(y, collectives.all_reduce, (y, Axis.TP), role=Role.TP_REDUCE)
    if X > 1:
        y = insert(y, ops.experts_out, (y, X), role=Role.EXPERTS_OUT)
    if bias is not None:
        # The bias sits right after fc2, so it follows every node inserted above: read the reduced output.
        bias.replace_input_with(fc2, y)
        y = bias
    if X > 1:
        y = insert(y, collectives.all_to_all, (y, Axis.EP), role=Role.A2A_COMBINE)
    combine.replace_input_with(combine.args[0], y)
