"""tedfx: dense PyTorch model in, Mixture-of-Experts trained with tensor x expert x data parallelism out.

    import tedfx
    moe = tedfx.MoEConfig(num_experts=8, top_k=2, layers="every_other")
    moe_model = tedfx.to_moe(model, (tokens,), moe=moe)
    print(tedfx.explain(model, (tokens,), moe=moe))
"""

from . import collectives
from .api import moe_losses, to_moe
from .capture import CaptureError, TedGraphModule, capture
from .config import MoEConfig, ParallelConfig
from .explain import explain
from .report import Report
from .runtime.launch import LaunchError, RankError, init_distributed, launch
from .runtime.parallel import ParallelModule, parallelize

__all__ = [
    "CaptureError",
    "LaunchError",
    "ParallelModule",
    "RankError",
    "MoEConfig",
    "ParallelConfig",
    "Report",
    "TedGraphModule",
    "capture",
    "collectives",
    "explain",
    "init_distributed",
    "launch",
    "moe_losses",
    "parallelize",
    "to_moe",
]

__version__ = "0.1.0"
