"""ParallelModule: one rank's TED graph, run with its process groups (docs/architecture.md, "Runtime").

The module is built by `tedfx.parallelize` (tedfx.api) from a rank graph the
pipeline produced; this file only runs it: it binds the call to the inputs of
the capture, checks that every rank calls it alike, gives each token group one
micro-batch (tedfx.runtime.token_group), binds the mesh axes to the rank's
process groups around each forward, and owns the gradient sync.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import collectives, rng
from ..capture import DROPOUT_P_META
from ..config import ParallelConfig
from ..moe.routing import moe_losses
from ..sharding import ParamShard, tensor_whole, unshard_tensor
from ..signature import bind_call
from . import doors
from .grad_norm import clip_coefficient, global_grad_norm
from .grad_sync import GradSync
from .input_check import check_same_inputs
from .mesh import TedMesh
from .precision import cast_inputs_and_outputs, compute_dtype
from .replicas import ReplicaCheck
from .token_group import TokenGroup, TokenGroupFeed

__all__ = ["ParallelModule", "check_same_weights"]


SHARDS_OF = "tedfx_shards_of"
"""Key of `pm.state_dict()`'s metadata: whose shards the dict holds (ParallelModule._shards_of)."""


class ParallelModule(nn.Module):
    """One rank's part of a TED-parallel MoE model.

    `pm(*inputs, **kwargs)` works like the model on this rank's token group's
    micro-batch (the inputs of the capture, by position or by name). After
    `loss.backward()` every local `.grad` holds the data-parallel average, so
    any torch optimizer on `pm.parameters()` works; clip with `pm.clip_grad_norm_`
    and accumulate with `pm.no_sync()`. With precision "bf16"/"fp16" the weights
    are 16-bit and `tedfx.optimizer` keeps their fp32 masters.

    The T tensor ranks of a token group run one micro-batch: by default each forward
    takes the inputs of the token group's first rank (ParallelConfig.token_group_inputs,
    tedfx.runtime.token_group). Draw data by `pm.data_parallel_rank`.

    Attributes:
        module: this rank's GraphModule (also `pm.graph`).
        mesh: the TedMesh (layout, coordinates, process groups).
        shards: {state-dict key: ParamShard}, how each tensor is split over the mesh.
        token_group: this rank's TokenGroup (index = data-parallel rank, count, its ranks).
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
            check_inputs: check on every call that all ranks pass the same input shapes and dtypes, and within
                the token group the RNG states (while dropout is on), the inputs ("verify" mode) and the
                gradient at the outputs: a few small tensor collectives per step, no pickle unless a check
                fails (docs/parallelism.md, "Cost of the checks").
        """
        super().__init__()
        self.module = gm
        self.mesh = mesh
        self.shards = shards
        self.parallel = parallel
        self.check_inputs = check_inputs
        self.register_state_dict_post_hook(ParallelModule._stamp_state_dict)
        self.register_load_state_dict_pre_hook(ParallelModule._check_loaded_shards)
        self._dropout = _has_dropout(gm)
        self.token_group = TokenGroup(index=mesh.layout.data_parallel_rank(mesh.rank), count=mesh.size("dp"),
                                      ranks=tuple(mesh.group_ranks("tp")))
        self._feed = TokenGroupFeed(self.token_group, mesh.group("tp"), mesh.rank, parallel.token_group_inputs) \
            if parallel.tensor > 1 else None
        self._stats = collectives.CommStats()
        self._check_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        world = mesh.layout.world_size
        self._grad_sync = GradSync(sync_params, mesh.groups(), world // parallel.tensor,
                                   parallel.bucket_mb, self._stats, tensor_whole(shards))
        self.sync_params = [(name, p, axis) for name, p, axis in sync_params if p.requires_grad]
        """(name, parameter, data-parallel axis) of every trained parameter: what tedfx.optimizer steps."""
        self.compute_dtype = compute_dtype(parallel.precision)
        if self.compute_dtype != torch.float32:
            cast_inputs_and_outputs(gm, self.compute_dtype)
        self.check_replicas = True
        """Check once per step that replicated parameters still agree on every rank (tedfx.runtime.replicas)."""
        self._replicas = ReplicaCheck(list(gm.named_parameters()), shards, mesh.layout)
        self._replicas_checked_at = 0
        self._replicas_pending: Callable[[], None] | None = None
        self.register_forward_pre_hook(_check_replicas_once_per_step)
        self.train(gm.training)  # the dense model's mode, as a DDP wrapper keeps its module's
        self._built_as = {name: (p.dtype, p.device) for name, p in gm.named_parameters()}
        self._recast: list[str] = []
        """Parameters `.to()` / `.half()` gave another dtype or device than the gradient buckets were built for."""

    @property
    def graph(self) -> torch.fx.GraphModule:
        """This rank's rewritten GraphModule."""
        return self.module

    @property
    def data_parallel_rank(self) -> int:
        """This rank's token group, d*X + x: the index to draw data by (the T tensor ranks share it)."""
        return self.token_group.index

    @property
    def data_parallel_size(self) -> int:
        """The number of token groups, X*D: how many micro-batches one step trains on."""
        return self.token_group.count

    def broadcast_batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The token group's first rank's `tensors` on every rank of the token group (e.g. the targets).

        Every tensor rank must pass tensors of the same shapes and dtypes. The module's own inputs need
        no call: they are broadcast already (ParallelConfig.token_group_inputs="broadcast").

        Example:
            >>> x, y = pm.broadcast_batch(x, y)
            >>> F.cross_entropy(pm(x).flatten(0, 1), y.flatten()).backward()
        """
        return tuple(self._feed.broadcast(list(tensors))) if self._feed is not None else tensors

    def _apply(self, fn: Callable, recurse: bool = True) -> "ParallelModule":
        out = super()._apply(fn, recurse)
        if "_built_as" in self.__dict__:
            self._recast = [name for name, p in self.module.named_parameters()
                            if (p.dtype, p.device) != self._built_as.get(name, (p.dtype, p.device))]
        return out

    def _refuse_training_after_recast(self) -> None:
        name = self._recast[0]
        dtype, device = self._built_as[name]
        p = self.module.get_parameter(name)
        more = f", and {len(self._recast) - 1} more" if len(self._recast) > 1 else ""
        raise RuntimeError(
            f"this ParallelModule's parameters were moved or cast after tedfx.parallelize ({name}: {dtype} on "
            f"{device} -> {p.dtype} on {p.device}{more}): its gradient buckets "
            f"and the optimizer's view of the parameters are those of the dtype and device it was built with, "
            f"so it runs without gradients only (torch.no_grad()). To train in bf16 or fp16, pass "
            f'ParallelConfig(precision="bf16") (fp32 master weights, docs/parallelism.md, "Mixed precision"); to train '
            f"on another dtype or device, move or cast the dense model before tedfx.parallelize.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._recast and torch.is_grad_enabled():
            self._refuse_training_after_recast()
        # 1. The inputs of the capture (a clear TypeError otherwise), before any collective.
        args, kwargs = bind_call(self.module, args, kwargs, door="tedfx.parallelize")
        checking = self.check_inputs and not torch.compiler.is_compiling()  # compiled graphs guard their shapes
        if checking:
            self._check_same_shapes(args, kwargs)
        # 2. One micro-batch per token group (and the same RNG state while dropout is on).
        if self._feed is not None:
            # "verify" is what the user chose instead of the broadcast: it runs whatever check_inputs says.
            verify = self.parallel.token_group_inputs == "verify" and not torch.compiler.is_compiling()
            args, kwargs = self._feed.feed(args, kwargs, check=checking or verify,
                                           check_rng=checking and self.training and self._dropout)
        with self.bind_groups():
            out = self.module(*args, **kwargs)
        if self._feed is not None:
            self._feed.finish_checks()  # the token group's comparison ran alongside the forward
        self._judge_replicas()  # so did the replica check's all-gather
        # 3. One loss per token group: the backward checks the gradient at the outputs (at its end).
        if self._feed is not None and checking and torch.is_grad_enabled():
            out = self._feed.watch_outputs(out)
        return out

    def _judge_replicas(self) -> None:
        pending, self._replicas_pending = self._replicas_pending, None
        if pending is not None:
            pending()

    def bind_groups(self) -> contextlib.AbstractContextManager[None]:
        """Bind this rank's process groups and stats around a call of another graph that shares this module's
        parameters (e.g. one graph of a model torch.compile split at graph breaks): what `forward` does
        around `self.module`."""
        return collectives.bind_axes(self.mesh.groups(), self._stats)

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
        """The collectives this rank issued since the last `comm_stats().reset()` (kind, axis, phase, calls, bytes).

        Those of the graph and the gradient sync, as `tedfx.explain` predicts them; the token group's input
        broadcast and the input checks are not counted.
        """
        return self._stats

    def aux_loss(self) -> dict[str, float]:
        """The last forward's MoE losses on this rank, unweighted, for logging: {"aux_loss", "z_loss", "blocks"}.

        They are in the backward already, weighted by the coefficients and by `tedfx.set_moe_loss_scale(pm, s)`
        (1 / N when the loop backpropagates loss / N over N micro-batches).
        """
        return moe_losses(self.module)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded state dict, with exactly the keys of `tedfx.to_moe(...)`'s, on every rank.

        A collective: call it on every rank and keep rank 0's to write it (`sd = pm.full_state_dict();
        if rank == 0: torch.save(sd, path)`). Called on some ranks only, it raises CollectiveCallError after
        ParallelConfig.timeout (docs/checkpoints.md, "Every rank calls it").
        """
        self.enter_collective("ParallelModule.full_state_dict")
        return self._gather_full_state()

    def _shards_of(self) -> dict[str, int]:
        """Whose shards this rank holds: the layout's split degrees and the rank's tensor and expert coordinates
        (ranks that differ only in "edp" hold the same shards)."""
        layout, coords = self.mesh.layout, self.mesh.coords
        return {"tensor": layout.tensor, "expert": layout.expert, "tp": coords["tp"], "ep": coords["ep"]}

    @staticmethod
    def _stamp_state_dict(pm: ParallelModule, state_dict, prefix, local_metadata) -> None:
        """`pm.state_dict()` holds this rank's shards: its metadata (which torch.save keeps) says whose."""
        local_metadata[SHARDS_OF] = pm._shards_of()

    @staticmethod
    def _check_loaded_shards(pm: ParallelModule, state_dict, prefix, local_metadata, *args) -> None:
        """Refuse a state dict stamped with another rank's shards: `if rank == 0: torch.save(pm.state_dict(), f)`
        loaded on every rank would give each rank rank 0's pieces of the split weights with no error of torch's
        (the keys and shapes are the same on every rank). A dict without the stamp is not checked."""
        theirs, mine = local_metadata.get(SHARDS_OF), pm._shards_of()
        if theirs is not None and theirs != mine:
            raise ValueError(
                f"this state dict holds the shards of another rank ({theirs}), not this rank's ({mine}): "
                f"pm.state_dict() is one rank's pieces of the split weights. To save and resume, call "
                f"tedfx.save(path, pm, optimizer) and tedfx.load(path, pm, optimizer) on every rank; for the whole "
                f"model, pm.full_state_dict() on every rank (docs/checkpoints.md).")

    def enter_collective(self, door: str) -> None:
        """Check that every rank entered the public collective `door` (one all-gather of 8 bytes per rank)."""
        doors.enter(door, self.mesh.door_group, self.parallel.timeout)

    def _gather_full_state(self) -> dict[str, torch.Tensor]:
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
        """Every rank must call with the same input shapes and dtypes: the all-to-alls exchange equal buffers.

        One all-reduce of 16 bytes over the world; a pickle only when the ranks differ (tedfx.runtime.input_check).
        """
        check_same_inputs(args, kwargs, device=self._check_device)


def _check_replicas_once_per_step(pm: ParallelModule, args: tuple) -> None:
    """Forward pre-hook: the first forward after a synced backward starts the replica check (the same step on
    every rank); the forward judges it when it returns (a forward that did not judge it: the next call)."""
    if torch.compiler.is_compiling():  # first: a compiled forward must not guard on the step counters
        return
    pm._judge_replicas()
    finished = pm._grad_sync.finished
    if not pm.check_replicas or finished == pm._replicas_checked_at:
        return
    pm._replicas_checked_at = finished
    pm._replicas_pending = pm._replicas.start()


def _has_dropout(module: nn.Module) -> bool:
    """Whether any graph of `module` (checkpointed regions included) drops out with p > 0."""
    graphs = [m.graph for m in module.modules() if isinstance(m, torch.fx.GraphModule)]
    graphs += [m.region.graph for m in module.modules() if hasattr(m, "region")]
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in rng.DROPOUT_OPS and node.args[1] > 0:
                return True
            if node.target in rng.ATTENTION_OPS and node.meta.get(DROPOUT_P_META, 0.0) > 0:
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
