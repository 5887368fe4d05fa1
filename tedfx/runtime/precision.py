"""Mixed precision: 16-bit weights, activations and gradients on each rank; fp32 where it matters.

`ParallelConfig(precision="bf16" | "fp16")` (docs/parallelism.md, "Mixed precision"):

- The model is captured from a 16-bit copy of the dense model (`low_precision_copy`), so the
  graph computes in 16 bits exactly as the model's own code does in that dtype (e.g. an
  RMSNorm that upcasts to fp32 and casts back keeps doing so).
- Routers are created in fp32 by the MoE rewrite and compute in fp32 (tedfx/moe/routing.py).
- Floating inputs are cast to the compute dtype on entry and floating outputs to fp32 on exit,
  so the user's loss is computed in fp32.
- `tedfx.optimizer` keeps fp32 master weights and, for fp16, scales the loss (`LossScaler`).

gloo reduces, gathers and exchanges bf16 and fp16 tensors (tests/test_optimizer.py checks every
collective tedfx issues on the installed torch), so gradients are reduced in their own dtype.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .._compat import pytree
from ..config import LossScaleConfig

__all__ = ["COMPUTE_DTYPES", "LossScaler", "cast_inputs_and_outputs", "compute_dtype", "low_precision_copy"]

COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""ParallelConfig.precision -> the dtype of weights, activations and gradients on each rank."""


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of `precision` ("fp32", "bf16" or "fp16")."""
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision {precision!r} is unknown: expected one of {sorted(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[precision]


def low_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose floating parameters and buffers are `dtype` (others and ties kept).

    Each floating tensor is cast directly into the copy (no fp32 copy of the model is made
    first), as `model.to(dtype)` would cast it. The model itself is not modified.
    """
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo or not torch.is_floating_point(t):
            continue
        low = t.detach().to(dtype)
        memo[id(t)] = nn.Parameter(low, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else low
    return copy.deepcopy(model, memo)


def cast_inputs_and_outputs(module: nn.Module, dtype: torch.dtype) -> list[Any]:
    """Cast `module`'s floating inputs to `dtype` and its `dtype` outputs to fp32; returns the hook handles."""
    others = tuple(d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16) if d != dtype)

    def cast(tree: Any, src: tuple[torch.dtype, ...], dst: torch.dtype) -> Any:
        return pytree.tree_map(lambda x: x.to(dst) if isinstance(x, torch.Tensor) and x.dtype in src else x, tree)

    def before(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return cast(args, others, dtype), cast(kwargs, others, dtype)

    def after(mod: nn.Module, args: tuple, output: Any) -> Any:
        return cast(output, (dtype,), torch.float32)

    return [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]


class LossScaler:
    """Dynamic loss scale of fp16 training, identical on every rank.

    Every rank calls `update(found_overflow)` with the same verdict (the global gradient norm
    is reduced over the whole world, so an overflow anywhere is an overflow everywhere).

    Attributes:
        scale: the current scale (a power of the growth/backoff factors times init_scale).
        skipped_steps: steps skipped because of an overflow.
        good_steps: steps without overflow since the last change of the scale.
    """

    def __init__(self, config: LossScaleConfig) -> None:
        self.config = config
        self.scale = float(config.init_scale)
        self.skipped_steps = 0
        self.good_steps = 0

    def update(self, found_overflow: bool) -> None:
        cfg = self.config
        if found_overflow:
            self.skipped_steps += 1
            self.good_steps = 0
            self.scale = max(self.scale * cfg.backoff_factor, cfg.min_scale)
            return
        self.good_steps += 1
        if self.good_steps >= cfg.growth_interval:
            self.scale *= cfg.growth_factor
            self.good_steps = 0

    @staticmethod
    def overflowed(total_norm: float) -> bool:
        return not math.isfinite(total_norm)

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "skipped_steps": self.skipped_steps, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.skipped_steps = int(state["skipped_steps"])
        self.good_steps = int(state["good_steps"])
