"""Tensor-parallel placement: which activations are split over "tp", decided by a rule table.

Every tensor gets a placement over the "tp" axis: replicated (R) or sharded on
a dim (S(d)). A linear that reads S(last) is row-parallel and yields a partial
sum that shard_tensor_parallel all-reduces back to R. `plan_tensor_parallel`,
in order:

1. Seeds: every linear (`graph.as_linear`) outside the MoE blocks is tried as
   column-parallel (its output S(last)).
2. Propagate placements through the graph with `RULES`, one small handler per
   aten op. A seed whose shard reaches an op without a rule (a norm, the
   graph's output, an MoE block) fails, with every seed that fed it; those stay
   replicated and propagation restarts. This settles on QKV/up column-parallel
   and out/down row-parallel, and keeps embeddings, norms, router and LM head
   replicated, without naming any of them.
3. Attention left whole is an error for the user (heads not divisible by T),
   never a silently replicated model.

The result is a `Plan`; shard_tensor_parallel rewrites the graph from it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .graph import MOE_META, as_linear, module_path

__all__ = ["Fail", "Placement", "Plan", "R", "RULES", "plan_tensor_parallel", "propagate"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Placement:
    """R (replicated) or S (sharded on `dim`); `seeds` are the column-parallel linears the shard came from."""

    kind: str  # "R" | "S"
    dim: int = -1
    seeds: frozenset = frozenset()


R = Placement("R")


class Fail(Exception):
    """A shard reached an op it cannot pass. `hard`: a size not divisible by T, an error for the user."""

    def __init__(self, seeds: frozenset, node: fx.Node, reason: str, hard: bool = False) -> None:
        super().__init__(f"{node.name}: {reason}")
        self.seeds, self.node, self.reason, self.hard = seeds, node, reason, hard


@dataclass
class Plan:
    place: dict[fx.Node, Placement] = field(default_factory=dict)
    column: dict[fx.Node, frozenset] = field(default_factory=dict)
    row: list[fx.Node] = field(default_factory=list)
    chunks: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    shape_edits: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # node -> (arg position in list, dim)
    kv_slices: list[tuple[fx.Node, int]] = field(default_factory=list)
    """(sdpa node, argument index) of replicated k/v that each rank narrows to its query heads."""


# ---------------------------------------------------------------- the rule table


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _ndim(node) -> int:
    v = _val(node)
    return v.dim() if v is not None else 0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _passthrough(node, ins, plan, T):
    return ins[0]


def _elementwise(node, ins, plan, T):
    out_nd = _ndim(node)
    sharded = [(a, p) for a, p in zip(node.args, ins) if p.kind == "S"]
    if not sharded:
        return R
    dims = {p.dim + (out_nd - _ndim(a)) for a, p in sharded}
    if len(dims) != 1:
        raise Fail(_all_seeds(ins), node, "operands sharded on different dims")
    d = dims.pop()
    for a, p in zip(node.args, ins):
        if isinstance(a, fx.Node) and p.kind == "R" and _val(a) is not None:
            aligned = d - (out_nd - _ndim(a))
            if aligned >= 0 and _val(a).shape[aligned] != 1:
                raise Fail(_all_seeds(ins), node, "replicated operand not broadcast along the sharded dim")
    return Placement("S", d, _all_seeds(ins))


def _transpose(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    nd = _ndim(node.args[0])
    a, b = (_norm_dim(d, nd) for d in node.args[1:3])
    return Placement("S", b if p.dim == a else a if p.dim == b else p.dim, p.seeds)


def _permute(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    nd = _ndim(node.args[0])
    order = [_norm_dim(d, nd) for d in node.args[1]]
    return Placement("S", order.index(p.dim), p.seeds)


def _unsqueeze(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    d = _norm_dim(node.args[1], _ndim(node))
    return Placement("S", p.dim + 1 if d <= p.dim else p.dim, p.seeds)


def _slice(node, ins, plan, T):
    p = ins[0]
    if p.kind == "S" and _norm_dim(node.args[1] if len(node.args) > 1 else 0, _ndim(node.args[0])) == p.dim:
        raise Fail(p.seeds, node, "slice along the sharded dim")
    return p


def _cat(node, ins, plan, T):
    # Empty operands (legacy cat skips them, e.g. an empty KV-cache placeholder) do not take part.
    tensors = [t for t in node.args[0] if _val(t) is None or _val(t).numel() > 0]
    places = [plan.place.get(t, R) for t in tensors]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, _ndim(node))
    kinds = {(p.kind, p.dim) for p in places}
    if kinds == {("R", -1)}:
        return R
    if len(kinds) != 1 or dim == places[0].dim:
        raise Fail(_all_seeds(places), node, "cat of mixed placements or along the sharded dim")
    return Placement("S", places[0].dim, _all_seeds(places))


def _split(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    nd = _ndim(node.args[0])
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, nd)
    if dim != p.dim:
        return p
    full = _val(node.args[0]).shape[dim]
    size = node.args[1]
    sizes = [size] * (full // size) if isinstance(size, int) else list(size)
    if any(not isinstance(s, int) or s % T for s in sizes) or sum(sizes) != full:
        raise Fail(p.seeds, node, f"split sizes {sizes} are not divisible by T={T}", hard=True)
    for seed in p.seeds:
        if plan.chunks.get(seed, tuple(sizes)) != tuple(sizes):
            raise Fail(p.seeds, node, "a fused projection split two different ways")
        plan.chunks[seed] = tuple(sizes)
    plan.shape_edits[node] = (1, -1)
    return p


def _reshape(node, ins, plan, T):
    """view/reshape: the sharded input dim must be the outermost of the dims it becomes part of."""
    p = ins[0]
    if p.kind != "S":
        return R
    src, dst = _val(node.args[0]).shape, _val(node).shape
    group_in, group_out = _dim_groups(src, dst, p.dim)
    if group_in is None or group_in[0] != p.dim:
        raise Fail(p.seeds, node, f"reshape {tuple(src)} -> {tuple(dst)} splits the sharded dim {p.dim}")
    out_dim = group_out[0]
    size = dst[out_dim]
    if not isinstance(size, int) or size % T:
        raise Fail(p.seeds, node, f"dim {out_dim} of shape {tuple(dst)} (size {size}, e.g. the number of "
                    f"attention heads) is not divisible by T={T}")
    plan.shape_edits[node] = (1, out_dim)
    return Placement("S", out_dim, p.seeds)


def _expand(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    d = p.dim + (_ndim(node) - _ndim(node.args[0]))
    plan.shape_edits[node] = (1, d)
    return Placement("S", d, p.seeds)


def _sdpa(node, ins, plan, T):
    q, k, v = ins[:3]
    if q.kind == k.kind == v.kind == "R":
        mask = ins[3] if len(ins) > 3 else R
        if mask.kind == "S":
            raise Fail(mask.seeds, node, "sharded attention mask with replicated q, k, v")
        return R
    if q.kind == "S" and q.dim == 1 and "R" in (k.kind, v.kind) and not node.kwargs.get("enable_gqa", False):
        # GQA whose KV heads do not divide by T: k and v stay replicated (already repeated to one per
        # query head), and each rank narrows them to its own query heads.
        bad = [p for p in (k, v) if p.kind == "S" and p.dim != 1]
        if bad:  # blame k/v only: the query's shard is fine
            raise Fail(_all_seeds(bad), node, "k or v sharded on a dim other than heads")
        plan.kv_slices.extend((node, i) for i, p in ((1, k), (2, v)) if p.kind == "R")
    elif not (q.kind == k.kind == v.kind == "S" and q.dim == k.dim == v.dim == 1):
        raise Fail(_all_seeds(ins), node, "q, k, v must all be sharded on the heads dim")
    if len(node.args) > 3 and isinstance(node.args[3], fx.Node):
        mask = _val(node.args[3])
        if ins[3].kind == "R" and mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
            raise Fail(_all_seeds(ins), node, "per-head attention mask is replicated")
    return Placement("S", 1, _all_seeds(ins))


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else size


def _dim_groups(src, dst, dim):
    """Input and output dims that hold the same elements as input `dim` across a reshape.

    Group boundaries are where the running products of both shapes agree
    (exact for symbolic sizes too); within a group, output size-1 dims are skipped.
    """
    def running(shape):
        out, acc = [], 1
        for s in shape:
            acc = acc * _expr(s)
            out.append(acc)
        return out

    ps, pd = running(src), running(dst)
    bounds, j = [(0, 0)], 0
    for i in range(len(src)):
        for jj in range(max(j, bounds[-1][1]), len(dst)):
            if pd[jj] == ps[i]:
                bounds.append((i + 1, jj + 1))
                j = jj + 1
                break
    for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]):
        if i0 <= dim < i1:
            out = [k for k in range(j0, j1) if _expr(dst[k]) != 1] or list(range(j0, j1))
            return list(range(i0, i1)), out
    return None, None


def _all_seeds(places) -> frozenset:
    out = frozenset()
    for p in places:
        out |= p.seeds
    return out


_ELEMENTWISE = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
    aten.neg.default, aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default,
    aten.pow.Tensor_Scalar, aten.square.default, aten.sigmoid.default, aten.exp.default, aten.rsqrt.default,
    aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten._to_copy.default, aten.to.dtype, aten.type_as.default, aten.where.self,
]
RULES: dict[Callable, Callable] = {
    **{op: _elementwise for op in _ELEMENTWISE},
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.slice.Tensor: _slice,
    aten.cat.default: _cat,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.expand.default: _expand,
    aten.scaled_dot_product_attention.default: _sdpa,
    operator.getitem: _passthrough,
}
"""One handler per aten op: (node, input placements, plan, T) -> output placement; raises Fail."""


# ---------------------------------------------------------------- propagation


def propagate(gm: fx.GraphModule, seeds: set[fx.Node], T: int) -> Plan:
    plan = Plan()
    for node in gm.graph.nodes:
        ins = [plan.place.get(a, R) if isinstance(a, fx.Node) else R for a in node.args]
        kw_ins = [plan.place.get(a, R) for a in node.kwargs.values() if isinstance(a, fx.Node)]
        lin = as_linear(node)
        if lin is not None:
            xp = plan.place.get(lin.x, R)
            if xp.kind == "S":
                if xp.dim != _ndim(lin.x) - 1:
                    raise Fail(xp.seeds, node, "linear input sharded on a non-feature dim")
                plan.row.append(node)
                plan.place[node] = R
            elif node in seeds:
                plan.column[node] = frozenset({node})
                plan.place[node] = Placement("S", _ndim(node) - 1, frozenset({node}))
            else:
                plan.place[node] = R
            continue
        if node.op == "output" or node.meta.get(MOE_META) or node.op in ("call_module", "placeholder", "get_attr"):
            bad = [plan.place[a] for a in node.all_input_nodes if plan.place.get(a, R).kind == "S"]
            if bad:
                raise Fail(_all_seeds(bad), node, "sharded value reaches an op that needs it whole")
            plan.place[node] = R
            continue
        if all(plan.place.get(a, R).kind == "R" for a in node.all_input_nodes):
            plan.place[node] = R
            continue
        rule = RULES.get(node.target)
        if rule is None:
            raise Fail(_all_seeds(ins + kw_ins), node, f"no sharding rule for {node.target}")
        plan.place[node] = rule(node, ins, plan, T)
    return plan


def plan_tensor_parallel(gm: fx.GraphModule, T: int) -> tuple[Plan, list[str]]:
    seeds = {n for n in gm.graph.nodes if as_linear(n) is not None and not n.meta.get(MOE_META)}
    notes = []
    while True:
        try:
            plan = propagate(gm, seeds, T)
        except Fail as fail:
            if fail.hard:
                where = module_path(fail.node)
                raise ValueError(
                    f"tensor parallelism with ParallelConfig.tensor={T} cannot shard {where or fail.node.name}: "
                    f"{fail.reason}. Choose a tensor degree that divides the attention heads (and KV heads) "
                    f"and the FFN width."
                ) from None
            if not fail.seeds:
                raise RuntimeError(f"tensor parallelism cannot place {fail.node.name}: {fail.reason}") from None
            notes.append(f"kept replicated {sorted(s.name for s in fail.seeds)}: {fail.reason}")
            seeds -= fail.seeds
            continue
        # Attention left whole means its heads did not divide by T: an error for the user, not a
        # silently replicated model.
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target == aten.scaled_dot_product_attention.default \
                    and plan.place.get(node, R).kind == "R":
                heads = _val(node.args[0]).shape[1] if _val(node.args[0]) is not None else "?"
                raise ValueError(
                    f"tensor parallelism with ParallelConfig.tensor={T} cannot split the attention of "
                    f"{module_path(node) or node.name}: its {heads} query heads are not divisible by {T} "
                    f"({'; '.join(notes[-2:]) or 'no projection could be split'}). Choose a tensor degree "
                    f"that divides the attention heads and the FFN width.")
        return plan, notes
