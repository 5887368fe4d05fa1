"""Predict a rank's sharding and communication without starting processes.

For one rank's coordinates: build its graph with the same passes `parallelize`
runs, then execute one training step (forward and backward of the sum of the
outputs) with every mesh axis bound to a `SimulatedAxis`. The collectives
return results of the right shape without sending anything and are counted as
a real run counts them; the gradient sync is the same bucket plan GradSync
issues. So what `explain` predicts is what `pm.comm_stats()` measures, call for
call and byte for byte (with drop_tokens=True; dropless capacities follow the
routing of the example inputs).

`build_report` assembles what `tedfx.explain` returns from these predictions.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import _compat, collectives
from ._compat import pytree
from .axes import GROUP_AXES
from .config import MoEConfig, ParallelConfig
from .fake import FakeRun, FakeUnsupported, device_of
from .graph_summary import summarize_graph
from .moe.routing import Router
from .passes.context import PassContext
from .pipeline import grad_sync_params, param_shards, shard_for_rank
from .report import Report
from .runtime.grad_sync import plan_buckets, record_plan
from .runtime.memory import predict_training_memory
from .runtime.mesh import Layout
from .sharding import ParamShard, tensor_whole

__all__ = ["RankPrediction", "build_report", "predict_rank", "record_grad_sync", "simulate_step", "simulated_axes"]

log = logging.getLogger(__name__)


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
    fake: FakeRun | None = None
    """Set when `graph` holds fake tensors: run it inside `fake.active()` on `fake.inputs(...)`."""


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
    fake: bool = True,
) -> RankPrediction:
    """Build `rank`'s graph and count what one training step on the example inputs communicates.

    fake=True runs the step on fake tensors (tedfx.fake): no parameter is materialised or computed
    with. A graph whose shapes follow its values (dropless routing) is simulated on real tensors,
    the rank's own shards only.
    """
    coords = layout.coords(rank)
    run = None
    if fake and moe_ctx.moe.drop_tokens:
        gm, ctx = shard_for_rank(moe_gm, moe_ctx, parallel=parallel, coords=coords, materialize=False)
        run = FakeRun(gm, device_of((example_inputs, example_kwargs), moe_gm))
        try:
            with run.active():
                stats = simulate_step(gm, layout=layout, rank=rank, bucket_mb=parallel.bucket_mb,
                                      tensor_whole=tensor_whole(param_shards(gm, ctx)),
                                      example_inputs=run.inputs(example_inputs),
                                      example_kwargs=run.inputs(example_kwargs))
        except FakeUnsupported as e:
            log.info("tedfx: rank %d's graph cannot run on fake tensors (%s); simulating it on its own shards",
                     rank, e)
            run = None
        except Exception as e:  # noqa: BLE001 - an op fake tensors do not cover: the real shards decide
            log.warning("tedfx: rank %d's graph failed on fake tensors (%s: %s); simulating it on its own shards",
                        rank, type(e).__name__, e)
            run = None
    if run is None:
        gm, ctx = shard_for_rank(moe_gm, moe_ctx, parallel=parallel, coords=coords)
        stats = simulate_step(gm, layout=layout, rank=rank, bucket_mb=parallel.bucket_mb,
                              tensor_whole=tensor_whole(param_shards(gm, ctx)),
                              example_inputs=example_inputs, example_kwargs=example_kwargs)
    params = dict(gm.named_parameters())
    return RankPrediction(
        rank=rank, coords=coords, shards=param_shards(gm, ctx),
        local_shapes={n: tuple(t.shape) for n, t in gm.state_dict().items()},
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        comm=stats, graph=gm, fake=run,
    )


def simulate_step(
    gm: fx.GraphModule,
    *,
    layout: Layout,
    rank: int,
    bucket_mb: float | None,
    tensor_whole: frozenset[str],
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    restore: bool = False,
    grad_sync: bool = True,
) -> collectives.CommStats:
    """One training step of a rank graph against simulated groups: the collectives it issues, traced.

    Forward, then backward of the sum of the outputs, then (with `grad_sync`) the gradient sync's bucket plan.
    Gradients are left on gm's parameters, unless `restore`: then the step leaves no trace on
    gm or on the caller's random state (grads, routers' call counts and losses, train mode,
    torch's RNG), so gm can go on to train (what parallelize's collective-order check needs).
    """
    stats = collectives.CommStats(trace=True)
    state = _ModuleState(gm) if restore else None
    with torch.random.fork_rng(devices=_compat.initialized_cuda_devices(), enabled=restore):
        gm.train()
        with collectives.bind_axes(simulated_axes(layout, rank), stats):
            out = gm(*example_inputs, **(example_kwargs or {}))
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if leaves:
            torch.stack([t.float().sum() for t in leaves]).sum().backward()
    del out, leaves
    if state is not None:
        state.restore()
    if grad_sync:
        record_grad_sync(stats, grad_sync_params(gm), layout, bucket_mb, tensor_whole)
    return stats


def record_grad_sync(stats: collectives.CommStats, params: list[tuple[str, nn.Parameter, str]], layout: Layout,
                     bucket_mb: float | None, tensor_whole: frozenset[str]) -> None:
    """Count the gradient sync's collectives of one step (its bucket plan) for the (name, parameter, axis) list."""
    sizes = {axis: layout.size(axis) for axis in ("dp", "edp", "tp")}
    for plan in plan_buckets(params, sizes, bucket_mb, tensor_whole):
        record_plan(stats, plan)


