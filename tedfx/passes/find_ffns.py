"""find_ffns: locate the dense FFN blocks of a captured model (docs/architecture.md, "Passes").

Match records only; `ffn_to_moe` does the rewriting.

An FFN is a single-entry single-exit region, MLP `x -> fc1 -> act -> [dropout] -> fc2`
or GLU `x -> (act(gate(x)) * up(x)) -> down`, whose projections are `aten.linear` or HF
Conv1D's `view -> aten.addmm -> view`, with only elementwise or view-like ops between
them. A GLU's gate and up may be the two halves of one fused projection H -> 2F, split
by `chunk`/`split` (Phi-3's gate_up_proj): each half is then a projection of its own.
The activation is not matched by op names (GELU comes as one op, as erf
arithmetic, or as GPT-2's mul/pow/tanh arithmetic): the subgraph between the
projections is evaluated on test tensors and compared with `ACTIVATIONS`.

The search, in order:
1. Build a networkx view of the dataflow between tensor-valued nodes; the halves
   of fused gate_up projections join the projections.
2. From every projection, walk forward a bounded number of hops through
   elementwise/view-like ops, stopping at the next projection. A projection
   reached that way has the walk's source as a *feeder*.
3. A projection with one feeder is tried as an MLP's fc2, with two as a GLU's
   down projection: build the region, check it is single-entry single-exit,
   classify the activation numerically, check the weight shapes.
4. No match at all raises `NoFFNFoundError` listing the nearest rejected
   candidates and why each was rejected. Where some FFNs match and others,
   shaped as FFNs, fail at the activation (an unknown one, or a parameter
   between the projections, which the experts could not keep), a warning
   names those left dense.
"""

from __future__ import annotations

import logging
import operator
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from typing import Literal

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .._compat import dropout_targets
from ..moe.ops import ACTIVATIONS as _EXPERT_ACTIVATIONS
from .context import FFNInfo, PassContext
from .graph import as_linear, fold_transposed_linears, get_by_target, module_path

