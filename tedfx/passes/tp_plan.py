"""The tensor-parallel plan, and the check that it leaves no projection whole.

See docs/parallelism.md, "Tensor parallelism".

`plan_tensor_parallel` tries every linear outside the MoE blocks as
column-parallel and propagates placements with the rule table of `tp_rules`
(`propagate`); a seed whose shard reaches an op it cannot pass stays
replicated, with the reason, and propagation restarts.

Megatron tensor parallelism splits every attention projection (q, k, v, o) and
every projection of a dense FFN. An op tedfx has no rule for, or a size T does
not divide, would otherwise leave such a projection replicated on every rank:
T times its memory and compute, and only a note to show for it. After planning,
`check_nothing_left_whole` raises for each one, naming it, why, and the fix.

The linears that must be split, outside the MoE blocks:
- attention inputs: an attention op (sdpa, or a matmul of two activations such
  as q @ k^T or probs @ v) is reached from the linear's output without passing
  another linear;
- attention outputs: the linear's input is reached from an attention op the same way;
- dense-FFN projections: those of the FFNs find_ffns found and MoEConfig.layers
  left dense (`DENSE_FFN_META`).
Embeddings, norms, the router and the LM head are none of these. Exempt: k/v
projections whose KV heads do not divide by T, whose value each rank narrows to
its query heads' share (MQA as in Llama with one KV head), and the linears under
ParallelConfig.replicate.
"""

from __future__ import annotations

import re
from collections import deque
from fnmatch import fnmatchcase
from typing import Callable, Iterable

import torch
import torch.fx as fx

from .graph import DENSE_FFN_META, MOE_META, as_linear, get_by_target, module_path
from .tp_rules import Fail, Placement, Plan, R, all_seeds, node_ndim, node_val, rule_for

__all__ = ["check_nothing_left_whole", "kept_whole_by_config", "linear_path", "plan_tensor_parallel",
           "projections_to_split", "propagate", "settle_slices"]

aten = torch.ops.aten

_PRODUCTS = (aten.matmul.default, aten.bmm.default)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_MAX_HOPS = 64
"""How far from a projection its attention op may be (a rotary embedding between them is ~20 ops)."""


def linear_path(node: fx.Node) -> str:
    """The module path of a linear: its weight's owner, e.g. "model.layers.0.self_attn.q_proj"."""
    return as_linear(node).weight.target.rpartition(".")[0]


def _linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if as_linear(n) is not None and not n.meta.get(MOE_META)]


def kept_whole_by_config(gm: fx.GraphModule, patterns: tuple[str, ...]) -> frozenset[fx.Node]:
    """The linears under ParallelConfig.replicate (fnmatch globs on module paths); a pattern matching none raises."""
    linears = _linears(gm)
    kept = set()
    for pattern in patterns:
        hits = {n for n in linears if fnmatchcase(linear_path(n), pattern)}
        if not hits:
            shown = ", ".join(dict.fromkeys(linear_path(n) for n in linears[:12]))
            raise ValueError(f"ParallelConfig.replicate pattern {pattern!r} matches no linear outside the MoE "
                             f"blocks; their module paths are {shown}{', ...' if len(linears) > 12 else ''}. "
                             f"Use fnmatch globs on those paths, e.g. 'layers.*.attn.*'.")
        kept |= hits
    return frozenset(kept)


def _trained(gm: fx.GraphModule) -> frozenset[fx.Node]:
    """The nodes computed from a parameter that requires grad (a (1 + weight) norm scale as well as the weight)."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_by_target(gm, node.target)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                out.add(node)
        elif any(a in out for a in node.all_input_nodes):
            out.add(node)
    return frozenset(out)


_SIZES = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int)


def _data(gm: fx.GraphModule) -> frozenset[fx.Node]:
    """The nodes computed from the values of the graph's inputs; reading an input's size does not count."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node.op != "get_attr" and node.target not in _SIZES
                                        and any(a in out for a in node.all_input_nodes)):
            out.add(node)
    return frozenset(out)


