"""The doors of tedfx: every public entry point that turns a model into something, in one place.

    to_moe                  dense model -> MoE GraphModule, one process
    parallelize             dense model -> this rank's TED-parallel module, every rank
    explain                 what tedfx does to a model, as a Report, no processes
    check_collective_order  every rank of a layout issues matching collectives, no processes
    compiled_module         the module the torch.compile backend built for a model
    moe_losses              the last forward's MoE losses of a module
    set_moe_loss_scale      the weight of the MoE losses in the backward (1 / N for loss / N accumulation)

The doors only orchestrate: capture and passes live in tedfx.pipeline, the
per-rank executor in tedfx.runtime, predictions in tedfx.predict, the
torch.compile backend in tedfx.backend (docs/architecture.md). What trains and
keeps a converted model has its own modules: `tedfx.optimizer` in
tedfx.runtime.optimizer, `tedfx.save` / `tedfx.load` in tedfx.checkpoint_io
(docs/checkpoints.md).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import _compat, backend, pipeline
from .capture import TedGraphModule, record_dense_config
from .check import check_layout, check_live_ranks
from .collectives import CommCall
from .config import MoEConfig, ParallelConfig
from .graph_summary import summarize_graph
from .moe.routing import MoELossScaleWarning, moe_losses, set_moe_loss_scale
from .predict import build_report
from .report import Report
from .runtime.executor import ParallelModule, check_same_weights
from .runtime.launch import local_world_size
from .runtime.mesh import Layout, TedMesh

__all__ = ["MoELossScaleWarning", "check_collective_order", "compiled_module", "explain", "moe_losses", "parallelize",
           "set_moe_loss_scale", "to_moe"]


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
        debug: keep each pass's code before and after in `module.meta["tedfx_dumps"]`
            as (pass name, before, after).

    Returns:
        A module with the model's call signature that trains with any torch
        optimizer. Its state dict has the model's keys, except that each
        converted FFN's keys are replaced by `<path>.router.weight` and
        `<path>.experts.{w1,b1,w3,b3,w2,b2}` (docs/moe.md, "State dict").

    Example:
        >>> moe_model = tedfx.to_moe(model, (tokens,), moe=tedfx.MoEConfig(num_experts=8, top_k=2))
        >>> loss = F.cross_entropy(moe_model(tokens).flatten(0, 1), targets.flatten())
        >>> loss.backward()  # the MoE aux and z losses are included

        With gradient accumulation, `(loss / N).backward()` per micro-batch, call
        `tedfx.set_moe_loss_scale(moe_model, 1 / N)` once: the MoE losses enter each
        backward with that weight (tedfx warns when it sees accumulation without it).
    """
    gm, ctx = pipeline.build_moe_graph(model, example_inputs, moe=moe, example_kwargs=example_kwargs, debug=debug)
    if debug:
        gm.meta["tedfx_dumps"] = list(ctx.dumps)
    record_dense_config(gm, model)
    return gm


def parallelize(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    parallel: ParallelConfig,
    example_kwargs: dict[str, Any] | None = None,
    check_inputs: bool = True,
    check_collectives: bool = True,
    dense_state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None = None,
) -> ParallelModule:
    """Turn a dense model into this rank's part of a TED-parallel MoE model. Call on every rank.

    No rank ever holds the unsharded MoE model: in order,
    1. Build the mesh (D, X, T) and its process groups.
    2. Check that every rank was handed the same dense weights (one small all-gather); with
       `dense_state` the weights are read later, shard by shard, and the replica check of the
       first steps compares what the ranks hold instead.
    3. Capture and convert to MoE (identical on every rank: seeded by MoEConfig.seed), with the
       experts left unmaterialised and the model's tensors shared, not copied.
    4. Shard for this rank's coordinates: materialise only its own shards (its E/X experts, each
       its 1/T of F; its slices of the dense weights) and copy its replicated tensors.
    5. With `check_collectives`, simulate one step of the rank graph and check that every process
       group's members would issue the same collectives in the same order.
    6. Wrap the graph in a ParallelModule, which registers the bucketed gradient sync over each
       parameter's data-parallel group.

    Args:
        model: the dense model, with the same weights on every rank (checked).
        example_inputs: one micro-batch's positional inputs.
        moe: the MoE rewrite.
        parallel: the layout (T, X; D inferred) and runtime options.
        example_kwargs: one micro-batch's keyword inputs.
        check_inputs: check every call that all ranks pass the same input shapes
            (one small all-gather per forward); a mismatch is an error, not a hang.
        check_collectives: before the first step, simulate one step of this rank's graph
            and check with one all-gather that every process group's members would issue
            the same collectives in the same order (tedfx.check); a mismatch is an error.
        dense_state: for a dense model built on the meta device (so that no rank holds it whole):
            its state dict, or a function from a state-dict key to the tensor (e.g. reading a
            checkpoint lazily). Each rank reads the tensors it needs, one at a time, and keeps
            only its shards of them.

    Returns:
        The rank's ParallelModule.

    Example:
        >>> def main():
        ...     pm = tedfx.parallelize(model, (tokens,), moe=moe, parallel=tedfx.ParallelConfig(tensor=2, expert=2))
        ...     loss = F.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten())
        ...     loss.backward(); opt.step()
        >>> tedfx.launch(main, nprocs=4)
    """
    return build_parallel_module(model, example_inputs, moe=moe, parallel=parallel, example_kwargs=example_kwargs,
                                 check_inputs=check_inputs, check_collectives=check_collectives,
                                 dense_state=dense_state)


