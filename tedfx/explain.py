"""tedfx.explain: what tedfx does to a model, computed in one process."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .api import to_moe
from .capture import capture
from .config import MoEConfig, ParallelConfig
from .graph_summary import summarize_graph
from .passes.runner import PassContext
from .predict import predict_rank, simulated_axes
from .report import Report
from .runtime.mesh import Layout

__all__ = ["explain"]


def explain(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    parallel: ParallelConfig | None = None,
    world_size: int = 1,
    example_kwargs: dict[str, Any] | None = None,
) -> Report:
    """What tedfx does to `model`, computed in this process without starting any others.

    Args:
        model: the dense model (not modified).
        example_inputs: one micro-batch's positional inputs (what each rank will see).
        moe: the MoE rewrite.
        parallel: the layout; None for the single-process MoE model.
        world_size: ranks to predict for (T * X * D).
        example_kwargs: one micro-batch's keyword inputs.

    Returns:
        A Report: converted FFNs with paths and dims; parameter counts before and
        after (total and active per token); with `parallel`, the sharding of every
        parameter, per-rank parameter bytes, and every collective of one training
        step on rank 0 (kind, axis, phase, shape, bytes), predicted by running the
        rank's graph against simulated process groups; `graphs` holds the dense
        graph and rank 0's rewritten graph for `Report.to_svg` / `to_html`.

    Example:
        >>> print(tedfx.explain(model, (tokens,), moe=moe, parallel=tedfx.ParallelConfig(tensor=2, expert=2),
        ...                     world_size=8))
    """
    if parallel is not None:
        parallel.check_supported()
    layout = Layout.build(world_size, parallel) if parallel is not None else None
    moe_model = to_moe(model, example_inputs, moe=moe, example_kwargs=example_kwargs)
    ctx: PassContext = moe_model.meta["tedfx_ctx"]
    blocks = ctx.records["ffn_to_moe"]
    params_moe = _count_params(moe_model)
    report = Report(
        model=type(model).__name__,
        moe={f: getattr(moe, f) if not callable(getattr(moe, f)) else "<predicate>"
             for f in moe.__dataclass_fields__},
        blocks=list(blocks),
        ffns_found=[{"index": m.index, "path": m.path, "kind": m.kind, "activation": m.activation,
                     "hidden_dim": m.hidden_dim, "ffn_dim": m.ffn_dim} for m in ctx.records["find_ffns"]],
        params_dense=_count_params(model),
        params_moe=params_moe,
        params_active=params_moe - sum(b.moe_params - b.active_params for b in blocks),
        pass_timings=[(r.name, r.seconds) for r in ctx.timings],
        world_size=world_size,
    )
    if layout is not None:
        _add_parallel(report, moe_model, ctx, parallel, layout, example_inputs, example_kwargs)
    else:
        report.graphs["rank0"] = summarize_graph(moe_model, example_inputs, example_kwargs)
    report.graphs["dense"] = summarize_graph(capture(model, example_inputs, example_kwargs), example_inputs,
                                             example_kwargs)
    return report


def _add_parallel(report: Report, moe_model, ctx, parallel, layout, example_inputs, example_kwargs) -> None:
    """Sharding and communication: rank 0 in full, and the parameter bytes of every distinct (ep, tp) rank."""
    report.parallel = {f: getattr(parallel, f) for f in parallel.__dataclass_fields__}
    report.layout = str(layout)
    bytes_by_rank = {}
    rank0 = None
    for x in range(layout.expert):
        for t in range(layout.tensor):
            rank = layout.rank(0, x, t)
            pred = predict_rank(moe_model, ctx, parallel=parallel, layout=layout, rank=rank,
                                example_inputs=example_inputs, example_kwargs=example_kwargs)
            bytes_by_rank[rank] = pred.param_bytes
            if rank == 0:
                rank0 = pred
    full = moe_model.state_dict()
    report.parameters = [
        {"name": name, "full_shape": list(full[name].shape), "local_shape": list(rank0.local_shapes[name]),
         "splits": [f"{axis}:{dim}" for axis, dim in spec.splits],
         "chunks": list(spec.chunks) if spec.chunks else None}
        for name, spec in rank0.shards.items()
    ]
    report.param_bytes_per_rank = {rank: bytes_by_rank[layout.rank(0, c["ep"], c["tp"])]
                                   for rank in range(layout.world_size) for c in [layout.coords(rank)]}
    report.collectives = [call._asdict() for call in rank0.comm.trace]
    report.comm_table = [list(row) for row in rank0.comm.table()]
    report.graphs["rank0"] = summarize_graph(rank0.graph, example_inputs, example_kwargs,
                                             axes=simulated_axes(layout, 0))
    report.comm_variants = _optimization_variants(moe_model, ctx, parallel, layout, example_inputs, example_kwargs,
                                                  current=rank0.comm)


def _optimization_variants(moe_model, ctx, parallel, layout, example_inputs, example_kwargs, current):
    """Rank 0's bytes per step by collective kind, with and without DTD and CAC."""
    variants = {"baseline": dict(dtd=False, cac=False), "dtd": dict(dtd=True, cac=False),
                "cac": dict(dtd=False, cac=True), "dtd+cac": dict(dtd=True, cac=True)}
    out = {}
    for name, flags in variants.items():
        variant = dataclasses.replace(parallel, **flags)
        if variant == parallel:
            stats = current
        else:
            stats = predict_rank(moe_model, ctx, parallel=variant, layout=layout, rank=0,
                                 example_inputs=example_inputs, example_kwargs=example_kwargs).comm
        out[name] = {f"{kind}/{axis}/{phase}": [calls, nbytes] for kind, axis, phase, calls, nbytes in stats.table()}
    return out


def _count_params(module: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in module.parameters())
