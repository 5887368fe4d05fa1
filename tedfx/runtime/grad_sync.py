"""Gradient synchronisation: DDP semantics over each parameter's own data-parallel group.

Non-expert parameters are replicated over "dp" (X*D ranks), experts over "edp"
(D ranks). Every gradient is averaged over the X*D token groups of the step:
an expert's local gradient already sums the X token groups of its expert-
parallel group (the all-to-all brought their tokens to it), so experts are
summed over "edp" and divided by X*D, like the rest. After `loss.backward()`
returns, every `.grad` is final and any torch optimizer can step.

In order (docs/parallelism.md, "Gradient sync"):
1. Gradients live in flat buckets of about `bucket_mb` MiB (by default 1/8 of an axis's
   gradient bytes, within 0.25-25 MiB, and the first a quarter of that), one dtype and one kind each (split or
   whole, below), filled
   in reverse registration order (roughly the order backward produces them). Each
   bucket is allocated once; every `.grad` is a view into its bucket: the gradient autograd makes
   first in a step is copied into the view once accumulated (then the view is `.grad`), and later
   backwards of an accumulation add into the view in place.
2. A bucket's all-reduce starts, in place on the bucket, as soon as all of its
   gradients are accumulated, in bucket order on every rank (so all ranks issue the
   same collectives in the same order), and overlaps with the rest of the backward.
3. The end of backward waits for every bucket and divides it in place. Nothing is
   copied: the averages are already in `.grad`. On a group of one rank nothing is
   sent; the bucket is only divided.

Split buckets: a parameter that tensor parallelism leaves whole has the same gradient
on the T ranks of a tensor group (Megatron's f and g make it so), so reducing all of it
over "dp" on every tensor rank would send the same bytes T times across the data-parallel
links. Such parameters get buckets of their own, and tensor rank t all-reduces only the
t-th of T slices of each; after the wait an all-gather over "tp" (inside a node) gives
every tensor rank the whole average. The data-parallel bytes of those gradients drop to 1/T.

Frozen parameters: a bucketed parameter whose requires_grad is turned off after parallelize keeps
`.grad` None (its view is not adopted; the bucket sends zeros in its place), so optimizers skip it as
with DDP; a bucket's all-reduce no longer waits for it. Turning it on again adopts the view as before. A
parameter frozen when GradSync was built has no bucket: turning it on later is an error (docs/parallelism.md,
"Gradient sync").

Gradient accumulation: inside `no_sync()` nothing is communicated and gradients add
up locally; the next synced backward reduces the sum. A backward outside `no_sync()`
onto gradients that were already averaged works too (each micro-batch is averaged
once): such a bucket is first multiplied by divisor / group size, which undoes the
re-reduction of its already averaged part (1 for non-expert buckets, X for experts).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat
from ..collectives import CommStats

__all__ = ["BucketPlan", "GradSync", "bucket_limit", "plan_buckets"]


@dataclass(frozen=True)
class BucketPlan:
    """One all-reduce of the gradient sync: which parameters, over which axis, how many bytes, in which dtype."""

    axis: str
    names: tuple[str, ...]
    nbytes: int
    """Bytes of the gradients in the bucket."""
    dtype: torch.dtype = torch.float32
    split: int = 1
    """T for a bucket of parameters that tensor parallelism leaves whole: each tensor rank all-reduces one of T
    slices over `axis`, then an all-gather over "tp" joins them. 1: the whole bucket is all-reduced."""

    @property
    def slice_numel(self) -> int:
        """Elements each rank all-reduces: the bucket's, or with a split a T-th of them rounded up."""
        return -(-(self.nbytes // self.dtype.itemsize) // self.split)


def _fill(params: list[tuple[str, nn.Parameter, str]], axis: str, limit: int | None,
          split_of: Callable[[str], int] = lambda name: 1, first_limit: int | None = None) -> list[BucketPlan]:
    """Buckets of one axis: parameters in reverse order, one open bucket per (dtype, split), closed at `limit`
    bytes; the axis's first bucket to close, at `first_limit` (default `limit`)."""
    plans = []
    open_buckets: dict[tuple[torch.dtype, int], tuple[list[str], list[int]]] = {}
    for name, p, a in reversed(params):
        if a != axis or not p.requires_grad:
            continue
        key = (p.dtype, split_of(name))
        names, size = open_buckets.setdefault(key, ([], [0]))
        names.append(name)
        size[0] += p.numel() * p.element_size()
        closing = limit if plans or first_limit is None else first_limit
        if closing is not None and size[0] >= closing:
            plans.append(BucketPlan(axis, tuple(names), size[0], *key))
            del open_buckets[key]
    plans += [BucketPlan(axis, tuple(names), size[0], *key) for key, (names, size) in open_buckets.items()]
    return plans


AUTO_BUCKETS = 8
"""bucket_mb=None aims at this many buckets per axis: the later ones overlap with the rest of the backward."""
AUTO_BUCKET_MIB = (0.25, 25.0)
"""bucket_mb=None keeps buckets within these sizes: per-call latency below (0.25 MiB measured 5-6 % faster than 1 MiB
on a small model over a slow link, docs/parallelism.md "Gradient sync"), DDP's default above."""


FIRST_BUCKET_FRACTION = 4
"""bucket_mb=None closes an axis's first bucket at 1/4 of the others' size: the last layer's gradients, ready first,
go on the wire before the layer below is done (DDP's first bucket is small for the same reason)."""


def bucket_limit(params: list[tuple[str, nn.Parameter, str]], axis: str, bucket_mb: float | None) -> int:
    """Bytes at which a bucket of `axis` closes: `bucket_mb`, or with None 1/AUTO_BUCKETS of the axis's gradient
    bytes within AUTO_BUCKET_MIB."""
    if bucket_mb is not None:
        return int(bucket_mb * 2**20)
    total = sum(p.numel() * p.element_size() for _, p, a in params if a == axis and p.requires_grad)
    low, high = (int(m * 2**20) for m in AUTO_BUCKET_MIB)
    return min(max(total // AUTO_BUCKETS, low), high)


def plan_buckets(params: list[tuple[str, nn.Parameter, str]], sizes: dict[str, int],
                 bucket_mb: float | None, tensor_whole: frozenset[str] = frozenset()) -> list[BucketPlan]:
    """The all-reduces GradSync issues per step, in issue order (pure: explain predicts with it).

    Args:
        params: (name, parameter, axis) triples in registration order, axis "dp" or "edp".
        sizes: {axis: group size}; axes of one rank issue nothing. "tp" (default 1) splits the buckets of
            `tensor_whole` parameters.
        bucket_mb: bucket size in MiB; None: automatic (`bucket_limit`).
        tensor_whole: names of the parameters tensor parallelism leaves whole (`tedfx.sharding.tensor_whole`).
    """
    tensor = sizes.get("tp", 1)

    def split_of(name: str) -> int:
        return tensor if name in tensor_whole else 1

    plans = []
    for axis in ("dp", "edp"):
        if sizes[axis] > 1:
            limit = bucket_limit(params, axis, bucket_mb)
            first = limit // FIRST_BUCKET_FRACTION if bucket_mb is None else None
            plans += _fill(params, axis, limit, split_of, first)
    return plans


def record_plan(stats: CommStats, plan: BucketPlan) -> None:
    """Count what one bucket sends per step: its all-reduce over its axis, and with a split the all-gather over
    "tp" that joins the slices (phase "backward")."""
    numel = plan.slice_numel
    stats.record("all_reduce", plan.axis, "backward", numel * plan.dtype.itemsize, (numel,), plan.dtype)
    if plan.split > 1:
        stats.record("all_gather", "tp", "backward", numel * plan.dtype.itemsize, (numel,), plan.dtype)


@dataclass
class _Bucket:
    plan: BucketPlan
    group: dist.ProcessGroup | None
    """None: a group of one rank, nothing to send."""
    group_size: int
    params: list[nn.Parameter]
    flat: torch.Tensor
    """The gradients, padded to a multiple of the split."""
    views: list[torch.Tensor]
    part: torch.Tensor
    """What this rank all-reduces: the whole flat, or its slice of a split bucket."""
    ready: set[int] = field(default_factory=set)
    work: object = None
    synced: bool = False
    """The bucket holds averaged gradients (set when a synced backward finishes)."""
    trainable: int = 0
    """Parameters that require grad, counted when a synced backward starts: gradients the launch waits for."""


def _is_view(grad: torch.Tensor | None, view: torch.Tensor) -> bool:
    return grad is not None and grad.data_ptr() == view.data_ptr() and grad.shape == view.shape \
        and grad.dtype == view.dtype


class GradSync:
    """Bucketed, overlapped, in-place gradient all-reduce for a rank's parameters.

    Args:
        params: (name, parameter, axis) triples, axis "dp" or "edp".
        groups: {axis: process group}; "tp" is needed for split buckets.
        divisor: X*D, the token groups averaged over.
        bucket_mb: bucket size in MiB.
        stats: where the all-reduces (and the split buckets' all-gathers) are counted (phase "backward").
        tensor_whole: names of the parameters tensor parallelism leaves whole: their buckets are split.
    """

    def __init__(self, params: list[tuple[str, nn.Parameter, str]], groups: dict[str, dist.ProcessGroup],
                 divisor: int, bucket_mb: float, stats: CommStats | None,
                 tensor_whole: frozenset[str] = frozenset()) -> None:
        self.divisor = divisor
        self.stats = stats
        self.enabled = True
        self.tp_group = groups.get("tp")
        by_name = {name: p for name, p, _ in params}
        sizes = {axis: dist.get_world_size(groups[axis]) for axis in ("dp", "edp")}
        sizes["tp"] = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        plans = [(plan, groups[plan.axis]) for plan in plan_buckets(params, sizes, bucket_mb, tensor_whole)]
        if divisor > 1:
            # Parameters on a one-rank group: nothing to send, only the average to take (experts with D = 1).
            plans += [(plan, None) for axis in ("dp", "edp") if sizes[axis] == 1
                      for plan in _fill(params, axis, None)]
        self.buckets = [self._allocate(plan, group, [by_name[n] for n in plan.names]) for plan, group in plans]
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._next = 0
        self._callback_queued = False
        self.finished = 0
        """Synced backwards finished so far (the same count on every rank)."""
        self._untracked = [(name, p) for name, p in by_name.items() if id(p) not in self._where] if divisor > 1 else []
        """Parameters frozen when the sync was built: no bucket, so their gradient would never be averaged."""
        bucketed = [p for p in by_name.values() if id(p) in self._where]
        self._handles = [p.register_hook(self._before_accumulate(p)) for p in bucketed]
        self._handles += [p.register_post_accumulate_grad_hook(self._on_grad)
                          for p in by_name.values() if p.requires_grad]

    def _allocate(self, plan: BucketPlan, group: dist.ProcessGroup | None, params: list[nn.Parameter]) -> _Bucket:
        flat = torch.zeros(plan.slice_numel * plan.split, dtype=plan.dtype, device=params[0].device)
        views, offset = [], 0
        for p in params:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        size = 1 if group is None else dist.get_world_size(group)
        part = flat
        if plan.split > 1:
            part = flat.narrow(0, dist.get_rank(self.tp_group) * plan.slice_numel, plan.slice_numel)
        return _Bucket(plan, group, size, params, flat, views, part)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside add their gradients up locally; the next synced backward reduces the sum."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # --- hooks --------------------------------------------------------------------------------

    def _before_accumulate(self, p: nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            bucket, _ = self._where[id(p)]
            if bucket.synced:
                self._unsync(bucket)

        return hook

    def _adopt(self, bucket: _Bucket, i: int) -> None:
        """Make the parameter's .grad its bucket view: later backwards accumulate into the bucket in place.

        The first gradient of a step is the one autograd just made (it takes the tensor of a fresh gradient
        rather than adding it to zeros): it is copied into the view, one pass, where zeroing the view
        for autograd to add into would take two more.
        """
        p, view = bucket.params[i], bucket.views[i]
        if _is_view(p.grad, view):
            return
        if p.grad is None:
            view.zero_()
        else:  # the gradient autograd made, or one the user set
            view.copy_(p.grad)
        p.grad = view

    @staticmethod
    def _release(bucket: _Bucket, i: int) -> None:
        """A frozen parameter: its .grad stays None (or, if it still is its view, a copy the sync leaves alone),
        as a backward leaves a frozen parameter's gradient; its view takes part in the all-reduce as zeros."""
        p, view = bucket.params[i], bucket.views[i]
        if _is_view(p.grad, view):
            p.grad = view.clone()
        view.zero_()

    def _unsync(self, bucket: _Bucket) -> None:
        """An averaged bucket gets a new backward: scale it so that the next reduction leaves it averaged."""
        factor = self.divisor // bucket.group_size
        if factor != 1:
            for p, view in zip(bucket.params, bucket.views):
                if p.requires_grad and _is_view(p.grad, view):  # a frozen one's .grad is released as it is
                    view.mul_(factor)
        bucket.synced = False

    def _on_grad(self, p: nn.Parameter) -> None:
        where = self._where.get(id(p))
        if where is not None:
            self._adopt(*where)
        if not self.enabled:
            return
        if not self._callback_queued:
            _compat.queue_backward_callback(self._finish)
            self._callback_queued = True
            for b in self.buckets:  # frozen parameters get no gradient: a bucket does not wait for them
                b.trainable = sum(p.requires_grad for p in b.params)
        if where is not None:
            where[0].ready.add(id(p))
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if len(b.ready) < b.trainable:
                return
            self._launch(b)
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        # Parameters that got no gradient this backward still take part (as zeros, or as what they hold);
        # frozen ones as zeros, their .grad left alone (docs/parallelism.md, "Gradient sync").
        for i, p in enumerate(b.params):
            if p.requires_grad:
                self._adopt(b, i)
            else:
                self._release(b, i)
        if b.group is None:
            return
        if self.stats is not None:
            record_plan(self.stats, b.plan)
        b.work = dist.all_reduce(b.part, group=b.group, async_op=True)

    def _finish(self) -> None:
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        gathers = []
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            b.part.div_(self.divisor)
            if b.part is not b.flat and b.group is not None:
                # This rank's averaged slice to the other tensor ranks, theirs into the rest of the bucket.
                gathers.append(_compat.all_gather_into(b.flat, b.part.clone(), group=self.tp_group, async_op=True))
            b.ready.clear()
            b.work = None
            b.synced = True
        for work in gathers:
            work.wait()
        self._next = 0
        self._callback_queued = False
        self.finished += 1
        thawed = [name for name, p in self._untracked if p.requires_grad]
        if thawed:
            raise RuntimeError(
                f"{thawed[:5]}{' ...' if len(thawed) > 5 else ''} did not require grad when tedfx.parallelize ran, so "
                f"their gradients are not averaged over the data-parallel ranks and training them would make the "
                f"replicas diverge. Parallelize with them trainable and call requires_grad_(False) on them "
                f"afterwards; they can then be frozen and unfrozen at will (docs/parallelism.md, \"Gradient sync\").")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
