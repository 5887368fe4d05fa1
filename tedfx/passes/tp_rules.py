"""Tensor-parallel placement: which activations are split over "tp", decided by a rule table.

Every tensor gets a placement over the "tp" axis: replicated (R) or sharded on
a dim (S(d)). A linear that reads S(last) is row-parallel and yields a partial
sum that shard_tensor_parallel all-reduces back to R. `tp_plan.plan_tensor_parallel`,
in order:

1. Seeds: every linear (`graph.as_linear`) outside the MoE blocks, except those
   ParallelConfig.replicate keeps whole, is tried as column-parallel (its output S(last)).
2. Propagate placements through the graph with `RULES`, one small handler per
   aten op. A seed whose shard reaches an op without a rule (a norm, the
   graph's output, an MoE block) fails, with every seed that fed it; those stay
   replicated (`Plan.reasons` says why) and propagation restarts. This settles on
   QKV/up column-parallel and out/down row-parallel, and keeps embeddings, norms,
   router and LM head replicated, without naming any of them.
3. Fused projections are split per chunk (`Plan.chunks`) wherever the graph
   splits them: `split`/`chunk`/`slice` of the output features (GPT-2's c_attn,
   Phi-3's qkv_proj and gate_up_proj) or a view as (n, heads, head_dim) that is
   unbound (timm's qkv). A view as (heads, n, head_dim) (GPT-NeoX) is split in
   contiguous blocks of heads, which keeps each head's q, k and v together.

Attention left whole is not decided here: `tp_plan` raises for every attention
or dense-FFN projection the plan leaves whole (docs/parallelism.md, "Tensor parallelism").
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

__all__ = ["Fail", "Placement", "Plan", "R", "RULES", "all_seeds", "node_ndim", "node_val", "rule_for"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Placement:
    """R (replicated) or S (sharded on `dim`); `seeds` are the column-parallel linears the shard came from."""

    kind: str  # "R" | "S"
    dim: int = -1
    seeds: frozenset = frozenset()
    outer: Any = 1
    """Blocks the sharded dim holds, each split over T on its own: the batch B of a (B * heads) dim that
    bmm-style attention flattens; 1 for a plain shard. An int or a sympy expression of the captured sizes."""

    def at(self, dim: int) -> Placement:
        """The same shard, moved to `dim`."""
        return dataclasses.replace(self, dim=dim)


R = Placement("R")


class Fail(Exception):
    """A shard reached an op it cannot pass: its `seeds` stay replicated, for `reason`."""

    def __init__(self, seeds: frozenset, node: fx.Node, reason: str) -> None:
        super().__init__(f"{node.name}: {reason}")
        self.seeds, self.node, self.reason = seeds, node, reason


@dataclass
class Plan:
    """The tensor-parallel plan of one graph: placements, and what shard_tensor_parallel rewrites."""

    place: dict[fx.Node, Placement] = field(default_factory=dict)
    column: dict[fx.Node, frozenset] = field(default_factory=dict)
    """Column-parallel linears (output features split)."""
    row: list[fx.Node] = field(default_factory=list)
    """Row-parallel linears (input features split; partial sums all-reduced)."""
    chunks: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    """Column-parallel linear -> sizes of the chunks of its output features, each split over T on its own."""
    shape_edits: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # node -> (arg position in list, dim)
    slices: dict[fx.Node, tuple[frozenset, int, int]] = field(default_factory=dict)
    """slice node along the sharded features of a fused projection -> (seeds, start, end); each is one chunk,
    and shard_tensor_parallel divides its bounds by T."""
    narrow: list[tuple[fx.Node, int, int]] = field(default_factory=list)
    """(attention node, argument index, dim): a replicated operand (GQA k/v whose KV heads do not divide by T)
    that each rank narrows to its query heads' share along dim."""
    reasons: dict[fx.Node, str] = field(default_factory=dict)
    """Seed kept replicated -> why (the op its shard could not pass)."""
    grad_sums: list[tuple[fx.Node, int]] = field(default_factory=list)
    """(op, argument index): a replicated operand that requires grad, broadcast into an op whose output is sharded
    (Qwen3's q/k norm weight, one per head_dim, over each rank's heads). Each rank's gradient of it is its heads'
    share, so shard_tensor_parallel puts Megatron's f before it (all-reduce over "tp" in backward)."""
    asserts: dict[fx.Node, int] = field(default_factory=dict)
    """_assert_tensor_metadata of a sharded tensor -> its sharded dim: shard_tensor_parallel divides the size
    it checks there by T and drops the strides it checks (those of the whole tensor)."""
    partial_sums: dict[fx.Node, int] = field(default_factory=dict)
    """mean or sum over the sharded dim (OLMo2's q/k RMSNorm across all heads) -> the divisor of the all-reduced
    local results (T for a mean over equal shards, 1 for a sum): shard_tensor_parallel all-reduces them."""
    data: frozenset[fx.Node] = frozenset()
    """Nodes computed from the values of the graph's inputs (not from their sizes alone): activations, which an
    elementwise op never narrows (that would split the residual stream; docs/parallelism.md)."""
    attention_inputs: frozenset[fx.Node] = frozenset()
    """The attention input projections (q, k, v): the only seeds whose shard a mean or sum over the sharded dim
    all-reduces (a q/k norm across all heads); any other (a norm of the residual stream) stays refused."""
    trained: frozenset[fx.Node] = frozenset()
    """Nodes whose value depends on a parameter that requires grad (export's meta values of activations do not
    record requires_grad): the operands grad_sums must sum."""


