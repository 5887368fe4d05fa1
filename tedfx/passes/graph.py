"""The graph's rules: what the passes write into a graph and read back (docs/architecture.md, "The graph's rules").

Everything one pass leaves for another lives here, so no pass imports another
for a constant:

- node.meta keys: `MOE_META` tags every node of an MoE block with its FFN
  path, its `Role` and the FFN's index; `FFN_EXIT_META` marks the exit of
  every FFN, converted or not; `DENSE_FFN_META` marks the projections of an
  FFN that stayed dense; `REGION_META` names the checkpointed region a node is
  recomputed in; `DROPOUT_P_META` keeps an attention's
  captured dropout probability.
- `Role`: what each node of an MoE block does; `Axis`: the mesh axes.
- `moe_blocks(graph)`: every MoE block's nodes by role.
- `as_linear(node)`: the one recogniser of "a linear" (aten.linear, HF Conv1D's
  addmm, mm/matmul by a weight).
- `insert(...)`: create a node next to another, copying its metadata.
- `get_by_target` / `set_by_target` / `has_target`: a module's attribute by dotted name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..axes import GROUP_AXES, MESH_AXES, Axis
from ..capture import DROPOUT_P_META

__all__ = [
    "Axis", "DENSE_FFN_META", "DROPOUT_P_META", "FFN_EXIT_META", "GROUP_AXES", "Linear", "MESH_AXES", "MOE_META",
    "MoETag", "REGION_META", "Role",
    "as_linear", "fold_transposed_linears", "get_by_target", "has_target", "insert", "module_path", "moe_blocks",
    "set_by_target",
]

aten = torch.ops.aten

MOE_META = "tedfx_moe"
"""node.meta key on every node of an MoE block: a `MoETag`."""
FFN_EXIT_META = "tedfx_ffn_exit"
"""node.meta key on the node whose value leaves an FFN (an MoE block's unflatten_tokens, or a dense FFN's exit:
its last projection, or the view after it for HF Conv1D): the FFN's module path. Written by ffn_to_moe for
every FFN of the model; activation checkpointing finds the transformer blocks from these exits."""
DENSE_FFN_META = "tedfx_dense_ffn"
"""node.meta key on the projections of an FFN that find_ffns found and MoEConfig.layers left dense: its path."""
REGION_META = "tedfx_region"
"""node.meta key: the name of the checkpointed region a node is recomputed in."""


class Role(StrEnum):
    """What a node of an MoE block does: written by ffn_to_moe, shard_experts and drop_duplicate_tokens."""

    FLATTEN_TOKENS = "flatten_tokens"
    ROUTER = "router"
    EXPERT = "expert"
    """The router plan's expert index of each choice (a getitem)."""
    SLOT = "slot"
    GATE = "gate"
    CAPACITY = "capacity"
    LOSS = "loss"
    LOADS = "loads"
    """Dropless only: rows per expert of the packed layout (ops.expert_loads)."""
    DISPATCH = "dispatch"
    WEIGHT = "weight"
    """A get_attr of a stacked expert tensor; moe_blocks keys it by its name ("w1", "b2", ...)."""
    EXPERT_FC1 = "expert_fc1"
    EXPERT_DROPOUT = "expert_dropout"
    EXPERT_FC2 = "expert_fc2"
    EXPERT_BIAS = "expert_bias"
    COMBINE = "combine"
    ATTACH_AUX_LOSS = "attach_aux_loss"
    UNFLATTEN_TOKENS = "unflatten_tokens"
    # Inserted by shard_experts.
    AGREE_CAPACITY = "agree_capacity"
    EXCHANGE_LOADS = "exchange_loads"
    """Packed dropless: the rows each rank will receive per local expert (an int all-to-all)."""
    LOCAL_LOADS = "local_loads"
    A2A_DISPATCH = "a2a_dispatch"
    EXPERTS_IN = "experts_in"
    TP_F = "tp_f"
    """Megatron's f before the column-parallel expert FC1 (identity forward, all-reduce backward)."""
    TP_REDUCE = "tp_reduce"
    EXPERTS_OUT = "experts_out"
    A2A_COMBINE = "a2a_combine"
    # Inserted by chunk_all_to_all.
    A2A_CHUNK = "a2a_chunk"
    """A chunk of the capacity dim taken from the dispatch buffer, or the chunks joined for the combine."""
    A2A_DISPATCH_WAIT = "a2a_dispatch_wait"
    A2A_COMBINE_WAIT = "a2a_combine_wait"
    # Inserted by drop_duplicate_tokens.
    DTD_SLICE = "dtd_slice"
    DTD_GATHER = "dtd_gather"
    DTD_REDUCE_SCATTER = "dtd_reduce_scatter"
    DTD_BIAS_GRAD = "dtd_bias_grad"
    DTD_GATHER_OUT = "dtd_gather_out"