def propagate(gm: fx.GraphModule, seeds: set[fx.Node], T: int) -> Plan:
    """Place every node for these column-parallel seeds; raises Fail at the first op a shard cannot pass."""
    attention_inputs = frozenset(n for n, role in projections_to_split(gm).items()
                                 if role == "attention input projection")
    plan = Plan(trained=_trained(gm), data=_data(gm), attention_inputs=attention_inputs)
    for node in gm.graph.nodes:
        ins = [plan.place.get(a, R) if isinstance(a, fx.Node) else R for a in node.args]
        lin = as_linear(node)
        if lin is not None:
            xp = plan.place.get(lin.x, R)
            if xp.kind == "S":
                if xp.dim != node_ndim(lin.x) - 1 or xp.outer != 1:
                    raise Fail(xp.seeds, node, "linear input sharded on a non-feature dim or in blocks")
                plan.row.append(node)
                plan.place[node] = R
            elif node in seeds:
                features = node_val(node).shape[-1] if node_val(node) is not None else None
                if not isinstance(features, int) or features % T:
                    raise Fail(frozenset({node}), node, f"its {features} output features are not divisible by T={T}")
                plan.column[node] = frozenset({node})
                plan.place[node] = Placement("S", node_ndim(node) - 1, frozenset({node}))
            else:
                plan.place[node] = R
            continue
        if node.op == "output" or node.meta.get(MOE_META) or node.op in ("call_module", "placeholder", "get_attr"):
            bad = [plan.place[a] for a in node.all_input_nodes if plan.place.get(a, R).kind == "S"]
            if bad:
                raise Fail(all_seeds(bad), node, "sharded value reaches an op that needs it whole")
            plan.place[node] = R
            continue
        if all(plan.place.get(a, R).kind == "R" for a in node.all_input_nodes):
            plan.place[node] = R
            continue
        rule = rule_for(node.target)
        try:
            if rule is None:
                raise Fail(frozenset(), node, f"no sharding rule for {node.target}")
            plan.place[node] = rule(node, ins, plan, T)
        except Fail as fail:
            if fail.seeds:
                raise
            # The seeds of every sharded input, also those inside list arguments (torch.stack of a list).
            raise Fail(all_seeds([plan.place.get(a, R) for a in node.all_input_nodes]), fail.node,
                       fail.reason) from None
    settle_slices(plan, T)
    return plan


def settle_slices(plan: Plan, T: int) -> None:
    """After propagation: the slices of each fused projection must cut it into chunks, one chunk per slice."""
    cuts: dict[fx.Node, set[int]] = {}
    for node, (seeds, start, end) in plan.slices.items():
        for seed in seeds:
            cuts.setdefault(seed, {0, node_val(seed).shape[-1]}).update((start, end))
    for seed, bounds in cuts.items():
        bounds = sorted(bounds)
        sizes = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        user = next(n for n, (seeds, _, _) in plan.slices.items() if seed in seeds)
        if plan.chunks.get(seed, sizes) != sizes:
            raise Fail(frozenset({seed}), user, "a fused projection split two different ways")
        if any(c % T for c in sizes):
            raise Fail(frozenset({seed}), user, f"slices cut the fused projection into chunks {list(sizes)}, "
                                                f"not all divisible by T={T}")
        plan.chunks[seed] = sizes
    for node, (seeds, start, end) in plan.slices.items():
        for seed in seeds:
            bounds = sorted(cuts[seed])
            if bounds.index(end) != bounds.index(start) + 1:
                raise Fail(seeds, node, f"slice [{start}:{end}] spans several chunks of a fused projection")


def plan_tensor_parallel(gm: fx.GraphModule, T: int, *, keep_whole: frozenset = frozenset()
                         ) -> tuple[Plan, list[str]]:
    """The tensor-parallel plan of `gm` for degree T, and notes on what stayed replicated.

    Args:
        gm: the MoE graph (MoE blocks are left to shard_experts).
        T: the tensor-parallel degree (> 1).
        keep_whole: linears never tried as column-parallel (ParallelConfig.replicate).

    Returns:
        (plan, notes); `plan.reasons` names why each seed that failed stayed replicated (which
        `check_nothing_left_whole` turns into an error for the projections that must be split).
    """
    seeds = {n for n in gm.graph.nodes if as_linear(n) is not None and not n.meta.get(MOE_META)} - keep_whole
    notes, reasons = [], {}
    while True:
        try:
            plan = propagate(gm, seeds, T)
        except Fail as fail:
            if not fail.seeds:
                raise RuntimeError(f"tensor parallelism cannot place {fail.node.name}: {fail.reason}") from None
            notes.append(f"kept replicated {sorted(s.name for s in fail.seeds)}: {fail.reason}")
            where = module_path(fail.node)
            for seed in fail.seeds:
                reasons[seed] = f"{fail.reason} (at {fail.node.name}{f' in {where}' if where else ''})"
            seeds -= fail.seeds
            continue
        plan.reasons = reasons
        return plan, notes


def _is_attention(node: fx.Node) -> bool:
    """sdpa, or a product of two activations (q @ k^T, probs @ v)."""
    if node.op != "call_function" or node.meta.get(MOE_META):
        return False
    if node.target is aten.scaled_dot_product_attention.default:
        return True
    return node.target in _PRODUCTS and as_linear(node) is None and \
        all(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[:2])


