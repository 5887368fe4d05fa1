"""The distributed runtime: device mesh and process groups, the per-rank executor, gradient sync, mixed
precision, the optimizer (master weights, ZeRO-1, tiled step, global clipping), launcher.

Nothing here imports the passes, the predictions or the doors (docs/architecture.md,
"Dependencies point one way"): passes name mesh axes, and the runtime binds those
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
