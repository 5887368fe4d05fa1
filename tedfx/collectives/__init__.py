"""Differentiable, counted collectives that graph nodes call by mesh axis name.

Passes insert calls such as `all_to_all(x, "ep")`; they name mesh axes and never
hold a process group (docs/architecture.md, "Collectives name axes"). The runtime binds axis names to process groups
around a step:

    with bind_axes(mesh.groups(), stats):
        loss = gm(*inputs)
    loss.backward()          # works after the context has exited

Each op is a `torch.autograd.Function` over a collective of the group (`wire`: the process
group's own calls in eager mode, torch's functional collectives under torch.compile), paired
with its autograd partner:

    op                            forward                     backward
    all_reduce                    all-reduce (sum)            identity              (Megatron "g")
    identity_fwd_all_reduce_bwd   identity                    all-reduce (sum)      (Megatron "f")
    all_to_all                    all-to-all, dim 0           all-to-all, dim 0
    all_to_all_packed             all-to-all of row blocks    the reverse exchange  (split sizes from loads)
    all_to_all_start / _wait      all-to-all, dim 0, in       all-to-all, dim 0, in flight from the
                                  flight between the two      wait's backward to the start's
    exchange_loads                all-to-all of int counts    - (no gradient)
    all_gather                    all-gather along dim        reduce-scatter (sum)
    reduce_scatter                reduce-scatter (sum)        all-gather
    slice_for_rank                narrow to this rank's 1/n   all-gather
    gather_replicated             all-gather along dim        narrow to this rank's 1/n (a replicated consumer)
    agree_max                     all-reduce (max) of an int  - (no gradient)

The op looks the group up when it runs forward and keeps it (and the CommStats)
for its backward. An axis whose group has a single rank makes the op a no-op that
issues and counts nothing, so a graph for T=1 or X=1 runs unchanged.

The package: `binding` (axes bound to groups, the phase, what every op shares),
`tensor_parallel` (f, g, the gathers, the reduce-scatter, slicing, agree_max),
`expert` (the expert all-to-alls) and `wire` (how a collective is issued and waited for).
"""

from __future__ import annotations

from ..comm_stats import PHASES, CommCall, CommKey, CommStats
from .binding import SimulatedAxis, axis_rank, bind_axes, bound_axes, checkpoint_contexts, comm_phase
from .expert import (
    AllToAllInFlight,
    all_to_all,
    all_to_all_packed,
    all_to_all_start,
    all_to_all_wait,
    exchange_loads,
)
from .tensor_parallel import (
    agree_max,
    all_gather,
    all_reduce,
    gather_replicated,
    identity_fwd_all_reduce_bwd,
    reduce_scatter,
    slice_for_rank,
)

__all__ = [
    "PHASES",
    "AllToAllInFlight",
    "CommCall",
    "CommKey",
    "CommStats",
    "SimulatedAxis",
    "agree_max",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "all_to_all_packed",
    "all_to_all_start",
    "all_to_all_wait",
    "axis_rank",
    "bind_axes",
    "bound_axes",
    "checkpoint_contexts",
    "comm_phase",
    "exchange_loads",
    "gather_replicated",
    "identity_fwd_all_reduce_bwd",
    "reduce_scatter",
    "slice_for_rank",
]
