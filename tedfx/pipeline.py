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
import dataclasses
import functools
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ._compat import pytree
from .capture import TedGraphModule, capture, own_tensors
from .config import MoEConfig, ParallelConfig
from .module_tree import module_tree
from .moe.experts import ExpertWeights
from .passes.checkpoint import activation_checkpoint_pass, cache_all_to_all_pass, outline_regions_pass
from .passes.chunk_all_to_all import chunk_all_to_all_pass
from .passes.context import PassContext
from .passes.drop_duplicate_tokens import drop_duplicate_tokens_pass
from .passes.ffn_to_moe import ffn_to_moe_pass, mark_ffns
from .passes.find_ffns import NoFFNFoundError, find_ffns_pass
from .passes.graph import fold_transposed_linears, get_by_target
from .passes.runner import Pass, run_passes
from .passes.shard_dropout import shard_dropout_pass
from .passes.shard_experts import dtd_applies, shard_experts_pass
from .passes.shard_tensor_parallel import shard_tensor_parallel_pass
from .runtime.precision import compute_dtype, low_precision_copy
from .sharding import ParamShard, shard_tensor

__all__ = [
    "adopt_model_tensors", "at_precision", "build_moe_graph", "capture_dense", "convert_piece", "convert_to_moe",
    "grad_sync_params", "moe_passes", "named_tensors", "parallel_passes", "param_shards", "replace_in_tree",
    "shard_for_rank",
]


def moe_passes(moe: MoEConfig, *, materialize_experts: bool = True) -> list[Pass]:
    """Dense graph -> MoE graph (what to_moe runs; a parallel layout leaves the experts to materialise per rank)."""
    if materialize_experts:
        return [find_ffns_pass, ffn_to_moe_pass]
    return [find_ffns_pass, functools.partial(ffn_to_moe_pass, materialize=False)]


def parallel_passes(parallel: ParallelConfig) -> list[Pass]:
    """MoE graph -> one rank's TED graph, for this layout and these options."""
    T, X = parallel.tensor, parallel.expert
    if parallel.dtd == "auto":
        raise ValueError('ParallelConfig(dtd="auto") reached the pipeline unresolved: call '
                         "parallel.resolve_dtd(world_size, ranks_per_node) first (the doors do).")
    passes: list[Pass] = []
    if T > 1:
        passes.append(shard_tensor_parallel_pass)
    passes.append(shard_experts_pass)  # also records the expert shards when no axis splits them
    if dtd_applies(parallel):
        passes.append(drop_duplicate_tokens_pass)
    if parallel.chunks > 1 and X > 1:
        passes.append(chunk_all_to_all_pass)
    elif parallel.chunks > 1:
        warnings.warn(f"ParallelConfig.a2a_chunks={parallel.a2a_chunks} does nothing with expert=1: there is no "
                      f"expert all-to-all to overlap with compute. Set a2a_chunks=1, or expert > 1.", stacklevel=3)
    if T > 1 or X > 1:
        passes.append(shard_dropout_pass)  # after every pass that splits activations, before regions are outlined
    if parallel.activation_checkpointing != "none":
        passes.append(functools.partial(activation_checkpoint_pass, mode=parallel.activation_checkpointing,
                                        blocks=parallel.checkpoint_blocks))
        if parallel.cac:
            passes.append(cache_all_to_all_pass)
        passes.append(outline_regions_pass)
    return passes


def capture_dense(model: nn.Module, example_inputs: tuple[Any, ...],
                  example_kwargs: dict[str, Any] | None = None) -> TedGraphModule:
    """The model's graph, sharing the model's tensors (`convert_to_moe` copies what it keeps); `x @ W.T`
    projections folded into aten.linear (`fold_transposed_linears`)."""
    gm = capture(model, example_inputs, example_kwargs, copy_params=False)
    fold_transposed_linears(gm)
    return gm


def convert_to_moe(gm: TedGraphModule, model: nn.Module, *, moe: MoEConfig, debug: bool = False,
                   lazy: bool = False, fetch_dense: Callable[[str], torch.Tensor] | None = None,
                   ) -> tuple[TedGraphModule, PassContext]:
    """Run the MoE passes on a `capture_dense` graph of `model`.

    Args:
        lazy: False (one process): materialise every expert and copy the tensors the result keeps, so
            it owns them (the dense FFN weights it replaced are never copied). True (a parallel layout):
            the experts stay on the meta device with their recipe, and the graph keeps sharing the
            model's tensors; `shard_for_rank` materialises and copies only a rank's own shards.
        fetch_dense: dense state-dict key -> tensor, for a model on the meta device.
    """
    ctx = PassContext(moe=moe, debug=debug, fetch_dense=fetch_dense)
    try:
        gm = run_passes(gm, moe_passes(moe, materialize_experts=not lazy), ctx=ctx)
    finally:
        if not lazy:
            own_tensors(gm, model)
    # The modules the passes added (routers, experts) take the captured model's mode: an eval-mode model
    # (as HF's from_pretrained returns one) routes with the eval capacity factor, not the training one.
    gm.train(gm.training)
    return gm, ctx


