"""`tedfx.plan`: which layouts (T, X, D) and options fit a cluster, ranked by predicted step time.

In order (docs/planner.md):
1. Describe the model (a preset, a `DecoderConfig`, or a real model with example inputs)
   and the cluster (ranks, ranks per node, device memory, link bandwidths, throughput).
2. Enumerate layouts: T divides the ranks of a node and the attention heads, X divides
   the experts, D = world / (T * X); and options: DTD, activation checkpointing (with
   CAC), ZeRO, the tiled optimizer step, precision.
3. For each, predict rank 0's collectives, memory and FLOPs from one simulated step
   (tedfx.layout_cost: the simulation `tedfx.explain` runs, on fake tensors).
4. Price each collective by the link its group crosses and add the compute time
   (the time model, docs/planner.md, "Time model"); keep what fits in memory, fastest first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .config import MoEConfig, ParallelConfig
from .layout_cost import LayoutCost, ModelSource, layout_cost
from .models.decoder import Decoder, DecoderConfig
from .report import Table, _fmt_count
from .runtime.mesh import Layout

__all__ = ["PRESETS", "Cluster", "LayoutPlan", "Options", "Plan", "Preset", "collective_seconds", "layouts_for", "plan"]

GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The machines a plan is for."""

    world_size: int
    """Ranks (devices) in all."""
    gpus_per_node: int = 8
    """Ranks per node; nodes hold consecutive ranks."""
    memory_gib: float = 80.0
    """Memory of one device, GiB."""
    reserve_gib: float = 2.0
    """Memory a rank cannot use for tensors (runtime context, allocator fragmentation, library workspaces), GiB."""
    intra_node_gbps: float = 150.0
    """Bandwidth one rank gets to the others of its node, GB/s (1e9 bytes per second)."""
    inter_node_gbps: float = 12.5
    """Bandwidth one rank gets to ranks on other nodes, GB/s."""
    tflops: float = 100.0
    """Sustained throughput of one device in the plan's precision, TFLOP/s (1e12 operations per second)."""

    def __post_init__(self) -> None:
        for name in ("world_size", "gpus_per_node"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Cluster.{name}={getattr(self, name)!r} is invalid: expected an int >= 1.")
        for name in ("memory_gib", "intra_node_gbps", "inter_node_gbps", "tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Cluster.{name}={getattr(self, name)!r} is invalid: expected a number > 0.")
        if not 0 <= self.reserve_gib < self.memory_gib:
            raise ValueError(f"Cluster.reserve_gib={self.reserve_gib!r} is invalid: expected 0 <= reserve_gib < "
                             f"memory_gib={self.memory_gib}.")

    def link(self, ranks: list[int]) -> str:
        """"intra" when the ranks share a node, else "inter"."""
        return "intra" if len({r // self.gpus_per_node for r in ranks}) == 1 else "inter"

    def gbps(self, link: str) -> float:
        return self.intra_node_gbps if link == "intra" else self.inter_node_gbps


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A model shape and its MoE conversion, with the micro-batch each token group runs."""

    model: DecoderConfig
    moe: MoEConfig
    micro_batch: int = 1
    note: str = ""


PRESETS: dict[str, Preset] = {
    "ted-6.7b": Preset(
        model=DecoderConfig(layers=32, hidden=4096, heads=32, ffn=16384, vocab=51200, seq=2048),
        moe=MoEConfig(num_experts=16, top_k=1, capacity_factor=1.0, layers="every_other"),
        note="GPT-3 6.7B base, 16 experts on every other FFN (the paper's 40B MoE); vocab padded to 51,200"),
    "mixtral-8x7b": Preset(
        model=DecoderConfig(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, ffn_kind="swiglu",
                            vocab=32000, seq=4096),
        moe=MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25, layers="all"),
        note="Mixtral-8x7B's shape (GQA 32/8 heads, SwiGLU 14336, 8 experts, top-2) with capacity factor 1.25"),
    "gpt3-1.3b": Preset(
        model=DecoderConfig(layers=24, hidden=2048, heads=16, ffn=8192, vocab=51200, seq=2048),
        moe=MoEConfig(num_experts=16, top_k=1, capacity_factor=1.0, layers="every_other")),
    "gpt3-2.7b": Preset(
        model=DecoderConfig(layers=32, hidden=2560, heads=32, ffn=10240, vocab=51200, seq=2048),
        moe=MoEConfig(num_experts=16, top_k=1, capacity_factor=1.0, layers="every_other")),
    "gpt3-13b": Preset(
        model=DecoderConfig(layers=40, hidden=5120, heads=40, ffn=20480, vocab=51200, seq=2048),
        moe=MoEConfig(num_experts=16, top_k=1, capacity_factor=1.0, layers="every_other")),
}
"""Named model shapes for `tedfx.plan("ted-6.7b", ...)` and `tedfx plan --preset` (docs/planner.md, "Presets")."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """The option values a plan enumerates; each field lists the values tried."""

    dtd: tuple[bool, ...] = (False, True)
    """Tried where it applies (T > 1 and X > 1)."""
    activation_checkpointing: tuple[Literal["none", "block", "moe"], ...] = ("none", "block")
    cac: tuple[bool, ...] = (True,)
    """Tried with activation checkpointing on (CAC never sends more; add False to see the difference)."""
    zero: tuple[int, ...] = (0, 1)
    tile_numel: tuple[int | None, ...] = (None, 2**24)
    """The optimizer step untiled (None) or in tiles of this many entries."""
    precision: tuple[Literal["fp32", "bf16", "fp16"], ...] = ("bf16",)


@dataclass
class LayoutPlan:
    """One layout with one choice of options: its predicted memory, communication and time per rank."""

    tensor: int
    expert: int
    data: int
    parallel: ParallelConfig
    tile_numel: int | None
    cost: LayoutCost
    comm: list[dict[str, Any]]
    """Per (kind, axis, phase): calls, bytes, the link it crosses ("intra"/"inter") and its seconds."""
    compute_s: float
    comm_s: dict[str, float]
    """Seconds on each link."""
    tokens: int
    """Tokens of one step over the whole cluster: micro-batch * sequence * X * D."""
    fits: bool

    @property
    def step_s(self) -> float:
        """Predicted seconds per step: compute plus every collective, without overlap."""
        return self.compute_s + sum(self.comm_s.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s if self.step_s > 0 else float("inf")

    def options(self) -> dict[str, Any]:
        p = self.parallel
        return {"dtd": p.dtd, "activation_checkpointing": p.activation_checkpointing, "cac": p.cac, "zero": p.zero,
                "tile_numel": self.tile_numel, "precision": p.precision, "a2a_chunks": p.a2a_chunks}

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "expert": self.expert, "data": self.data, **self.options(),
                "memory": {**self.cost.memory, "total": self.cost.total_memory}, "flops": self.cost.flops,
                "comm": self.comm, "compute_s": self.compute_s, "comm_s": self.comm_s, "step_s": self.step_s,
                "tokens": self.tokens, "tokens_per_s": self.tokens_per_s, "fits": self.fits}


@dataclass
class Plan:
    """What `tedfx.plan` returns: every layout and option tried, fastest fitting first."""

    model: str
    params: int
    """Parameters of the MoE model."""
    base_params: int
    """Parameters of the dense (base) model."""
    cluster: Cluster
    rows: list[LayoutPlan] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> list[LayoutPlan]:
        return [r for r in self.rows if r.fits]

    def best(self) -> LayoutPlan:
        """The fastest layout that fits; raises when none does."""
        if not self.feasible:
            smallest = min(self.rows, key=lambda r: r.cost.total_memory)
            raise ValueError(f"no layout of {self.model} fits {self.cluster.memory_gib} GiB per device on "
                             f"{self.cluster.world_size} ranks: the smallest needs "
                             f"{smallest.cost.total_memory / GiB:.1f} GiB (T={smallest.tensor}, X={smallest.expert}, "
                             f"{smallest.options()}).")
        return self.feasible[0]

    def table(self, limit: int | None = 20, fitting_only: bool = False) -> Table:
        """The ranking as a Table (`str(plan)` prints it): fitting layouts first, fastest first."""
        table = Table(f"Layouts of {self.model} on {self.cluster.world_size} ranks "
                      f"({len(self.feasible)} of {len(self.rows)} fit)",
                      ["T", "X", "D", "dtd", "ckpt", "zero", "tiles", "prec", "memory GiB", "fits", "step s",
                       "compute s", "intra s", "inter s", "tokens/s"],
                      numeric=(0, 1, 2, 8, 10, 11, 12, 13, 14), anchor="plan")
        rows = self.feasible if fitting_only else self.rows
        for r in rows[:limit]:
            p = r.parallel
            ckpt = p.activation_checkpointing + ("+cac" if p.cac and p.activation_checkpointing != "none" else "")
            table.rows.append([r.tensor, r.expert, r.data, "on" if p.dtd else "-", ckpt, p.zero,
                               "-" if r.tile_numel is None else _fmt_count(r.tile_numel), p.precision,
                               f"{r.cost.total_memory / GiB:.2f}", "yes" if r.fits else "no", f"{r.step_s:.3f}",
                               f"{r.compute_s:.3f}", f"{r.comm_s.get('intra', 0):.3f}",
                               f"{r.comm_s.get('inter', 0):.3f}", f"{r.tokens_per_s:,.0f}"])
        table.notes = [f"{self.model}: {self.params / 1e9:.2f}B parameters (base {self.base_params / 1e9:.2f}B)",
                       *self.assumptions]
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params": self.params, "base_params": self.base_params,
                "cluster": dataclasses.asdict(self.cluster), "assumptions": self.assumptions,
                "rows": [r.to_dict() for r in self.rows]}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        import io

        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        table = self.table()
        for note in table.notes:
            console.print(note)
        console.print(table.to_rich())
        return buf.getvalue()


# Ring algorithms: what one rank moves over its slowest link per byte of its input (CommStats's byte convention).
_WIRE_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: n - 1,  # the input is the local chunk; it receives n - 1 others
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}


def collective_seconds(kind: str, nbytes: int, group: list[int], cluster: Cluster) -> tuple[str, float]:
    """(link, seconds) of one rank's `nbytes` into collective `kind` over `group` (docs/planner.md, "Time model")."""
    link = cluster.link(group)
    n = len(group)
    if n == 1:
        return link, 0.0
    return link, _WIRE_FACTOR[kind](n) * nbytes / (cluster.gbps(link) * 1e9)


def _price(cost: LayoutCost, layout: Layout, cluster: Cluster) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows, per_link = [], {"intra": 0.0, "inter": 0.0}
    for (kind, axis, phase), (calls, nbytes) in sorted(cost.comm.items()):
        group = list(range(layout.world_size)) if axis == "world" else layout.group_of(0, axis)
        link, seconds = collective_seconds(kind, nbytes, group, cluster)
        per_link[link] += seconds
        rows.append({"kind": kind, "axis": axis, "phase": phase, "calls": calls, "bytes": nbytes, "link": link,
                     "seconds": seconds})
    return rows, per_link


def _source(model: Any, moe: MoEConfig | None, micro_batch: int | None, seq: int | None
            ) -> tuple[str, ModelSource, int, MoEConfig]:
    """(name, source, micro_batch, moe) for a preset name, a DecoderConfig or (model, example_inputs)."""
    name = model if isinstance(model, str) else None
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown preset {model!r}: expected one of {sorted(PRESETS)}, a DecoderConfig, or "
                             f"(model, example_inputs).")
        preset = PRESETS[model]
        model, moe, micro_batch = preset.model, moe or preset.moe, micro_batch or preset.micro_batch
    if isinstance(model, DecoderConfig):
        cfg = dataclasses.replace(model, seq=seq) if seq else model
        if moe is None:
            raise ValueError("tedfx.plan(DecoderConfig(...)) needs moe=tedfx.MoEConfig(...).")
        batch = micro_batch or 1

        def build(depth: int | None) -> tuple[nn.Module, tuple[Any, ...]]:
            with torch.device("meta"):
                dense = Decoder(dataclasses.replace(cfg, layers=depth or cfg.layers))
            return dense, (torch.zeros(batch, cfg.seq, dtype=torch.long),)

        label = name or f"decoder L={cfg.layers} H={cfg.hidden} F={cfg.ffn}"
        return label, ModelSource(build=build, moe=moe, layers=cfg.layers), batch, moe
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        if moe is None:
            raise ValueError("tedfx.plan((model, example_inputs)) needs moe=tedfx.MoEConfig(...).")
        dense, inputs = model
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        return type(dense).__name__, ModelSource(build=lambda depth: (dense, inputs), moe=moe), 0, moe
    raise ValueError(f"tedfx.plan takes a preset name, a DecoderConfig or (model, example_inputs), found "
                     f"{type(model).__name__}.")


def layouts_for(cluster: Cluster, *, heads: int | None, experts: int) -> list[tuple[int, int, int]]:
    """(T, X, D) with T dividing the ranks of a node (and the heads), X dividing the experts, T * X * D = world."""
    out = []
    for t in range(1, cluster.gpus_per_node + 1):
        if cluster.gpus_per_node % t or cluster.world_size % t or (heads and heads % t):
            continue
        for x in range(1, experts + 1):
            if experts % x == 0 and cluster.world_size % (t * x) == 0:
                out.append((t, x, cluster.world_size // (t * x)))
    return out


def plan(
    model: str | DecoderConfig | tuple[nn.Module, tuple[Any, ...]],
    *,
    cluster: Cluster,
    moe: MoEConfig | None = None,
    micro_batch: int | None = None,
    seq: int | None = None,
    options: Options | None = None,
    layouts: list[tuple[int, int]] | None = None,
    scale_layers: bool = True,
) -> Plan:
    """Rank the layouts (T, X, D) and options of a model on a cluster by predicted step time.

    Args:
        model: a preset name (`PRESETS` of tedfx/plan.py), a `DecoderConfig`, or (dense model, example inputs)
            for a real model (simulated at its own depth; build it on the meta device when it is large).
        cluster: ranks, ranks per node, device memory, link bandwidths, device throughput.
        moe: the MoE conversion (a preset has its own).
        micro_batch, seq: one token group's batch and sequence length (for a DecoderConfig or a preset).
        options: the option values to enumerate (default `Options()`).
        layouts: (T, X) pairs to try instead of every one that fits the cluster.
        scale_layers: simulate a decoder at two small depths and extrapolate (docs/planner.md, "Layer scaling").

    Returns:
        A Plan: every layout and option with its memory, collectives, compute and time; `plan.best()` is
        the fastest that fits; `print(plan)` shows the table, `plan.to_json()` everything.

    Example:
        >>> cluster = tedfx.Cluster(world_size=128, gpus_per_node=8, memory_gib=32, intra_node_gbps=150,
        ...                         inter_node_gbps=12.5, tflops=60)
        >>> print(tedfx.plan("ted-6.7b", cluster=cluster))
    """
    options = options or Options()
    name, source, batch, moe = _source(model, moe, micro_batch, seq)
    dense, inputs = source.build(source.layers)
    config = getattr(dense, "config", None)
    heads = getattr(config, "heads", None) or getattr(config, "num_attention_heads", None)
    pairs = layouts or [(t, x) for t, x, _ in layouts_for(cluster, heads=heads, experts=moe.num_experts)]
    tokens_per_group = inputs[0].numel() if inputs and isinstance(inputs[0], torch.Tensor) else 0
    usable = (cluster.memory_gib - cluster.reserve_gib) * GiB
    if source.layers is None:  # a real model: count the converted graph (its experts unbuilt, on the meta device)
        params = sum(p.numel() for p in source.graph(None, options.precision[0])[0].parameters())
    else:
        params = _moe_params(dense, moe)
    result = Plan(model=name, params=params, base_params=sum(p.numel() for p in dense.parameters()),
                  cluster=cluster, assumptions=assumptions(cluster, scale_layers and source.layers is not None))
    for t, x in pairs:
        for parallel, tile in _configs(t, x, options):
            # a2a_chunks="auto" as a run on this cluster resolves it: 2 where the expert groups cross nodes.
            parallel, _, _ = parallel.resolve_auto(cluster.world_size, cluster.gpus_per_node,
                                                   drop_tokens=moe.drop_tokens)
            cost = layout_cost(source, parallel, cluster.world_size, tile_numel=tile, scale_layers=scale_layers)
            layout = Layout.build(cluster.world_size, parallel)
            comm, per_link = _price(cost, layout, cluster)
            result.rows.append(LayoutPlan(
                tensor=t, expert=x, data=layout.data, parallel=parallel, tile_numel=tile, cost=cost, comm=comm,
                compute_s=cost.flops / (cluster.tflops * 1e12), comm_s=per_link,
                tokens=tokens_per_group * x * layout.data, fits=cost.total_memory <= usable))
    result.rows.sort(key=lambda r: (not r.fits, -r.tokens_per_s if r.fits else r.cost.total_memory))
    return result


def _configs(t: int, x: int, options: Options) -> list[tuple[ParallelConfig, int | None]]:
    out = []
    for dtd, ac, cac, zero, tile, precision in itertools.product(
            options.dtd, options.activation_checkpointing, options.cac, options.zero, options.tile_numel,
            options.precision):
        if dtd and (t == 1 or x == 1) and False in options.dtd:
            continue  # DTD does nothing without T > 1 and X > 1: one row, not two equal ones
        if ac == "none" and not cac and True in options.cac:
            continue  # CAC does nothing without checkpointing
        parallel = ParallelConfig(tensor=t, expert=x, dtd=dtd and t > 1 and x > 1, activation_checkpointing=ac,
                                  cac=cac, zero=zero, precision=precision)
        if (parallel, tile) not in out:
            out.append((parallel, tile))
    return out


def _moe_params(dense: nn.Module, moe: MoEConfig) -> int:
    """Parameters after conversion: each converted FFN's weights E times, plus its router (H x E)."""
    from .models.decoder import FFN

    ffns = [m for m in dense.modules() if isinstance(m, FFN)]
    if not ffns:
        return sum(p.numel() for p in dense.parameters())
    converted = [f for i, f in enumerate(ffns) if moe.selects(i, "", len(ffns))]
    extra = sum((moe.num_experts - 1) * sum(p.numel() for p in f.parameters()) + f.up.in_features * moe.num_experts
                for f in converted)
    return sum(p.numel() for p in dense.parameters()) + extra


def assumptions(cluster: Cluster, scaled: bool) -> list[str]:
    """The plan's assumptions in words (printed above its table, kept in its JSON)."""
    out = [
        f"memory: weights, gradients, fp32 masters, AdamW states, and the larger of the activation peak and the "
        f"optimizer step's transient; fits when <= {cluster.memory_gib} - {cluster.reserve_gib} GiB reserve",
        f"time: FLOPs / {cluster.tflops} TFLOP/s + each collective's ring traffic / the bandwidth of the link its "
        f"group crosses ({cluster.intra_node_gbps} GB/s inside a node of {cluster.gpus_per_node}, "
        f"{cluster.inter_node_gbps} GB/s across), no overlap, no latency",
        "rank 0 stands for every rank (ranks differ only by which experts and slices they hold)",
    ]
    if scaled:
        out.append("layers are identical: simulated at two small depths and extrapolated to the model's depth")
    return out
