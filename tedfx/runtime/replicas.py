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
on the axes the parameter is split over). Every rank sees the same table, so a mismatch raises
the same error on every rank, naming the parameters, the ranks and the likely cause.
It catches any divergence, not only clipping: per-rank learning rates, a step taken on some
ranks only, edits of replicated weights on one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

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
        self._index = [torch.linspace(0, max(p.numel() - 1, 0), min(p.numel(), SAMPLES)).round().long().to(p.device)
                       for _, p in params]
        self._weights = [torch.arange(1, len(i) + 1, dtype=torch.float64, device=i.device) for i in self._index]
        self.device = params[0][1].device if params else torch.device("cpu")

    def fingerprints(self) -> torch.Tensor:
        """[number of parameters] float64: this rank's fingerprint of each parameter."""
        with torch.no_grad():
            values = [(p.detach().reshape(-1)[i].double() * w).sum() for (_, p), i, w in
                      zip(self.params, self._index, self._weights)]
        return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=self.device)

    def check(self) -> None:
        """Raise ReplicaDivergenceError on every rank when any two copies of a parameter differ."""
        mine = self.fingerprints()
        world = self.layout.world_size
        everyone = torch.empty(world, mine.numel(), dtype=torch.float64, device=mine.device)
        dist.all_gather(list(everyone.unbind(0)), mine)
        bad = self.divergent(everyone.cpu())
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
