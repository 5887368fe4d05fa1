"""What one layout costs one rank per training step, from the simulation `tedfx.explain` runs.

For a layout and its options, rank 0's graph is built with the passes `parallelize`
runs and one training step is run on fake tensors against simulated process
groups (tedfx.predict.simulate_step, the code behind `explain`), with three
counters attached to that one run:

- the collectives it issues (`CommStats`: kind, mesh axis, phase, calls, bytes),
  plus ZeRO-1's all-gathers of the optimizer step as `tedfx.optimizer` issues them;
- the bytes its tensors allocate (`AllocationTracker`): the step's activation peak,
  gradients held in their buckets beforehand as the gradient sync holds them;
- the floating-point operations of its ops (`torch.utils.flop_counter`),
  recomputation included.

Weights, gradients, fp32 master weights, optimizer states and the optimizer step's
transient come from `predict_training_memory` on the rank's parameters (the
optimizer's own grouping and tiling code). By symmetry rank 0 stands for every rank
of the layout: ranks differ only by which experts and slices they hold, all of the
same shapes.

Layers of a decoder are identical, so a deep model is simulated at two small depths
L0 and L1 = L0 + p (p: the period of `MoEConfig.layers`, 2 for "every_other") and
each quantity of the graph is extrapolated linearly to L layers: q(L) = q(L0) + (q(L1) - q(L0)) *
(L - L0) / p. Exact for bytes, FLOPs and memory. The gradient sync's collectives are not per layer
(buckets span layers): they come from its bucket plan on the full model's parameters
(docs/planner.md, "Layer scaling").
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .comm_stats import CommStats
from .config import MoEConfig, ParallelConfig
from .fake import FakeRun, FakeUnsupported, device_of
from .moe.routing import set_moe_loss_scale
from .passes.context import PassContext
from .pipeline import at_precision, build_moe_graph, grad_sync_params, param_shards, shard_for_rank
from .predict import record_grad_sync, simulate_step
from .runtime.memory import AllocationTracker, predict_training_memory
from .runtime.mesh import Layout
from .runtime.zero import plan_groups
from .sharding import tensor_whole

__all__ = ["MEMORY_KEYS", "LayoutCost", "ModelSource", "layout_cost", "measure_rank_step", "scaled"]

MEMORY_KEYS = ("weights", "grads", "master", "optimizer_states", "step_transient", "activations")
"""Bytes per rank, as `LayoutCost.memory` holds them."""


Params = list[tuple[str, nn.Parameter, str]]
"""(name, parameter, data-parallel axis) of a rank, as `grad_sync_params` lists them."""


@dataclass
class LayoutCost:
    """One rank's step on one layout: collectives, memory and FLOPs."""

    comm: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    """(kind, axis, phase) -> [calls, bytes], as `CommStats.table()` rows; ZeRO's all-gathers in phase "optimizer"."""
    memory: dict[str, int] = field(default_factory=dict)
    """MEMORY_KEYS -> bytes; "activations" is the forward/backward peak on top of weights and gradients."""
    flops: int = 0
    """Floating-point operations of forward, recomputation and backward (matmuls and attention)."""

    @property
    def total_memory(self) -> int:
        """Bytes held at the rank's peak: weights, gradients, masters and states, plus the larger of the
        activation peak (forward/backward) and the optimizer step's transient (they never overlap)."""
        m = self.memory
        return (m["weights"] + m["grads"] + m["master"] + m["optimizer_states"]
                + max(m["activations"], m["step_transient"]))


@dataclass
class ModelSource:
    """Where a layout's graphs come from: the converted MoE graph of a model, built once per depth."""

    build: Callable[[int | None], tuple[nn.Module, tuple[Any, ...]]]
    """depth -> (dense model, example inputs); None: the model at its own depth."""
    moe: MoEConfig
    layers: int | None = None
    """The model's depth when `build` can vary it (layer scaling), else None."""
    _graphs: dict[tuple[int | None, str], tuple[fx.GraphModule, PassContext, tuple[Any, ...]]] = \
        field(default_factory=dict)
    _steps: dict[tuple[Any, ...], tuple[LayoutCost, Params, frozenset[str]]] = field(default_factory=dict)
    """Simulated steps by (depth, config without zero, layout): ZeRO changes the optimizer, not the graph. The
    cost without the gradient sync, the rank's parameters, and those tensor parallelism leaves whole."""

    def graph(self, depth: int | None, precision: str) -> tuple[fx.GraphModule, PassContext, tuple[Any, ...]]:
        """The MoE graph (experts unbuilt), its context and example inputs at `depth`, captured once."""
        key = (depth, precision)
        if key not in self._graphs:
            model, inputs = self.build(depth)
            model, inputs, _ = at_precision(model, inputs, None, ParallelConfig(precision=precision))
            gm, ctx = build_moe_graph(model, inputs, moe=self.moe, lazy=True)
            self._graphs[key] = (gm, ctx, inputs)
        return self._graphs[key]


