"""The distributed runtime: device mesh and process groups, launcher (DESIGN §3).

Passes never import this package; they name mesh axes, and the runtime binds those
names to the process groups built here (see `tedfx.collectives.bind_axes`).
"""

from tedfx.runtime.launch import LaunchError, RankError, init_distributed, launch, launched_externally
from tedfx.runtime.mesh import AXES, GROUP_AXES, Layout, TedMesh

__all__ = [
    "AXES",
    "GROUP_AXES",
    "LaunchError",
    "Layout",
    "RankError",
    "TedMesh",
    "init_distributed",
    "launch",
    "launched_externally",
]