# ---------------------------------------------------------------- the rule table


def node_val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def node_ndim(node) -> int:
    v = node_val(node)
    return v.dim() if v is not None else 0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _passthrough(node, ins, plan, T):
    return ins[0]


def _elementwise(node, ins, plan, T):
    out_nd = node_ndim(node)
    sharded = [(a, p) for a, p in zip(node.args, ins) if p.kind == "S"]
    if not sharded:
        return R
    dims = {(p.dim + (out_nd - node_ndim(a)), p.outer) for a, p in sharded}
    if len(dims) != 1:
        raise Fail(all_seeds(ins), node, "operands sharded on different dims")
    d, outer = dims.pop()
    out = node_val(node)
    for i, (a, p) in enumerate(zip(node.args, ins)):
        if isinstance(a, fx.Node) and p.kind == "R" and node_val(a) is not None:
            aligned = d - (out_nd - node_ndim(a))
            size = node_val(a).shape[aligned] if aligned >= 0 else 1
            if size == 1:
                if a in plan.trained:
                    plan.grad_sums.append((node, i))
                continue
            # Computed whole on every rank from parameters and sizes (a per-head bias added to sharded attention
            # scores, T5 written with matmuls): each rank narrows it to its share, its gradient all-gathered
            # (docs/parallelism.md). An activation is not narrowed: the residual stream stays whole.
            if outer == 1 and out is not None and size == out.shape[d] and size % T == 0 and a not in plan.data:
                plan.narrow.append((node, i, aligned))
                continue
            raise Fail(all_seeds(ins), node, "replicated operand not broadcast along the sharded dim")
    return Placement("S", d, all_seeds(ins), outer)


