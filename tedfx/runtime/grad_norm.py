"""The global gradient norm of a TED-parallel model: every parameter counted exactly once.

A rank holds shards of some parameters and copies of others. After the gradient sync,
every copy of a parameter holds the same gradient: a non-expert weight is replicated over
"ep" and "edp" (and over "tp" when tensor parallelism does not split it), an expert over
"edp" (and "tp" for biases added after the tensor-parallel sum). `ParamShard.splits` names
the axes a parameter is split over; it is replicated over the others. So the rank whose
coordinate is 0 on every replicated axis counts the parameter and the others do not, and
one all-reduce over the world sums each parameter's contribution once
(docs/parallelism.md, "Gradient clipping").

`torch.nn.utils.clip_grad_norm_(pm.parameters())` instead computes the norm of the rank's
own shards, different on every rank, and scales replicated gradients differently on each
replica: the replicas drift apart (tedfx.runtime.replicas detects it).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..axes import MESH_AXES
from ..collectives import CommStats
from ..sharding import ParamShard

__all__ = ["clip_coefficient", "counted_here", "global_grad_norm"]


def counted_here(shard: ParamShard, coords: dict[str, int]) -> bool:
    """Whether this rank's copy of a parameter is the one that counts (coordinate 0 on every replicated axis)."""
    split = {axis for axis, _ in shard.splits}
    return all(coords[axis] == 0 for axis in MESH_AXES if axis not in split)


def global_grad_norm(params: Iterable[tuple[str, nn.Parameter]], shards: dict[str, ParamShard],
                     coords: dict[str, int], *, norm_type: float = 2.0, check_every_copy: bool = False,
                     stats: CommStats | None = None, group: dist.ProcessGroup | None = None) -> float:
    """The norm of the whole model's gradient, the same number on every rank.

    Args:
        params: (state-dict name, parameter) of this rank; parameters without a gradient count as zero.
        shards: {name: ParamShard}, how each parameter is split over the mesh.
        coords: this rank's mesh coordinates.
        norm_type: p of the p-norm; `math.inf` for the largest absolute entry.
        check_every_copy: also look for inf/nan in the copies that do not count (an overflow on any
            rank must be seen by all: fp16's loss scaler skips the step on every rank alike).
        stats: where the all-reduce is counted (kind "all_reduce", axis "world", phase "optimizer").
        group: the world's process group (None: the default group).

    Returns:
        The norm as a Python float; inf when some copy's gradient is not finite (with check_every_copy),
        else inf or nan as the arithmetic gives it.
    """
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type={norm_type} is invalid: expected a p > 0 or math.inf.")
    params = list(params)
    device = next((p.device for _, p in params), torch.device("cpu"))  # where the backend reduces (nccl: the GPU)
    # [sum of |g|^p (or max |g|) over the parameters counted here, copies with inf/nan that do not count]
    local = torch.zeros(2, dtype=torch.float64, device=device)
    for name, p in params:
        if p.grad is None:
            continue
        counted = counted_here(shards[name], coords)
        if not counted and not check_every_copy:
            continue
        # dtype=float32 accumulates 16-bit gradients in fp32 without an fp32 copy of them.
        norm = torch.linalg.vector_norm(p.grad, norm_type, dtype=torch.float32).double()
        if not counted:
            local[1] += (~torch.isfinite(norm)).double()
        elif norm_type == math.inf:
            local[0] = torch.maximum(local[0], norm)
        else:
            local[0] += norm**norm_type
    if stats is not None:
        stats.record("all_reduce", "world", "optimizer", local.numel() * local.element_size(), (2,), local.dtype)
    dist.all_reduce(local, op=dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM, group=group)
    total, overflowed_copies = float(local[0]), float(local[1])
    if overflowed_copies:
        return math.inf
    return total if norm_type == math.inf else total ** (1.0 / norm_type)


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ scales gradients by: min(max_norm / (norm + 1e-6), 1)."""
    return min(max_norm / (total_norm + 1e-6), 1.0)
