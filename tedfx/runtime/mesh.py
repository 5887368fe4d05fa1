"""The TED device mesh: a pure description of the layout, and its process groups on one rank.

`Layout` is arithmetic only (no processes): the mesh of shape (D, X, T) with axes
("edp", "ep", "tp") and rank = d*X*T + x*T + t, as in DeepSpeed's
`_get_expert_parallel_ranks` with tensor groups of consecutive ranks (docs/parallelism.md, "Layout"):

    world 8, T=2, X=2, D=2       tp  groups: [0, 1] [2, 3] [4, 5] [6, 7]
    rank = d*4 + x*2 + t         ep  groups: [0, 2] [1, 3] [4, 6] [5, 7]
                                 edp groups: [0, 4] [1, 5] [2, 6] [3, 7]
                                 dp  groups: [0, 2, 4, 6] [1, 3, 5, 7]   (edp x ep flattened)

"tp" splits non-expert and expert weights (Megatron), "ep" spreads experts, "edp"
replicates experts, and "dp" (size X*D) replicates the non-expert weights.

`TedMesh` binds a Layout to torch.distributed process groups on the current rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from tedfx import _compat
from tedfx.axes import GROUP_AXES, MESH_AXES
from tedfx.config import ParallelConfig
from tedfx.runtime.doors import new_door_group

__all__ = ["AXES", "GROUP_AXES", "Layout", "TedMesh"]

AXES: tuple[str, str, str] = MESH_AXES
"""The mesh dims, outermost first (the order of `Layout.shape`)."""


def _check_axis(axis: str) -> None:
    if axis not in GROUP_AXES:
        raise ValueError(f"unknown mesh axis {axis!r}: expected one of {list(GROUP_AXES)}.")


@dataclass(frozen=True)
class Layout:
    """The TED layout of `world_size` ranks: mesh shape (D, X, T), axes ("edp", "ep", "tp").

    Pure arithmetic: building and querying a Layout starts no process.

    Attributes:
        data: D, the expert-data-parallel degree (axis "edp").
        expert: X, the expert-parallel degree (axis "ep").
        tensor: T, the tensor-parallel degree (axis "tp").

    Example:
        >>> layout = Layout.build(8, ParallelConfig(tensor=2, expert=2))
        >>> layout.coords(5)
        {'edp': 1, 'ep': 0, 'tp': 1}
        >>> layout.group_of(5, "dp")
        [1, 3, 5, 7]
    """

    data: int
    expert: int
    tensor: int

    def __post_init__(self) -> None:
        for name in ("data", "expert", "tensor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{name}={value!r} is invalid: expected an int >= 1.")

    @classmethod
    def build(cls, world_size: int, parallel: ParallelConfig) -> "Layout":
        """The layout of `world_size` ranks under `parallel`.

        Args:
            world_size: number of ranks, T * X * D.
            parallel: gives T (`tensor`), X (`expert`) and optionally D (`data`).

        Returns:
            The Layout with D inferred from the world size.

        Raises:
            ValueError: when T * X does not divide `world_size`, or `parallel.data` disagrees.
        """
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size {world_size!r} is invalid: expected an int >= 1.")
        data = parallel.data_degree(world_size)
        return cls(data=data, expert=parallel.expert, tensor=parallel.tensor)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, X, T), the mesh shape in the order of `AXES`."""
        return (self.data, self.expert, self.tensor)

    @property
    def axes(self) -> tuple[str, str, str]:
        """("edp", "ep", "tp")."""
        return AXES

    @property
    def world_size(self) -> int:
        """D * X * T."""
        return self.data * self.expert * self.tensor

    def size(self, axis: str) -> int:
        """Ranks in one group of `axis` ("tp": T, "ep": X, "edp": D, "dp": X * D)."""
        _check_axis(axis)
        return {"tp": self.tensor, "ep": self.expert, "edp": self.data, "dp": self.expert * self.data}[axis]

    def rank(self, edp: int, ep: int, tp: int) -> int:
        """The global rank at mesh coordinates (d, x, t): d*X*T + x*T + t."""
        for name, value, bound in (("edp", edp, self.data), ("ep", ep, self.expert), ("tp", tp, self.tensor)):
            if not 0 <= value < bound:
                raise ValueError(f"mesh coordinate {name}={value} is out of range: expected 0..{bound - 1}.")
        return (edp * self.expert + ep) * self.tensor + tp

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of `rank`: {"edp": d, "ep": x, "tp": t}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank {rank} is out of range for a world of {self.world_size} ranks "
                f"(D={self.data} x X={self.expert} x T={self.tensor}): expected 0..{self.world_size - 1}."
            )
        d, rest = divmod(rank, self.expert * self.tensor)
        x, t = divmod(rest, self.tensor)
        return {"edp": d, "ep": x, "tp": t}

    def data_parallel_rank(self, rank: int) -> int:
        """The token group of `rank`, d*X + x: its data-parallel rank, shared by its T tensor ranks.

        Draw each rank's data by this number (of `size("dp")`), never by the global rank.
        """
        c = self.coords(rank)
        return c["edp"] * self.expert + c["ep"]

    def group_ranks(self, axis: str) -> list[list[int]]:
        """Every group of `axis`, each as its ranks in ascending order, groups sorted by first rank.

        Args:
            axis: "tp", "ep", "edp" or "dp".

        Returns:
            A partition of range(world_size) into groups of `size(axis)` ranks.
        """
        _check_axis(axis)
        D, X, T = self.shape
        if axis == "tp":  # fixed (d, x), t varies: consecutive ranks
            groups = [[self.rank(d, x, t) for t in range(T)] for d in range(D) for x in range(X)]
        elif axis == "ep":  # fixed (d, t), x varies
            groups = [[self.rank(d, x, t) for x in range(X)] for d in range(D) for t in range(T)]
        elif axis == "edp":  # fixed (x, t), d varies
            groups = [[self.rank(d, x, t) for d in range(D)] for x in range(X) for t in range(T)]
        else:  # "dp": fixed t, (d, x) varies, flattened row-major
            groups = [[self.rank(d, x, t) for d in range(D) for x in range(X)] for t in range(T)]
        return sorted(groups)

    def group_of(self, rank: int, axis: str) -> list[int]:
        """The ranks of the `axis` group that holds `rank`, ascending."""
        _check_axis(axis)
        c = self.coords(rank)
        D, X, T = self.shape
        if axis == "tp":
            return [self.rank(c["edp"], c["ep"], t) for t in range(T)]
        if axis == "ep":
            return [self.rank(c["edp"], x, c["tp"]) for x in range(X)]
        if axis == "edp":
            return [self.rank(d, c["ep"], c["tp"]) for d in range(D)]
        return [self.rank(d, x, c["tp"]) for d in range(D) for x in range(X)]

    def __str__(self) -> str:
        return f"Layout(D={self.data} x X={self.expert} x T={self.tensor} = {self.world_size} ranks)"


