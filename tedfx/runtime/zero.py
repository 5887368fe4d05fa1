"""Which part of which parameter each rank's optimizer owns: groups, ZeRO-1 ranges and tiles.

Parameters are grouped by their data-parallel axis ("dp" for non-expert weights, "edp" for
experts) and dtype, in registration order. A group's parameters are laid end to end in one
flat index space of `numel` entries. Without sharding a rank owns all of it. With ZeRO-1
(docs/parallelism.md, "Optimizer-state sharding") the group's N ranks (the parameter's own
data-parallel group) each own one contiguous chunk of L = ceil(numel / N) entries: rank i owns
[i*L, min((i+1)*L, numel)). The flat space is padded to N*L entries for the all-gather, so the
last rank owns up to N - 1 fewer entries than the others and no rank holds state for padding.
The parameters themselves become views into one flat buffer of N*L entries per group, so that
after the step one in-place all-gather of each rank's chunk updates every copy.

The owned range is cut into pieces at parameter boundaries and at tile boundaries: a piece is
(parameter, start, stop) over the parameter's flattened entries. The optimizer steps one tile
of pieces at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat
from ..collectives import CommStats

__all__ = ["FlatGroup", "Piece", "build_groups", "cut_tiles", "plan_groups"]


@dataclass
class Piece:
    """Entries [start, stop) of one parameter's flattened values."""

    param: nn.Parameter
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def values(self) -> torch.Tensor:
        """The entries in the parameter (a view)."""
        return self.param.detach().view(-1)[self.start:self.stop]

    def grad(self) -> torch.Tensor | None:
        """The entries in the parameter's gradient (a view), None without a gradient."""
        g = self.param.grad
        return None if g is None else g.view(-1)[self.start:self.stop]


@dataclass
class FlatGroup:
    """Parameters of one data-parallel axis and dtype, laid end to end; the range this rank owns."""

    axis: str
    dtype: torch.dtype
    names: list[str]
    params: list[nn.Parameter]
    size: int
    """N: ranks the group's optimizer state is sharded over (1 without ZeRO)."""
    rank: int
    """This rank's index among them."""
    process_group: dist.ProcessGroup | None = None
    offsets: list[int] = field(default_factory=list)
    flat: torch.Tensor | None = None
    """With ZeRO: the buffer of N*L entries the parameters are views into."""

    def __post_init__(self) -> None:
        offset = 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def chunk(self) -> int:
        """L = ceil(numel / N): entries each rank owns (the last rank may own fewer)."""
        return math.ceil(self.numel / self.size)

    @property
    def owned(self) -> tuple[int, int]:
        """[start, stop) of the flat index space this rank's optimizer updates."""
        start = min(self.rank * self.chunk, self.numel)
        return start, min(start + self.chunk, self.numel)

    def pieces(self) -> list[Piece]:
        """The owned range cut at parameter boundaries, in order."""
        start, stop = self.owned
        out = []
        for p, offset in zip(self.params, self.offsets):
            a, b = max(start, offset), min(stop, offset + p.numel())
            if a < b:
                out.append(Piece(p, a - offset, b - offset))
        return out

    def flatten(self) -> None:
        """Make every parameter a view into one padded flat buffer (ZeRO): the all-gather then works in place."""
        if self.size == 1:
            return
        flat = torch.zeros(self.chunk * self.size, dtype=self.dtype, device=self.params[0].device)
        for p, offset in zip(self.params, self.offsets):
            view = flat[offset:offset + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view_as(p)
        self.flat = flat

    def all_gather(self, stats: CommStats | None) -> None:
        """Every rank's updated chunk to every rank of the group, in place."""
        if self.size == 1:
            return
        L = self.chunk
        mine = self.flat[self.rank * L:(self.rank + 1) * L]
        if stats is not None:
            stats.record("all_gather", self.axis, "optimizer", mine.numel() * mine.element_size(), (L,), self.dtype)
        _compat.all_gather_into(self.flat, mine, self.process_group)


def plan_groups(params: list[tuple[str, nn.Parameter, str]], *, zero: int, sizes: dict[str, int],
                ranks: dict[str, int], process_groups: dict[str, dist.ProcessGroup] | None = None) -> list[FlatGroup]:
    """FlatGroups of (axis, dtype) in order of first appearance; with zero=1 sharded over each axis's group.

    Pure (no communication) given `sizes` and `ranks` ({axis: group size} and {axis: this rank's index}):
    tedfx.explain plans a rank's groups with it, the optimizer with its process groups.
    """
    by_key: dict[tuple[str, torch.dtype], tuple[list[str], list[nn.Parameter]]] = {}
    for name, p, axis in params:
        names, ps = by_key.setdefault((axis, p.dtype), ([], []))
        names.append(name)
        ps.append(p)
    out = []
    for (axis, dtype), (names, ps) in by_key.items():
        size, rank = (sizes[axis], ranks[axis]) if zero else (1, 0)
        out.append(FlatGroup(axis, dtype, names, ps, size, rank, (process_groups or {}).get(axis)))
    return out


def build_groups(params: list[tuple[str, nn.Parameter, str]], *, zero: int,
                 groups: dict[str, dist.ProcessGroup]) -> list[FlatGroup]:
    """plan_groups with the sizes and ranks of this rank's process groups."""
    axes = {axis for _, _, axis in params}
    return plan_groups(params, zero=zero, sizes={a: dist.get_world_size(groups[a]) for a in axes},
                       ranks={a: dist.get_rank(groups[a]) for a in axes}, process_groups=groups)


def cut_tiles(pieces: list[Piece], tile_numel: int | None) -> list[list[Piece]]:
    """Pieces in tiles of at most `tile_numel` entries (a piece larger than a tile is cut); None: one tile."""
    if tile_numel is None:
        return [pieces] if pieces else []
    tiles: list[list[Piece]] = []
    current: list[Piece] = []
    room = tile_numel
    for piece in pieces:
        start = piece.start
        while start < piece.stop:
            take = min(room, piece.stop - start)
            current.append(Piece(piece.param, start, start + take))
            start += take
            room -= take
            if room == 0:
                tiles.append(current)
                current, room = [], tile_numel
    if current:
        tiles.append(current)
    return tiles
