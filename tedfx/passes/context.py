"""What passes read and what they record: a typed PassContext (docs/architecture.md, "Pass context").

A pass reads its configs and this rank's coordinates from the context and
writes what it found or did into `ctx.records`, one typed field per pass. The
records that outlive a graph hold paths, names and dims only, never fx nodes:
a rank's context copies them from the MoE graph's context, and nothing in them
keeps another graph alive. The one exception, `ffn_matches`, is the hand-over
from find_ffns to ffn_to_moe on the same graph, and is cleared once used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

import torch

from ..config import MoEConfig, ParallelConfig
from ..sharding import ParamShard

if TYPE_CHECKING:
    from .find_ffns import FFNMatch

__all__ = ["FFNInfo", "MoEBlockRecord", "PassContext", "PassRecords", "PassTiming"]


@dataclass(frozen=True)
class FFNInfo:
    """One FFN found in the dense graph, as `explain` reports it."""

    index: int
    """Position among the model's FFNs, in graph order (what MoEConfig.layers indexes)."""
    path: str
    """Module path, e.g. "transformer.h.0.mlp"."""
    kind: Literal["mlp", "glu"]
    activation: str
    hidden_dim: int
    ffn_dim: int


@dataclass(frozen=True)
class MoEBlockRecord:
    """One converted FFN, as reported by `explain`."""

    index: int
    path: str
    kind: str
    activation: str
    hidden_dim: int
    ffn_dim: int
    num_experts: int
    top_k: int
    dense_params: int
    moe_params: int
    """Router + all experts."""
    active_params: int
    """Router + top_k experts: the parameters one token uses."""


@dataclass
class PassRecords:
    """What the passes found and did, one field per pass that records something."""

    ffns: list[FFNInfo] = field(default_factory=list)
    """find_ffns: every FFN of the dense graph."""
    ffn_matches: list[FFNMatch] | None = None
    """find_ffns: the match records (fx nodes of the graph it ran on) for ffn_to_moe; cleared after use."""
    moe_blocks: list[MoEBlockRecord] = field(default_factory=list)
    """ffn_to_moe: the converted FFNs."""
    shards: dict[str, ParamShard] = field(default_factory=dict)
    """Every parameter shard_tensor_parallel splits and every expert tensor (split or not), by state-dict key."""
    tp_column: list[str] = field(default_factory=list)
    """shard_tensor_parallel: weights split column-parallel (output features)."""
    tp_row: list[str] = field(default_factory=list)
    """shard_tensor_parallel: weights split row-parallel (input features)."""
    tp_notes: list[str] = field(default_factory=list)
    """shard_tensor_parallel: what it kept replicated or narrowed, and why."""
    tp_sharded_dropouts: list[str] = field(default_factory=list)
    """shard_tensor_parallel: dropout and attention nodes, by name, whose activation it split over "tp"."""
    sharded_dropouts: list[str] = field(default_factory=list)
    """shard_dropout: the dropouts given a mask per shard, as "node name (axes)"."""
    regions: list[str] = field(default_factory=list)
    """outline_regions: the checkpointed regions, by submodule name."""

    def without_nodes(self) -> PassRecords:
        """A copy that holds no fx node (for another graph's context)."""
        return dataclasses.replace(self, ffns=list(self.ffns), ffn_matches=None, moe_blocks=list(self.moe_blocks),
                                   shards=dict(self.shards), tp_column=list(self.tp_column),
                                   tp_row=list(self.tp_row), tp_notes=list(self.tp_notes),
                                   tp_sharded_dropouts=list(self.tp_sharded_dropouts),
                                   sharded_dropouts=list(self.sharded_dropouts), regions=list(self.regions))


@dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass
class PassContext:
    """What passes read and record. Holds configs and mesh coordinates, never process groups.

    Attributes:
        moe: the MoEConfig of the run.
        parallel: the ParallelConfig (None for single-process rewrites).
        coords: this rank's mesh coordinates {"edp": d, "ep": x, "tp": t} ({} in one process).
        records: what the passes found and did.
        done: the passes run so far, in order (a pass's `requires` are checked against it).
        debug: keep each pass's code before and after in `dumps`.
        dumps: (pass name, code before, code after) per pass, with debug.
        timings: seconds and node counts per pass.
        fetch_dense: dense state-dict key -> tensor, for a model whose tensors are on the meta device
            (parallelize's `dense_state`); None reads the model's own tensors.
        materialize: False: the sharding passes give each split tensor this rank's shard shape on the
            meta device instead of its values (`explain` and the order check simulate such graphs on
            fake tensors, tedfx.fake).
    """

    moe: MoEConfig
    parallel: ParallelConfig | None = None
    coords: dict[str, int] = field(default_factory=dict)
    records: PassRecords = field(default_factory=PassRecords)
    done: list[str] = field(default_factory=list)
    debug: bool = False
    dumps: list[tuple[str, str, str]] = field(default_factory=list)
    timings: list[PassTiming] = field(default_factory=list)
    fetch_dense: Callable[[str], torch.Tensor] | None = None
    materialize: bool = True

    def for_rank(self, parallel: ParallelConfig, coords: dict[str, int], *,
                 materialize: bool = True) -> PassContext:
        """The context a rank's passes start from: this one's node-free records, and `coords`."""
        return PassContext(moe=self.moe, parallel=parallel, coords=dict(coords),
                           records=self.records.without_nodes(), done=list(self.done), debug=self.debug,
                           fetch_dense=self.fetch_dense, materialize=materialize)
