"""tedfx: dense PyTorch model in, Mixture-of-Experts trained with tensor x expert x data parallelism out.

    import tedfx
    moe = tedfx.MoEConfig(num_experts=8, top_k=2, layers="every_other")
    moe_model = tedfx.to_moe(model, (tokens,), moe=moe)
    print(tedfx.explain(model, (tokens,), moe=moe))
"""

from .api import explain, moe_losses, to_moe
from .capture import CaptureError, TedGraphModule, capture
from .config import MoEConfig, ParallelConfig
from .report import Report

__all__ = [
    "CaptureError",
    "MoEConfig",
    "ParallelConfig",
    "Report",
    "TedGraphModule",
    "capture",
    "explain",
    "moe_losses",
    "to_moe",
]

__version__ = "0.1.0"
