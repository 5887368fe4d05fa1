"""ParallelModule: one rank's TED graph, run with its process groups (DESIGN §1).

`parallelize` builds it on every rank, in order:
1. Build the mesh (D, X, T) and its process groups.
2. Check that every rank was handed the same dense weights (one small all-gather).
3. Capture and convert to MoE (identical on every rank: seeded by MoEConfig.seed),
   then shard for this rank's coordinates (tedfx.compiler).
4. Register bucketed gradient sync over each parameter's data-parallel group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import collectives
from ..api import moe_losses
from ..compiler import build_moe_graph, grad_sync_params, param_shards, shard_for_rank
from ..config import MoEConfig, ParallelConfig
from ..passes.sharding import ParamShard, unshard_tensor
from .. import _compat
from .._compat import pytree
from ..check import CollectiveOrderError, compare_traces
from ..predict import predict_rank
from .grad_sync import GradSync
from .mesh import TedMesh

__all__ = ["ParallelModule", "parallelize"]


class ParallelModule(nn.Module):
    """One rank's part of a TED-parallel MoE model.

    `pm(*inputs)` works like the model on this rank's micro-batch. After
    `loss.backward()` every local `.grad` holds the data-parallel average, so
    any torch optimizer on `pm.parameters()` works.

    Attributes:
        module: this rank's GraphModule (also `pm.graph`).
        mesh: the TedMesh (layout, coordinates, process groups).
        shards: {state-dict key: ParamShard}, how each tensor is split over the mesh.
    """

    def __init__(self, gm: torch.fx.GraphModule, mesh: TedMesh, shards: dict[str, ParamShard],
                 parallel: ParallelConfig, check_inputs: bool = True) -> None:
        super().__init__()
        self.module = gm
        self.mesh = mesh
        self.shards = shards
        self.parallel = parallel
        self.check_inputs = check_inputs
        self._dropout = _has_dropout(gm)
        self._stats = collectives.CommStats()
        world = mesh.layout.world_size
        self._grad_sync = GradSync(grad_sync_params(gm), mesh.groups(), world // parallel.tensor,
                                   parallel.bucket_mb, self._stats)

    @property
    def graph(self) -> torch.fx.GraphModule:
        """This rank's rewritten GraphModule."""
        return self.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.check_inputs and not torch.compiler.is_compiling():
            self._check_same_shapes(args, kwargs)  # a compiled graph guards its own input shapes
        with collectives.bind_axes(self.mesh.groups(), self._stats):
            return self.module(*args, **kwargs)

    def comm_stats(self) -> collectives.CommStats:
        """The collectives this rank issued since the last `comm_stats().reset()` (kind, axis, phase, calls, bytes)."""
        return self._stats

    def aux_loss(self) -> dict[str, float]:
        """The last forward's MoE losses on this rank: {"aux_loss", "z_loss", "blocks"}."""
        return moe_losses(self.module)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded state dict, with exactly the keys of `tedfx.to_moe(...)`'s; a collective on every rank."""
        layout = self.mesh.layout
        sizes = {"tp": layout.tensor, "ep": layout.expert, "edp": layout.data}
        out = {}
        for name, local in self.module.state_dict().items():
            spec = self.shards[name]
            if not spec.splits:
                out[name] = local.detach().clone()
                continue
            gathered = [torch.empty_like(local) for _ in range(layout.world_size)]
            dist.all_gather(gathered, local.detach().contiguous())
            pieces = {}
            for rank, t in enumerate(gathered):
                c = layout.coords(rank)
                pieces.setdefault(tuple(c[axis] for axis, _ in spec.splits), t)
            out[name] = unshard_tensor(pieces, spec, sizes)
        return out

    def _check_same_shapes(self, args: tuple, kwargs: dict) -> None:
        """Every rank must call with the same input shapes: the all-to-alls exchange equal buffers.

        While dropout is active, the tensor ranks of a group must also hold the same RNG state, or
        their masks on the replicated activations differ and the replicas drift apart silently.
        """
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in pytree.tree_leaves((args, kwargs))]
        rng = _rng_fingerprint() if self.training and self._dropout else None
        everyone: list[Any] = [None] * self.mesh.layout.world_size
        dist.all_gather_object(everyone, (shapes, rng))
        bad = [r for r, (s, _) in enumerate(everyone) if s != shapes]
        if bad:
            detail = "; ".join(f"rank {r}: {everyone[r][0]}" for r in [self.mesh.rank, *bad])
            raise ValueError(
                f"ranks called the ParallelModule with different input shapes ({detail}). Every rank must "
                f"pass a micro-batch of the same shape (the expert all-to-alls exchange equal-size buffers); "
                f"pad or drop the last batch."
            )
        tp_group = self.mesh.group_ranks("tp")
        if rng is not None and any(everyone[r][1] != rng for r in tp_group):
            raise ValueError(
                f"the tensor-parallel ranks {tp_group} hold different torch RNG states while dropout is on, so "
                f"their dropout masks on replicated activations would differ. Seed torch identically on the "
                f"ranks of a tensor group (e.g. torch.manual_seed(seed + data_parallel_rank))."
            )


