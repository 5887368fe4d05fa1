"""tedfx: dense PyTorch model in, Mixture-of-Experts trained with tensor x expert x data parallelism out.

    import tedfx
    moe = tedfx.MoEConfig(num_experts=8, top_k=2, layers="every_other")
    moe_model = tedfx.to_moe(model, (tokens,), moe=moe)
    print(tedfx.explain(model, (tokens,), moe=moe))

    pm = tedfx.parallelize(model, (tokens,), moe=moe, parallel=tedfx.ParallelConfig(tensor=2, expert=2))
    opt = tedfx.optimizer(pm, torch.optim.AdamW, lr=3e-4)   # master weights, ZeRO-1, tiled step, clipping
    tedfx.save("ckpt", pm, opt, step=step); extra = tedfx.load("ckpt", pm, opt)   # any layout loads it
    compiled = torch.compile(model, backend="tedfx", options={"moe": moe, "parallel": parallel})

The doors are in tedfx.api; docs/architecture.md says which module does what.
"""

from . import collectives
from .api import (
    MoELossScaleWarning,
    check_collective_order,
    compiled_module,
    explain,
    moe_losses,
    parallelize,
    set_moe_loss_scale,
    to_moe,
)
from .capture import CaptureError, TedGraphModule, capture
from .check import CollectiveOrderError
from .checkpoint_io import CheckpointError, CollectiveCallError, load, save
from .config import LossScaleConfig, MoEConfig, ParallelConfig
from .export import ExportError, export_hf
from .plan import Cluster, Plan, plan
from .released import ReleasedParameterError
from .report import Report
from .runtime.executor import ParallelModule
from .runtime.launch import LaunchError, RankError, init_distributed, launch
from .runtime.optimizer import TedOptimizer, optimizer
from .runtime.replicas import ReplicaDivergenceError

__all__ = [
    "CaptureError",
    "CheckpointError",
    "Cluster",
    "CollectiveCallError",
    "CollectiveOrderError",
    "ExportError",
    "LaunchError",
    "LossScaleConfig",
    "MoEConfig",
    "MoELossScaleWarning",
    "ParallelConfig",
    "ParallelModule",
    "Plan",
    "RankError",
    "ReleasedParameterError",
    "ReplicaDivergenceError",
    "Report",
    "TedGraphModule",
    "TedOptimizer",
    "capture",
    "check_collective_order",
    "collectives",
    "compiled_module",
    "explain",
    "export_hf",
    "init_distributed",
    "launch",
    "load",
    "moe_losses",
    "optimizer",
    "parallelize",
    "plan",
    "save",
    "set_moe_loss_scale",
    "to_moe",
]

__version__ = "0.1.0"