def build_parallel_module(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    parallel: ParallelConfig,
    example_kwargs: dict[str, Any] | None = None,
    check_inputs: bool = True,
    check_collectives: bool = True,
    dense_state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None = None,
    share_model_tensors: bool = False,
) -> ParallelModule:
    """`parallelize`'s steps; with `share_model_tensors` the rank's module uses `model`'s own tensor wherever
    it keeps one unchanged (replicated, unconverted), before the gradient sync registers on them (the
    torch.compile backend's eager code between graphs then trains the same weights)."""
    if not dist.is_initialized():
        raise RuntimeError("tedfx.parallelize needs torch.distributed: run it inside tedfx.launch(...) or "
                           "under torchrun after tedfx.init_distributed().")
    parallel.check_supported()
    parallel, dtd_reason, chunks_reason = parallel.resolve_auto(dist.get_world_size(), local_world_size(),
                                                                drop_tokens=moe.drop_tokens)
    mesh = TedMesh.build(parallel)
    _compat.set_group_timeouts([None, *mesh.groups().values()], parallel.timeout)
    fetch = _dense_reader(model, dense_state)
    if fetch is None:
        check_same_weights(model, mesh)
    model, example_inputs, example_kwargs = pipeline.at_precision(model, example_inputs, example_kwargs, parallel)
    moe_gm, moe_ctx = pipeline.build_moe_graph(model, example_inputs, moe=moe, example_kwargs=example_kwargs,
                                               lazy=True, fetch_dense=fetch)
    gm, ctx = pipeline.shard_for_rank(moe_gm, moe_ctx, parallel=parallel, coords=mesh.coords)
    del moe_gm
    if check_collectives:
        check_live_ranks(gm, ctx, parallel=parallel, mesh=mesh, example_inputs=example_inputs,
                         example_kwargs=example_kwargs)
    if share_model_tensors:
        pipeline.adopt_model_tensors(gm, model)
    record_dense_config(gm, model)
    pm = ParallelModule(gm, mesh, pipeline.param_shards(gm, ctx), parallel, pipeline.grad_sync_params(gm),
                        check_inputs)
    pm.dtd_reason, pm.a2a_chunks_reason = dtd_reason, chunks_reason
    return pm


def _dense_reader(model: nn.Module, dense_state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None
                  ) -> Callable[[str], torch.Tensor] | None:
    """How parallelize reads the dense tensors of a model on the meta device (None: the model holds them)."""
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if dense_state is None:
        if on_meta:
            raise ValueError(f"the dense model holds {on_meta[:3]}{' ...' if len(on_meta) > 3 else ''} on the meta "
                             f"device: pass dense_state= (its state dict, or a function key -> tensor) so that "
                             f"each rank can read the tensors it needs.")
        return None
    if isinstance(dense_state, Mapping):
        return dense_state.__getitem__
    if not callable(dense_state):
        raise ValueError(f"dense_state must be a mapping or a callable key -> tensor, found "
                         f"{type(dense_state).__name__}.")
    return dense_state


