"""The pass pipeline: dense model -> MoE graph -> one rank's TED graph, in one process.

Which passes run is decided here, from the configs, in `moe_passes` and
`parallel_passes`: a pass never checks a feature flag itself. Adding a pass is
one file under tedfx/passes/ and one line in one of these lists
(docs/architecture.md, "Adding a pass").

`parallelize` runs the pipeline on every rank for that rank's coordinates;
`explain` and the collective-order check run it for any coordinates without
starting processes. All of them use these functions.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import torch.fx as fx
from torch import nn

from .capture import TedGraphModule, capture, own_tensors
from .config import MoEConfig, ParallelConfig
from .moe.experts import ExpertWeights
from .passes.checkpoint import activation_checkpoint_pass, cache_all_to_all_pass, outline_regions_pass
from .passes.context import PassContext
from .passes.drop_duplicate_tokens import drop_duplicate_tokens_pass
from .passes.ffn_to_moe import ffn_to_moe_pass
from .passes.find_ffns import find_ffns_pass
from .passes.graph import get_by_target
from .passes.runner import Pass, run_passes
from .passes.shard_dropout import shard_dropout_pass
from .passes.shard_experts import shard_experts_pass
from .passes.shard_tensor_parallel import shard_tensor_parallel_pass
from .sharding import ParamShard

__all__ = [
    "build_moe_graph", "capture_dense", "convert_to_moe", "grad_sync_params", "moe_passes", "parallel_passes",
    "param_shards", "shard_for_rank",
]


def moe_passes(moe: MoEConfig) -> list[Pass]:
    """Dense graph -> MoE graph (what to_moe runs)."""
    return [find_ffns_pass, ffn_to_moe_pass]


def parallel_passes(parallel: ParallelConfig) -> list[Pass]:
    """MoE graph -> one rank's TED graph, for this layout and these options."""
    T, X = parallel.tensor, parallel.expert
    passes: list[Pass] = []
    if T > 1:
        passes.append(shard_tensor_parallel_pass)
    passes.append(shard_experts_pass)  # also records the expert shards when no axis splits them
    if parallel.dtd and T > 1 and X > 1:
        passes.append(drop_duplicate_tokens_pass)
    if T > 1 or X > 1:
        passes.append(shard_dropout_pass)  # after every pass that splits activations, before regions are outlined
    if parallel.activation_checkpointing != "none":
        passes.append(functools.partial(activation_checkpoint_pass, mode=parallel.activation_checkpointing))
        if parallel.cac:
            passes.append(cache_all_to_all_pass)
        passes.append(outline_regions_pass)
    return passes


def capture_dense(model: nn.Module, example_inputs: tuple[Any, ...],
                  example_kwargs: dict[str, Any] | None = None) -> TedGraphModule:
    """The model's graph, sharing the model's tensors (`convert_to_moe` copies what it keeps)."""
    return capture(model, example_inputs, example_kwargs, copy_params=False)


def convert_to_moe(gm: TedGraphModule, model: nn.Module, *, moe: MoEConfig,
                   debug: bool = False) -> tuple[TedGraphModule, PassContext]:
    """Run the MoE passes on a `capture_dense` graph of `model`, then copy the tensors the result keeps.

    The dense FFN weights the MoE blocks replace are never copied (most of a transformer's bytes).
    """
    ctx = PassContext(moe=moe, debug=debug)
    try:
        gm = run_passes(gm, moe_passes(moe), ctx=ctx)
    finally:
        own_tensors(gm, model)
    return gm, ctx


def build_moe_graph(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    example_kwargs: dict[str, Any] | None = None,
    debug: bool = False,
) -> tuple[TedGraphModule, PassContext]:
    """Capture and convert FFNs to MoE blocks: the single-process reference graph and its pass context."""
    return convert_to_moe(capture_dense(model, example_inputs, example_kwargs), model, moe=moe, debug=debug)


def shard_for_rank(
    moe_gm: fx.GraphModule,
    moe_ctx: PassContext,
    *,
    parallel: ParallelConfig,
    coords: dict[str, int],
    skip: tuple[str, ...] = (),
) -> tuple[fx.GraphModule, PassContext]:
    """One rank's graph: a deep copy of the MoE graph, sharded for `coords`, and its pass context."""
    with warnings.catch_warnings():
        # torch's own TreeSpec pickling warns about its deprecated LeafSpec while copying _in_spec.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        gm = copy.deepcopy(moe_gm)
    ctx = moe_ctx.for_rank(parallel, coords)
    gm = run_passes(gm, parallel_passes(parallel), ctx=ctx, skip=skip)
    return gm, ctx


def param_shards(gm: nn.Module, ctx: PassContext) -> dict[str, ParamShard]:
    """Every state-dict tensor of the rank graph with its split (replicated ones have none)."""
    shards = ctx.records.shards
    out = {}
    for name, t in gm.state_dict(keep_vars=True).items():
        spec = shards.get(name)
        if spec is None:
            # A tied alias (wte.weight = lm_head.weight) shares its owner's split.
            spec = next((s for n, s in shards.items() if get_by_target(gm, n) is t), None)
            spec = ParamShard(name, spec.splits, spec.chunks, spec.full_shape) if spec else \
                ParamShard(name, (), None, tuple(t.shape))
        out[name] = spec
    return out


def grad_sync_params(gm: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, data-parallel axis) in registration order: experts reduce over "edp", the rest over "dp"."""
    expert_ids = {id(p) for m in gm.modules() if isinstance(m, ExpertWeights) for p in m.parameters()}
    return [(n, p, "edp" if id(p) in expert_ids else "dp") for n, p in gm.named_parameters()]