__all__ = ["ACTIVATIONS", "FFNMatch", "LinearRef", "NoFFNFoundError", "find_ffns", "find_ffns_pass"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class LinearRef:
    """One projection of an FFN as it stands in the graph."""

    node: fx.Node
    """The aten.linear / aten.addmm / aten.mm / aten.matmul node."""
    weight: str
    """get_attr target of the weight."""
    bias: str | None
    """get_attr target of the bias, None when there is none."""
    transposed: bool
    """True when the weight is stored [in, out] (HF Conv1D via addmm); False for nn.Linear's [out, in]."""
    out_slice: tuple[int, int] | None = None
    """(start, stop) of the output features used, for one half of a fused gate_up projection; None: all."""


@dataclass(frozen=True)
class FFNMatch:
    """A single-entry single-exit FFN region: linear -> activation -> linear, or its GLU variant.

    For HF Conv1D projections (`view -> addmm -> view`) the region includes the
    flattening view before fc1 and the unflattening view after fc2, so `entry`
    and `exit` both have the model's [..., H] shape. Side inputs that are not
    tensors (SymInt `sym_size` nodes feeding view shapes) are not in `nodes`.
    """

    index: int
    """Position among the model's FFNs, in graph order (what MoEConfig.layers indexes)."""
    path: str
    """Module path of the FFN: the longest common module path of its projections' weights, e.g.
    "transformer.h.0.mlp" (from the weights' names, so it holds for graphs without module metadata too)."""
    kind: Literal["mlp", "glu"]
    activation: str
    """"gelu", "gelu_tanh", "relu", "silu" or "relu2"."""
    hidden_dim: int
    """H: width of the FFN's input and output."""
    ffn_dim: int
    """F: width of the FFN's inner activation."""
    entry: fx.Node
    """The tensor the FFN reads, shape [..., H]."""
    exit: fx.Node
    """The node producing the FFN's result, shape [..., H]."""
    nodes: tuple[fx.Node, ...]
    """Every node of the region in graph order: entry excluded, exit included, get_attr excluded."""
    fc1: LinearRef
    """The up projection (for GLU: the gate, the projection under the activation)."""
    fc2: LinearRef
    """The down projection."""
    up: LinearRef | None = None
    """GLU only: the projection multiplied by the activated gate."""
    dropout_p: float = 0.0
    """Dropout probability between the activation and fc2 (0.0 when there is none)."""

    def info(self) -> FFNInfo:
        """What the match says about the FFN, without graph nodes."""
        return FFNInfo(self.index, self.path, self.kind, self.activation, self.hidden_dim, self.ffn_dim)


class NoFFNFoundError(ValueError):
    """The graph has no FFN region tedfx can convert."""


# The activations tedfx converts (the experts compute them): a region's subgraph must compute one of these.
ACTIVATIONS = _EXPERT_ACTIVATIONS

# Ops that move or recast values without mixing them; identity for classification.
_VIEW_LIKE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype, aten.to.dtype_layout,
    aten._to_copy.default,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_ASSERT_META = aten._assert_tensor_metadata.default
_MAX_HOPS = 32
"""How far forward from a projection the next one may be (GPT-2's spelled-out GELU is 11 hops)."""
_MAX_VISITED = 4096
_REPORTED_CANDIDATES = 8
# gelu and gelu_tanh differ by up to 5e-4; evaluation is in float64, so this tolerance separates them.
_ATOL = 1e-5


def _is_param(gm: fx.GraphModule, node: fx.Node | None, ndim: int) -> bool:
    """Whether `node` reads a tensor of rank `ndim` from the module (a parameter or buffer)."""
    return node is not None and getattr(get_by_target(gm, node.target), "ndim", -1) == ndim


def _projection(gm: fx.GraphModule, node: fx.Node) -> LinearRef | None:
    """The LinearRef of `node` when it multiplies by a 2-d weight of the module, else None."""
    lin = as_linear(node)
    if lin is None or not _is_param(gm, lin.weight, 2) or (lin.bias is not None and not _is_param(gm, lin.bias, 1)):
        return None
    return LinearRef(node, lin.weight.target, lin.bias.target if lin.bias is not None else None, lin.transposed)


def _data_input(ref: LinearRef) -> fx.Node:
    return ref.node.args[1] if ref.node.target is aten.addmm.default else ref.node.args[0]


def _fused_nodes(ref: LinearRef, source: fx.Node) -> list[fx.Node]:
    """For the half of a fused gate_up: the projection and its split, which the region also holds."""
    return [ref.node, source.args[0]] if ref.out_slice else []


def _in_out(gm: fx.GraphModule, ref: LinearRef) -> tuple[int, int]:
    """(in_features, out_features) of a projection (of its half, for a fused gate_up)."""
    rows, cols = get_by_target(gm, ref.weight).shape
    fan_in, fan_out = (rows, cols) if ref.transposed else (cols, rows)
    return (fan_in, ref.out_slice[1] - ref.out_slice[0]) if ref.out_slice else (fan_in, fan_out)


_HALVING = {  # split op -> whether its size argument cuts `F + F` features in two halves
    aten.chunk.default: lambda parts, F: parts == 2,
    aten.split.Tensor: lambda parts, F: parts == F,
    aten.split_with_sizes.default: lambda parts, F: list(parts) == [F, F],
}


def _fused_halves(projections: dict[fx.Node, LinearRef]) -> dict[fx.Node, LinearRef]:
    """{getitem: LinearRef of that half} for every projection split in two along its features, as
    `gate, up = proj(x).chunk(2, dim=-1)` (Phi-3's gate_up_proj)."""
    halves = {}
    for node, ref in projections.items():
        split, out = next(iter(node.users), None), node.meta.get("val")
        if len(node.users) != 1 or split.target not in _HALVING or not isinstance(out, torch.Tensor):
            continue
        F, dim = out.shape[-1] // 2, split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        items = {u.args[1]: u for u in split.users if u.target is operator.getitem}
        if dim in (-1, out.dim() - 1) and isinstance(F, int) and out.shape[-1] == 2 * F \
                and _HALVING[split.target](split.args[1], F) and sorted(items) == [0, 1] and len(split.users) == 2:
            halves.update((item, replace(ref, out_slice=(i * F, (i + 1) * F))) for i, item in items.items())
    return halves


def _is_tensor(node: fx.Node) -> bool:
    if node.op in ("get_attr", "output") or node.target is _ASSERT_META:
        return False
    val = node.meta.get("val")
    if val is None:
        return node.op == "call_function"  # unknown: assume a tensor, as most ops return one
    if isinstance(val, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def _dataflow(graph: fx.Graph) -> nx.DiGraph:
    """Edges producer -> user between tensor-valued nodes; parameters and SymInts left out,
    so a walk cannot jump between layers through a shared weight or a sym_size."""
    dg = nx.DiGraph()
    for node in graph.nodes:
        if _is_tensor(node):
            dg.add_node(node)
            dg.add_edges_from((node, user) for user in node.users if _is_tensor(user))
    return dg


def _last_dim(node: object) -> object:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def _is_elementwise(node: fx.Node) -> bool:
    """Elementwise, view-like (keeping the feature dim) or dropout: allowed inside an FFN."""
    if node.op != "call_function":
        return False
    if node.target in dropout_targets:
        return True
    if node.target in _VIEW_LIKE:
        before, after = _last_dim(node.args[0]), _last_dim(node)
        return before is not None and before == after
    tags = getattr(node.target, "tags", ())
    return torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags


def _op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    return str(node.target) if isinstance(node.target, torch._ops.OpOverload) else node.target.__name__


def _non_elementwise_ops(inner: set[fx.Node], order: dict[fx.Node, int]) -> str:
    """'non-elementwise op aten.split.Tensor, ...' in graph order, or '' when every op is allowed."""
    names = dict.fromkeys(_op_name(n) for n in sorted(inner, key=order.__getitem__) if not _is_elementwise(n))
    plural = "s" if len(names) > 1 else ""
    return f"non-elementwise op{plural} {', '.join(names)} between the projections" if names else ""


def _walk(dg: nx.DiGraph, source: fx.Node, projections: dict, *, elementwise_only: bool) -> dict[fx.Node, int]:
    """Bounded BFS forward from `source`: node -> hops. Stops at (but records) other projections."""
    hops = {source: 0}
    queue = deque([source])
    while queue and len(hops) < _MAX_VISITED:
        node = queue.popleft()
        if hops[node] >= _MAX_HOPS or (node is not source and node in projections):
            continue
        for user in dg.successors(node):
            if user in hops or (elementwise_only and user not in projections and not _is_elementwise(user)):
                continue
            hops[user] = hops[node] + 1
            queue.append(user)
    return hops


class _Rejected(Exception):
    """A candidate region is not an FFN; the message says why."""


class _UnknownActivation(_Rejected):
    """A region shaped as an FFN (one entry, one exit, H -> F -> H) whose activation tedfx cannot convert."""


@dataclass(frozen=True)
class _Candidate:
    """A rejected region, for the error message."""

    sources: tuple[fx.Node, ...]
    target: fx.Node
    hops: int
    reason: str


def _inner_nodes(dg: nx.DiGraph, sources: list[fx.Node], target: fx.Node,
                 walks: dict[fx.Node, dict[fx.Node, int]], projections: dict) -> set[fx.Node]:
    """Nodes on the walked paths from `sources` to `target`, excluding both ends."""
    visited = set().union(*(walks[s] for s in sources))
    keep = {n for n in visited if n not in projections} | set(sources) | {target}
    return nx.ancestors(dg.subgraph(keep), target) - set(sources)


def _entry_of(ref: LinearRef, sources: set[fx.Node]) -> tuple[fx.Node, list[fx.Node]]:
    """The tensor a projection reads, looking through Conv1D's flattening view: (entry, pre-views)."""
    x = _data_input(ref)
    if (ref.node.target is not aten.linear.default and x.op == "call_function" and x.target in _RESHAPES
            and set(x.users) <= sources):
        return x.args[0], [x]
    return x, []


def _exit_of(ref: LinearRef, entry: fx.Node) -> fx.Node:
    """fc2's node, or the view after it that restores the entry's rank (Conv1D's unflatten)."""
    node = ref.node
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _RESHAPES:
        entry_val, out_val, view_val = (n.meta.get("val") for n in (entry, node, users[0]))
        if all(isinstance(v, torch.Tensor) for v in (entry_val, out_val, view_val)) \
                and view_val.dim() == entry_val.dim() != out_val.dim():
            return users[0]
    return node


def _check_single_entry_single_exit(region: list[fx.Node], entry: fx.Node, exit_node: fx.Node) -> None:
    """Inside users only (but at the exit); inputs from the region, the entry, parameters or SymInts."""
    members = set(region)
    for node in region:
        if node is not exit_node:
            for user in node.users:
                if user not in members:
                    raise _Rejected(f"region has outside users at node {node.name} ({_op_name(node)} "
                                    f"is also read by {user.name})")
        for arg in node.all_input_nodes:
            if arg not in members and arg is not entry and arg.op != "get_attr" and _is_tensor(arg):
                raise _Rejected(f"node {node.name} ({_op_name(node)}) reads {arg.name}, a tensor computed "
                                f"outside the region (a second entry)")


def _evaluate(gm: fx.GraphModule, inner: list[fx.Node], env: dict[fx.Node, torch.Tensor],
              out: fx.Node) -> tuple[torch.Tensor, float]:
    """Run the activation subgraph on test tensors: (value of `out`, dropout p seen)."""
    dropout_p = 0.0

    def value(arg: fx.Node) -> object:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":
            tensor = get_by_target(gm, arg.target)
            if isinstance(tensor, nn.Parameter):
                # Experts keep the projections' weights and biases only: a trained tensor between them (a
                # separate bias, a learned scale) would be dropped, whatever value it holds now.
                raise _UnknownActivation(f"the activation reads the parameter {arg.target}, which the experts "
                                         f"cannot keep (only the projections' weights and biases are copied)")
            tensor = tensor.detach()
            return tensor.double() if tensor.is_floating_point() else tensor
        raise _UnknownActivation(f"activation reads {arg.name} ({_op_name(arg)}), which it cannot be evaluated "
                                 f"without")

    for node in inner:
        if node.target in dropout_targets:
            dropout_p = max(dropout_p, float(node.args[1]))
            env[node] = env[node.args[0]]
        elif node.target in _VIEW_LIKE:
            env[node] = env[node.args[0]]
        else:
            try:
                env[node] = node.target(*fx.node.map_arg(node.args, value), **fx.node.map_arg(node.kwargs, value))
            except _Rejected:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means "not an activation we know"
                raise _UnknownActivation(f"activation could not be evaluated at {node.name}: "
                                         f"{type(e).__name__}: {e}") from e
    return env[out], dropout_p


def _classify(gm: fx.GraphModule, sources: list[fx.Node], inner: list[fx.Node], out: fx.Node,
              ffn_dim: int) -> tuple[str, list[fx.Node], float]:
    """Name the activation numerically: (activation, sources reordered as [gate, up] or [fc1], dropout p)."""
    g = torch.Generator().manual_seed(0)
    # Rows of an even sweep and of random values, wide enough to tell gelu from gelu_tanh.
    a = torch.cat([torch.linspace(-6, 6, 2 * ffn_dim, dtype=torch.float64).view(2, ffn_dim),
                   4 * torch.randn(2, ffn_dim, generator=g, dtype=torch.float64)])
    b = 2 * torch.randn(a.shape, generator=g, dtype=torch.float64)
    env = dict(zip(sources, (a, b)))
    got, dropout_p = _evaluate(gm, inner, env, out)
    if not isinstance(got, torch.Tensor) or got.shape != a.shape:
        raise _UnknownActivation("unknown activation (the subgraph does not map the inner tensor elementwise)")

    # An MLP computes act(a); a GLU act(a) * b or act(b) * a, which also says which source is the gate.
    for name, act in ACTIVATIONS.items():
        for expected, ordered in ([(act(a), sources)] if len(sources) == 1 else
                                  [(act(a) * b, sources), (act(b) * a, sources[::-1])]):
            if (got - expected).abs().max() <= _ATOL + 1e-6 * expected.abs().max():
                return name, ordered, dropout_p
    computed = "act(x)" if len(sources) == 1 else "act(gate) * up"
    raise _UnknownActivation(f"unknown activation: the ops between the projections compute {computed} for no "
                             f"act in {', '.join(ACTIVATIONS)}")


def _describe(node: fx.Node) -> str:
    path = module_path(node)
    return f"{path} ({node.name})" if path else node.name


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _match(gm: fx.GraphModule, dg: nx.DiGraph, sources: list[fx.Node], target: fx.Node,
           walks: dict, projections: dict[fx.Node, LinearRef], order: dict[fx.Node, int]) -> FFNMatch:
    """Build and check the region from `sources` to `target`; raises _Rejected with the reason."""
    if len(sources) > 2:
        names = ", ".join(s.name for s in sources)
        raise _Rejected(f"{len(sources)} projections ({names}) feed it elementwise; an MLP has 1, a GLU 2")
    # 1. The region's nodes: Conv1D views around the projections, the projections, what lies between.
    inner = _inner_nodes(dg, sources, target, walks, projections)
    entries, pre_views = set(), []
    for s in sources:
        entry, views = _entry_of(projections[s], set(sources))
        entries.add(entry)
        pre_views += views + _fused_nodes(projections[s], s)
    if len(entries) != 1:
        raise _Rejected("the two projections read different tensors (a GLU's gate and up read the same input)")
    entry = entries.pop()
    exit_node = _exit_of(projections[target], entry)
    members = set(pre_views) | set(sources) | inner | {target, exit_node}
    members |= {u for n in members for u in n.users if u.target is _ASSERT_META}  # checks of region tensors
    region = sorted(members, key=order.__getitem__)
    # 2. Only elementwise ops between the projections, one way in, one way out.
    blocking = _non_elementwise_ops(inner, order)
    if blocking:
        raise _Rejected(blocking)
    _check_single_entry_single_exit(region, entry, exit_node)
    # 3. Shapes: H -> F -> H, gate and up alike.
    hidden, ffn = _in_out(gm, projections[sources[0]])
    shapes = [_in_out(gm, projections[n]) for n in (*sources, target)]  # (in, out) each
    if shapes != [(hidden, ffn)] * len(sources) + [(ffn, hidden)]:
        raise _Rejected(f"projection shapes (in, out) {shapes} do not chain H -> F -> H")
    # 4. The activation, and for a GLU which projection is the gate.
    inner_in_order = [n for n in region if n in inner]
    activation, ordered, dropout_p = _classify(gm, sources, inner_in_order, _data_input(projections[target]), ffn)
    refs = [projections[s] for s in ordered]
    return FFNMatch(
        index=-1, path=_common_path([r.weight.rpartition(".")[0] for r in (*refs, projections[target])]),
        kind="glu" if len(refs) == 2 else "mlp", activation=activation, hidden_dim=hidden, ffn_dim=ffn,
        entry=entry, exit=exit_node, nodes=tuple(region),
        fc1=refs[0], fc2=projections[target], up=refs[1] if len(refs) == 2 else None, dropout_p=dropout_p,
    )


def find_ffns(gm: fx.GraphModule) -> list[FFNMatch]:
    """Find every FFN block (MLP or GLU) of a captured graph.

    Args:
        gm: a GraphModule in the ATen training IR (from `tedfx.capture`).

    Returns:
        One `FFNMatch` per FFN, in graph order (`index` 0, 1, ...).

    Raises:
        NoFFNFoundError: the graph has no FFN; the message lists the patterns
            searched and the nearest rejected candidates with the reason for each.

    Example:
        >>> gm = capture(model, (tokens,))
        >>> [(m.path, m.kind, m.activation) for m in find_ffns(gm)]
        [('h.0.mlp', 'mlp', 'gelu'), ('h.1.mlp', 'mlp', 'gelu')]
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    projections = {n: ref for n in gm.graph.nodes if (ref := _projection(gm, n)) is not None}
    projections.update(_fused_halves(projections))
    dg = _dataflow(gm.graph)

    # 1. Feeders: projections that reach another one through elementwise ops only.
    walks = {p: _walk(dg, p, projections, elementwise_only=True) for p in projections}
    feeders: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for source, hops in walks.items():
        for node in hops:
            if node is not source and node in projections:
                feeders[node].append(source)

    # 2. Each fed projection is a candidate down projection.
    matches: list[FFNMatch] = []
    rejected: list[_Candidate] = []
    left_dense: list[_Candidate] = []  # shaped as FFNs, not convertible: loud when other FFNs convert
    claimed: set[fx.Node] = set()
    for target in sorted(feeders, key=order.__getitem__):
        sources = sorted(feeders[target], key=order.__getitem__)
        hops = max(walks[s][target] for s in sources)
        try:
            match = _match(gm, dg, sources, target, walks, projections, order)
        except _Rejected as e:
            rejected.append(_Candidate(tuple(sources), target, hops, str(e)))
            if isinstance(e, _UnknownActivation):
                left_dense.append(rejected[-1])
            continue
        if claimed & set(match.nodes):
            rejected.append(_Candidate(tuple(sources), target, hops, "overlaps an FFN already matched"))
            continue
        claimed |= set(match.nodes)
        matches.append(match)

    for c in rejected:
        log.debug("find_ffns: rejected %s -> %s: %s", [s.name for s in c.sources], c.target.name, c.reason)
    if not matches:
        raise NoFFNFoundError(_no_ffn_message(dg, projections, order, rejected))
    if left_dense:
        warnings.warn(_left_dense_message(left_dense, len(matches)), stacklevel=2)
    matches.sort(key=lambda m: order[m.nodes[0]])
    return [replace(m, index=i) for i, m in enumerate(matches)]


def find_ffns_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Record the FFNs of `gm` in `ctx.records.ffns` (and the matches for ffn_to_moe).

    The graph is unchanged but for `x @ W.T` projections, folded into aten.linear first
    (`graph.fold_transposed_linears`; tedfx's own captures have them folded already).

    Example:
        >>> ctx = PassContext(moe=MoEConfig())
        >>> gm = run_passes(gm, [find_ffns_pass], ctx=ctx)
        >>> [f.path for f in ctx.records.ffns]
        ['h.0.mlp', 'h.1.mlp']
    """
    fold_transposed_linears(gm)
    matches = find_ffns(gm)
    ctx.records.ffn_matches = matches
    ctx.records.ffns = [m.info() for m in matches]
    return gm


def _left_dense_message(left: list[_Candidate], found: int) -> str:
    """Which FFN-shaped regions stay dense while others convert, why, and what to do."""
    lines = [f"find_ffns converts {found} FFN block(s) but leaves {len(left)} FFN-shaped region(s) dense; they "
             f"are not counted in MoEConfig.layers indices and hold no MoE block:"]
    for c in left:
        lines.append(f"  - {' + '.join(_describe(s) for s in c.sources)} -> {_describe(c.target)}: {c.reason}")
    lines.append(f"What to do: write the activation as one of {', '.join(ACTIVATIONS)} with nothing trained between "
                 f"the projections (a bias belongs in the first projection), or accept these blocks staying dense.")
    return "\n".join(lines)


def _no_ffn_message(dg: nx.DiGraph, projections: dict[fx.Node, LinearRef], order: dict[fx.Node, int],
                    rejected: list[_Candidate]) -> str:
    """Expected patterns, what was found nearby, and what to do."""
    acts = ", ".join(ACTIVATIONS)
    lines = [
        f"find_ffns found no FFN block in this graph ({len(projections)} projections: aten.linear, "
        f"aten.addmm, aten.mm or aten.matmul with a parameter weight).",
        "Searched for single-entry single-exit regions of these patterns:",
        f"  - MLP: linear -> act -> [dropout] -> linear, act one of {acts}",
        f"  - GLU: act(linear_gate(x)) * linear_up(x) -> linear_down, act one of {acts}",
    ]
    candidates = rejected + _path_candidates(dg, projections, order, rejected)
    candidates.sort(key=lambda c: (c.hops, order[c.target]))
    if candidates:
        lines.append("Nearest candidates, and why each was rejected:")
        for c in candidates[:_REPORTED_CANDIDATES]:
            sources = " + ".join(_describe(s) for s in c.sources)
            lines.append(f"  - {sources} -> {_describe(c.target)}, {c.hops} ops apart: {c.reason}")
        if len(candidates) > _REPORTED_CANDIDATES:
            lines.append(f"  ... and {len(candidates) - _REPORTED_CANDIDATES} more")
    elif projections:
        lines.append("No two projections are connected by a path of at most "
                     f"{_MAX_HOPS} ops, so no candidate region exists.")
    lines.append(
        "What to do: give tedfx a model with FFN blocks of that shape; if it has them, make sure only "
        "elementwise ops (and dropout) sit between the projections, that the activation is one of those "
        "listed, and that no tensor inside the FFN is used outside it."
    )
    return "\n".join(lines)


def _path_candidates(dg: nx.DiGraph, projections: dict[fx.Node, LinearRef], order: dict[fx.Node, int],
                     rejected: list[_Candidate]) -> list[_Candidate]:
    """Pairs of projections joined by a short path through any op, with the non-elementwise ops on it."""
    seen = {(s, c.target) for c in rejected for s in c.sources}  # already explained
    candidates = []
    for source in projections:
        hops = _walk(dg, source, projections, elementwise_only=False)
        for target, distance in hops.items():
            if target is source or target not in projections or (source, target) in seen \
                    or projections[target].out_slice:  # half of a fused projection: not a down projection
                continue
            inner = _inner_nodes(dg, [source], target, {source: hops}, projections)
            reason = _non_elementwise_ops(inner, order) or "no elementwise path between the projections"
            candidates.append(_Candidate((source,), target, distance, reason))
    return candidates