def _transpose(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    nd = node_ndim(node.args[0])
    a, b = (_norm_dim(d, nd) for d in node.args[1:3])
    return p.at(b if p.dim == a else a if p.dim == b else p.dim)


def _permute(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    nd = node_ndim(node.args[0])
    order = [_norm_dim(d, nd) for d in node.args[1]]
    return p.at(order.index(p.dim))


def _unsqueeze(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    d = _norm_dim(node.args[1], node_ndim(node))
    return p.at(p.dim + 1 if d <= p.dim else p.dim)


def _slice(node, ins, plan, T):
    """A slice along the sharded features of a fused projection (Phi-3's qkv[..., a:b]) picks one chunk."""
    p = ins[0]
    nd = node_ndim(node.args[0])
    if p.kind != "S" or _norm_dim(node.args[1] if len(node.args) > 1 else 0, nd) != p.dim:
        return p
    full = node_val(node.args[0]).shape[p.dim]
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 else None
    end = full if end is None or (isinstance(end, int) and end >= full) else end
    if not (isinstance(start, int) and isinstance(end, int)) or (len(node.args) > 4 and node.args[4] != 1) \
            or p.outer != 1:
        raise Fail(p.seeds, node, "slice along the sharded dim with symbolic bounds, a step or blocks")
    start, end = (_norm_dim(b, full) for b in (start, end))
    if (start, end) == (0, full):
        return p
    _check_fused(node, p, full)
    plan.slices[node] = (p.seeds, start, end)
    return p


def _check_fused(node, p: Placement, size: int) -> None:
    """Chunks of a fused projection are chunks of its output features: the sharded dim must hold all of them."""
    if p.outer != 1 or any(node_val(s) is None or node_val(s).shape[-1] != size for s in p.seeds):
        raise Fail(p.seeds, node, "split of a sharded dim that is not a projection's whole output features (the "
                                  "heads split apart, e.g. to normalize each with a module of its own)")


def _record_chunks(node, p: Placement, sizes: list, plan, T) -> None:
    """The seeds' output features come in `sizes` chunks, each split over T on its own."""
    _check_fused(node, p, sum(sizes))
    if any(not isinstance(s, int) or s % T for s in sizes):
        raise Fail(p.seeds, node, f"chunks {sizes} of a fused projection are not divisible by T={T}")
    for seed in p.seeds:
        if plan.chunks.get(seed, tuple(sizes)) != tuple(sizes):
            raise Fail(p.seeds, node, "a fused projection split two different ways")
        plan.chunks[seed] = tuple(sizes)


def _cat(node, ins, plan, T):
    # Empty operands (legacy cat skips them, e.g. an empty KV-cache placeholder) do not take part.
    tensors = [t for t in node.args[0] if node_val(t) is None or node_val(t).numel() > 0]
    places = [plan.place.get(t, R) for t in tensors]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, node_ndim(node))
    kinds = {(p.kind, p.dim, p.outer) for p in places}
    if kinds == {("R", -1, 1)}:
        return R
    if len(kinds) != 1 or dim == places[0].dim:
        raise Fail(all_seeds(places), node, "cat of mixed placements or along the sharded dim")
    return dataclasses.replace(places[0], seeds=all_seeds(places))


def _split(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    nd = node_ndim(node.args[0])
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, nd)
    if dim != p.dim:
        return p
    full = node_val(node.args[0]).shape[dim]
    size = node.args[1]
    sizes = [size] * (full // size) if isinstance(size, int) else list(size)
    if sum(sizes) != full:
        raise Fail(p.seeds, node, f"split sizes {sizes} do not add up to {full}")
    _record_chunks(node, p, sizes, plan, T)
    plan.shape_edits[node] = (1, -1)
    return p


def _chunk(node, ins, plan, T):
    """chunk(n) of the sharded features: each rank chunks its share of every chunk (GPT-NeoX, Phi-3's gate_up)."""
    p = ins[0]
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, node_ndim(node.args[0]))
    if p.kind != "S" or dim != p.dim:
        return p
    full, n = node_val(node.args[0]).shape[dim], node.args[1]
    if not isinstance(full, int) or full % n:
        raise Fail(p.seeds, node, f"chunk({n}) of {full} features is uneven")
    _record_chunks(node, p, [full // n] * n, plan, T)
    return p


def _unbind(node, ins, plan, T):
    """unbind/select along another dim than the sharded one: the shard moves down when a dim before it goes."""
    p = ins[0]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, node_ndim(node.args[0]))
    if p.kind != "S":
        return R
    if dim == p.dim:
        raise Fail(p.seeds, node, "unbind or select along the sharded dim")
    return p.at(p.dim - (p.dim > dim))


def _unbound_later(node: fx.Node, dim: int, hops: int = 4) -> bool:
    """Whether `dim` of `node` is unbound or selected soon after, through transposes and permutes: the sign
    that a view as (n, heads, head_dim) fuses n tensors (timm's qkv), not n groups of heads."""
    for _ in range(hops):
        if len(node.users) != 1:
            return False
        user = next(iter(node.users))
        if user.target in (aten.unbind.int, aten.select.int):
            return _norm_dim(user.args[1] if len(user.args) > 1 else 0, node_ndim(node)) == dim
        if user.target is aten.transpose.int:
            a, b = (_norm_dim(d, node_ndim(node)) for d in user.args[1:3])
            dim = b if dim == a else a if dim == b else dim
        elif user.target is aten.permute.default:
            dim = [_norm_dim(d, node_ndim(node)) for d in user.args[1]].index(dim)
        elif user.target not in (aten.clone.default, aten.contiguous.default, aten.alias.default):
            return False
        node = user
    return False


def _reshape(node, ins, plan, T):
    """view/reshape: the sharded factor of the input dim lands on the output dim where it starts.

    Within the dims that hold the same elements, the sharded factor sits behind `outer` elements of
    the dims before it; it lands on the first output dim whose prefix divides them, the rest of them
    becoming that dim's `outer` blocks: (B, heads, S, d) -> (B * heads, S, d) for bmm gives blocks B,
    and back. A fused projection viewed (n, heads, head_dim) and then unbound is split per chunk.
    """
    p = ins[0]
    if p.kind != "S":
        return R
    src, dst = node_val(node.args[0]).shape, node_val(node).shape
    group_in, group_out = _dim_groups(src, dst, p.dim)
    if group_in is None:
        raise Fail(p.seeds, node, f"reshape {tuple(src)} -> {tuple(dst)} splits the sharded dim {p.dim}")
    j = group_out[0]
    if group_in == [p.dim] and p.outer == 1 and len(group_out) > 1 and isinstance(dst[j], int) \
            and _unbound_later(node, j):
        # A fused projection viewed (n, heads, head_dim), as timm's qkv (3, heads, head_dim): each of the
        # n chunks is split over T on its own, so every rank keeps its heads' q, k and v together.
        _record_chunks(node, p, [src[p.dim] // dst[j]] * dst[j], plan, T)
        j, outer = group_out[1], sympy.Integer(1)
    else:
        j, outer = _landing(src, dst, group_in, group_out, p)
        if j is None:
            raise Fail(p.seeds, node, f"reshape {tuple(src)} -> {tuple(dst)} splits the sharded dim {p.dim}")
    size = sympy.sympify(_expr(dst[j])) / outer
    if not size.is_Integer or int(size) % T:
        raise Fail(p.seeds, node, f"dim {j} of shape {tuple(dst)} (size {size}, e.g. the number of "
                    f"attention heads) is not divisible by T={T}")
    plan.shape_edits[node] = (1, j)
    return Placement("S", j, p.seeds, int(outer) if outer.is_Integer else outer)


def _flatten(node, ins, plan, T):
    """flatten (GPT-J's rotate_every_two flattens its stacked pairs) places as the reshape it is; its sizes
    come from its input, so it has no shape constant to divide."""
    out = _reshape(node, ins, plan, T)
    plan.shape_edits.pop(node, None)
    return out


def _landing(src, dst, group_in, group_out, p: Placement):
    """(output dim, its outer blocks) where the input's sharded factor starts; (None, None) if it is cut."""
    outer = sympy.sympify(_expr(p.outer))
    for i in group_in[:group_in.index(p.dim)]:
        outer *= _expr(src[i])
    factor = sympy.sympify(_expr(src[p.dim])) / _expr(p.outer)
    prefix = sympy.Integer(1)
    for j in group_out:
        blocks = sympy.simplify(outer / prefix)
        if blocks.is_integer is not True:
            break
        size = sympy.simplify(_expr(dst[j]) / blocks)
        # The factor starts here: it spans this dim and more (heads, head_dim -> features) or fits in it.
        if size.is_integer and size != 1 and (sympy.simplify(factor / size).is_integer
                                              or sympy.simplify(size / factor).is_integer):
            return j, blocks
        prefix *= _expr(dst[j])
    return None, None


def _expand(node, ins, plan, T):
    p = ins[0]
    if p.kind != "S":
        return R
    d = p.dim + (node_ndim(node) - node_ndim(node.args[0]))
    plan.shape_edits[node] = (1, d)
    return p.at(d)


def _sdpa(node, ins, plan, T):
    q, k, v = ins[:3]
    if any(p.outer != 1 for p in ins):
        raise Fail(all_seeds(ins), node, "attention inputs sharded in blocks")
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
            raise Fail(all_seeds(bad), node, "k or v sharded on a dim other than heads")
        plan.narrow.extend((node, i, 1) for i, p in ((1, k), (2, v)) if p.kind == "R")
    elif not (q.kind == k.kind == v.kind == "S" and q.dim == k.dim == v.dim == 1):
        raise Fail(all_seeds(ins), node, "q, k, v must all be sharded on the heads dim")
    if len(node.args) > 3 and isinstance(node.args[3], fx.Node):
        mask = node_val(node.args[3])
        if ins[3].kind == "R" and mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
            # A per-head bias (T5's relative positions) computed whole: each rank narrows it to its heads.
            if mask.shape[1] % T:
                raise Fail(all_seeds(ins), node, f"per-head attention mask of {mask.shape[1]} heads, not "
                                                 f"divisible by T={T}")
            plan.narrow.append((node, 3, 1))
        elif ins[3].kind == "R" and node.args[3] in plan.trained:  # a learned bias broadcast over the heads
            plan.grad_sums.append((node, 3))
    return Placement("S", 1, all_seeds(ins))


def _matmul(node, ins, plan, T):
    """matmul/bmm (attention written as plain ops): batch dims align from the right.

    Both operands sharded on the same batch dim (q @ k^T per head) stay sharded there; a replicated
    operand that is not broadcast along the sharded batch dim (GQA k/v whose KV heads do not divide
    by T) is narrowed to this rank's share. Rows of the left or columns of the right operand pass
    through; a sharded contraction dim would need a reduction, and fails.
    """
    (a, b), (pa, pb) = node.args[:2], ins[:2]
    va, vb, nd = node_val(a), node_val(b), node_ndim(node)
    if va is None or vb is None or va.dim() < 2 or vb.dim() < 2:
        raise Fail(all_seeds(ins), node, "matmul with a vector operand")
    sharded = {i: (p, v) for i, (p, v) in enumerate(((pa, va), (pb, vb))) if p.kind == "S"}
    kinds = {i: "batch" if p.dim < v.dim() - 2 else ("row", "contract")[i] if p.dim == v.dim() - 2
             else ("contract", "col")[i] for i, (p, v) in sharded.items()}
    out = {i: p.dim + nd - v.dim() for i, (p, v) in sharded.items()}
    if len(sharded) == 2:
        if set(kinds.values()) == {"batch"} and out[0] == out[1] and pa.outer == pb.outer:
            return dataclasses.replace(pa.at(out[0]), seeds=all_seeds(ins))
        # Blame the operand not sharded per batch (head): q's shard is fine when k's is on head_dim.
        blamed = [sharded[i][0] for i in kinds if kinds[i] != "batch"] or [pa, pb]
        what = "contracts the sharded dim" if "contract" in kinds.values() else "has operands sharded on different dims"
        raise Fail(all_seeds(blamed), node, f"matmul {what}")
    (i, (p, v)), = sharded.items()
    if kinds[i] == "contract":
        raise Fail(p.seeds, node, "matmul contracts the sharded dim")
    other = vb if i == 0 else va
    od = out[i] - (nd - other.dim())
    if kinds[i] == "batch" and od >= 0 and other.shape[od] != 1:
        if not isinstance(other.shape[od], int) or other.shape[od] % T or p.outer != 1:
            raise Fail(p.seeds, node, f"replicated operand of size {other.shape[od]} along the sharded batch dim "
                                      f"is not divisible by T={T}")
        plan.narrow.append((node, 1 - i, od))
    elif node.args[1 - i] in plan.trained:
        # Broadcast over the sharded batch dim, or multiplied by this rank's rows or columns only: each rank's
        # gradient of it is a partial sum (a one-KV-head v kept whole under ParallelConfig.replicate).
        plan.grad_sums.append((node, 1 - i))
    return p.at(out[i])


def _reduce(node, ins, plan, T):
    """mean/sum/amax over dims other than the sharded one (Qwen3's per-head q/k RMSNorm over head_dim) keep the
    shard; a mean or sum over the sharded dim (OLMo2's q/k RMSNorm across all heads) reduces this rank's share
    and all-reduces it over "tp", replicated after; amax over it is refused."""
    p = ins[0]
    if p.kind != "S":
        return R
    nd = node_ndim(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = range(nd) if dims is None or dims == [] else [dims] if isinstance(dims, int) else dims
    dims = {_norm_dim(d, nd) for d in dims}
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if p.dim in dims:
        if node.target is aten.amax.default or p.outer != 1 or not p.seeds <= plan.attention_inputs:
            raise Fail(p.seeds, node, f"{node.target} over the sharded dim {p.dim}: its statistics need the "
                                      f"whole features")
        plan.partial_sums[node] = T if node.target is aten.mean.dim else 1
        return R
    return p if keepdim else p.at(p.dim - sum(d < p.dim for d in dims))


def _norm(node, ins, plan, T):
    """layer_norm / rms_norm over trailing dims without the sharded one (Persimmon's per-head q/k LayerNorm over
    head_dim) keep the shard; their weight and bias, one per normalized element and shared by every head, get
    Megatron's f (each rank's gradient covers its own heads). A norm over the sharded dim (of the residual
    stream) is refused: its statistics need the whole features."""
    p = ins[0]
    if p.kind != "S":
        return R
    if p.dim >= node_ndim(node.args[0]) - len(node.args[1]):
        raise Fail(p.seeds, node, f"{node.target} over the sharded dim {p.dim}: its statistics need the whole "
                                  f"features")
    for i in (2, 3):  # weight, bias (rms_norm's 3 is eps)
        if i < len(node.args) and isinstance(node.args[i], fx.Node) and node.args[i] in plan.trained:
            plan.grad_sums.append((node, i))
    return p


def _stack(node, ins, plan, T):
    """stack (GPT-J's rotate_every_two stacks (-x2, x1) on a new last dim): a new dim never cuts the sharded
    one, so operands sharded alike stay sharded, the shard moving up when the new dim comes before it."""
    tensors = list(node.args[0])
    places = [plan.place.get(t, R) for t in tensors]
    kinds = {(p.kind, p.dim, p.outer) for p in places}
    if kinds == {("R", -1, 1)}:
        return R
    if len(kinds) != 1:
        raise Fail(all_seeds(places), node, "stack of operands with different placements")
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), node_ndim(node))
    p = places[0]
    return dataclasses.replace(p, dim=p.dim + (dim <= p.dim), seeds=all_seeds(places))


def _index(node, ins, plan, T):
    """Indexing by tensors off the sharded dim (Falcon's grouped-KV `qkv[:, :, :, [-2]]` picks the key of each
    group): the indexed dims, if adjacent, are replaced in place by the index's shape, so the shard keeps its
    place before them or moves by the change in rank after them. Indexing the sharded dim (positions in the
    whole dim) or with indices apart (numpy moves their result to the front) fails."""
    p, indices = ins[0], list(node.args[1])
    if any(isinstance(i, fx.Node) and plan.place.get(i, R).kind == "S" for i in indices):
        raise Fail(all_seeds([plan.place.get(i, R) for i in indices if isinstance(i, fx.Node)] + [p]), node,
                   "indexing with a sharded index")
    if p.kind != "S":
        return R
    used = [d for d, i in enumerate(indices) if i is not None]
    if any(node_val(i) is None or node_val(i).dtype == torch.bool for i in indices if i is not None):
        raise Fail(p.seeds, node, "indexing a sharded tensor with a boolean mask")  # a mask spans several dims
    if not used or p.dim in used or used != list(range(used[0], used[-1] + 1)):
        raise Fail(p.seeds, node, "indexing the sharded dim, or by indices on dims apart")
    if p.dim < used[0]:
        return p
    return p.at(p.dim + node_ndim(node) - node_ndim(node.args[0]))


def _assert_metadata(node, ins, plan, T):
    """_assert_tensor_metadata (export's check of a cast's input) returns nothing; on a sharded tensor the size
    it may check is the whole tensor's, so the rewrite divides it on the sharded dim (`Plan.asserts`)."""
    p = ins[0]
    if p.kind == "S":
        plan.asserts[node] = p.dim
    return R


def _softmax(node, ins, plan, T):
    p = ins[0]
    if p.kind == "S" and _norm_dim(node.args[1], node_ndim(node)) == p.dim:
        raise Fail(p.seeds, node, "softmax over the sharded dim")
    return p


def _repeat_interleave(node, ins, plan, T):
    """GQA's k/v expansion along the heads dim: each rank repeats its own KV heads, which are exactly the
    ones its query heads read (KV heads divisible by T)."""
    p = ins[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if p.kind != "S":
        return R
    if dim is None:
        raise Fail(p.seeds, node, "repeat_interleave without a dim flattens the sharded tensor")
    output_size = node.args[3] if len(node.args) > 3 else node.kwargs.get("output_size")
    if _norm_dim(dim, node_ndim(node)) == p.dim and (output_size is not None or p.outer != 1):
        raise Fail(p.seeds, node, "repeat_interleave with output_size or blocks along the sharded dim")
    return p


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


def all_seeds(places) -> frozenset:
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
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.div.Scalar, aten.sub.Scalar, aten.rsub.Scalar,
    aten.to.dtype_layout,
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
    aten.flatten.using_ints: _flatten,
    aten.expand.default: _expand,
    aten.broadcast_to.default: _expand,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.chunk.default: _chunk,
    aten.unbind.int: _unbind,
    aten.select.int: _unbind,
    aten.matmul.default: _matmul,
    aten.bmm.default: _matmul,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.log_softmax.int: _softmax,
    aten._log_softmax.default: _softmax,
    aten.repeat_interleave.self_int: _repeat_interleave,
    aten.mean.dim: _reduce,
    aten.sum.dim_IntList: _reduce,
    aten.amax.default: _reduce,
    aten.stack.default: _stack,
    aten._assert_tensor_metadata.default: _assert_metadata,
    aten.index.Tensor: _index,
    aten.layer_norm.default: _norm,
    aten.rms_norm.default: _norm,
    operator.getitem: _passthrough,
}
"""One handler per aten op: (node, input placements, plan, T) -> output placement; raises Fail."""


def rule_for(target) -> Callable | None:
    """The handler of an op: its RULES entry; any other pointwise aten op (erf in a spelled-out GELU, abs,
    ...) broadcasts as add does; None when there is no rule."""
    if target in RULES:
        return RULES[target]
    tags = getattr(target, "tags", ())
    return _elementwise if torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags else None
