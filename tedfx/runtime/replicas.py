"""Replicated parameters must stay identical: a cheap check once per step.

Every copy of a replicated parameter gets the same averaged gradient, so the same optimizer
step keeps the copies bit-identical. Code that treats a rank's shards as if they were the whole
model breaks that silently: `torch.nn.utils.clip_grad_norm_(pm.parameters())` computes a
different norm on every rank (each sees other shards), scales the same gradient by a
different factor on each replica, and from then on the replicas train as different models.

The check (docs/parallelism.md, "Gradient clipping"): at the first forward after each
synchronised backward, every rank fingerprints each parameter (a weighted sum of 16 fixed,
evenly spaced entries, in float64: exact for equal values, and a different clipping factor
changes every entry) and one all-gather of the fingerprints over the world lets every rank
compare each parameter between the ranks that must hold the same copy (the same coordinates
on the axes the parameter is split over). The all-gather runs alongside that forward and is
judged when the forward returns, with one comparison of the whole table. Every rank sees the
same table, so a mismatch raises the same error on every rank, naming the parameters, the
ranks and the likely cause.
It catches any divergence, not only clipping: per-rank learning rates, a step taken on some
ranks only, edits of replicated weights on one rank.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import _compat
from ..axes import MESH_AXES
from ..sharding import ParamShard
from .mesh import Layout

__all__ = ["ReplicaCheck", "ReplicaDivergenceError"]

SAMPLES = 16
"""Entries of each parameter in its fingerprint."""


class ReplicaDivergenceError(RuntimeError):
    """Copies of a replicated parameter hold different values on different ranks."""


class ReplicaCheck:
    """Fingerprints every parameter of a rank and compares them between the ranks holding the same copy.

    Args:
        params: (state-dict name, parameter) of this rank, in the same order on every rank.
        shards: {name: ParamShard}.
        layout: the mesh layout.
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], shards: dict[str, ParamShard],
                 layout: Layout) -> None:
        self.params = params
        self.layout = layout
        self.split_axes = [tuple(sorted(axis for axis, _ in shards[name].splits)) for name, _ in params]
        self.device = params[0][1].device if params else torch.device("cpu")
        # Entries 0, s, 2s, ... (s = numel // SAMPLES) of each parameter, weighted 1, 2, 3, ...
        self._stride = [max(p.numel() // SAMPLES, 1) for _, p in params]
        counts = [min(p.numel(), SAMPLES) for _, p in params]
        self._weights = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) for n in counts]).to(self.device) \
            if params else torch.zeros(0, dtype=torch.float64)
        self._owner = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(counts, dtype=torch.long)) \
            .to(self.device) if params else torch.zeros(0, dtype=torch.long)
        # [world, parameters]: the first rank of the replica set each rank belongs to, for each parameter.
        coords = [layout.coords(r) for r in range(layout.world_size)]
        first = torch.empty(layout.world_size, len(params), dtype=torch.long)
        for i, axes in enumerate(self.split_axes):
            seen: dict[tuple[int, ...], int] = {}
            for r, c in enumerate(coords):
                first[r, i] = seen.setdefault(tuple(c[a] for a in MESH_AXES if a in axes), r)
        self._first = first

    def fingerprints(self) -> torch.Tensor:
        """[number of parameters] float64: this rank's fingerprint of each parameter."""
        if not self.params:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            samples = torch.cat([p.detach().reshape(-1)[:s * SAMPLES:s]
                                 for (_, p), s in zip(self.params, self._stride)])
            weighted = samples.double() * self._weights
            return torch.zeros(len(self.params), dtype=torch.float64, device=self.device) \
                .index_add_(0, self._owner, weighted)

    def start(self) -> Callable[[], None]:
        """Fingerprint the parameters and start gathering every rank's; calling the result waits and raises
        ReplicaDivergenceError on every rank when any two copies of a parameter differ."""
        mine = self.fingerprints()
        world = self.layout.world_size
        everyone = torch.empty(world * mine.numel(), dtype=torch.float64, device=mine.device)
        work = _compat.all_gather_into(everyone, mine, async_op=True)

        def judge() -> None:
            work.wait()
            self._raise_if_divergent(everyone.view(world, -1).cpu())
        return judge

    def _raise_if_divergent(self, table: torch.Tensor) -> None:
        bad = self.divergent(table)
        if bad:
            shown = "; ".join(f"{name} differs between ranks {ranks}" for name, ranks in bad[:5])
            raise ReplicaDivergenceError(
                f"replicated parameters no longer agree across ranks ({shown}{' ...' if len(bad) > 5 else ''}). "
                f"The last optimizer step changed copies of the same parameter differently. The usual cause is "
                f"torch.nn.utils.clip_grad_norm_(pm.parameters()): each rank computes the norm of its own shards "
                f"only. Clip with pm.clip_grad_norm_(max_norm) (the norm of the whole model, the same on every "
                f"rank) or tedfx.optimizer(pm, ..., max_norm=...). Any per-rank change of the weights, learning "
                f"rate or step count has the same effect. Turn this check off with pm.check_replicas = False."
            )

    def divergent(self, table: torch.Tensor) -> list[tuple[str, list[int]]]:
        """(name, ranks of one replica set that disagree) for each parameter whose copies differ.

        Args:
            table: [world, number of parameters], row r = rank r's fingerprints.
        """
        bits = table.double().view(torch.int64)  # bit patterns: equal NaNs agree too
        if bool((bits == bits.gather(0, self._first)).all()):  # every entry equals its replica set's first
            return []
        coords = [self.layout.coords(r) for r in range(self.layout.world_size)]
        bad = []
        for i, (name, _) in enumerate(self.params):
            sets: dict[tuple[int, ...], list[int]] = {}
            for r, c in enumerate(coords):
                sets.setdefault(tuple(c[a] for a in MESH_AXES if a in self.split_axes[i]), []).append(r)
            for ranks in sets.values():
                values = table[ranks, i].double().view(torch.int64)  # bit patterns: equal NaNs agree too
                if not bool((values == values[0]).all()):
                    bad.append((name, ranks))
                    break
        return bad
