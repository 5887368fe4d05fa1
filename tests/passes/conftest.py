"""Shared setup of the single-process pass tests: captures, MoE graphs and rank graphs of the tiny models.

Capturing is the slow step (seconds per HF model), so each tiny model is
captured once per session and every test rewrites a deep copy of that capture.
MoE graphs are built by `tedfx.pipeline.convert_to_moe` once per (model,
MoEConfig); rank graphs are built from them by `shard_for_rank` (the whole
parallel pipeline) or by `run_passes` on a `ctx.for_rank(...)` context (only
the passes under test). A rank graph runs in this one process with its axes
bound to `SimulatedAxis(size, rank)`: every collective returns a result of the
right shape and is counted in a `CommStats`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pytest
import torch
import torch.fx as fx
from torch import nn

import tedfx
from tedfx import collectives
from tedfx.capture import capture
from tedfx.passes.context import PassContext
from tedfx.passes.runner import Pass, run_passes
from tedfx.pipeline import convert_to_moe, shard_for_rank

from models import tiny_gpt, tiny_llama, tiny_mlp_with_dropout

MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "gpt": tiny_gpt,  # MLP FFNs with biases, fused c_attn, tied LM head; FFN width 128
    "gpt-dropout": lambda: tiny_gpt(dropout=0.1),  # the same with dropout after embeddings, attention, FFNs
    "llama": tiny_llama,  # SwiGLU FFNs without biases, q/k/v projections, 2 KV heads; FFN width 64
    "llama-kv1": lambda: tiny_llama(kv_heads=1),  # one KV head: it cannot be split over T=2
    "mlp-dropout": tiny_mlp_with_dropout,  # one residual MLP at the root, dropout 0.25 before fc2
}

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, expert_noise=0.1)
"""The default: E=4, k=2, capacity factor 1.25, so the 16 tokens of a step make C = 10; noisy upcycling, so
that every expert holds different weights (a rank holding the wrong experts shows)."""


@functools.cache
def _captured(name: str) -> tuple[nn.Module, fx.GraphModule, tuple[torch.Tensor, ...]]:
    model, inputs = MODELS[name]()
    return model, capture(model, inputs), inputs


@functools.cache
def _moe(name: str, moe: tedfx.MoEConfig) -> tuple[fx.GraphModule, PassContext]:
    model, gm, _ = _captured(name)
    return convert_to_moe(copy.deepcopy(gm), model, moe=moe)


def logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@dataclass
class RankGraph:
    """One rank's graph, its pass context, and how to run a training step of it in this process."""

    gm: fx.GraphModule
    ctx: PassContext
    inputs: tuple[torch.Tensor, ...]
    full: fx.GraphModule
    """The MoE graph it was sharded from (shared between tests: read it, never change it)."""
    T: int
    X: int
    t: int
    x: int

    def axes(self) -> dict[str, collectives.SimulatedAxis | None]:
        """Every mesh axis bound to simulated ranks, this graph being (ep x, tp t); one data-parallel group."""
        ep = collectives.SimulatedAxis(self.X, self.x)
        return {"tp": collectives.SimulatedAxis(self.T, self.t), "ep": ep, "edp": None, "dp": ep}

    def forward(self, stats: collectives.CommStats | None = None) -> torch.Tensor:
        with collectives.bind_axes(self.axes(), stats):
            return logits(self.gm(*self.inputs))

    def step(self) -> collectives.CommStats:
        """Forward and backward of one training step; the collectives it issued, with their trace."""
        stats = collectives.CommStats(trace=True)
        self.gm.train()
        self.forward(stats).float().square().mean().backward()
        return stats


@pytest.fixture(scope="session")
def dense_graph() -> Callable[[str], tuple[fx.GraphModule, tuple[torch.Tensor, ...]]]:
    """dense_graph(name) -> (a fresh copy of the model's captured graph, its example inputs)."""

    def get(name: str) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
        _, gm, inputs = _captured(name)
        return copy.deepcopy(gm), inputs

    return get


@pytest.fixture(scope="session")
def moe_graph() -> Callable[..., tuple[fx.GraphModule, PassContext, tuple[torch.Tensor, ...]]]:
    """moe_graph(name, moe=MOE) -> (the MoE graph, its context, inputs): shared, so never change them."""

    def get(name: str, moe: tedfx.MoEConfig = MOE):
        gm, ctx = _moe(name, moe)
        return gm, ctx, _captured(name)[2]

    return get


@pytest.fixture(scope="session")
def rank_graph(moe_graph) -> Callable[..., RankGraph]:
    """rank_graph(name, tensor=T, expert=X, tp=t, ep=x, passes=None, skip=(), moe=MOE, **ParallelConfig fields).

    passes=None runs the pipeline (`shard_for_rank`, leaving out the passes named in `skip`); a list runs
    only those passes (`run_passes` on a deep copy of the MoE graph, from `ctx.for_rank(parallel, coords)`).
    """

    def build(name: str, *, tensor: int, expert: int, tp: int = 0, ep: int = 0,
              passes: Sequence[Pass] | None = None, skip: tuple[str, ...] = (), moe: tedfx.MoEConfig = MOE,
              **parallel: Any) -> RankGraph:
        full, moe_ctx, inputs = moe_graph(name, moe)
        config = tedfx.ParallelConfig(tensor=tensor, expert=expert, **parallel)
        coords = {"edp": 0, "ep": ep, "tp": tp}
        if passes is None:
            gm, ctx = shard_for_rank(full, moe_ctx, parallel=config, coords=coords, skip=skip)
        else:
            ctx = moe_ctx.for_rank(config, coords)
            gm = run_passes(copy.deepcopy(full), passes, ctx=ctx, skip=skip)
        return RankGraph(gm, ctx, inputs, full, tensor, expert, tp, ep)

    return build