@dataclass(frozen=True)
class MoETag:
    """node.meta[MOE_META]: the MoE block a node belongs to and its role there."""

    path: str
    """Module path of the converted FFN, e.g. "h.1.mlp"."""
    role: Role
    index: int
    """The FFN's index among the model's FFNs."""


def moe_blocks(graph: fx.Graph) -> dict[str, dict[str, fx.Node]]:
    """Every MoE block's nodes, {ffn path: {role: node}}; expert weights by their name ("w1", "b2", ...)."""
    blocks: dict[str, dict[str, fx.Node]] = {}
    for node in graph.nodes:
        tag = node.meta.get(MOE_META)
        if tag is not None:
            role = node.target.rsplit(".", 1)[1] if node.op == "get_attr" else tag.role
            blocks.setdefault(tag.path, {}).setdefault(role, node)
    return blocks


# --- linears -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """A projection by a weight the graph reads with get_attr."""

    node: fx.Node
    """The aten.linear / aten.addmm / aten.mm / aten.matmul node."""
    x: fx.Node
    """The projected input."""
    weight: fx.Node
    """get_attr of the weight."""
    bias: fx.Node | None
    """get_attr of the bias (aten.linear, addmm); None when there is none or it is computed."""
    transposed: bool
    """True when the weight is stored [in, out] (addmm, mm, matmul); False for nn.Linear's [out, in]."""


def _get_attr(arg: Any) -> fx.Node | None:
    return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def as_linear(node: fx.Node) -> Linear | None:
    """The `Linear` of `node` when it multiplies by a get_attr weight, else None.

    Recognised: `aten.linear(x, w[, b])`; HF Conv1D's `aten.addmm(b, x, w)`; and
    `aten.mm(x, w)` / `aten.matmul(x, w)` with a weight stored [in, out]. A bias
    that is not a get_attr (computed) leaves `bias` None only when there is none:
    such a node is not a linear.
    """
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        x, w = node.args[0], _get_attr(node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        b = _get_attr(bias_arg)
        if w is None or (bias_arg is not None and b is None):
            return None
        return Linear(node, x, w, b, transposed=False)
    if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        b, x, w = node.args[0], node.args[1], _get_attr(node.args[2])
        if w is None or _get_attr(b) is None:
            return None
        return Linear(node, x, w, b, transposed=True)
    if node.target in (aten.mm.default, aten.matmul.default) and not node.kwargs:
        w = _get_attr(node.args[1])
        return Linear(node, node.args[0], w, None, transposed=True) if w is not None else None
    return None


_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default)


def _transposed_weight(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The get_attr of a 2-D module tensor that `node` transposes (`W.T`, `W.t()`, `W.transpose(0, 1)`,
    `W.permute(1, 0)`), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    w = _get_attr(node.args[0])
    if w is None or getattr(get_by_target(gm, w.target), "ndim", -1) != 2:
        return None
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] != [1, 0]:
        return None
    return w


