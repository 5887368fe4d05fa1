"""ParallelModule: one rank's TED graph, run with its process groups (docs/architecture.md, "Runtime").

The module is built by `tedfx.parallelize` (tedfx.api) from a rank graph the
pipeline produced; this file only runs it: it binds the mesh axes to the
rank's process groups around each forward, checks that every rank calls it
alike, and owns the gradient sync.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat, collectives
from .._compat import pytree
from ..capture import DROPOUT_P_META
from ..config import ParallelConfig
from ..moe.routing import moe_losses
from ..sharding import ParamShard, unshard_tensor
from .grad_norm import clip_coefficient, global_grad_norm
from .grad_sync import GradSync
from .mesh import TedMesh
from .precision import cast_inputs_and_outputs, compute_dtype
from .replicas import ReplicaCheck

__all__ = ["ParallelModule", "check_same_weights"]


class ParallelModule(nn.Module):
    """One rank's part of a TED-parallel MoE model.

    `pm(*inputs)` works like the model on this rank's micro-batch. After
    `loss.backward()` every local `.grad` holds the data-parallel average, so
    any torch optimizer on `pm.parameters()` works; clip with `pm.clip_grad_norm_`
    and accumulate with `pm.no_sync()`. With precision "bf16"/"fp16" the weights
    are 16-bit and `tedfx.optimizer` keeps their fp32 masters.

    Attributes:
        module: this rank's GraphModule (also `pm.graph`).
        mesh: the TedMesh (layout, coordinates, process groups).
        shards: {state-dict key: ParamShard}, how each tensor is split over the mesh.
    """

    def __init__(self, gm: torch.fx.GraphModule, mesh: TedMesh, shards: dict[str, ParamShard],
                 parallel: ParallelConfig, sync_params: list[tuple[str, nn.Parameter, str]],
                 check_inputs: bool = True) -> None:
        """
        Args:
            gm: this rank's graph (tedfx.pipeline.shard_for_rank).
            mesh: the rank's TedMesh.
            shards: {state-dict key: ParamShard} of gm.
            parallel: the ParallelConfig gm was built for.
            sync_params: (name, parameter, data-parallel axis) of every parameter, for the gradient sync.
            check_inputs: check on every call that all ranks pass the same input shapes.
        """
        super().__init__()
        self.module = gm
        self.mesh = mesh
        self.shards = shards
        self.parallel = parallel
        self.check_inputs = check_inputs
        self._dropout = _has_dropout(gm)
        self._stats = collectives.CommStats()
        world = mesh.layout.world_size
        self._grad_sync = GradSync(sync_params, mesh.groups(), world // parallel.tensor,
                                   parallel.bucket_mb, self._stats)
        self.sync_params = [(name, p, axis) for name, p, axis in sync_params if p.requires_grad]
        """(name, parameter, data-parallel axis) of every trained parameter: what tedfx.optimizer steps."""
        self.compute_dtype = compute_dtype(parallel.precision)
        if self.compute_dtype != torch.float32:
            cast_inputs_and_outputs(gm, self.compute_dtype)
        self.check_replicas = True
        """Check once per step that replicated parameters still agree on every rank (tedfx.runtime.replicas)."""
        self._replicas = ReplicaCheck(list(gm.named_parameters()), shards, mesh.layout)
        self._replicas_checked_at = 0
        self.register_forward_pre_hook(_check_replicas_once_per_step)

    @property
    def graph(self) -> torch.fx.GraphModule:
        """This rank's rewritten GraphModule."""
        return self.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.check_inputs and not torch.compiler.is_compiling():
            self._check_same_shapes(args, kwargs)  # a compiled graph guards its own input shapes
        with collectives.bind_axes(self.mesh.groups(), self._stats):
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation without communication: backwards inside add up local gradients.

        The first backward after the block reduces and averages the accumulated sum over each
        parameter's data-parallel group, as DDP's `no_sync` does.

        Example:
            >>> with pm.no_sync():
            ...     loss_fn(pm(x0)).backward()   # no all-reduce
            >>> loss_fn(pm(x1)).backward()       # all-reduces the sum of both micro-batches
            >>> opt.step()
        """
        with self._grad_sync.no_sync():
            yield

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clip the gradients by the norm of the whole model's gradient, the same on every rank.

        Use this, not `torch.nn.utils.clip_grad_norm_(pm.parameters())`: that one sees only this
        rank's shards, computes a different norm on every rank and makes replicas diverge
        (docs/parallelism.md, "Gradient clipping"). One all-reduce of a scalar over the world.

        Args:
            max_norm: the largest norm allowed.
            norm_type: p of the p-norm (math.inf for the largest entry).
            error_if_nonfinite: raise when the norm is inf or nan (on every rank alike).

        Returns:
            The total norm before clipping (a 0-dim fp32 tensor, equal on every rank).
        """
        params = list(self.module.named_parameters())
        total = global_grad_norm(params, self.shards, self.mesh.coords, norm_type=norm_type, stats=self._stats)
        if error_if_nonfinite and not math.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {total}: some gradient "
                               f"overflowed. Set error_if_nonfinite=False to clip anyway.")
        coef = clip_coefficient(total, max_norm)
        for _, p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
        return torch.tensor(total, dtype=torch.float32)

    def grad_buffers(self) -> list[torch.Tensor]:
        """The flat gradient buckets, allocated once: every synchronised `.grad` is a view into one of them."""
        return [b.flat for b in self._grad_sync.buckets]

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


def _check_replicas_once_per_step(pm: ParallelModule, args: tuple) -> None:
    """Forward pre-hook: the first forward after a synced backward checks the replicas (same step on every rank)."""
    if torch.compiler.is_compiling():  # first: a compiled forward must not guard on the step counters
        return
    finished = pm._grad_sync.finished
    if not pm.check_replicas or finished == pm._replicas_checked_at:
        return
    pm._replicas_checked_at = finished
    pm._replicas.check()


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
            if node.target is _compat.sdpa_target and node.meta.get(DROPOUT_P_META, 0.0) > 0:
                return True
    return False


def check_same_weights(model: nn.Module, mesh: TedMesh) -> None:
    """Every rank must start from the same dense model.

    One all-gather of a (sum, sum of squares) fingerprint per tensor; any difference is an error.
    """
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
