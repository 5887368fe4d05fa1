"""Predict a rank's sharding and communication without starting processes.

For one rank's coordinates: build its graph with the same passes `parallelize`
runs, then execute one training step (forward and backward of the sum of the
outputs) with every mesh axis bound to a `SimulatedAxis`. The collectives
return results of the right shape without sending anything and are counted as
a real run counts them; the gradient sync is the same bucket plan GradSync
issues. So what `explain` predicts is what `pm.comm_stats()` measures, call for
call and byte for byte (with drop_tokens=True; dropless capacities follow the
routing of the example inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from . import collectives
from ._compat import pytree
from .compiler import grad_sync_params, param_shards, shard_for_rank
from .config import ParallelConfig
from .passes.runner import PassContext
from .passes.sharding import ParamShard
from .runtime.grad_sync import plan_buckets
from .runtime.mesh import GROUP_AXES, Layout

__all__ = ["RankPrediction", "predict_rank", "simulate_step", "simulated_axes"]


@dataclass
class RankPrediction:
    """What one rank holds and sends in one training step."""

    rank: int
    coords: dict[str, int]
    shards: dict[str, ParamShard]
    local_shapes: dict[str, tuple[int, ...]]
    param_bytes: int
    """Bytes of the rank's distinct parameters."""
    comm: collectives.CommStats
    """Counts and the call trace (forward, backward, gradient sync) of one step."""
    graph: fx.GraphModule


def simulated_axes(layout: Layout, rank: int) -> dict[str, collectives.SimulatedAxis]:
    """Every mesh axis bound to a simulated group, with `rank`'s position in it."""
    return {axis: collectives.SimulatedAxis(layout.size(axis), layout.group_of(rank, axis).index(rank))
            for axis in GROUP_AXES}


def predict_rank(
    moe_gm: fx.GraphModule,
    moe_ctx: PassContext,
    *,
    parallel: ParallelConfig,
    layout: Layout,
    rank: int,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
) -> RankPrediction:
    """Build `rank`'s graph and count what one training step on the example inputs communicates."""
    coords = layout.coords(rank)
    gm, ctx = shard_for_rank(moe_gm, moe_ctx, parallel=parallel, coords=coords)
    stats = simulate_step(gm, layout=layout, rank=rank, bucket_mb=parallel.bucket_mb,
                          example_inputs=example_inputs, example_kwargs=example_kwargs)
    params = dict(gm.named_parameters())
    return RankPrediction(
        rank=rank, coords=coords, shards=param_shards(gm, ctx),
        local_shapes={n: tuple(t.shape) for n, t in gm.state_dict().items()},
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        comm=stats, graph=gm,
    )


def simulate_step(
    gm: fx.GraphModule,
    *,
    layout: Layout,
    rank: int,
    bucket_mb: float,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
) -> collectives.CommStats:
    """One training step of a rank graph against simulated groups: the collectives it issues, traced.

    Forward, then backward of the sum of the outputs, then the gradient sync's
    bucket plan. Gradients are left on gm's parameters.
    """
    stats = collectives.CommStats(trace=True)
    gm.train()
    with collectives.bind_axes(simulated_axes(layout, rank), stats):
        out = gm(*example_inputs, **(example_kwargs or {}))
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if leaves:
        torch.stack([t.float().sum() for t in leaves]).sum().backward()
    sizes = {axis: layout.size(axis) for axis in ("dp", "edp")}
    for plan in plan_buckets(grad_sync_params(gm), sizes, bucket_mb):
        stats.record("all_reduce", plan.axis, "backward", plan.nbytes, (plan.nbytes // 4,), torch.float32)
    return stats
