"""Differentiable, counted collectives that graph nodes call by mesh axis name.

Passes insert calls such as `all_to_all(x, "ep")`; they name mesh axes and never
hold a process group (docs/architecture.md, "Collectives name axes"). The runtime binds axis names to process groups
around a step:

    with bind_axes(mesh.groups(), stats):
        loss = gm(*inputs)
    loss.backward()          # works after the context has exited

Each op is a `torch.autograd.Function` over `torch.distributed._functional_collectives`,
paired with its autograd partner:

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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist

from tedfx import _compat
from tedfx.comm_stats import PHASES, CommCall, CommKey, CommStats

__all__ = [
    "PHASES",
    "CommKey",
    "CommStats",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "bind_axes",
    "axis_rank",
    "bound_axes",
    "CommCall",
    "SimulatedAxis",
    "agree_max",
    "all_to_all_packed",
    "all_to_all_start",
    "all_to_all_wait",
    "checkpoint_contexts",
    "exchange_loads",
    "gather_replicated",
    "comm_phase",
    "identity_fwd_all_reduce_bwd",
    "reduce_scatter",
    "slice_for_rank",
]

# --- Axis binding and phase -------------------------------------------------------------------


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


# --- The collectives as issued (counted, waited) ----------------------------------------------


def _simulated(g: _AxisGroup) -> bool:
    return isinstance(g.group, SimulatedAxis)


def _issue_all_reduce(x: torch.Tensor, g: _AxisGroup, phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "all_reduce", x, phase)
    if _simulated(g):
        return x.clone()
    return _compat.wait_collective(_compat.funcol.all_reduce(x, "sum", g.group))


def _issue_all_to_all(x: torch.Tensor, g: _AxisGroup, phase: str) -> torch.Tensor:
    return _compat.wait_collective(_start_all_to_all(x, g, phase))


def _issue_all_to_all_packed(x: torch.Tensor, send: list[int], recv: list[int], g: _AxisGroup,
                             phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "all_to_all", x, phase)
    if _simulated(g):
        return x.clone()  # a simulated rank receives what it sends (exchange_loads agrees)
    return _compat.wait_collective(_compat.funcol.all_to_all_single(x, recv, send, g.group))


def _issue_all_gather(x: torch.Tensor, dim: int, g: _AxisGroup, phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "all_gather", x, phase)
    if _simulated(g):
        return torch.cat([x] * g.size, dim=dim)
    return _compat.wait_collective(_compat.funcol_all_gather(x, dim, g.group))


def _issue_reduce_scatter(x: torch.Tensor, dim: int, g: _AxisGroup, phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "reduce_scatter", x, phase)
    if _simulated(g):
        return _local_chunk(x, dim, g).clone()
    return _compat.wait_collective(_compat.funcol_reduce_scatter(x, "sum", dim, g.group))


def _local_chunk(x: torch.Tensor, dim: int, g: _AxisGroup) -> torch.Tensor:
    chunk = x.shape[dim] // g.size
    return x.narrow(dim, g.rank * chunk, chunk)


# --- autograd Functions ---------------------------------------------------------------------------


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: _AxisGroup) -> torch.Tensor:
        return _issue_all_reduce(x, g, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _IdentityFwdAllReduceBwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: _AxisGroup) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _issue_all_reduce(grad, ctx.g, "backward"), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: _AxisGroup) -> torch.Tensor:
        ctx.g = g
        return _issue_all_to_all(x, g, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _issue_all_to_all(grad, ctx.g, "backward"), None


class _AllToAllPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], g: _AxisGroup) -> torch.Tensor:
        ctx.g, ctx.send, ctx.recv = g, send, recv
        return _issue_all_to_all_packed(x, send, recv, g, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _issue_all_to_all_packed(grad, ctx.recv, ctx.send, ctx.g, "backward"), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, g: _AxisGroup) -> torch.Tensor:
        ctx.g, ctx.dim = g, dim
        return _issue_all_gather(x, dim, g, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _issue_reduce_scatter(grad, ctx.dim, ctx.g, "backward"), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, g: _AxisGroup) -> torch.Tensor:
        ctx.g, ctx.dim = g, dim
        return _issue_reduce_scatter(x, dim, g, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _issue_all_gather(grad, ctx.dim, ctx.g, "backward"), None, None


class _GatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, g: _AxisGroup) -> torch.Tensor:
        ctx.g, ctx.dim = g, dim
        return _issue_all_gather(x, dim, g, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _local_chunk(grad, ctx.dim, ctx.g), None, None


class _SliceForRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, g: _AxisGroup) -> torch.Tensor:
        ctx.g, ctx.dim = g, dim
        return _local_chunk(x, dim, g)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _issue_all_gather(grad, ctx.dim, ctx.g, "backward"), None, None


# --- Public ops -----------------------------------------------------------------------------------


def all_reduce(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Sum `x` over the ranks of `axis`; the gradient passes through unchanged.

    Megatron's "g": the output of a row-parallel region, whose downstream computation
    is replicated over the axis (so each rank already holds the full gradient).

    Args:
        x: this rank's partial sum.
        axis: mesh axis name, e.g. "tp".

    Returns:
        The sum over the axis, the same on every rank of the group.
    """
    g = _lookup(axis, "all_reduce")
    return x if g.size == 1 else _AllReduce.apply(x, g)


