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
for all of them and copies the averages back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat
from ..collectives import CommStats

__all__ = ["GradSync"]


@dataclass
class _Bucket:
    axis: str
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
        self.buckets: list[_Bucket] = []
        limit = int(bucket_mb * 2**20)
        self._where: dict[int, int] = {}
        for axis in ("dp", "edp"):
            group = groups[axis]
            if dist.get_world_size(group) == 1 and divisor == 1:
                continue
            current: list[nn.Parameter] = []
            size = 0
            for _, p, a in reversed(params):
                if a != axis or not p.requires_grad:
                    continue
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= limit:
                    self.buckets.append(_Bucket(axis, group, current))
                    current, size = [], 0
            if current:
                self.buckets.append(_Bucket(axis, group, current))
        for i, b in enumerate(self.buckets):
            for p in b.params:
                self._where[id(p)] = i
        self._next = 0
        self._callback_queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for b in self.buckets for p in b.params]

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._callback_queued:
            _compat.queue_backward_callback(self._finish)
            self._callback_queued = True
        bucket = self.buckets[self._where[id(p)]]
        bucket.ready.add(id(p))
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if len(b.ready) < len(b.params):
                return
            self._launch(b)
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        b.flat = torch.cat([g.reshape(-1) for g in grads])
        if self.stats is not None:
            self.stats.record("all_reduce", b.axis, "backward", b.flat.numel() * b.flat.element_size())
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
                n = p.numel()
                chunk = b.flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n
            b.ready.clear()
            b.flat = b.work = None
        self._next = 0
        self._callback_queued = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
