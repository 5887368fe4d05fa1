"""The expert all-to-alls: the exchange of equal chunks, the packed exchange with its loads, and the
start/wait pair that keeps an exchange in flight (docs/parallelism.md, "Overlap").
"""

from __future__ import annotations

import torch

from . import wire
from .binding import _AxisGroup, _check_divisible, _count, _lookup, _phase, _simulated

__all__ = ["AllToAllInFlight", "all_to_all", "all_to_all_packed", "all_to_all_start", "all_to_all_wait",
           "exchange_loads"]


def _issue_all_to_all(x: torch.Tensor, g: _AxisGroup, phase: str) -> torch.Tensor:
    return wire.wait(_start_all_to_all(x, g, phase))


def _issue_all_to_all_packed(x: torch.Tensor, send: list[int], recv: list[int], g: _AxisGroup,
                             phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "all_to_all", x, phase)
    if _simulated(g):
        return x.clone()  # a simulated rank receives what it sends (exchange_loads agrees)
    return wire.wait(wire.all_to_all_start(x, recv, send, g.group))


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
    out = wire.wait(wire.all_to_all_start(loads, None, None, g.group))
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
        self.result: torch.Tensor | wire.InFlight | None = None
        self.grad: torch.Tensor | wire.InFlight | None = None


def _start_all_to_all(x: torch.Tensor, g: _AxisGroup, phase: str) -> torch.Tensor | wire.InFlight:
    """Issue an all-to-all of dim 0 and return without waiting (`wire.wait` gives the result)."""
    if g.size == 1:
        return x
    x = x.contiguous()
    _count(g, "all_to_all", x, phase)
    if _simulated(g):
        return x.clone()
    return wire.all_to_all_start(x, None, None, g.group)


class _AllToAllStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, flight: AllToAllInFlight) -> torch.Tensor:
        ctx.flight = flight
        flight.result = _start_all_to_all(x, flight.g, _phase("forward"))
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad: torch.Tensor):
        flight = ctx.flight
        grad, flight.grad = wire.wait(flight.grad), None
        return grad, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, flight: AllToAllInFlight) -> torch.Tensor:
        ctx.flight = flight
        out, flight.result = wire.wait(flight.result), None
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
