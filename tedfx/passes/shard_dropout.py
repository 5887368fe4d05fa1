"""shard_dropout: a dropout mask per shard on activations split over the mesh (docs/parallelism.md, "Dropout").

Runs after the sharding passes, which know what is split:
- shard_tensor_parallel names the dropouts and attentions whose activation it split
  over "tp" (ctx.records.tp_sharded_dropouts): a column-parallel output, local heads;
- every MoE block's expert dropout (Role.EXPERT_DROPOUT) acts on the rank's
  [E/X, C, F/T] buffer: split over "ep" (other experts) and "tp" (other F columns).

For each of those with p > 0, in order:
1. Swap `aten.dropout` for `tedfx.rng.sharded_dropout` and
   `aten.scaled_dot_product_attention` for `tedfx.rng.sharded_attention`, passing the
   axes that split the activation. The arguments stay where they were, so
   TedGraphModule.train/eval still switches them.
2. Record it in ctx.records.sharded_dropouts.

Every other dropout acts on a replicated activation and keeps `aten.dropout`: the
tensor ranks share the default generator's state, so they draw the same mask.
"""

from __future__ import annotations

import torch.fx as fx

from .. import _compat, rng
from .context import PassContext
from .graph import DROPOUT_P_META, MOE_META, Axis, Role
from .runner import requires

__all__ = ["shard_dropout_pass"]


@requires("shard_experts")
def shard_dropout_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Give every dropout on an activation split over "tp" or "ep" a mask of its own per shard."""
    T, X = ctx.parallel.tensor, ctx.parallel.expert
    tp_split = set(ctx.records.tp_sharded_dropouts)
    expert_axes = tuple(str(axis) for axis, size in ((Axis.EP, X), (Axis.TP, T)) if size > 1)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        tag = node.meta.get(MOE_META)
        if tag is not None and tag.role == Role.EXPERT_DROPOUT:
            axes = expert_axes
        elif node.name in tp_split:
            axes = (str(Axis.TP),)
        else:
            continue
        if not axes or _dropout_p(node) == 0:
            continue
        # 1.
        if node.target in _compat.dropout_targets:
            if node.target is not _compat.dropout_targets[0]:
                raise ValueError(f"{node.name}: {node.target} on an activation split over {axes} has no per-shard "
                                 f"form; use nn.Dropout there, or ParallelConfig(tensor=1).")
            node.target = rng.sharded_dropout
        elif node.target is _compat.sdpa_target:
            node.target = rng.sharded_attention
        else:
            raise RuntimeError(f"{node.name}: shard_dropout was told it drops out, but it calls {node.target}")
        node.kwargs = {**node.kwargs, "axes": axes}
        # 2.
        ctx.records.sharded_dropouts.append(f"{node.name} ({', '.join(axes)})")
    return gm


def _dropout_p(node: fx.Node) -> float:
    """The dropout probability of a dropout or attention node, as captured in train mode."""
    if node.target is _compat.sdpa_target:
        now = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return float(node.meta.get(DROPOUT_P_META, now))
    return float(node.args[1])