def layout_cost(source: ModelSource, parallel: ParallelConfig, world_size: int, *, tile_numel: int | None,
                scale_layers: bool = True) -> LayoutCost:
    """Rank 0's step on `parallel` over `world_size` ranks, at the model's full depth.

    With `scale_layers` and a source whose depth can vary, simulated at depths L0 and L1 and
    extrapolated (module docstring); otherwise simulated at the model's own depth.
    """
    layout = Layout.build(world_size, parallel)
    depths = _scaling_depths(source) if scale_layers else None
    if depths is None:
        cost, params, whole = _simulate(source, None, parallel, layout)
    else:
        l0, l1 = depths
        k = (source.layers - l0) // (l1 - l0)
        (at_l0, params_l0, _), (at_l1, params_l1, whole) = (_simulate(source, d, parallel, layout) for d in depths)
        cost, params = scaled(at_l0, at_l1, k), _deepen(params_l0, params_l1, k)
        whole = frozenset(name for name, _, _ in params if name.partition("#")[0] in whole)
    sync = CommStats()
    record_grad_sync(sync, params, layout, parallel.bucket_mb, whole)
    for *key, calls, nbytes in sync.table():
        total = cost.comm.setdefault(tuple(key), [0, 0])
        total[0] += calls
        total[1] += nbytes
    cost.comm = dict(sorted(cost.comm.items()))
    _add_training_state(cost, params, parallel, layout, tile_numel)
    return cost


def _scaling_depths(source: ModelSource) -> tuple[int, int] | None:
    """(L0, L1) to extrapolate from, or None when the model is simulated whole."""
    if source.layers is None:
        return None
    period = 2 if source.moe.layers == "every_other" else 1
    if source.moe.layers not in ("all", "every_other") or source.layers % period or source.layers <= 2 * period:
        return None
    return period, 2 * period


def scaled(at_l0: LayoutCost, at_l1: LayoutCost, k: int) -> LayoutCost:
    """at_l0 + k * (at_l1 - at_l0), entry by entry: the step's cost at depth L0 + k * (L1 - L0)."""
    def lin(a: int, b: int) -> int:
        return a + k * (b - a)

    comm = {}
    for key in sorted(set(at_l0.comm) | set(at_l1.comm)):
        a, b = at_l0.comm.get(key, [0, 0]), at_l1.comm.get(key, [0, 0])
        comm[key] = [lin(a[0], b[0]), lin(a[1], b[1])]
    memory = {key: lin(at_l0.memory[key], at_l1.memory[key]) for key in at_l0.memory}
    return LayoutCost(comm=comm, memory=memory, flops=lin(at_l0.flops, at_l1.flops))


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Python's cycle collector paused: a tensor held by a reference cycle is freed when the block ends, not
    whenever the collector happens to run, so the measured peak is the same on every run (and an upper bound)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def _deepen(params_l0: Params, params_l1: Params, k: int) -> Params:
    """The rank's parameter list at depth L0 + k * (L1 - L0): L1's, with the parameters L1 adds (one period of
    layers) repeated k times where they stand, as shapes on the meta device (the optimizer's grouping, ZeRO
    ranges and tiles are then computed on the full model, not extrapolated)."""
    known = {name for name, _, _ in params_l0}
    added = [i for i, (name, _, _) in enumerate(params_l1) if name not in known]
    if not added:
        return list(params_l1)
    end = added[-1] + 1
    period = [params_l1[i] for i in added]
    copies = [(f"{name}#{j}", nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                          requires_grad=p.requires_grad), axis)
              for j in range(1, k) for name, p, axis in period]
    return [*params_l1[:end], *copies, *params_l1[end:]]


