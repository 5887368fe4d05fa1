"""The collective-order check: no rank can hang waiting for a collective its group never issues.

Every rank of a process group must issue the same collectives, in the same
order, with the same shapes and dtypes (docs/parallelism.md, "Every rank issues
the same collectives"; a rank whose experts get no tokens included). The check simulates one training step of each
rank's graph against simulated groups (tedfx.predict), keeps each rank's trace
of calls, and compares the traces of the members of every group.
`parallelize` runs it across the live ranks (`check_live_ranks`, one small
all-gather); `tedfx inspect --check` and `tedfx.check_collective_order` run it
for every rank of a layout in one process (`check_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.fx as fx

from .axes import GROUP_AXES
from .collectives import CommCall
from .config import ParallelConfig
from .passes.context import PassContext
from .pipeline import param_shards
from .predict import predict_rank, simulate_step
from .runtime.mesh import Layout, TedMesh
from .sharding import tensor_whole

__all__ = ["CollectiveOrderError", "OrderMismatch", "check_layout", "check_live_ranks", "compare_traces"]


@dataclass(frozen=True)
class OrderMismatch:
    """The first collective where two members of a group disagree."""

    axis: str
    group: tuple[int, ...]
    index: int
    """Position in the group's sequence of calls."""
    rank: int
    call: CommCall | None
    """`rank`'s call there (None: it issued nothing more)."""
    reference_rank: int
    reference_call: CommCall | None

    def __str__(self) -> str:
        def show(c: CommCall | None) -> str:
            return "nothing" if c is None else f"{c.kind}({c.phase}, shape={c.shape}, {c.dtype})"

        return (f"group {self.axis} {list(self.group)}: call #{self.index} is {show(self.reference_call)} on "
                f"rank {self.reference_rank} but {show(self.call)} on rank {self.rank}")


class CollectiveOrderError(RuntimeError):
    """Members of a process group would issue different collectives: a hang or a silent error at run time."""

    def __init__(self, mismatches: list[OrderMismatch]) -> None:
        self.mismatches = mismatches
        lines = "\n  ".join(str(m) for m in mismatches[:8])
        super().__init__(
            f"{len(mismatches)} process group(s) would issue different collectives on different ranks, which "
            f"hangs or corrupts the run:\n  {lines}\nEvery rank of a group must issue the same collectives in "
            f"the same order with the same shapes: check passes that treat ranks differently.")


def _key(call: CommCall, exact_shapes: bool) -> tuple:
    return (call.kind, call.shape, call.dtype) if exact_shapes else (call.kind, len(call.shape), call.dtype)


def compare_traces(traces: dict[int, list[CommCall]], layout: Layout, *,
                   exact_shapes: bool = True) -> list[OrderMismatch]:
    """For every group with two or more traced members, the first call where a member differs from the first.

    exact_shapes=False compares kinds, ranks of the shapes and dtypes only: with dropless routing
    the capacity dim follows the routing, which a simulation without the other ranks' partial sums
    cannot reproduce; at run time the expert group agrees on one capacity (collectives.agree_max).
    """
    mismatches = []
    for axis in GROUP_AXES:
        for group in layout.group_ranks(axis):
            members = [r for r in group if r in traces]
            if len(members) < 2:
                continue
            seqs = {r: [c for c in traces[r] if c.axis == axis] for r in members}
            ref = members[0]
            for r in members[1:]:
                a, b = seqs[ref], seqs[r]
                for i in range(max(len(a), len(b))):
                    ca = a[i] if i < len(a) else None
                    cb = b[i] if i < len(b) else None
                    if ca is None or cb is None or _key(ca, exact_shapes) != _key(cb, exact_shapes):
                        mismatches.append(OrderMismatch(axis, tuple(group), i, r, cb, ref, ca))
                        break
    return mismatches


def check_layout(
    moe_gm: fx.GraphModule,
    moe_ctx: PassContext,
    *,
    parallel: ParallelConfig,
    layout: Layout,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
) -> dict[int, list[CommCall]]:
    """Build every rank's graph of `layout` in this process and check their collectives agree.

    Returns:
        {rank: trace} when every group agrees.

    Raises:
        CollectiveOrderError: naming the group, the ranks and the first differing collective.
    """
    traces = {
        rank: predict_rank(moe_gm, moe_ctx, parallel=parallel, layout=layout, rank=rank,
                           example_inputs=example_inputs, example_kwargs=example_kwargs).comm.trace
        for rank in range(layout.world_size)
    }
    mismatches = compare_traces(traces, layout, exact_shapes=moe_ctx.moe.drop_tokens)
    if mismatches:
        raise CollectiveOrderError(mismatches)
    return traces


def check_live_ranks(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    parallel: ParallelConfig,
    mesh: TedMesh,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
) -> None:
    """On every rank: simulate a step of this rank's graph `gm`, gather every rank's trace, compare group by group.

    The simulated step leaves `gm` as it found it (no gradients, no router call counted, the RNG untouched).

    Raises:
        CollectiveOrderError: on every rank alike, before any rank can hang.
    """
    mine = simulate_step(gm, layout=mesh.layout, rank=mesh.rank, bucket_mb=parallel.bucket_mb,
                         tensor_whole=tensor_whole(param_shards(gm, ctx)), example_inputs=example_inputs,
                         example_kwargs=example_kwargs, restore=True).trace
    traces: list[Any] = [None] * mesh.layout.world_size
    dist.all_gather_object(traces, mine)
    mismatches = compare_traces(dict(enumerate(traces)), mesh.layout, exact_shapes=ctx.moe.drop_tokens)
    if mismatches:
        raise CollectiveOrderError(mismatches)
