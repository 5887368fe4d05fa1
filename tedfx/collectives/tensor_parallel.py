"""The tensor-parallel collectives: Megatron's f and g, the gathers, the reduce-scatter, slicing, agree_max.

Each is an autograd Function over `wire`'s collectives, paired with its adjoint (the table in
`tedfx.collectives`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import wire
from .binding import _AxisGroup, _check_divisible, _count, _local_chunk, _lookup, _simulated

__all__ = ["agree_max", "all_gather", "all_reduce", "gather_replicated", "identity_fwd_all_reduce_bwd",
           "reduce_scatter", "slice_for_rank"]


def _issue_all_reduce(x: torch.Tensor, g: _AxisGroup, phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "all_reduce", x, phase)
    if _simulated(g):
        return x.clone()
    return wire.all_reduce(x, "sum", g.group)


def _issue_all_gather(x: torch.Tensor, dim: int, g: _AxisGroup, phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "all_gather", x, phase)
    if _simulated(g):
        return torch.cat([x] * g.size, dim=dim)
    return wire.all_gather(x, dim, g.group, g.size)


def _issue_reduce_scatter(x: torch.Tensor, dim: int, g: _AxisGroup, phase: str) -> torch.Tensor:
    x = x.contiguous()
    _count(g, "reduce_scatter", x, phase)
    if _simulated(g):
        return _local_chunk(x, dim, g).clone()
    return wire.reduce_scatter(x, dim, g.group, g.size)


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
    return int(wire.all_reduce(t, "max", g.group).item())