def identity_fwd_all_reduce_bwd(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Return `x` unchanged; in backward, sum the gradient over the ranks of `axis`.

    Megatron's "f": the input of a column-parallel region. Each rank computes a partial
    input gradient from its column shard; the all-reduce makes it whole.

    Args:
        x: a tensor replicated over the axis.
        axis: mesh axis name, e.g. "tp".

    Returns:
        `x` (a view, so autograd sees the op).
    """
    g = _lookup(axis, "identity_fwd_all_reduce_bwd")
    return x if g.size == 1 else _IdentityFwdAllReduceBwd.apply(x, g)


def all_to_all(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Exchange equal chunks of dim 0 between the ranks of `axis` (backward: the same exchange).

    Chunk i of dim 0 goes to the i-th rank of the group; the output's chunk j came from
    rank j. For the MoE dispatch, dim 0 is the experts of the [E, C, H] buffer.

    Args:
        x: tensor whose dim 0 is divisible by the group size.
        axis: mesh axis name, e.g. "ep".

    Returns:
        A tensor of the same shape.
    """
    g = _lookup(axis, "all_to_all")
    if g.size == 1:
        return x
    _check_divisible("all_to_all", x, 0, g)
    return _AllToAll.apply(x, g)


def all_to_all_packed(x: torch.Tensor, axis: str, send_loads: torch.Tensor, recv_loads: torch.Tensor) -> torch.Tensor:
    """Exchange blocks of rows of unequal sizes between the ranks of `axis` (backward: the reverse exchange).

    The packed layout of dropless routing (docs/moe.md, "Dropless: the packed layout"): x's rows are
    sorted by destination rank, and each rank receives exactly the rows sent to it, no padding.

    Args:
        x: [N, H] rows, the rows for rank i before those for rank i + 1.
        axis: mesh axis name, e.g. "ep".
        send_loads: rows this rank sends, per (destination, anything): [G, ...] or [G * n], summed per
            destination (e.g. the [E] expert loads, E = G * E_local).
        recv_loads: rows this rank receives, the same way per source (e.g. exchange_loads's [G, E_local]).

    Returns:
        The received rows, those from rank 0 first.
    """
    g = _lookup(axis, "all_to_all_packed")
    if g.size == 1:
        return x
    send = send_loads.reshape(g.size, -1).sum(1).tolist()  # host syncs: split sizes are Python ints
    recv = recv_loads.reshape(g.size, -1).sum(1).tolist()
    if sum(send) != x.shape[0]:
        raise ValueError(f"all_to_all_packed over axis {g.axis!r}: the send loads add up to {sum(send)} rows, "
                         f"but x has {x.shape[0]}.")
    return _AllToAllPacked.apply(x, send, recv, g)


def exchange_loads(loads: torch.Tensor, axis: str) -> torch.Tensor:
    """Tell every rank of `axis` how many rows it will receive: an all-to-all of int64 counts (no gradient).

    Args:
        loads: [E] rows this rank sends per expert, experts split over the group in equal blocks
            (rank i owns experts i * E_local .. (i + 1) * E_local - 1).
        axis: mesh axis name, e.g. "ep".

    Returns:
        [G, E_local]: row s holds the rows rank s sends to each of this rank's experts.
    """
    g = _lookup(axis, "exchange_loads")
    if g.size == 1:
        return loads.reshape(1, -1)
    _check_divisible("exchange_loads", loads, 0, g)
    loads = loads.detach().contiguous()
    _count(g, "all_to_all", loads, "forward")
    if _simulated(g):
        return loads.view(g.size, -1).clone()
    out = _compat.wait_collective(_compat.funcol.all_to_all_single(loads, None, None, g.group))
    return out.view(g.size, -1)


class AllToAllInFlight:
    """An all-to-all between `all_to_all_start` and `all_to_all_wait` (docs/parallelism.md, "Overlap").

    `token` is a 0-dim tensor that carries the autograd edge from the start to the wait; the exchange
    itself lives in `result` (forward) and `grad` (backward) while in flight.
    """

    __slots__ = ("token", "result", "grad", "g")

    def __init__(self, g: _AxisGroup) -> None:
        self.g = g
        self.token: torch.Tensor | None = None
        self.result: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None


def _start_all_to_all(x: torch.Tensor, g: _AxisGroup, phase: str) -> torch.Tensor:
    """Issue an all-to-all of dim 0 and return without waiting (eager funcol defers the wait to first use)."""
    if g.size == 1:
        return x
    x = x.contiguous()
    _count(g, "all_to_all", x, phase)
    if _simulated(g):
        return x.clone()
    return _compat.funcol.all_to_all_single(x, None, None, g.group)


class _AllToAllStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, flight: AllToAllInFlight) -> torch.Tensor:
        ctx.flight = flight
        flight.result = _start_all_to_all(x, flight.g, _phase("forward"))
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad: torch.Tensor):
        flight = ctx.flight
        grad, flight.grad = _compat.wait_collective(flight.grad), None
        return grad, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, flight: AllToAllInFlight) -> torch.Tensor:
        ctx.flight = flight
        out, flight.result = _compat.wait_collective(flight.result), None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The reverse exchange starts here and is waited for by the start's backward: whatever the autograd
        # engine runs in between (another chunk's expert backward) overlaps with it.
        ctx.flight.grad = _start_all_to_all(grad, ctx.flight.g, "backward")
        return torch.zeros((), dtype=grad.dtype, device=grad.device), None