def fold_transposed_linears(gm: fx.GraphModule) -> int:
    """Rewrite `x @ W.T` (+ a 1-D bias) into `aten.linear(x, W[, b])`, the IR's one form of such a projection.

    Some models project without F.linear (HF Falcon's FalconLinear: `input @ self.weight.T + self.bias`);
    after this every pass reads them as linears (`as_linear`), so their FFNs convert and tensor
    parallelism splits them like any other (docs/architecture.md, "One IR"). A transpose that other nodes
    also read stays for them. Returns the number of projections folded.
    """
    graph, folded = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.matmul.default, aten.mm.default) or node.kwargs:
            continue
        x, wt = node.args
        w = _transposed_weight(gm, wt)
        if w is None or not isinstance(x, fx.Node):
            continue
        out, bias = node, None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target is aten.add.Tensor \
                and not users[0].kwargs and len(users[0].args) == 2:
            other = users[0].args[1] if users[0].args[0] is node else users[0].args[0]
            b = _get_attr(other)
            weight, value = get_by_target(gm, w.target), get_by_target(gm, b.target) if b is not None else None
            # aten.linear takes one dtype: a bias of another (promoted by the add) stays an add of its own.
            if isinstance(value, torch.Tensor) and value.shape == (weight.shape[0],) and value.dtype == weight.dtype:
                out, bias = users[0], b
        with graph.inserting_before(out):
            linear = graph.call_function(aten.linear.default, (x, w) if bias is None else (x, w, bias))
        linear.meta = dict(node.meta)
        if "val" in out.meta:
            linear.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(linear)
        for dead in dict.fromkeys((out, node, wt)):
            if not dead.users:
                graph.erase_node(dead)
        folded += 1
    if folded:
        gm.recompile()
    return folded


# --- editing -----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Graph arguments must print as Python source: an Axis or Role becomes its string."""
    if isinstance(value, StrEnum):
        return str(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def insert(
    anchor: fx.Node,
    target: Callable[..., Any] | str,
    args: tuple | list,
    kwargs: dict[str, Any] | None = None,
    *,
    before: bool = False,
    op: str = "call_function",
    like: fx.Node | None = None,
    role: Role | None = None,
    tag: MoETag | None = None,
) -> fx.Node:
    """A new node right after (or `before`) `anchor`, with the metadata of `like` (default: the anchor).

    The node gets `like`'s `nn_module_stack`. With `role`, it joins `like`'s MoE block under
    that role (or the block `tag` names, when `like` belongs to none).

    Example:
        >>> y = insert(fc2, collectives.all_reduce, (fc2, Axis.TP), role=Role.TP_REDUCE)
    """
    graph = anchor.graph
    like = like if like is not None else anchor
    with graph.inserting_before(anchor) if before else graph.inserting_after(anchor):
        node = graph.create_node(op, target, tuple(_plain(a) for a in args),
                                 {k: _plain(v) for k, v in (kwargs or {}).items()})
    node.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack") or {})
    if role is not None:
        base = tag or like.meta.get(MOE_META)
        if base is None:
            raise RuntimeError(f"insert(role={role!s}): {like.name} belongs to no MoE block; pass tag=MoETag(...).")
        node.meta[MOE_META] = MoETag(base.path, role, base.index)
    return node


def module_path(node: fx.Node) -> str:
    """The innermost module of `node` (the last entry of its nn_module_stack), "" when unknown."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


# --- attributes by dotted name -------------------------------------------------------------------------


def get_by_target(module: nn.Module, target: str) -> Any:
    """`module.a.b.c` for target "a.b.c" (a parameter, buffer or submodule)."""
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def set_by_target(module: nn.Module, target: str, value: Any) -> None:
    """Set `module.a.b.c = value` for target "a.b.c" (a Parameter registers as one)."""
    owner, _, name = target.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, name, value)


def has_target(module: nn.Module, target: str) -> bool:
    """Whether `module` has the attribute path `target`."""
    obj: Any = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
