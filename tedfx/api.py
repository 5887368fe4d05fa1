"""The public entry points that run in one process: to_moe and moe_losses."""

from __future__ import annotations

from typing import Any

from torch import nn

from .capture import TedGraphModule
from .compiler import build_moe_graph
from .config import MoEConfig
from .moe.routing import Router

__all__ = ["moe_losses", "to_moe"]


def to_moe(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    example_kwargs: dict[str, Any] | None = None,
    debug: bool = False,
) -> TedGraphModule:
    """Capture a dense model and rewrite its FFNs into upcycled MoE blocks, in one process.

    Args:
        model: the dense model (not modified).
        example_inputs: positional inputs of one call; batch and sequence dims
            stay dynamic where export allows.
        moe: which FFNs to convert and how to route.
        example_kwargs: keyword inputs of one call.
        debug: keep each pass's code before and after in `module.meta["tedfx_ctx"].dumps`.

    Returns:
        A module with the model's call signature that trains with any torch
        optimizer. Its state dict has the model's keys, except that each
        converted FFN's keys are replaced by `<path>.router.weight` and
        `<path>.experts.{w1,b1,w3,b3,w2,b2}` (see ExpertWeights).

    Example:
        >>> moe_model = tedfx.to_moe(model, (tokens,), moe=tedfx.MoEConfig(num_experts=8, top_k=2))
        >>> loss = F.cross_entropy(moe_model(tokens).flatten(0, 1), targets.flatten())
        >>> loss.backward()  # the MoE aux and z losses are included
    """
    gm, ctx = build_moe_graph(model, example_inputs, moe=moe, example_kwargs=example_kwargs, debug=debug)
    gm.meta["tedfx_ctx"] = ctx
    return gm


def moe_losses(module: nn.Module) -> dict[str, float]:
    """The last forward's MoE losses, unweighted and summed over the MoE blocks.

    Returns:
        {"aux_loss": ..., "z_loss": ..., "blocks": number of MoE blocks}
    """
    routers = [m for m in module.modules() if isinstance(m, Router)]
    totals = {"aux_loss": 0.0, "z_loss": 0.0}
    for r in routers:
        for key, value in r.last_losses.items():
            totals[key] += float(value)
    totals["blocks"] = len(routers)
    return totals
