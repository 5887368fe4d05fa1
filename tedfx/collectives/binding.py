"""Mesh axes bound to process groups, the communication phase, and what every collective shares.

`bind_axes` binds axis names to process groups around a step; `comm_phase` and
`checkpoint_contexts` decide under which phase a call is counted. The helpers
below them (axis lookup, counting, chunk checks) serve the ops of
`tensor_parallel` and `expert`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist

from .. import _compat
from ..comm_stats import PHASES, CommStats

__all__ = ["SimulatedAxis", "axis_rank", "bind_axes", "bound_axes", "checkpoint_contexts", "comm_phase"]


@dataclass(frozen=True)
class SimulatedAxis:
    """Binds an axis to `size` simulated ranks, this one being `rank`: nothing is sent.

    Each op returns a result of the right shape (its own values stand in for the
    other ranks') and counts exactly what a real run would issue. `tedfx.explain`
    runs a rank's graph this way to predict its communication without processes.
    """

    size: int
    rank: int


@dataclass(frozen=True)
class _AxisGroup:
    """One bound axis as an op sees it; kept by the autograd Function for its backward."""

    axis: str
    group: dist.ProcessGroup | None
    size: int
    rank: int
    stats: CommStats | None


# Module-level rather than thread-local: CUDA backward runs on autograd device threads.
_bindings: list[dict[str, _AxisGroup]] = []
_phase_overrides: list[str] = []


@contextlib.contextmanager
def bind_axes(groups: dict[str, dist.ProcessGroup | None], stats: CommStats | None = None) -> Iterator[None]:
    """Bind mesh axis names to process groups for the ops called inside the block.

    Args:
        groups: {axis: process group}, e.g. `TedMesh.groups()`. A value of None binds a
            trivial axis of one rank (every op on it is a no-op), which lets a graph with
            collectives run in one process without torch.distributed.
        stats: where issued collectives are counted; None counts nothing.

    The innermost binding wins entirely (axes are not merged with an outer binding).
    Ops keep their group for backward, so `loss.backward()` may run after the block.
    """
    bound: dict[str, _AxisGroup] = {}
    for axis, group in groups.items():
        if not isinstance(axis, str):
            raise TypeError(f"bind_axes expects axis names as str keys, found {axis!r}.")
        if group is None:
            bound[axis] = _AxisGroup(axis, None, 1, 0, stats)
        elif isinstance(group, SimulatedAxis):
            bound[axis] = _AxisGroup(axis, group, group.size, group.rank, stats)
        else:
            bound[axis] = _AxisGroup(axis, group, dist.get_world_size(group), dist.get_rank(group), stats)
    with _rebind(bound):
        yield


def bound_axes() -> dict[str, int]:
    """{axis: group size} of the innermost binding; {} when none is active."""
    return {axis: g.size for axis, g in _bindings[-1].items()} if _bindings else {}


def axis_rank(axis: str) -> tuple[int, int]:
    """(this rank's index in its group of `axis`, the group's size) under the innermost binding."""
    g = _lookup(axis, "axis_rank")
    return g.rank, g.size


@contextlib.contextmanager
def comm_phase(phase: str) -> Iterator[None]:
    """Count every collective issued inside the block under `phase` ("forward", "backward", "recompute",
    "optimizer": the optimizer step's norm and ZeRO collectives).

    Without an override, ops count "forward" in the forward pass, "backward" in the
    backward pass, and "recompute" when a forward runs inside a backward pass.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown communication phase {phase!r}: expected one of {list(PHASES)}.")
    _phase_overrides.append(phase)
    try:
        yield
    finally:
        _phase_overrides.pop()


@contextlib.contextmanager
def _rebind(bound: dict[str, _AxisGroup] | None) -> Iterator[None]:
    if bound is None:
        yield
        return
    _bindings.append(bound)
    try:
        yield
    finally:
        _bindings.pop()


def checkpoint_contexts(
    context_fn: Callable[[], tuple[ContextManager, ContextManager]] | None = None,
) -> tuple[ContextManager, ContextManager]:
    """A `context_fn` for `torch.utils.checkpoint` that lets checkpointed collectives recompute.

    Recomputation runs the forward again inside the backward pass, after `bind_axes` has
    usually exited. These contexts capture the binding active when the checkpointed
    forward runs and re-enter it for the recomputation, counted under phase "recompute".

    Args:
        context_fn: another context_fn to combine with (e.g. selective checkpointing's
            `functools.partial(create_selective_checkpoint_contexts, policy)`).

    Returns:
        (forward context, recompute context).

    Example:
        >>> y = checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_contexts)
    """
    bound = _bindings[-1] if _bindings else None
    if context_fn is None:
        forward_ctx, recompute_ctx = contextlib.nullcontext(), contextlib.nullcontext()
    else:
        forward_ctx, recompute_ctx = context_fn()

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        with _rebind(bound), comm_phase("recompute"), recompute_ctx:
            yield

    return forward_ctx, recompute()


def _lookup(axis: str, op: str) -> _AxisGroup:
    if not isinstance(axis, str):
        raise TypeError(f"{op}: axis must be a mesh axis name such as 'tp', found {axis!r}.")
    if not _bindings:
        hint = (
            " This call runs inside a backward pass, i.e. an activation-checkpointing recomputation: "
            "pass context_fn=tedfx.collectives.checkpoint_contexts to torch.utils.checkpoint."
            if _compat.in_backward_pass()
            else ""
        )
        raise RuntimeError(
            f"{op}(..., axis={axis!r}) was called with no mesh axes bound. Run the graph inside "
            f"`with tedfx.collectives.bind_axes(mesh.groups(), stats):` (the tedfx runtime does this), "
            f"or bind the axis to None to run on one process.{hint}"
        )
    bound = _bindings[-1]
    if axis not in bound:
        raise RuntimeError(
            f"{op}(..., axis={axis!r}): axis {axis!r} is not bound; bound axes are {sorted(bound)}. "
            f"Add it to the groups given to bind_axes."
        )
    return bound[axis]


def _phase(default: str) -> str:
    if _phase_overrides:
        return _phase_overrides[-1]
    if default == "forward" and _compat.in_backward_pass():
        return "recompute"
    return default


def _count(g: _AxisGroup, kind: str, sent: torch.Tensor, default_phase: str) -> None:
    # A compiled graph runs without Python, so it cannot count per step; it counts nothing
    # rather than counting once at trace time.
    if g.stats is not None and not torch.compiler.is_compiling():
        g.stats.record(kind, g.axis, _phase(default_phase), sent.numel() * sent.element_size(),
                       tuple(sent.shape), sent.dtype)


def _check_divisible(op: str, x: torch.Tensor, dim: int, g: _AxisGroup) -> int:
    """Normalised `dim`, after checking it splits into `g.size` equal chunks."""
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}.")
    dim = dim % x.dim()
    if x.shape[dim] % g.size:
        raise ValueError(
            f"{op} over axis {g.axis!r} splits dim {dim} of shape {tuple(x.shape)} into {g.size} equal "
            f"chunks, but {x.shape[dim]} is not divisible by {g.size}; pad that dim to a multiple of {g.size}."
        )
    return dim


def _simulated(g: _AxisGroup) -> bool:
    return isinstance(g.group, SimulatedAxis)


def _local_chunk(x: torch.Tensor, dim: int, g: _AxisGroup) -> torch.Tensor:
    chunk = x.shape[dim] // g.size
    return x.narrow(dim, g.rank * chunk, chunk)
