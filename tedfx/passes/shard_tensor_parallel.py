"""shard_tensor_parallel: Megatron tensor parallelism on the non-expert graph (docs/parallelism.md).

The placement of every activation comes from `tp_plan.plan_tensor_parallel`
(with the rule table of `tp_rules`); `tp_plan.check_nothing_left_whole` raises
when the plan would leave an attention or dense-FFN projection whole. This pass rewrites the graph from that
plan, for the rank at ctx.coords["tp"]:

1. Slice the weights of column-parallel linears on their output features (per
   chunk for fused projections that are split afterwards, such as GPT-2's
   c_attn), and of row-parallel linears on their input features.
2. Put Megatron's f (identity forward, all-reduce backward) before every
   column-parallel input, and an all-reduce after every row-parallel output,
   with the bias added after the reduction; f also before a replicated operand
   that requires grad and is broadcast into sharded work (Qwen3's per-head q/k
   norm weight), whose gradient each rank holds only its heads' share of; an
   all-reduce (and / T for a mean) after a mean or sum over the sharded dim
   (OLMo2's q/k norm across all heads).
3. Divide the shape constants of view/reshape/expand/split on sharded dims by T,
   and the bounds of slices that cut a fused projection into chunks; a
   metadata check of a sharded tensor checks this rank's size, not strides.
4. Narrow replicated operands of sharded work to this rank's share: k/v (GQA whose KV
   heads do not divide by T), a per-head bias computed whole (T5), a norm weight
   over all heads (OLMo2).
5. Record the dropouts and attentions whose activation is now split (shard_dropout
   gives them a mask per shard).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .. import _compat, collectives
from ..sharding import ParamShard, shard_tensor
from .context import PassContext
from .graph import FFN_EXIT_META, Axis, as_linear, get_by_target, insert, set_by_target
from .runner import requires
from .tp_plan import check_nothing_left_whole, kept_whole_by_config, plan_tensor_parallel
from .tp_rules import Plan

__all__ = ["shard_tensor_parallel_pass"]

aten = torch.ops.aten
_MAX_END = 2**62
"""Slice ends at or above this mean "to the end" (export writes sys.maxsize)."""


@requires("ffn_to_moe")
def shard_tensor_parallel_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Shard the non-expert graph over "tp" for the rank at ctx.coords["tp"] (T = ctx.parallel.tensor > 1)."""
    T, t = ctx.parallel.tensor, ctx.coords["tp"]
    records = ctx.records
    kept_whole = kept_whole_by_config(gm, ctx.parallel.replicate)
    plan, records.tp_notes = plan_tensor_parallel(gm, T, keep_whole=kept_whole)
    records.tp_notes += check_nothing_left_whole(gm, plan, T, allowed=kept_whole)
    # 5. Named before the rewrite; the rewrite keeps these nodes and their names.
    random_ops = (*_compat.dropout_targets, _compat.sdpa_target)
    records.tp_sharded_dropouts = [n.name for n, p in plan.place.items()
                                   if p.kind == "S" and n.op == "call_function" and n.target in random_ops]

    def slice_param(target: str, dim: int, chunks: tuple[int, ...] | None) -> None:
        full = get_by_target(gm, target)
        if any(c % T for c in (chunks or (full.shape[dim],))):
            raise ValueError(f"tensor parallelism with ParallelConfig.tensor={T} cannot split {target} of shape "
                             f"{tuple(full.shape)} along dim {dim}{f' in chunks {chunks}' if chunks else ''}: not "
                             f"divisible by {T}. Choose a tensor degree that divides the FFN width and the heads.")
        spec = ParamShard(target, ((Axis.TP.value, dim),), chunks, tuple(full.shape))
        source = full.detach() if ctx.materialize else full.detach().to("meta")  # meta: the shard's shape only
        local = shard_tensor(source, spec, {"tp": t}, {"tp": T})
        set_by_target(gm, target, nn.Parameter(local, requires_grad=full.requires_grad))
        records.shards[target] = spec

    # 1-2. Column-parallel: slice the output features, Megatron's f before the input (once per input).
    f_inputs: dict[fx.Node, fx.Node] = {}
    for node in plan.column:
        lin = as_linear(node)
        chunks = plan.chunks.get(node)
        slice_param(lin.weight.target, 1 if lin.transposed else 0, chunks)
        if lin.bias is not None:
            slice_param(lin.bias.target, 0, chunks)
        if lin.x not in f_inputs:
            f_inputs[lin.x] = insert(lin.x, collectives.identity_fwd_all_reduce_bwd, (lin.x, Axis.TP), like=node)
        node.replace_input_with(lin.x, f_inputs[lin.x])
        records.tp_column.append(lin.weight.target)

    # 1-2. Row-parallel: slice the input features, all-reduce the partial sums, then add the bias.
    for node in plan.row:
        lin = as_linear(node)
        slice_param(lin.weight.target, 0 if lin.transposed else 1, None)
        product = aten.linear.default if not lin.transposed else \
            node.target if node.target in (aten.mm.default, aten.matmul.default) else aten.mm.default
        partial = insert(node, product, (lin.x, lin.weight))
        out = reduced = insert(partial, collectives.all_reduce, (partial, Axis.TP), like=node)
        if lin.bias is not None:
            out = insert(reduced, aten.add.Tensor, (reduced, lin.bias), like=node)
        for n in (partial, reduced, out):
            if "val" in node.meta:
                n.meta["val"] = node.meta["val"]
        if FFN_EXIT_META in node.meta:  # a dense FFN's exit: its value now leaves through `out`
            out.meta[FFN_EXIT_META] = node.meta[FFN_EXIT_META]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        records.tp_row.append(lin.weight.target)

    # 3-4.
    for node, (pos, dim) in plan.shape_edits.items():
        _edit_shape(node, pos, dim, T)
    for node, divisor in plan.partial_sums.items():  # a mean or sum over the sharded dim: of every rank's share
        reduced = insert(node, collectives.all_reduce, (node, Axis.TP))
        out = reduced if divisor == 1 else insert(reduced, aten.div.Tensor, (reduced, divisor), like=node)
        for n in (reduced, out):
            n.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not reduced)
    for node, i in plan.grad_sums:  # a replicated operand of sharded work: its gradient summed over "tp"
        operand = node.args[i]
        if operand not in f_inputs:
            f_inputs[operand] = insert(operand, collectives.identity_fwd_all_reduce_bwd, (operand, Axis.TP), like=node)
        node.args = (*node.args[:i], f_inputs[operand], *node.args[i + 1:])
    for node, dim in plan.asserts.items():  # checks of a sharded tensor: this rank's size, no strides
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("size")
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "stride")}
        node.args = (node.args[0], size, None, *node.args[3:])
        if size is not None:
            _edit_shape(node, 1, dim, T)
    for node in plan.slices:  # each slice is one chunk: [start, end) of the full features -> of the local ones
        node.args = (*node.args[:2], *(b // T if isinstance(b, int) and b < _MAX_END else b for b in node.args[2:4]),
                     *node.args[4:])
    for node, i, dim in plan.narrow:
        operand = node.args[i]
        chunks = _fused_chunks(plan, node, operand, dim)
        if chunks is None:
            local = insert(node, collectives.slice_for_rank, (operand, Axis.TP, dim), before=True)
        else:  # the operand spans a fused projection's features: this rank's share of each chunk, as its weight
            parts = insert(node, aten.split_with_sizes.default, (operand, list(chunks), dim), before=True)
            shares = [insert(node, collectives.slice_for_rank,
                             (insert(node, operator.getitem, (parts, j), before=True), Axis.TP, dim), before=True)
                      for j in range(len(chunks))]
            local = insert(node, aten.cat.default, (shares, dim), before=True)
        node.args = (*node.args[:i], local, *node.args[i + 1:])
        records.tp_notes.append(f"{node.name}: replicated operand {i} narrowed to this rank's share"
                                + (f" of each of the chunks {chunks}" if chunks else ""))
    return gm


def _fused_chunks(plan: Plan, node: fx.Node, operand: fx.Node, dim: int) -> tuple[int, ...] | None:
    """The chunks of the fused projection whose whole output features `operand` lines up with (a bias added
    to q | k | v before they are split), else None: a contiguous share is then this rank's."""
    seeds = plan.place[node].seeds if node in plan.place else frozenset()
    patterns = {plan.chunks[s] for s in seeds if s in plan.chunks and len(plan.chunks[s]) > 1}
    size = operand.meta["val"].shape[dim] if isinstance(operand.meta.get("val"), torch.Tensor) else None
    matching = {c for c in patterns if sum(c) == size}
    if len(matching) > 1:
        raise ValueError(f"tensor parallelism cannot narrow {operand.name} (at {node.name}): it lines up with "
                         f"fused projections split in different chunks {sorted(matching)}. Keep them whole with "
                         f"ParallelConfig.replicate.")
    return matching.pop() if matching else None


def _edit_shape(node: fx.Node, pos: int, dim: int, T: int) -> None:
    """Divide a shape constant (view/reshape/expand size, split sizes) by T.

    A symbolic size is an fx node computed from the inputs' sizes (export derives every size from
    them), which are the same on every rank: a floordiv node divides it.
    """
    arg = node.args[pos]
    if isinstance(arg, int):  # split(x, size)
        new = arg // T
    else:
        new = list(arg)
        if dim == -1:  # split_with_sizes / split with a list
            new = [s // T for s in new]
        elif isinstance(new[dim], int) and new[dim] != -1:
            new[dim] //= T
        elif isinstance(new[dim], fx.Node):
            new[dim] = insert(node, operator.floordiv, (new[dim], T), before=True)
        elif new[dim] != -1:
            raise RuntimeError(f"{node.name}: cannot divide size {new[dim]} by T={T}")
    node.args = (*node.args[:pos], new, *node.args[pos + 1:])