def _add_training_state(cost: LayoutCost, params: Params, parallel: ParallelConfig, layout: Layout,
                        tile_numel: int | None) -> None:
    """Weights, gradients, masters, optimizer states and the step's transient (predict_training_memory), and
    ZeRO-1's all-gathers after the step, as tedfx.optimizer issues them (one per sharded group)."""
    sizes = {axis: layout.size(axis) for axis in ("dp", "edp")}
    ranks = {axis: layout.group_of(0, axis).index(0) for axis in ("dp", "edp")}
    training = predict_training_memory(params, zero=parallel.zero, sizes=sizes, ranks=ranks, tile_numel=tile_numel)
    cost.memory.update({key: training[key] for key in MEMORY_KEYS if key != "activations"})
    if parallel.zero:
        for g in plan_groups([t for t in params if t[1].requires_grad], zero=1, sizes=sizes, ranks=ranks):
            if g.size > 1:
                nbytes = g.chunk * torch.empty((), dtype=g.dtype).element_size()
                calls, total = cost.comm.get(("all_gather", g.axis, "optimizer"), [0, 0])
                cost.comm[("all_gather", g.axis, "optimizer")] = [calls + 1, total + nbytes]


def _simulate(source: ModelSource, depth: int | None, parallel: ParallelConfig,
              layout: Layout) -> tuple[LayoutCost, Params, frozenset[str]]:
    """One simulated step of rank 0 at `depth`: its collectives without the gradient sync's, activation peak and
    FLOPs; its parameters, and those tensor parallelism leaves whole."""
    key = (depth, dataclasses.replace(parallel, zero=0), layout)
    if key not in source._steps:
        source._steps[key] = _simulate_step(source, depth, parallel, layout)
    cost, params, whole = source._steps[key]
    return LayoutCost(comm={k: list(v) for k, v in cost.comm.items()}, memory=dict(cost.memory),
                      flops=cost.flops), params, whole


def _simulate_step(source: ModelSource, depth: int | None, parallel: ParallelConfig,
                   layout: Layout) -> tuple[LayoutCost, Params, frozenset[str]]:
    moe_gm, ctx, inputs = source.graph(depth, parallel.precision)
    gm, rank_ctx = shard_for_rank(moe_gm, ctx, parallel=parallel, coords=layout.coords(0), materialize=False)
    run = FakeRun(gm, device_of(inputs, moe_gm))
    params = grad_sync_params(gm)
    whole = tensor_whole(param_shards(gm, rank_ctx))
    set_moe_loss_scale(gm, 1.0)  # gradients start at zero, as in the gradient sync's buckets: not an accumulation
    try:
        with run.active():
            for _, p, _ in params:  # gradients live in buckets allocated before the first step (gradient sync)
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            with FlopCounterMode(display=False) as counter, AllocationTracker() as mem, _no_gc():
                stats = simulate_step(gm, layout=layout, rank=0, bucket_mb=parallel.bucket_mb,
                                      tensor_whole=whole, example_inputs=run.inputs(inputs),
                                      grad_sync=False)  # added on the full model's parameters (layout_cost)
    except FakeUnsupported as e:
        raise ValueError(f"the planner simulates steps on fake tensors, and this model's graph cannot run on them "
                         f"({e}); dropless routing (MoEConfig(drop_tokens=False)) sizes buffers by values: plan "
                         f"with drop_tokens=True.") from e
    cost = LayoutCost(comm={row[:3]: list(row[3:]) for row in stats.table()}, memory={"activations": mem.peak},
                      flops=int(counter.get_total_flops()))
    return cost, params, whole


def measure_rank_step(moe_gm: fx.GraphModule, ctx: PassContext, inputs: tuple[Any, ...], parallel: ParallelConfig,
                      world_size: int, *, rank: int = 0, lr: float = 1e-4) -> tuple[int, int]:
    """What the planner's memory prediction is checked against: the rank's real shards train two steps (forward,
    backward of the summed output, AdamW) against simulated process groups.

    Returns:
        (tensor bytes held after the first step: weights, gradients kept allocated as in the gradient sync's
        buckets, optimizer states; the held bytes plus the peak of the second, steady-state step's allocations).
    """
    from . import collectives
    from .predict import simulated_axes
    from .runtime.memory import tensor_bytes

    layout = Layout.build(world_size, parallel)
    gm, _ = shard_for_rank(moe_gm, ctx, parallel=parallel, coords=layout.coords(rank))
    set_moe_loss_scale(gm, 1.0)  # the gradients start at zero, as the gradient sync's buckets do
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, foreach=False)

    def step() -> None:
        with collectives.bind_axes(simulated_axes(layout, rank), collectives.CommStats()):
            loss = gm(*inputs).float().sum()
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in the gradient sync's buckets

    step()  # creates the optimizer's states; the second step is the steady state
    held = tensor_bytes([list(gm.parameters()), [p.grad for p in params], list(opt.state.values())])
    with AllocationTracker() as mem:
        step()
    return held, held + mem.peak