def build_moe_graph(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    example_kwargs: dict[str, Any] | None = None,
    debug: bool = False,
    lazy: bool = False,
    fetch_dense: Callable[[str], torch.Tensor] | None = None,
) -> tuple[TedGraphModule, PassContext]:
    """Capture and convert FFNs to MoE blocks (see `convert_to_moe` for `lazy` and `fetch_dense`).

    With lazy=False: the single-process reference graph. With lazy=True: the graph every rank's
    graph is cut from, holding no expert and no copy of the model's tensors.
    """
    return convert_to_moe(capture_dense(model, example_inputs, example_kwargs), model, moe=moe, debug=debug,
                          lazy=lazy, fetch_dense=fetch_dense)


def shard_for_rank(
    moe_gm: fx.GraphModule,
    moe_ctx: PassContext,
    *,
    parallel: ParallelConfig,
    coords: dict[str, int],
    skip: tuple[str, ...] = (),
    materialize: bool = True,
) -> tuple[fx.GraphModule, PassContext]:
    """One rank's graph, sharded for `coords`, and its pass context.

    In order:
    1. Copy the MoE graph's structure (graph, modules) but not its tensors: the copy shares them.
    2. Run the parallel passes: they replace each split tensor by this rank's shard (experts
       materialised from their recipe, never whole).
    3. Give the rank its own copy of every tensor still shared with the MoE graph (replicated ones),
       and fill tensors the model held on the meta device from `moe_ctx.fetch_dense`.

    With materialize=False every tensor of the result is on the meta device with the rank's shapes
    and dtypes, and nothing is computed, copied or fetched: what `tedfx.fake` simulates a rank from.
    """
    shared = {id(t): t for t in [*moe_gm.parameters(), *moe_gm.buffers()]}
    with warnings.catch_warnings():
        # torch's own TreeSpec pickling warns about its deprecated LeafSpec while copying _in_spec.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        gm = copy.deepcopy(moe_gm, memo=dict(shared))
    ctx = moe_ctx.for_rank(parallel, coords, materialize=materialize)
    gm = run_passes(gm, parallel_passes(parallel), ctx=ctx, skip=skip)
    _own_rank_tensors(gm, shared, ctx, parallel)
    return gm, ctx