def explain(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    parallel: ParallelConfig | None = None,
    world_size: int = 1,
    example_kwargs: dict[str, Any] | None = None,
    tile_numel: int | None = None,
) -> Report:
    """What tedfx does to `model`, computed in this process without starting any others.

    Args:
        model: the dense model (not modified).
        example_inputs: one micro-batch's positional inputs (what each rank will see).
        moe: the MoE rewrite.
        parallel: the layout; None for the single-process MoE model.
        world_size: ranks to predict for (T * X * D).
        example_kwargs: one micro-batch's keyword inputs.
        tile_numel: the tile size of `tedfx.optimizer` to predict the tiled step's memory for
            (None: 2**20 entries).

    Returns:
        A Report: converted FFNs with paths and dims; parameter counts before and
        after (total and active per token); with `parallel`, the sharding of every
        parameter, per-rank parameter bytes, and every collective of one training
        step on rank 0 (kind, axis, phase, shape, bytes), predicted by running the
        rank's graph against simulated process groups; rank 0's training memory
        (weights, gradients, master weights, AdamW states, the step's transient peak)
        for ZeRO 0 and 1, untiled and tiled; `graphs` holds the dense
        graph and rank 0's rewritten graph for `Report.to_svg` / `to_html`.

    Example:
        >>> print(tedfx.explain(model, (tokens,), moe=moe, parallel=tedfx.ParallelConfig(tensor=2, expert=2),
        ...                     world_size=8))
    """
    dtd_reason = chunks_reason = None
    if parallel is not None:
        parallel.check_supported()
        Layout.build(world_size, parallel)  # a layout that does not fit the world fails before any work
        parallel, dtd_reason, chunks_reason = parallel.resolve_auto(world_size, local_world_size(),
                                                                    drop_tokens=moe.drop_tokens)
        model, example_inputs, example_kwargs = pipeline.at_precision(model, example_inputs, example_kwargs, parallel)
    # One capture: the dense graph is summarised before the MoE passes rewrite it in place.
    dense_gm = pipeline.capture_dense(model, example_inputs, example_kwargs)
    dense_graph = summarize_graph(dense_gm, example_inputs, example_kwargs)
    # With a layout, each predicted rank materialises only its own shards, one rank at a time.
    moe_gm, ctx = pipeline.convert_to_moe(dense_gm, model, moe=moe, lazy=parallel is not None)
    report = build_report(model, moe_gm, ctx, moe=moe, parallel=parallel, world_size=world_size,
                          example_inputs=example_inputs, example_kwargs=example_kwargs, dense_graph=dense_graph,
                          tile_numel=tile_numel)
    report.dtd_choice, report.chunks_choice = dtd_reason, chunks_reason
    return report


def check_collective_order(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    parallel: ParallelConfig,
    world_size: int,
    example_kwargs: dict[str, Any] | None = None,
) -> dict[int, list[CommCall]]:
    """Build every rank's graph of the layout, in this process, and check their collectives agree.

    Returns:
        {rank: trace} when every group agrees.

    Raises:
        CollectiveOrderError: naming the group, the ranks and the first differing collective.

    Example:
        >>> tedfx.check_collective_order(model, (tokens,), moe=moe, parallel=par, world_size=8)
    """
    layout = Layout.build(world_size, parallel)
    parallel, _, _ = parallel.resolve_auto(world_size, local_world_size(), drop_tokens=moe.drop_tokens)
    moe_gm, moe_ctx = pipeline.build_moe_graph(model, example_inputs, moe=moe, example_kwargs=example_kwargs,
                                               lazy=True)
    return check_layout(moe_gm, moe_ctx, parallel=parallel, layout=layout, example_inputs=example_inputs,
                        example_kwargs=example_kwargs)


def compiled_module(model: nn.Module) -> nn.Module:
    """The module `torch.compile(model, backend="tedfx")` built for `model`: a ParallelModule or a to_moe module.

    One module for the whole model, even when graph breaks split it into several graphs: every graph
    runs on its parameters, and its state dict has the keys of `tedfx.to_moe(model)`'s. Exists after the
    compiled model's first call. Its parameters are the ones to train (the dense model's FFN weights, and
    those tensor parallelism shards, were replaced; the others are shared with the dense model).

    Example:
        >>> compiled = torch.compile(model, backend="tedfx", options={"moe": moe})
        >>> compiled(tokens)
        >>> opt = torch.optim.AdamW(tedfx.compiled_module(model).parameters(), lr=3e-4)
    """
    return backend.built_module(model)