def _walk(starts: Iterable[fx.Node], forward: bool, found: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """Nodes satisfying `found` reached from `starts` without passing a linear or an MoE block (not beyond them)."""
    hops = {n: 0 for n in starts}
    queue, hits = deque(hops), []
    while queue:
        node = queue.popleft()
        if found(node):
            hits.append(node)
            continue
        if as_linear(node) is not None or node.meta.get(MOE_META) or hops[node] >= _MAX_HOPS:
            continue
        for nxt in (node.users if forward else node.all_input_nodes):
            if nxt not in hops:
                hops[nxt] = hops[node] + 1
                queue.append(nxt)
    return hits


def projections_to_split(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Every linear outside the MoE blocks that tensor parallelism must split -> what it is."""
    out = {}
    for node in _linears(gm):
        if node.meta.get(DENSE_FFN_META) is not None:
            out[node] = f"projection of the dense FFN {node.meta[DENSE_FFN_META]}"
        elif _walk(node.users, True, _is_attention):
            out[node] = "attention input projection"
        elif _walk([as_linear(node).x], False, _is_attention):
            out[node] = "attention output projection"
    return out


def _linears_above(node: fx.Node) -> list[fx.Node]:
    return _walk([node], False, lambda n: as_linear(n) is not None and not n.meta.get(MOE_META))


def _heads_before_expansion(node: fx.Node, dim: int) -> int | None:
    """The size of heads dim `dim` of `node` before GQA's repeat (repeat_interleave, or expand + reshape)."""
    for _ in range(_MAX_HOPS):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        if node.target is aten.repeat_interleave.self_int:
            return node.args[0].meta["val"].shape[dim]
        if node.target in _RESHAPES:
            src = node.args[0]
            if src.target is aten.expand.default and src.meta["val"].dim() == val.dim() + 1:
                return src.meta["val"].shape[dim]  # (B, KV, n_rep, S, d) -> (B, KV * n_rep, S, d)
            return val.shape[dim]
        if node.target is aten.transpose.int:
            a, b = (d % val.dim() for d in node.args[1:3])
            dim = b if dim == a else a if dim == b else dim
        elif node.target is aten.permute.default:
            dim = node.args[1][dim] % val.dim()
        first = node.args[0] if node.op == "call_function" and node.args else None
        if not isinstance(first, fx.Node) or not isinstance(first.meta.get("val"), torch.Tensor) \
                or first.meta["val"].dim() != val.dim():
            return val.shape[dim]
        node = first
    return None


def _narrowed(plan: Plan) -> dict[fx.Node, int | None]:
    """Linears whose value an attention narrows per rank -> the KV heads it had before expansion."""
    out: dict[fx.Node, int | None] = {}
    for node, i, dim in plan.narrow:
        heads = _heads_before_expansion(node.args[i], dim)
        for lin in _linears_above(node.args[i]):
            out[lin] = heads if out.get(lin, heads) == heads else None
    return out


def check_nothing_left_whole(gm: fx.GraphModule, plan: Plan, T: int, *, allowed: frozenset[fx.Node]) -> list[str]:
    """Raise when an attention or dense-FFN projection is left whole; returns notes on the exempt ones.

    Args:
        gm: the graph that was planned.
        plan: its tensor-parallel plan.
        T: the tensor-parallel degree.
        allowed: linears ParallelConfig.replicate keeps whole.

    Raises:
        ValueError: naming every projection left whole, why, and the fix.
    """
    split = set(plan.column) | set(plan.row)
    narrowed = _narrowed(plan)
    notes, whole = [], {}
    for node, role in projections_to_split(gm).items():
        if node in split:
            continue
        if node in allowed:
            notes.append(f"{linear_path(node)}: kept whole, as ParallelConfig.replicate asks")
            continue
        heads = narrowed.get(node)
        if heads is not None and heads % T:
            notes.append(f"{linear_path(node)}: kept whole, its {heads} KV heads do not divide by T={T}; each "
                         f"rank narrows its value to its query heads' share")
            continue
        whole[node] = role
    if whole:
        raise ValueError(_left_whole_message(plan, T, whole))
    return notes


def _left_whole_message(plan: Plan, T: int, whole: dict[fx.Node, str]) -> str:
    lines = []
    for node, role in whole.items():
        # An output or down projection is whole because what feeds it is: name those (same block only).
        upstream = [] if role == "attention input projection" else [
            n for n in _linears_above(as_linear(node).x)
            if whole.get(n) == ("attention input projection" if role == "attention output projection" else role)]
        if upstream:
            why = f"its input comes from {', '.join(dict.fromkeys(map(linear_path, upstream)))}, left whole"
        else:
            why = plan.reasons.get(node, "its input is replicated")
        lines.append(f"  - {linear_path(node)} ({role}): {why}")
    globs = tuple(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", linear_path(n)) for n in whole))
    return (f"tensor parallelism with ParallelConfig.tensor={T} would leave {len(whole)} projection(s) whole, "
            f"replicated on every rank at T times their memory and compute:\n" + "\n".join(lines) +
            f"\nMegatron tensor parallelism splits every attention and dense-FFN projection. To fix: choose a "
            f"tensor degree that divides the attention heads, KV heads and FFN width; write the attention with "
            f"ops tedfx has sharding rules for (docs/parallelism.md, \"Tensor parallelism\"); or accept these "
            f"weights replicated with ParallelConfig(tensor={T}, replicate={globs!r}).")