def _own_rank_tensors(gm: nn.Module, shared: dict[int, torch.Tensor], ctx: PassContext,
                      parallel: ParallelConfig) -> None:
    """Copy every tensor `gm` still shares with the MoE graph; fill meta ones from `ctx.fetch_dense`
    (without ctx.materialize: a meta tensor of the same shape for each, nothing copied or fetched)."""
    sizes = {"tp": parallel.tensor, "ep": parallel.expert, "edp": 1}
    copies: dict[int, torch.Tensor] = {}
    replaced: list[torch.Tensor] = []  # alive until the end: a freed tensor's id could name a later one
    missing = []
    # Checkpointed regions are GraphModules held outside the module tree that read the same tensors.
    regions = [m.region for m in gm.modules() if isinstance(getattr(m, "region", None), nn.Module)]
    named = [item for root in (gm, *regions) for item in root.named_modules()]
    for module_name, module in named:
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None or (id(t) not in shared and not t.is_meta):
                    continue
                if id(t) not in copies:
                    key = f"{module_name}.{name}" if module_name else name
                    if not ctx.materialize:
                        local = t.detach().to("meta")
                    elif t.is_meta:
                        local = _fetch_shard(key, t, ctx, sizes)
                        if local is None:
                            missing.append(key)
                            continue
                    else:
                        local = t.detach().clone()
                    copies[id(t)] = nn.Parameter(local, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else local
                replaced.append(t)
                store[name] = copies[id(t)]
    if missing:
        raise ValueError(f"the model holds {missing[:5]}{' ...' if len(missing) > 5 else ''} on the meta device and "
                         f"parallelize's dense_state does not provide them: give every state-dict key of the dense "
                         f"model (non-persistent buffers included), or build those tensors on a real device.")


def _fetch_shard(key: str, meta: torch.Tensor, ctx: PassContext, sizes: dict[str, int]) -> torch.Tensor | None:
    """This rank's shard of dense tensor `key`, read through ctx.fetch_dense (None when it has none)."""
    if ctx.fetch_dense is None:
        return None
    try:
        full = ctx.fetch_dense(key)
    except KeyError:
        return None
    spec = ctx.records.shards.get(key)
    local = shard_tensor(full.detach(), spec, ctx.coords, sizes) if spec is not None else full.detach().clone()
    if tuple(local.shape) != tuple(meta.shape):
        raise ValueError(f"dense_state[{key!r}] has shape {tuple(full.shape)}, which gives a shard of shape "
                         f"{tuple(local.shape)} on this rank; the model expects {tuple(meta.shape)}.")
    return local.to(meta.dtype)


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


def convert_piece(
    piece: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    ffn_paths: frozenset[str],
    parallel: ParallelConfig | None = None,
    coords: dict[str, int] | None = None,
) -> fx.GraphModule:
    """One graph of a model that torch.compile split at graph breaks, converted as the whole model was.

    `piece` holds the model's tensors under the model's names. Exactly its FFNs at `ffn_paths` (those
    the whole model's conversion turned into MoE blocks) become MoE blocks; with `parallel` the piece
    is then sharded for `coords`. The result shares or copies `piece`'s tensors: the torch.compile
    backend binds every one of them to the whole model's converted module afterwards.
    """
    gm = capture_dense(piece, example_inputs)
    ctx = PassContext(moe=dataclasses.replace(moe, layers=lambda path: path in ffn_paths))
    try:
        gm = run_passes(gm, [find_ffns_pass], ctx=ctx)
        converts = any(f.path in ffn_paths for f in ctx.records.ffns)
    except NoFFNFoundError:
        converts = False
    if converts:
        # With a layout, the experts stay unbuilt: shard_for_rank materialises this rank's slices only.
        gm = run_passes(gm, [functools.partial(ffn_to_moe_pass, materialize=parallel is None)], ctx=ctx)
    else:
        # Nothing here is an FFN the whole model's conversion converted: the MoE passes have nothing to
        # do on this piece, and the sharding passes that require them may follow. Its dense FFNs still
        # end blocks and must still be split.
        mark_ffns(ctx.records.ffn_matches or [], [])
        ctx.records.ffn_matches = None
        ctx.done += [name for name in ("find_ffns", "ffn_to_moe") if name not in ctx.done]
    if parallel is not None:
        mode = parallel.activation_checkpointing
        if (mode == "block" and not ctx.records.ffns) or (mode == "moe" and not converts):
            # A piece without any FFN (the embedding, the head), or without an MoE block for mode "moe",
            # holds nothing to recompute; the pieces that do are checkpointed (docs/architecture.md,
            # "The torch.compile door").
            parallel = dataclasses.replace(parallel, activation_checkpointing="none", checkpoint_blocks=())
        gm, _ = shard_for_rank(gm, ctx, parallel=parallel, coords=coords or {})
    return gm


def adopt_model_tensors(gm: nn.Module, model: nn.Module) -> None:
    """Make `gm` use `model`'s own tensor wherever it holds an unchanged copy of it under the same name.

    The torch.compile backend runs code between graphs eagerly on the model's tensors: sharing them is
    what keeps that code and the graphs on the same (trained) weights.
    """
    theirs = named_tensors(model)
    adopted = {}
    for name, t in named_tensors(gm).items():
        m = theirs.get(name)
        if m is None or m is t or isinstance(m, nn.Parameter) != isinstance(t, nn.Parameter):
            continue
        if (m.shape, m.dtype, m.device, m.requires_grad) == (t.shape, t.dtype, t.device, t.requires_grad) \
                and torch.equal(m, t):
            adopted[id(t)] = m
    replace_in_tree(gm, adopted)


def replace_in_tree(root: nn.Module, new: dict[int, Any]) -> None:
    """Replace every parameter, buffer and submodule `x` with `new[id(x)]` throughout `root`, including the
    graphs held outside the module tree (checkpointed regions share their parent graph's tensors)."""
    for module in module_tree(root):
        for store in (module._parameters, module._buffers, module._modules):
            for key, value in list(store.items()):
                if value is not None and id(value) in new:
                    store[key] = new[id(value)]


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, each alias of a tied tensor included."""
    return {**dict(module.named_buffers(remove_duplicate=False)),
            **dict(module.named_parameters(remove_duplicate=False))}


def at_precision(model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any] | None,
                  parallel: ParallelConfig) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any] | None]:
    """What to capture: the model itself in fp32, else a 16-bit copy and 16-bit floating example inputs,
    so the graph computes as the model's own code does in 16 bits.

    Routers are created in fp32 by the MoE rewrite whatever the precision (docs/parallelism.md, "Mixed precision").
    """
    dtype = compute_dtype(parallel.precision)
    if dtype == torch.float32:
        return model, example_inputs, example_kwargs

    def cast(x: Any) -> Any:
        return x.to(dtype) if isinstance(x, torch.Tensor) and torch.is_floating_point(x) else x

    return (low_precision_copy(model, dtype), pytree.tree_map(cast, example_inputs),
            pytree.tree_map(cast, example_kwargs))