class TedMesh:
    """A Layout bound to process groups on the current rank.

    Build it with `TedMesh.build(parallel)` on every rank after `init_process_group`
    (`tedfx.launch` and `tedfx.runtime.init_distributed` do that). The groups come from
    `init_device_mesh(..., mesh_dim_names=("edp", "ep", "tp"))`; "dp" is ("edp", "ep")
    flattened.

    Attributes:
        layout: the Layout.
        rank: this process's global rank.
        coords: this rank's mesh coordinates {"edp": d, "ep": x, "tp": t}.
        device_mesh: the torch DeviceMesh (for DTensor and distributed checkpoints).
    """

    def __init__(self, layout: Layout, groups: dict[str, dist.ProcessGroup], rank: int, device_mesh=None):
        missing = [a for a in GROUP_AXES if a not in groups]
        if missing:
            raise ValueError(f"TedMesh needs a process group for every axis {list(GROUP_AXES)}; missing {missing}.")
        self.layout = layout
        self.rank = rank
        self.coords = layout.coords(rank)
        self.device_mesh = device_mesh
        self._groups = dict(groups)
        self.door_group: dist.ProcessGroup | None = None
        """The group on which a collective call such as tedfx.save first checks that every rank entered it
        (tedfx.runtime.doors); None: the default group."""

    @classmethod
    def build(cls, parallel: ParallelConfig, *, device_type: str | None = None) -> "TedMesh":
        """Create the mesh's process groups; a collective call that every rank must make.

        Args:
            parallel: the layout's degrees; D is inferred from the world size.
            device_type: "cpu" or "cuda"; None picks "cuda" for nccl, else "cpu".

        Returns:
            The TedMesh of this rank.

        Raises:
            RuntimeError: when torch.distributed is not initialised.
            ValueError: when the world size does not fit `parallel`.
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "TedMesh.build needs an initialised process group: run inside tedfx.launch(...), "
                "or call tedfx.runtime.init_distributed() first (e.g. under torchrun)."
            )
        world_size, rank = dist.get_world_size(), dist.get_rank()
        layout = Layout.build(world_size, parallel)
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        from torch.distributed.device_mesh import init_device_mesh

        device_mesh = init_device_mesh(device_type, layout.shape, mesh_dim_names=AXES)
        groups = {axis: device_mesh.get_group(axis) for axis in AXES}
        flat = _compat.flatten_mesh_dims(device_mesh, ("edp", "ep"), "dp")
        groups["dp"] = flat.get_group() if flat is not None else _new_groups(layout, "dp", rank)
        mesh = cls(layout, groups, rank, device_mesh)
        mesh._check_groups()
        mesh.door_group = new_door_group(parallel.timeout)
        return mesh

    def _check_groups(self) -> None:
        """Every group must hold exactly the ranks the Layout says (no communication)."""
        for axis in GROUP_AXES:
            found = sorted(dist.get_process_group_ranks(self._groups[axis]))
            expected = self.layout.group_of(self.rank, axis)
            if found != expected:
                raise RuntimeError(
                    f"rank {self.rank}: the {axis!r} process group holds ranks {found}, but the layout "
                    f"{self.layout} expects {expected}. This is a bug in the mesh construction."
                )

    def group(self, axis: str) -> dist.ProcessGroup:
        """This rank's process group of `axis` ("tp", "ep", "edp" or "dp")."""
        _check_axis(axis)
        return self._groups[axis]

    def groups(self) -> dict[str, dist.ProcessGroup]:
        """{axis: process group} for every axis: what `tedfx.collectives.bind_axes` takes."""
        return dict(self._groups)

    def size(self, axis: str) -> int:
        """Ranks in this rank's group of `axis`."""
        return self.layout.size(axis)

    def group_ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group of `axis`, ascending."""
        return self.layout.group_of(self.rank, axis)

    def __repr__(self) -> str:
        return f"TedMesh(rank={self.rank}, coords={self.coords}, {self.layout})"


def _new_groups(layout: Layout, axis: str, rank: int) -> dist.ProcessGroup:
    """Create every group of `axis` (same order on all ranks) and return the one holding `rank`."""
    mine = None
    for ranks in layout.group_ranks(axis):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    assert mine is not None
    return mine