def all_to_all_start(x: torch.Tensor, axis: str) -> AllToAllInFlight:
    """Start `all_to_all(x, axis)` and return at once; `all_to_all_wait` gives its result.

    What runs between the two overlaps with the exchange, in the forward and, reversed, in the backward
    (the chunked expert pipeline of `ParallelConfig.a2a_chunks`). Counted like all_to_all, when started.
    """
    g = _lookup(axis, "all_to_all_start")
    _check_divisible("all_to_all_start", x, 0, g)
    flight = AllToAllInFlight(g)
    flight.token = _AllToAllStart.apply(x, flight)
    return flight


def all_to_all_wait(flight: AllToAllInFlight) -> torch.Tensor:
    """The result of an `all_to_all_start`, waiting for it if it is still in flight."""
    if not isinstance(flight, AllToAllInFlight):
        raise TypeError(f"all_to_all_wait expects what all_to_all_start returned, got {type(flight).__name__}.")
    return _AllToAllWait.apply(flight.token, flight)


def all_gather(x: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
    """Concatenate the ranks' `x` along `dim` in group-rank order.

    Backward is the exact adjoint: the gradient is summed over the axis and each rank
    keeps its own chunk (a reduce-scatter). That is right when each rank's downstream
    contributes a partial gradient, as column-parallel expert FC1 does after DTD's gather.

    Args:
        x: this rank's chunk; the same shape on every rank.
        axis: mesh axis name, e.g. "tp".
        dim: tensor dim to concatenate along.

    Returns:
        A tensor whose `dim` is group-size times longer.
    """
    g = _lookup(axis, "all_gather")
    if g.size == 1:
        return x
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"all_gather: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}.")
    return _AllGather.apply(x, dim % x.dim(), g)


