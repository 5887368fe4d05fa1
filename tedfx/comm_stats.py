"""Counting what a rank communicates: CommStats, by (collective kind, mesh axis, phase)."""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

__all__ = ["PHASES", "CommCall", "CommKey", "CommStats"]

PHASES: tuple[str, ...] = ("forward", "backward", "recompute", "optimizer")


class CommKey(NamedTuple):
    """What a CommStats row counts: the collective `kind`, the mesh `axis` and the `phase`."""

    kind: str
    axis: str
    phase: str


class CommCall(NamedTuple):
    """One traced collective call: what was sent, in what shape and dtype."""

    kind: str
    axis: str
    phase: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class CommStats:
    """Counts every collective actually issued, by (kind, axis, phase).

    kind is "all_reduce", "all_to_all", "all_gather" or "reduce_scatter"; phase is
    "forward", "backward" or "recompute" (a forward run again during the backward pass,
    as activation checkpointing does), or "optimizer" (`tedfx.optimizer`'s step: the global
    gradient norm, over axis "world", and ZeRO's all-gathers). Ops on a size-1 axis issue
    nothing and count nothing.

    Byte convention: `bytes` is what *one rank* sends into the collective, i.e. the
    numel * element size of that rank's input tensor. For an all-gather that is the
    local chunk; for a reduce-scatter, all-reduce or all-to-all the full local input.
    Multiply by the group size for the bytes entering the collective over all ranks.

    Example:
        >>> stats = CommStats()
        >>> with bind_axes(mesh.groups(), stats):
        ...     y = all_to_all(x, "ep")
        >>> stats.table()
        [('all_to_all', 'ep', 'forward', 1, 4096)]
    """

    def __init__(self, *, trace: bool = False) -> None:
        self._lock = threading.Lock()  # backward may run on autograd device threads
        self._counts: dict[CommKey, list[int]] = {}
        self.trace: list[CommCall] | None = [] if trace else None
        """With trace=True, every call in issue order (for explain and the collective-order check)."""

    def record(self, kind: str, axis: str, phase: str, nbytes: int,
               shape: tuple[int, ...] = (), dtype: torch.dtype | None = None) -> None:
        """Count one issued collective of `nbytes` bytes sent by this rank (of `shape` and `dtype`)."""
        if phase not in PHASES:
            raise ValueError(f"unknown communication phase {phase!r}: expected one of {list(PHASES)}.")
        with self._lock:
            row = self._counts.setdefault(CommKey(kind, axis, phase), [0, 0])
            row[0] += 1
            row[1] += int(nbytes)
            if self.trace is not None:
                self.trace.append(CommCall(kind, axis, phase, tuple(shape), str(dtype).removeprefix("torch."),
                                           int(nbytes)))

    def table(self) -> list[tuple[str, str, str, int, int]]:
        """Rows (kind, axis, phase, calls, bytes), sorted by kind, axis, then phase order."""
        with self._lock:
            items = sorted(self._counts.items(), key=lambda kv: (kv[0].kind, kv[0].axis, PHASES.index(kv[0].phase)))
            return [(k.kind, k.axis, k.phase, calls, nbytes) for k, (calls, nbytes) in items]

    def as_dict(self) -> dict[CommKey, dict[str, int]]:
        """{CommKey(kind, axis, phase): {"calls": n, "bytes": b}}; CommKey is a plain tuple too."""
        return {CommKey(*row[:3]): {"calls": row[3], "bytes": row[4]} for row in self.table()}

    def calls(self, kind: str | None = None, axis: str | None = None, phase: str | None = None) -> int:
        """Calls summed over the rows matching every given field (None matches all)."""
        return sum(row[3] for row in self._select(kind, axis, phase))

    def nbytes(self, kind: str | None = None, axis: str | None = None, phase: str | None = None) -> int:
        """Bytes summed over the rows matching every given field (None matches all)."""
        return sum(row[4] for row in self._select(kind, axis, phase))

    def _select(self, kind: str | None, axis: str | None, phase: str | None) -> list[tuple]:
        want = (kind, axis, phase)
        return [row for row in self.table() if all(w is None or w == v for w, v in zip(want, row[:3]))]

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._counts.clear()

    def __str__(self) -> str:
        rows = [("kind", "axis", "phase", "calls", "bytes")] + [tuple(map(str, r)) for r in self.table()]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

    def __repr__(self) -> str:
        return f"CommStats({self.table()!r})"
