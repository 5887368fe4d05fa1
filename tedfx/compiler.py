"""The pass pipeline: dense model -> one rank's sharded MoE graph, in one process.

`parallelize` runs it on every rank for that rank's coordinates; `explain` runs
it for any coordinates without starting processes. Both use this one list.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch.fx as fx
from torch import nn

from .capture import capture, own_tensors
from .config import MoEConfig, ParallelConfig
from .moe.experts import ExpertWeights
from .passes.checkpoint import activation_checkpoint_pass, cache_all_to_all_pass, outline_regions_pass
from .passes.drop_duplicate_tokens import drop_duplicate_tokens_pass
from .passes.ffn_to_moe import ffn_to_moe_pass
from .passes.find_ffns import find_ffns_pass
from .passes.runner import PassContext, run_passes
from .passes.shard_experts import EXPERT_RECORD, shard_experts_pass
from .passes.shard_tensor_parallel import TP_RECORD, shard_tensor_parallel_pass
from .passes.sharding import ParamShard

__all__ = ["MOE_PASSES", "PARALLEL_PASSES", "build_moe_graph", "grad_sync_params", "param_shards", "shard_for_rank"]

MOE_PASSES = [find_ffns_pass, ffn_to_moe_pass]
"""Dense graph -> MoE graph (what to_moe runs)."""
PARALLEL_PASSES = [
    shard_tensor_parallel_pass,
    shard_experts_pass,
    drop_duplicate_tokens_pass,
    activation_checkpoint_pass,
    cache_all_to_all_pass,
    outline_regions_pass,
]
"""MoE graph -> one rank's TED graph."""


def build_moe_graph(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    example_kwargs: dict[str, Any] | None = None,
    debug: bool = False,
) -> tuple[fx.GraphModule, PassContext]:
    """Capture and convert FFNs to MoE blocks: the single-process reference graph."""
    # Capture the model itself, convert, then copy what is left of its tensors: the dense FFN
    # weights the MoE blocks replace are never copied (most of a transformer's bytes).
    gm = capture(model, example_inputs, example_kwargs, copy_params=False)
    try:
        ctx = PassContext(moe=moe, debug=debug)
        gm = run_passes(gm, MOE_PASSES, ctx=ctx)
    finally:
        own_tensors(gm, model)
    return gm, ctx


def shard_for_rank(
    moe_gm: fx.GraphModule,
    moe_ctx: PassContext,
    *,
    parallel: ParallelConfig,
    coords: dict[str, int],
    skip: tuple[str, ...] = (),
) -> tuple[fx.GraphModule, PassContext]:
    """One rank's graph: a deep copy of the MoE graph, sharded for `coords`."""
    saved = moe_gm.meta.pop("tedfx_ctx", None)  # match records hold nodes of this graph: not copied
    try:
        with warnings.catch_warnings():
            # torch's own TreeSpec pickling warns about its deprecated LeafSpec while copying _in_spec.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            gm = copy.deepcopy(moe_gm)
    finally:
        if saved is not None:
            moe_gm.meta["tedfx_ctx"] = saved
    ctx = PassContext(moe=moe_ctx.moe, parallel=parallel, coords=dict(coords),
                      records=dict(moe_ctx.records), debug=moe_ctx.debug)
    gm = run_passes(gm, PARALLEL_PASSES, ctx=ctx, skip=skip)
    gm.meta["tedfx_ctx"] = ctx
    return gm, ctx


def param_shards(gm: nn.Module, ctx: PassContext) -> dict[str, ParamShard]:
    """Every state-dict tensor of the rank graph with its split (replicated ones have none)."""
    shards = {**ctx.records.get(TP_RECORD, {}).get("params", {}),
              **ctx.records.get(EXPERT_RECORD, {}).get("params", {})}
    out = {}
    for name, t in gm.state_dict(keep_vars=True).items():
        spec = shards.get(name)
        if spec is None:
            # A tied alias (wte.weight = lm_head.weight) shares its owner's split.
            spec = next((s for n, s in shards.items() if _get(gm, n) is t), None)
            spec = ParamShard(name, spec.splits, spec.chunks, spec.full_shape) if spec else \
                ParamShard(name, (), None, tuple(t.shape))
        out[name] = spec
    return out


def _get(gm: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def grad_sync_params(gm: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, data-parallel axis) in registration order: experts reduce over "edp", the rest over "dp"."""
    expert_ids = {id(p) for m in gm.modules() if isinstance(m, ExpertWeights) for p in m.parameters()}
    return [(n, p, "edp" if id(p) in expert_ids else "dp") for n, p in gm.named_parameters()]