def reduce_scatter(x: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
    """Sum `x` over the ranks of `axis` and keep this rank's 1/size chunk along `dim`.

    Equal to `slice_for_rank(all_reduce(x, axis), axis, dim)` with 1/size of the traffic;
    backward all-gathers the gradient.

    Args:
        x: this rank's partial sum; `dim` divisible by the group size.
        axis: mesh axis name, e.g. "tp".
        dim: tensor dim to scatter along.

    Returns:
        The chunk of the sum owned by this rank (group rank i gets chunk i).
    """
    g = _lookup(axis, "reduce_scatter")
    if g.size == 1:
        return x
    dim = _check_divisible("reduce_scatter", x, dim, g)
    return _ReduceScatter.apply(x, dim, g)


def slice_for_rank(x: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
    """Narrow `x` (replicated over `axis`) to this rank's 1/size chunk along `dim`; no communication.

    Backward all-gathers the gradient, so every rank gets the full input gradient
    (Megatron's scatter-to-region convention for a replicated input).

    Args:
        x: a tensor replicated over the axis; `dim` divisible by the group size.
        axis: mesh axis name, e.g. "tp".
        dim: tensor dim to slice.

    Returns:
        Chunk i of `x` on group rank i (a view).
    """
    g = _lookup(axis, "slice_for_rank")
    if g.size == 1:
        return x
    dim = _check_divisible("slice_for_rank", x, dim, g)
    return _SliceForRank.apply(x, dim, g)


def gather_replicated(x: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
    """Concatenate the ranks' `x` along `dim`, for a consumer that is replicated over `axis`.

    Unlike `all_gather`, backward takes this rank's chunk of the gradient without
    communicating: a replicated consumer gives every rank the whole gradient
    already (DTD's gather before the combine).

    Args:
        x: this rank's chunk; the same shape on every rank.
        axis: mesh axis name, e.g. "tp".
        dim: tensor dim to concatenate along.

    Returns:
        A tensor whose `dim` is group-size times longer.
    """
    g = _lookup(axis, "gather_replicated")
    if g.size == 1:
        return x
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"gather_replicated: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}.")
    return _GatherReplicated.apply(x, dim % x.dim(), g)


def agree_max(value: int, axis: str) -> int:
    """The largest `value` over the ranks of `axis` (an int all-reduce with MAX; no gradient).

    Dropless routing sizes its expert buffers by the largest load of the step,
    which differs between the token groups of an expert-parallel group; the
    all-to-all needs one size for all of them.

    Args:
        value: this rank's number (e.g. its dropless capacity).
        axis: mesh axis name, e.g. "ep".

    Returns:
        The maximum over the axis, the same on every rank of the group.
    """
    g = _lookup(axis, "agree_max")
    if g.size == 1:
        return value
    if _simulated(g):
        _count(g, "all_reduce", torch.tensor([int(value)], dtype=torch.int64), "forward")
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(g.group) == "nccl" else "cpu"
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)  # nccl takes only GPU tensors
    _count(g, "all_reduce", t, "forward")
    return int(_compat.wait_collective(_compat.funcol.all_reduce(t, "max", g.group)).item())
