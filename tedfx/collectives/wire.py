"""How an op puts its collective on the wire: process-group calls in eager mode, functional collectives
under tracing (docs/architecture.md, "Collectives name axes").

torch.compile traces only the functional collectives (`torch.distributed._functional_collectives`).
In eager mode they wrap every result twice, in an `AsyncCollectiveTensor` and in an autograd-aware
tensor, through several layers of Python per call; on a CPU training step that was about a tenth of
a rank's time. Outside tracing the ops therefore call the process group directly, on buffers they
allocate themselves, and wait on its work object: the same collectives with the same bytes, in the
same order, without the wrappers. One exception in kind, not in bytes: on gloo a reduce-scatter of CPU
tensors is an all-to-all and a local sum (`_reduce_scatter_by_all_to_all`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _compat

__all__ = ["InFlight", "all_gather", "all_reduce", "all_to_all_start", "broadcast_", "reduce_scatter", "wait"]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class InFlight:
    """An eager collective started with `async_op=True`; `wait()` gives its result (once waited, at once)."""

    __slots__ = ("_out", "_work")

    def __init__(self, out: torch.Tensor, work: dist.Work) -> None:
        self._out, self._work = out, work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._out


def wait(result: torch.Tensor | InFlight) -> torch.Tensor:
    """The plain tensor behind a collective's result, waiting for it if it is in flight."""
    if isinstance(result, InFlight):
        return result.wait()
    return _compat.wait_collective(result)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def all_reduce(x: torch.Tensor, op: str, group: dist.ProcessGroup) -> torch.Tensor:
    """The reduction of the contiguous `x` over `group`, a new tensor (x is left as it is)."""
    if _tracing():
        return wait(_compat.funcol.all_reduce(x, op, group))
    out = x.clone()
    dist.all_reduce(out, _REDUCE_OPS[op], group=group)
    return out


def broadcast_(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The group's first rank's contiguous `x` on every rank of `group`: eager, into `x` itself (the caller's own
    buffer); under tracing, a new tensor."""
    if _tracing():
        return wait(_compat.funcol.broadcast(x, 0, group))  # funcol takes the rank within the group
    dist.broadcast(x, src=dist.get_global_rank(group, 0), group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """The group's contiguous `x`s concatenated along `dim` (0 <= dim < x.dim()), in group-rank order."""
    if _tracing():
        return wait(_compat.funcol_all_gather(x, dim, group))
    out = x.new_empty((size, *x.shape))
    _compat.all_gather_into(out.flatten(0, 1), x, group=group)
    if dim == 0:
        return out.flatten(0, 1)
    return out.movedim(0, dim).flatten(dim, dim + 1)  # one copy, as a concatenation along dim makes


def reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """This rank's 1/size chunk along `dim` of the sum of the group's `x` (dim divisible by size)."""
    if _tracing():
        return wait(_compat.funcol_reduce_scatter(x, "sum", dim, group))
    if dim != 0:  # the process group scatters dim 0: bring the chunks there (one copy)
        x = x.unflatten(dim, (size, -1)).movedim(dim, 0).contiguous().flatten(0, 1)
    if x.device.type == "cpu" and dist.get_backend(group) == "gloo":
        return _reduce_scatter_by_all_to_all(x, group, size)
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    _reduce_scatter_into(out, x, group)
    return out


def _reduce_scatter_by_all_to_all(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """Gloo's reduce-scatter of CPU tensors reduces the whole tensor on every rank (an all-reduce's work) before
    it keeps a chunk: 1.3-2.6x the time of sending each rank its chunk of every partial sum and adding the `size`
    received partials here (docs/architecture.md, "Collectives name axes"). The same bytes leave each rank as in a
    reduce-scatter, (size - 1) / size of x."""
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x, group=group)
    partials = received.chunk(size)  # size > 1: the ops never issue a collective over an axis of one rank
    out = partials[0] + partials[1]  # adds in rank order: 4-5x faster here than a sum over a new dim 0
    for partial in partials[2:]:
        out += partial
    return out


def all_to_all_start(x: torch.Tensor, recv: list[int] | None, send: list[int] | None,
                     group: dist.ProcessGroup) -> torch.Tensor | InFlight:
    """Start exchanging the contiguous `x`'s dim-0 blocks (equal ones when `send`/`recv` are None); `wait` ends it."""
    if _tracing():
        return _compat.funcol.all_to_all_single(x, recv, send, group)
    out = x.new_empty((sum(recv), *x.shape[1:])) if recv is not None else torch.empty_like(x)
    work = dist.all_to_all_single(out, x, recv, send, group=group, async_op=True)
    return InFlight(out, work)


_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    # torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single (the old name warns).
    _reduce_scatter_single(out, x, group=group)
