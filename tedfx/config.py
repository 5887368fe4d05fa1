"""Configuration: small frozen keyword-only dataclasses, one per concern.

Configs hold numbers and choices only — never a process group, a device or a
tensor — so they can be hashed, printed, compared and sent between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable, Literal, Sequence, Union

__all__ = ["LossScaleConfig", "MoEConfig", "ParallelConfig"]

LayerSelection = Union[Literal["all", "every_other"], Sequence[int], Callable[[str], bool]]


def _fail(cls: str, name: str, value: object, expected: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: expected {expected}.")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """How dense FFN blocks become Mixture-of-Experts blocks (docs/moe.md)."""

    num_experts: int = 8
    """E: experts per MoE block."""
    top_k: int = 2
    """k: experts each token is sent to (1 <= k <= E)."""
    normalize_gates: bool | None = None
    """Renormalise the kept k gate values to sum to 1. None: True for k >= 2, False for k = 1 (Switch)."""
    capacity_factor: float = 1.25
    """Training capacity: C = max(ceil(k * capacity_factor * S / E), min_capacity)."""
    eval_capacity_factor: float = 2.0
    """Capacity factor used in eval mode."""
    min_capacity: int = 4
    """Lower bound on the capacity of each expert."""
    drop_tokens: bool = True
    """False: dropless, the capacity is the largest expert load of the step."""
    drop_policy: Literal["probs", "position"] = "probs"
    """Which assignments an over-full expert keeps: the highest router probabilities, or the earliest."""
    aux_loss_coef: float = 0.01
    """Weight of the GShard load-balancing loss in the backward."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss in the backward."""
    noisy_gate: Literal["jitter", "rsample"] | None = None
    """Routing noise: multiplicative jitter on the router input, or Gumbel noise on the logits."""
    jitter_eps: float = 0.01
    """Jitter draws the router input scale from U(1 - eps, 1 + eps)."""
    layers: LayerSelection = "all"
    """Which FFNs to convert: "all", "every_other" (1, 3, 5, ...), FFN indices, or a predicate on the module path."""
    upcycle: bool = True
    """Experts start as copies of the dense FFN. False: fresh seeded initialisation."""
    expert_noise: float = 0.0
    """Relative std of seeded Gaussian noise added to each upcycled expert (breaks expert symmetry)."""
    seed: int = 0
    """Seed of the random choices of the MoE rewrite: router init, expert noise, routing noise. Dropout draws
    from torch's generator, as the model's own dropout does (seed torch per token group)."""

    def __post_init__(self) -> None:
        cls = "MoEConfig"
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            _fail(cls, "num_experts", self.num_experts, "an int >= 1")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            _fail(cls, "top_k", self.top_k, f"an int in [1, num_experts={self.num_experts}]")
        if not self.capacity_factor > 0:
            _fail(cls, "capacity_factor", self.capacity_factor, "a number > 0")
        if not self.eval_capacity_factor > 0:
            _fail(cls, "eval_capacity_factor", self.eval_capacity_factor, "a number > 0")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            _fail(cls, "min_capacity", self.min_capacity, "an int >= 0")
        if self.drop_policy not in ("probs", "position"):
            _fail(cls, "drop_policy", self.drop_policy, '"probs" or "position"')
        if self.noisy_gate not in (None, "jitter", "rsample"):
            _fail(cls, "noisy_gate", self.noisy_gate, 'None, "jitter" or "rsample"')
        if not 0 <= self.jitter_eps < 1:
            _fail(cls, "jitter_eps", self.jitter_eps, "a number in [0, 1)")
        for name in ("aux_loss_coef", "z_loss_coef", "expert_noise"):
            if getattr(self, name) < 0:
                _fail(cls, name, getattr(self, name), "a number >= 0")
        layers = self.layers
        if isinstance(layers, str):
            if layers not in ("all", "every_other"):
                _fail(cls, "layers", layers, '"all", "every_other", a list of FFN indices or a predicate')
        elif not callable(layers):
            if not all(isinstance(i, int) and i >= 0 for i in layers):
                _fail(cls, "layers", layers, "FFN indices as non-negative ints")
            object.__setattr__(self, "layers", tuple(layers))
        if self.normalize_gates is None:
            object.__setattr__(self, "normalize_gates", self.top_k >= 2)
        for name, factor in (("_capacity_ratio", self.capacity_factor), ("_eval_capacity_ratio",
                                                                          self.eval_capacity_factor)):
            ratio = Fraction(str(float(factor)))
            object.__setattr__(self, name, (ratio.numerator, ratio.denominator))

    def capacity(self, num_tokens: int, *, training: bool = True) -> int:
        """C for a token group of `num_tokens` tokens (before any padding to a multiple of T)."""
        # Exact integer arithmetic on the factor as written (in floats 1 * 1.1 * 100 / 10 rounds up to 12,
        # not 11); integers also keep the formula traceable when num_tokens is symbolic.
        num, den = self._capacity_ratio if training else self._eval_capacity_ratio
        return max(-(-self.top_k * num * num_tokens // (den * self.num_experts)), self.min_capacity)

    def selects(self, index: int, path: str, num_ffns: int) -> bool:
        """Whether FFN number `index` (at module `path`, of `num_ffns`) becomes an MoE block."""
        layers = self.layers
        if layers == "all":
            return True
        if layers == "every_other":
            return index % 2 == 1
        if callable(layers):
            return bool(layers(path))
        bad = [i for i in layers if i >= num_ffns]
        if bad:
            raise ValueError(
                f"MoEConfig.layers={list(layers)!r} names FFN indices {bad}, but the model has "
                f"{num_ffns} FFNs (valid indices 0..{num_ffns - 1})."
            )
        return index in layers


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The TED layout and what the runtime does on top of it (docs/parallelism.md)."""

    tensor: int = 1
    """T: tensor-parallel degree (mesh axis "tp", consecutive ranks)."""
    expert: int = 1
    """X: expert-parallel degree (mesh axis "ep")."""
    data: int | None = None
    """D: expert-data-parallel degree (mesh axis "edp"); None = world_size // (T * X)."""
    dtd: bool | Literal["auto"] = True
    """Duplicate token dropping: all-to-all bytes fall by T. "auto": on where an expert group's all-to-all crosses
    nodes while tensor groups stay inside one, off otherwise (decided by `resolve_dtd` from `ranks_per_node`;
    docs/parallelism.md, "DTD")."""
    cac: bool = True
    """Communication-aware activation checkpointing: recomputation reuses saved all-to-all outputs."""
    a2a_chunks: int | Literal["auto"] = "auto"
    """Split each MoE block's capacity into this many chunks, so that the all-to-all of one chunk runs while the
    experts compute another, forward and backward (docs/parallelism.md, "Overlap"). Needs X > 1 and capacity
    slots (not the packed layout of dropless routing without DTD). "auto": 2 where an expert group's all-to-all
    crosses nodes (judged as for `dtd="auto"`, by `resolve_a2a_chunks`), 1 otherwise; a config that reaches the
    passes unresolved counts as one node (1)."""
    activation_checkpointing: Literal["none", "block", "moe"] = "none"
    """Recompute activations per transformer block, per MoE layer, or not at all. "block" finds the blocks from
    the graph (each ends at its FFN's residual add), whatever module holds them; `checkpoint_blocks` names them."""
    checkpoint_blocks: tuple[str, ...] = ()
    """With activation_checkpointing="block": the module paths of the blocks, one region each, as patterns where
    "*" matches one path component (e.g. ("h.*",) or ("model.layers.*",)). Empty: found from the graph."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights, activations and gradients on each rank: "bf16" and "fp16" hold them in 16 bits (routers stay
    fp32) and `tedfx.optimizer` keeps fp32 master weights; "fp16" also scales the loss (docs/parallelism.md,
    "Mixed precision")."""
    zero: int = 0
    """Optimizer-state sharding (ZeRO stage): 0 = none, 1 = `tedfx.optimizer` shards master weights and optimizer
    states over each parameter's data-parallel group ("dp" or "edp"). False/True are read as 0/1."""
    timeout: float = 300.0
    """Seconds a collective may wait before the run fails instead of hanging."""
    bucket_mb: float | None = None
    """Gradient all-reduce bucket size in MiB. None: per data-parallel axis, 1/8 of its gradient bytes, kept
    within 0.25-25 MiB, so that about 8 buckets overlap with the rest of the backward (docs/parallelism.md,
    "Gradient sync")."""
    replicate: tuple[str, ...] = ()
    """Module paths (fnmatch globs, e.g. "layers.*.attn.*") of linears outside the MoE blocks that tensor
    parallelism keeps whole on every rank. With T > 1 every attention projection (q, k, v, o: a linear that
    reaches attention, sdpa or a matmul of two activations, through no other linear, or is reached from it)
    and every projection of a dense FFN must be split, or parallelize raises naming it; k/v projections whose
    KV heads do not divide by T are exempt (each rank narrows them to its query heads). List here what you
    accept replicated instead; a pattern that matches no linear raises."""
    ranks_per_node: int | None = None
    """Ranks that share a node (fast links), the node holding consecutive ranks; what `dtd="auto"` decides from.
    None: LOCAL_WORLD_SIZE (set by torchrun and tedfx.launch) where the ranks run; one node for `tedfx.explain`
    without it."""
    token_group_inputs: Literal["broadcast", "verify"] = "broadcast"
    """How the T tensor ranks of a token group get one micro-batch: "broadcast" sends the first tensor rank's
    inputs to the others before each forward; "verify" compares checksums and raises, naming the ranks, when
    they differ (docs/parallelism.md, "Token groups")."""

    def __post_init__(self) -> None:
        cls = "ParallelConfig"
        for name in ("tensor", "expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(cls, name, value, "an int >= 1")
        if self.data is not None and (not isinstance(self.data, int) or self.data < 1):
            _fail(cls, "data", self.data, "None or an int >= 1")
        if self.a2a_chunks != "auto" and (not isinstance(self.a2a_chunks, int) or isinstance(self.a2a_chunks, bool)
                                          or self.a2a_chunks < 1):
            _fail(cls, "a2a_chunks", self.a2a_chunks, 'an int >= 1 (1: no chunking) or "auto"')
        if self.dtd not in (True, False, "auto") or not isinstance(self.dtd, (bool, str)):
            _fail(cls, "dtd", self.dtd, 'True, False or "auto"')
        if self.ranks_per_node is not None and (not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1):
            _fail(cls, "ranks_per_node", self.ranks_per_node, "None or an int >= 1")
        if self.activation_checkpointing not in ("none", "block", "moe"):
            _fail(cls, "activation_checkpointing", self.activation_checkpointing, '"none", "block" or "moe"')
        blocks = self.checkpoint_blocks
        if isinstance(blocks, str) or not all(isinstance(b, str) and b for b in blocks):
            _fail(cls, "checkpoint_blocks", blocks, 'a tuple of module-path patterns, e.g. ("h.*",)')
        object.__setattr__(self, "checkpoint_blocks", tuple(blocks))
        if blocks and self.activation_checkpointing != "block":
            _fail(cls, "checkpoint_blocks", blocks, f'() unless activation_checkpointing="block" (it is '
                                                    f'{self.activation_checkpointing!r}, which would ignore them)')
        if self.precision not in ("fp32", "bf16", "fp16"):
            _fail(cls, "precision", self.precision, '"fp32", "bf16" or "fp16"')
        if self.zero not in (0, 1) or not isinstance(self.zero, (int, bool)):
            _fail(cls, "zero", self.zero, "0 (no sharding) or 1 (optimizer states and master weights sharded); "
                  "False/True mean 0/1")
        object.__setattr__(self, "zero", int(self.zero))
        if not self.timeout > 0:
            _fail(cls, "timeout", self.timeout, "a number of seconds > 0")
        if self.bucket_mb is not None and not self.bucket_mb > 0:
            _fail(cls, "bucket_mb", self.bucket_mb, "None (automatic) or a number of MiB > 0")
        if isinstance(self.replicate, str) or not all(isinstance(p, str) and p for p in self.replicate):
            _fail(cls, "replicate", self.replicate, 'a tuple of module paths or globs, e.g. ("layers.*.attn.*",)')
        object.__setattr__(self, "replicate", tuple(self.replicate))
        if self.token_group_inputs not in ("broadcast", "verify"):
            _fail(cls, "token_group_inputs", self.token_group_inputs, '"broadcast" or "verify"')

    def check_supported(self) -> None:
        """Raise for options this version of tedfx declares but does not run yet (never ignore them silently).

        Every declared option runs today; the check stays as the one place a new option would be refused.
        """

    def resolve_dtd(self, world_size: int, ranks_per_node: int | None = None) -> tuple["ParallelConfig", str]:
        """This config with `dtd` a bool, and why (docs/parallelism.md, "DTD": "Choosing DTD").

        DTD trades 1/T of the all-to-all bytes over the expert group for all-gathers and a reduce-scatter over
        the tensor group. It pays where the all-to-all crosses nodes and the tensor group stays in one node; it
        costs where everything is in one node (the extra in-node collectives buy nothing over links that are
        as fast). Nodes hold consecutive ranks, `ranks_per_node` of them (`self.ranks_per_node` first).

        Returns:
            (config with dtd True or False, the reason in words).
        """
        if self.dtd != "auto":
            return self, f"dtd={self.dtd} as configured"
        T, X = self.tensor, self.expert
        if T == 1 or X == 1:
            return replace(self, dtd=False), f"dtd=auto -> off: DTD needs T > 1 and X > 1 (T={T}, X={X})"
        ep_crosses, tp_crosses, where = self._crossings(world_size, ranks_per_node)
        if ep_crosses and not tp_crosses:
            return replace(self, dtd=True), (f"dtd=auto -> on: {where}; expert groups (all-to-all) cross nodes, "
                                             f"tensor groups (DTD's all-gathers) stay inside one")
        if not ep_crosses:
            return replace(self, dtd=False), (f"dtd=auto -> off: {where}; expert groups stay inside a node, so "
                                              f"DTD's extra all-gathers would cost more than the all-to-all bytes "
                                              f"they save")
        return replace(self, dtd=False), (f"dtd=auto -> off: {where}; tensor groups cross nodes too, so DTD's "
                                          f"all-gathers would cross the same slow links as the bytes they save")

    def resolve_a2a_chunks(self, world_size: int, ranks_per_node: int | None = None, *,
                           packed_dropless: bool = False) -> tuple["ParallelConfig", str]:
        """This config with `a2a_chunks` an int, and why (docs/parallelism.md, "Overlap").

        Chunks pay where the all-to-all crosses a slow link, so that its transfer hides expert compute; over
        links as fast as the node's own, the extra calls cost more than they hide. "auto" gives 2 where an
        expert group crosses nodes, else 1; and 1 for X = 1 or for MoE blocks in the packed layout of dropless
        routing (`packed_dropless`: MoEConfig(drop_tokens=False) without DTD), which chunks do not apply to.
        """
        if self.a2a_chunks != "auto":
            return self, f"a2a_chunks={self.a2a_chunks} as configured"
        if self.expert == 1:
            return replace(self, a2a_chunks=1), "a2a_chunks=auto -> 1: no expert all-to-all (X=1)"
        if packed_dropless:
            return replace(self, a2a_chunks=1), ("a2a_chunks=auto -> 1: dropless routing without DTD moves packed "
                                                 "rows, which are not chunked")
        ep_crosses, _, where = self._crossings(world_size, ranks_per_node)
        if ep_crosses:
            return replace(self, a2a_chunks=2), (f"a2a_chunks=auto -> 2: {where}; expert groups (all-to-all) cross "
                                                 f"nodes, so one chunk's exchange hides the other's expert compute")
        return replace(self, a2a_chunks=1), (f"a2a_chunks=auto -> 1: {where}; expert groups stay inside a node, "
                                             f"where the extra calls would cost more than they hide")

    def resolve_auto(self, world_size: int, ranks_per_node: int | None = None, *,
                     drop_tokens: bool = True) -> tuple["ParallelConfig", str, str]:
        """`resolve_dtd`, then `resolve_a2a_chunks` (packed dropless unless `drop_tokens` or DTD applies): the
        config every door builds graphs from, with the reasons for dtd and a2a_chunks."""
        parallel, dtd_reason = self.resolve_dtd(world_size, ranks_per_node)
        dtd_runs = parallel.dtd is True and parallel.tensor > 1 and parallel.expert > 1
        parallel, chunks_reason = parallel.resolve_a2a_chunks(world_size, ranks_per_node,
                                                              packed_dropless=not drop_tokens and not dtd_runs)
        return parallel, dtd_reason, chunks_reason

    @property
    def chunks(self) -> int:
        """`a2a_chunks` as the passes apply it: an unresolved "auto" counts as one node (1 chunk)."""
        return 1 if self.a2a_chunks == "auto" else self.a2a_chunks

    def _crossings(self, world_size: int, ranks_per_node: int | None) -> tuple[bool, bool, str]:
        """(an expert group spans nodes, a tensor group spans nodes, the node size in words); nodes hold
        consecutive ranks, `self.ranks_per_node` of them, else `ranks_per_node`, else all of them."""
        T, X = self.tensor, self.expert
        d = self.data_degree(world_size)
        per_node = self.ranks_per_node or ranks_per_node
        if per_node is None:
            per_node = world_size
            where = f"all {world_size} ranks assumed on one node (neither ranks_per_node nor LOCAL_WORLD_SIZE set)"
        else:
            where = f"{per_node} ranks per node"

        def crosses(groups: list[list[int]]) -> bool:
            return any(len({r // per_node for r in group}) > 1 for group in groups)

        ep_groups = [[(g * X + x) * T + t for x in range(X)] for g in range(d) for t in range(T)]
        tp_groups = [[(g * X + x) * T + t for t in range(T)] for g in range(d) for x in range(X)]
        return crosses(ep_groups), crosses(tp_groups), where

    def data_degree(self, world_size: int) -> int:
        """D for `world_size` ranks; raises when T * X * D != world_size."""
        tx = self.tensor * self.expert
        if world_size % tx:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor * expert = "
                f"{self.tensor} * {self.expert} = {tx}; choose T and X whose product divides {world_size}."
            )
        d = world_size // tx
        if self.data is not None and self.data != d:
            raise ValueError(
                f"ParallelConfig.data={self.data} but world size {world_size} / (tensor {self.tensor} * "
                f"expert {self.expert}) = {d}; leave data=None to infer it."
            )
        return d


@dataclass(frozen=True, kw_only=True)
class LossScaleConfig:
    """Dynamic loss scaling of `precision="fp16"` (docs/parallelism.md, "Mixed precision").

    The loss is multiplied by the scale before backward; a step whose gradients overflow anywhere in the
    world is skipped on every rank and the scale shrinks; after `growth_interval` good steps in a row it grows.
    """

    init_scale: float = 2.0**16
    """Scale of the first step."""
    growth_factor: float = 2.0
    """The scale is multiplied by this after `growth_interval` steps without overflow."""
    backoff_factor: float = 0.5
    """The scale is multiplied by this after a step that overflowed (and was skipped)."""
    growth_interval: int = 1000
    """Good steps in a row before the scale grows."""
    min_scale: float = 1.0
    """The scale never shrinks below this."""

    def __post_init__(self) -> None:
        cls = "LossScaleConfig"
        if not self.init_scale > 0:
            _fail(cls, "init_scale", self.init_scale, "a number > 0")
        if not self.growth_factor > 1:
            _fail(cls, "growth_factor", self.growth_factor, "a number > 1")
        if not 0 < self.backoff_factor < 1:
            _fail(cls, "backoff_factor", self.backoff_factor, "a number in (0, 1)")
        if not isinstance(self.growth_interval, int) or self.growth_interval < 1:
            _fail(cls, "growth_interval", self.growth_interval, "an int >= 1")
        if not 0 < self.min_scale <= self.init_scale:
            _fail(cls, "min_scale", self.min_scale, f"a number in (0, init_scale={self.init_scale}]")
