"""Gradient synchronisation: DDP semantics over each parameter's own data-parallel group.

Non-expert parameters are replicated over "dp" (X*D ranks), experts over "edp"
(D ranks). Every gradient is averaged over the X*D token groups of the step:
an expert's local gradient already sums the X token groups of its expert-
parallel group (the all-to-all brought their tokens to it), so experts are
summed over "edp" and divided by X*D, like the rest. After `loss.backward()`
returns, every `.grad` is final and any torch optimizer can step.

Gradients are packed into buckets of about `bucket_mb` MiB in reverse
registration order (roughly the order backward produces them). A bucket's
all-reduce starts as soon as all of its gradients are accumulated, in bucket
order on every rank (so all ranks issue the same collectives in the same
order), and overlaps with the rest of the backward; the end of backward waits
for all of them and copies the averages back. On a group of one rank nothing
is sent: the gradients are only divided. With gradient accumulation (several
backwards before a step), only each backward's new gradient is reduced and
averaged, and added to the average already in `.grad`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat
from ..collectives import CommStats

__all__ = ["BucketPlan", "GradSync", "plan_buckets"]


@dataclass(frozen=True)
class BucketPlan:
    """One all-reduce of the gradient sync: which parameters, over which axis, how many bytes."""

    axis: str
    names: tuple[str, ...]
    nbytes: int


def plan_buckets(params: list[tuple[str, nn.Parameter, str]], sizes: dict[str, int],
                 bucket_mb: float) -> list[BucketPlan]:
    """The all-reduces GradSync issues per step, in issue order (pure: explain predicts with it).

    Args:
        params: (name, parameter, axis) triples in registration order, axis "dp" or "edp".
        sizes: {axis: group size}; axes of one rank issue nothing.
        bucket_mb: bucket size in MiB.
    """
    limit = int(bucket_mb * 2**20)
    plans = []
    for axis in ("dp", "edp"):
        if sizes[axis] == 1:
            continue
        names, size = [], 0
        for name, p, a in reversed(params):
            if a != axis or not p.requires_grad:
                continue
            names.append(name)
            size += p.numel() * p.element_size()
            if size >= limit:
                plans.append(BucketPlan(axis, tuple(names), size))
                names, size = [], 0
        if names:
            plans.append(BucketPlan(axis, tuple(names), size))
    return plans


@dataclass
class _Bucket:
    plan: BucketPlan
    group: dist.ProcessGroup
    params: list[nn.Parameter]
    ready: set[int] = field(default_factory=set)
    flat: torch.Tensor | None = None
    work: object = None


class GradSync:
    """Bucketed, overlapped gradient all-reduce for a rank's parameters.

    Args:
        params: (name, parameter, axis) triples, axis "dp" or "edp".
        groups: {axis: process group}.
        divisor: X*D, the token groups averaged over.
        bucket_mb: bucket size in MiB.
        stats: where the all-reduces are counted (phase "backward").
    """

    def __init__(self, params: list[tuple[str, nn.Parameter, str]], groups: dict[str, dist.ProcessGroup],
                 divisor: int, bucket_mb: float, stats: CommStats | None) -> None:
        self.divisor = divisor
        self.stats = stats
        by_name = {name: p for name, p, _ in params}
        sizes = {axis: dist.get_world_size(groups[axis]) for axis in ("dp", "edp")}
        self.buckets = [_Bucket(plan, groups[plan.axis], [by_name[n] for n in plan.names])
                        for plan in plan_buckets(params, sizes, bucket_mb)]
        synced = {id(p) for b in self.buckets for p in b.params}
        # Parameters on a one-rank group: nothing to send, only the average to take.
        self.local = [p for _, p, _ in params if p.requires_grad and id(p) not in synced]
        self._where = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._next = 0
        self._callback_queued = False
        self._previous: dict[int, torch.Tensor] = {}
        """This backward's starting .grad of each parameter that had one (gradient accumulation)."""
        trained = [p for _, p, _ in params if p.requires_grad]
        self._handles = [p.register_hook(self._remember_previous(p)) for p in trained]
        self._handles += [p.register_post_accumulate_grad_hook(self._on_grad) for p in trained]

    def _remember_previous(self, p: nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            if p.grad is not None and id(p) not in self._previous:
                self._previous[id(p)] = p.grad.detach().clone()

        return hook

    def _new_grad(self, p: nn.Parameter) -> torch.Tensor:
        """What this backward added to p.grad (all of it, without accumulation)."""
        if p.grad is None:
            return torch.zeros_like(p)
        previous = self._previous.get(id(p))
        return p.grad if previous is None else p.grad - previous

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._callback_queued:
            _compat.queue_backward_callback(self._finish)
            self._callback_queued = True
        i = self._where.get(id(p))
        if i is not None:
            self.buckets[i].ready.add(id(p))
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if len(b.ready) < len(b.params):
                return
            self._launch(b)
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        b.flat = torch.cat([self._new_grad(p).reshape(-1) for p in b.params])
        if self.stats is not None:
            self.stats.record("all_reduce", b.plan.axis, "backward", b.flat.numel() * b.flat.element_size())
        b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)

    def _finish(self) -> None:
        # Parameters that got no gradient this step still take part (as zeros): same collectives on every rank.
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for b in self.buckets:
            b.work.wait()
            b.flat.div_(self.divisor)
            offset = 0
            for p in b.params:
                chunk = b.flat[offset:offset + p.numel()].view_as(p)
                previous = self._previous.get(id(p))
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk if previous is None else previous + chunk)
                offset += p.numel()
            b.ready.clear()
            b.flat = b.work = None
        if self.divisor > 1:
            for p in self.local:
                if p.grad is not None:
                    previous = self._previous.get(id(p))
                    new = self._new_grad(p).div(self.divisor)
                    p.grad.copy_(new if previous is None else previous + new)
        self._previous.clear()
        self._next = 0
        self._callback_queued = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
