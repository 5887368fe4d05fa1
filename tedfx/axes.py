"""The names of the TED mesh axes, shared by the passes (which name axes) and the runtime (which binds them).

Passes insert collectives such as `all_to_all(x, "ep")`: the graph names an
axis, never a process group. The runtime binds each name to this rank's group
(see docs/architecture.md, "Collectives name axes"). Both sides read the names
from here.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Axis", "GROUP_AXES", "MESH_AXES"]


class Axis(StrEnum):
    """A mesh axis. A StrEnum: `Axis.TP == "tp"`, and graph code may use either spelling."""

    TP = "tp"
    """Tensor parallelism: T consecutive ranks split weights Megatron-style."""
    EP = "ep"
    """Expert parallelism: X ranks each hold E/X experts."""
    EDP = "edp"
    """Expert data parallelism: D ranks hold the same experts."""
    DP = "dp"
    """Non-expert data parallelism: "edp" x "ep" flattened (X * D ranks)."""


MESH_AXES: tuple[str, str, str] = (Axis.EDP.value, Axis.EP.value, Axis.TP.value)
"""The mesh dims as plain names, outermost first: the mesh has shape (D, X, T)."""
GROUP_AXES: tuple[str, ...] = (Axis.TP.value, Axis.EP.value, Axis.EDP.value, Axis.DP.value)
"""Every axis that names a process group, as plain names: the three mesh dims and "dp"."""