class _ModuleState:
    """What a simulated step changes on a module, saved to be put back."""

    def __init__(self, gm: nn.Module) -> None:
        self.gm = gm
        self.training = gm.training
        self.routers = [(r, r.calls, dict(r.last_losses)) for r in gm.modules() if isinstance(r, Router)]
        self.grads = {id(p): p.grad for p in gm.parameters()}

    def restore(self) -> None:
        for p in self.gm.parameters():
            p.grad = self.grads.get(id(p))
        for router, calls, losses in self.routers:
            router.calls, router.last_losses = calls, losses
        self.gm.train(self.training)


# --- the report of tedfx.explain -------------------------------------------------------------------


def build_report(
    model: nn.Module,
    moe_gm: fx.GraphModule,
    ctx: PassContext,
    *,
    moe: MoEConfig,
    parallel: ParallelConfig | None,
    world_size: int,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None,
    dense_graph: list[dict[str, Any]],
    tile_numel: int | None = None,
) -> Report:
    """The Report of `tedfx.explain` for a converted model (`moe_gm`, `ctx`) and, with `parallel`, its layout."""
    blocks = ctx.records.moe_blocks
    params_moe = _count_params(moe_gm)
    report = Report(
        model=type(model).__name__,
        moe={f: getattr(moe, f) if not callable(getattr(moe, f)) else "<predicate>"
             for f in moe.__dataclass_fields__},
        blocks=list(blocks),
        ffns_found=[dataclasses.asdict(f) for f in ctx.records.ffns],
        params_dense=_count_params(model),
        params_moe=params_moe,
        params_active=params_moe - sum(b.moe_params - b.active_params for b in blocks),
        pass_timings=[(r.name, r.seconds) for r in ctx.timings],
        world_size=world_size,
    )
    report.graphs["dense"] = dense_graph
    if parallel is None:
        report.graphs["rank0"] = summarize_graph(moe_gm, example_inputs, example_kwargs)
        return report
    layout = Layout.build(world_size, parallel)
    report.parallel = {f: getattr(parallel, f) for f in parallel.__dataclass_fields__}
    report.layout = str(layout)
    # Rank 0 in full, and the parameter bytes of every distinct (ep, tp) position.
    bytes_by_rank = {}
    rank0 = None
    for x in range(layout.expert):
        for t in range(layout.tensor):
            rank = layout.rank(0, x, t)
            pred = predict_rank(moe_gm, ctx, parallel=parallel, layout=layout, rank=rank,
                                example_inputs=example_inputs, example_kwargs=example_kwargs)
            bytes_by_rank[rank] = pred.param_bytes
            if rank == 0:
                rank0 = pred
    full = moe_gm.state_dict()
    report.parameters = [
        {"name": name, "full_shape": list(full[name].shape), "local_shape": list(rank0.local_shapes[name]),
         "splits": [f"{axis}:{dim}" for axis, dim in spec.splits],
         "chunks": list(spec.chunks) if spec.chunks else None}
        for name, spec in rank0.shards.items()
    ]
    report.param_bytes_per_rank = {rank: bytes_by_rank[layout.rank(0, c["ep"], c["tp"])]
                                   for rank in range(layout.world_size) for c in [layout.coords(rank)]}
    report.training_memory = training_memory(rank0.graph, parallel=parallel, layout=layout, rank=0,
                                             tile_numel=tile_numel)
    report.collectives = [call._asdict() for call in rank0.comm.trace]
    report.comm_table = [list(row) for row in rank0.comm.table()]
    if rank0.fake is not None:
        with rank0.fake.active():
            report.graphs["rank0"] = summarize_graph(
                rank0.graph, rank0.fake.inputs(example_inputs), rank0.fake.inputs(example_kwargs),
                axes=simulated_axes(layout, 0), shards=rank0.shards)
    else:
        report.graphs["rank0"] = summarize_graph(rank0.graph, example_inputs, example_kwargs,
                                                 axes=simulated_axes(layout, 0), shards=rank0.shards)
    report.comm_variants = _optimization_variants(moe_gm, ctx, parallel, layout, example_inputs, example_kwargs,
                                                  current=rank0.comm)
    return report