def _rng_fingerprint() -> int:
    return hash(torch.get_rng_state().numpy().tobytes())


def _has_dropout(module: nn.Module) -> bool:
    """Whether any graph of `module` (checkpointed regions included) drops out with p > 0."""
    graphs = [m.graph for m in module.modules() if isinstance(m, torch.fx.GraphModule)]
    graphs += [m.region.graph for m in module.modules() if hasattr(m, "region")]
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _compat.dropout_targets and node.args[1] > 0:
                return True
            if node.target is _compat.sdpa_target and node.meta.get("tedfx_dropout_p", 0.0) > 0:
                return True
    return False


def parallelize(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    moe: MoEConfig,
    parallel: ParallelConfig,
    example_kwargs: dict[str, Any] | None = None,
    check_inputs: bool = True,
    check_collectives: bool = True,
) -> ParallelModule:
    """Turn a dense model into this rank's part of a TED-parallel MoE model. Call on every rank.

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

    Returns:
        The rank's ParallelModule.

    Example:
        >>> def main():
        ...     pm = tedfx.parallelize(model, (tokens,), moe=moe, parallel=tedfx.ParallelConfig(tensor=2, expert=2))
        ...     loss = F.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten())
        ...     loss.backward(); opt.step()
        >>> tedfx.launch(main, nprocs=4)
    """
    if not dist.is_initialized():
        raise RuntimeError("tedfx.parallelize needs torch.distributed: run it inside tedfx.launch(...) or "
                           "under torchrun after tedfx.runtime.init_distributed().")
    parallel.check_supported()
    mesh = TedMesh.build(parallel)
    _compat.set_group_timeouts([None, *mesh.groups().values()], parallel.timeout)
    _check_same_weights(model, mesh)
    moe_gm, moe_ctx = build_moe_graph(model, example_inputs, moe=moe, example_kwargs=example_kwargs)
    if check_collectives:
        _check_collective_order(moe_gm, moe_ctx, parallel, mesh, example_inputs, example_kwargs)
    gm, ctx = shard_for_rank(moe_gm, moe_ctx, parallel=parallel, coords=mesh.coords)
    del moe_gm
    return ParallelModule(gm, mesh, param_shards(gm, ctx), parallel, check_inputs)


def _check_same_weights(model: nn.Module, mesh: TedMesh) -> None:
    """One all-gather of a (sum, sum of squares) fingerprint per tensor; any difference is an error."""
    names, rows = [], []
    for name, t in model.state_dict().items():
        if torch.is_floating_point(t):
            t64 = t.detach().double()
            names.append(name)
            rows.append(torch.stack([t64.sum(), t64.square().sum()]))
    mine = torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(mesh.layout.world_size)]
    dist.all_gather(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, everyone[0]):
            bad = [names[i] for i in range(len(names)) if not torch.equal(theirs[i], everyone[0][i])]
            raise ValueError(
                f"rank {rank} holds different weights from rank 0 for {bad[:5]}{' ...' if len(bad) > 5 else ''}. "
                f"Every rank must start from the same dense model: seed the initialisation identically "
                f"(torch.manual_seed before building it) or load the same checkpoint on every rank."
            )


def _check_collective_order(moe_gm, moe_ctx, parallel, mesh, example_inputs, example_kwargs) -> None:
    """Simulate this rank's step, gather every rank's trace, and compare them group by group."""
    mine = predict_rank(moe_gm, moe_ctx, parallel=parallel, layout=mesh.layout, rank=mesh.rank,
                        example_inputs=example_inputs, example_kwargs=example_kwargs).comm.trace
    traces: list[Any] = [None] * mesh.layout.world_size
    dist.all_gather_object(traces, mine)
    mismatches = compare_traces(dict(enumerate(traces)), mesh.layout, exact_shapes=moe_ctx.moe.drop_tokens)
    if mismatches:
        raise CollectiveOrderError(mismatches)
