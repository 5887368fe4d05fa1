"""Every rank calls the ParallelModule with inputs of the same shapes and dtypes: a check cheap enough for every call.

The expert all-to-alls, the tensor-parallel collectives and the token group's input broadcast exchange
buffers whose sizes and dtypes follow the inputs, so one rank called with other shapes would make them
fail or hang. `ParallelModule` runs `check_same_inputs` on every call, before its first collective
(docs/parallelism.md, "Cost of the checks"):

1. each rank describes its call by a signature: (dtype, shape) of each tensor leaf of (args, kwargs),
   None for any other leaf (their values are not compared);
2. and by a 62-bit digest of it (blake2b of its repr: equal on every process, unlike the salted `hash`);
3. one all-reduce (max) over the world of [digest, -digest] gives the largest and the smallest digest:
   16 bytes, the same fixed-size collective on every rank and every call, and no pickle;
4. when they are equal every rank was called alike (two different signatures share a digest with
   probability 2^-62), and the call goes on;
5. otherwise every rank sees the same two numbers, so all of them take the slow path together: one
   `all_gather_object` of the signatures, and the same ValueError on every rank, naming the ranks and
   what each passed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from .._compat import pytree

__all__ = ["check_same_inputs", "different_inputs_message", "input_signature", "signature_digest"]

Signature = tuple[Optional[tuple[str, tuple[int, ...]]], ...]
"""(dtype name, shape) per tensor leaf of a call, None per other leaf, in pytree order."""

MAX_GROUPS_NAMED = 8
"""Distinct signatures spelled out in the error; more are counted."""


def input_signature(args: tuple, kwargs: dict) -> Signature:
    """What must be equal on every rank: each tensor leaf's dtype and shape, in order."""
    return tuple((str(x.dtype), tuple(int(d) for d in x.shape)) if isinstance(x, torch.Tensor) else None
                 for x in pytree.tree_leaves((args, kwargs)))


def signature_digest(signature: Signature) -> int:
    """A digest of `signature` in [0, 2^62): the same in every process (no hash salt), so ranks can compare it."""
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # room for its negation in an int64


def check_same_inputs(args: tuple, kwargs: dict, *, device: torch.device, group: dist.ProcessGroup | None = None
                      ) -> None:
    """Raise the same ValueError on every rank of `group` (the world) unless all were called alike.

    Args:
        args, kwargs: this rank's call, bound to the inputs of the capture.
        device: where the group's collectives take tensors (the GPU for nccl, else the CPU).
        group: the ranks that must agree; None: the world.

    Example:
        >>> check_same_inputs((tokens,), {}, device=torch.device("cpu"))  # one all-reduce of 16 bytes
    """
    signature = input_signature(args, kwargs)
    digest = signature_digest(signature)
    bounds = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    largest, negated_smallest = bounds.tolist()
    if largest == -negated_smallest:
        return
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, signature, group=group)  # only on the way to the error
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(everyone)))
    raise ValueError(different_inputs_message(dict(zip(ranks, everyone))))


def different_inputs_message(signatures: dict[int, Signature]) -> str:
    """The error for {rank: signature} that are not all equal: the ranks grouped by what they passed."""
    shapes = {rank: [None if leaf is None else leaf[1] for leaf in sig] for rank, sig in signatures.items()}
    same_shapes = len({repr(s) for s in shapes.values()}) == 1
    by_call: dict[str, list[int]] = {}
    for rank, sig in sorted(signatures.items()):
        entries = [_describe(leaf, with_dtype=same_shapes) for leaf in sig]
        by_call.setdefault(f"[{', '.join(entries)}]", []).append(rank)
    groups = [f"{_ranks(ranks)}: {call}" for call, ranks in by_call.items()]
    if len(groups) > MAX_GROUPS_NAMED:
        groups = groups[:MAX_GROUPS_NAMED] + [f"and {len(groups) - MAX_GROUPS_NAMED} more"]
    detail = "; ".join(groups)
    if same_shapes:
        return (f"ranks called the ParallelModule with inputs of different dtypes ({detail}). Every rank must "
                f"pass inputs of the same dtypes (the token group's broadcast and the all-to-alls exchange "
                f"buffers of one dtype); convert them alike on every rank.")
    return (f"ranks called the ParallelModule with different input shapes ({detail}). Every rank must pass a "
            f"micro-batch of the same shape (the expert all-to-alls exchange equal-size buffers); pad or drop "
            f"the last batch.")


def _describe(leaf: tuple[str, tuple[int, ...]] | None, *, with_dtype: bool) -> str:
    if leaf is None:
        return "None"
    dtype, shape = leaf
    return f"{shape} {dtype}" if with_dtype else str(shape)


def _ranks(ranks: list[int]) -> str:
    """"rank 3", "ranks 0, 2", "ranks 0-3, 5": runs of three or more consecutive ranks as a range."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    parts = [f"{run[0]}-{run[-1]}" if len(run) >= 3 else ", ".join(map(str, run)) for run in runs]
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(parts)}"