DEFAULT_REPORT_TILE = 2**20
"""Entries per tile the report predicts the tiled step with when explain is given no tile_numel."""


def training_memory(gm: nn.Module, *, parallel: ParallelConfig, layout: Layout, rank: int,
                    tile_numel: int | None) -> dict[str, Any]:
    """Bytes `rank` holds to train with tedfx.optimizer(pm, torch.optim.AdamW), for zero 0 and 1,
    untiled and tiled (tedfx.runtime.memory.predict_training_memory on the rank's graph)."""
    params = grad_sync_params(gm)
    sizes = {axis: layout.size(axis) for axis in ("dp", "edp")}
    ranks = {axis: layout.group_of(rank, axis).index(rank) for axis in ("dp", "edp")}
    foreach = any(p.device.type == "cuda" for _, p, _ in params)  # torch's AdamW default: foreach on GPUs
    tile = tile_numel or DEFAULT_REPORT_TILE
    rows = [{"zero": zero, "tile_numel": t,
             **predict_training_memory(params, zero=zero, sizes=sizes, ranks=ranks, tile_numel=t, foreach=foreach)}
            for zero in (0, 1) for t in (None, tile)]
    return {"rank": rank, "precision": parallel.precision, "zero": parallel.zero, "optimizer": "AdamW",
            "foreach": foreach, "rows": rows}


def _optimization_variants(moe_gm, ctx, parallel, layout, example_inputs, example_kwargs, current):
    """Rank 0's bytes per step by collective kind, with and without DTD and CAC."""
    variants = {"baseline": dict(dtd=False, cac=False), "dtd": dict(dtd=True, cac=False),
                "cac": dict(dtd=False, cac=True), "dtd+cac": dict(dtd=True, cac=True)}
    out = {}
    for name, flags in variants.items():
        variant = dataclasses.replace(parallel, **flags)
        if variant == parallel:
            stats = current
        else:
            stats = predict_rank(moe_gm, ctx, parallel=variant, layout=layout, rank=0,
                                 example_inputs=example_inputs, example_kwargs=example_kwargs).comm
        out[name] = {f"{kind}/{axis}/{phase}": [calls, nbytes] for kind, axis, phase, calls, nbytes in stats.table()}
    return out


def _count_params(module: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in module.parameters())
