"""A GraphModule as a plain, JSON-serialisable list of nodes, and the coarser view a picture draws.

`summarize_graph` records the facts of every node (what it computes, which
module and MoE block it belongs to, which collective on which mesh axis, its
output shape); `display_graph` turns such a list into the boxes and arrows of
a picture a person can read: runs of plain aten ops collapse into one box per
module, while every MoE op, every collective and every sharded parameter keeps
its own box. `tedfx.viz` draws display graphs; neither step needs torch once
the summary exists, so a saved report can be drawn again anywhere.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Any, Iterable

import torch
import torch.fx as fx

from . import collectives
from ._compat import pytree
from .passes.checkpoint import CheckpointRegion
from .passes.ffn_to_moe import MOE_META

__all__ = ["COLLECTIVE_KINDS", "block_of", "display_graph", "summarize_graph"]

log = logging.getLogger(__name__)

COLLECTIVE_KINDS: dict[str, tuple[str, str]] = {
    "all_reduce": ("all-reduce", "-"),
    "identity_fwd_all_reduce_bwd": ("-", "all-reduce"),
    "all_to_all": ("all-to-all", "all-to-all"),
    "all_gather": ("all-gather", "reduce-scatter"),
    "reduce_scatter": ("reduce-scatter", "all-gather"),
    "slice_for_rank": ("slice", "all-gather"),
    "gather_replicated": ("all-gather", "slice"),
}
"""Every tedfx collective op: (what it does in the forward, what its backward does)."""

_COLLECTIVE_FNS = {getattr(collectives, kind): kind for kind in COLLECTIVE_KINDS}
_ROUTER_OUTPUTS = ("expert", "slot", "gate", "capacity", "loss")
"""MoE roles of the getitems that unpack the router's plan: drawn as part of the router."""


# --- summarize_graph -------------------------------------------------------------------------------


def summarize_graph(
    gm: fx.GraphModule,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    axes: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every node of `gm` as a JSON-serialisable dict, in graph order.

    Checkpointed regions (CheckpointRegion submodules) are expanded: their
    nodes appear in place of the call, named "<region>.<node>" and marked with
    the region, so a picture shows what is recomputed.

    Args:
        gm: a captured, MoE or rank graph.
        example_inputs: when given, `gm` runs once on them (no gradients, the
            global RNG untouched) and every node gets its concrete output shape
            and dtype; otherwise shapes come from node.meta["val"], which a
            sharded graph may not have updated.
        example_kwargs: keyword inputs of that run.
        axes: mesh axes to bind for that run, e.g. `tedfx.predict.simulated_axes(layout, rank)`.

    Returns:
        A list of dicts with keys: name, op, target (readable: "aten.linear",
        "tedfx.all_to_all", "router", ...), module (innermost nn_module_stack
        path), module_type, moe_path, moe_role, collective, axis, comm_forward,
        comm_backward, comm_bytes (what one rank sends, CommStats' convention),
        inputs (node names), shape, dtype, param, param_shape, param_split
        (["tp:0", ...]), param_chunks, param_full_shape, region. Absent facts are None.

    Example:
        >>> nodes = summarize_graph(tedfx.to_moe(model, (tokens,), moe=moe), (tokens,))
        >>> [n["target"] for n in nodes if n["moe_role"] == "dispatch"]
        ['moe.dispatch']
    """
    values: dict[str, tuple[list[int], str, int]] = {}
    if example_inputs is not None:
        try:
            _record_values(gm, example_inputs, example_kwargs or {}, axes or {}, values)
        except Exception as e:  # noqa: BLE001 - shapes are a nicety of the picture, never a reason to fail
            log.warning("tedfx: could not run %s to record shapes (%s: %s); showing captured shapes",
                        type(gm).__name__, type(e).__name__, e)
            values.clear()
    shards = _param_shards(gm)
    out: list[dict[str, Any]] = []
    outer_params = {n.target: n.name for n in gm.graph.nodes if n.op == "get_attr"}
    rename: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.name in rename:  # a getitem that unpacks an expanded region's outputs
            continue
        module = _called_module(gm, node)
        if isinstance(module, CheckpointRegion):
            _expand_region(gm, node, module, outer_params, rename, values, shards, out)
            continue
        out.append(_describe(gm, node, node.name, [rename.get(a.name, a.name) for a in node.all_input_nodes],
                             values, shards, region=None))
    return out


def _expand_region(gm, call: fx.Node, module: CheckpointRegion, outer_params: dict[str, str],
                   rename: dict[str, str], values, shards, out: list[dict[str, Any]]) -> None:
    """Inline a CheckpointRegion's nodes in place of its call (and of the getitems unpacking it)."""
    region = str(call.target)
    local: dict[str, str] = {}
    placeholders = [n for n in module.region.graph.nodes if n.op == "placeholder"]
    for ph, arg in zip(placeholders, call.args):
        local[ph.name] = rename.get(arg.name, arg.name) if isinstance(arg, fx.Node) else str(arg)
    for node in module.region.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for user in call.users:
                if user.target is operator.getitem and isinstance(user.args[1], int):
                    rename[user.name] = local[results[user.args[1]].name]
            continue
        if node.op == "get_attr" and node.target in outer_params:
            local[node.name] = outer_params[node.target]  # the rank graph reads the same parameter
            continue
        name = f"{region}.{node.name}"
        local[node.name] = name
        out.append(_describe(gm, node, name, [local[a.name] for a in node.all_input_nodes], values, shards,
                             region=region))


def _describe(gm, node: fx.Node, name: str, inputs: list[str], values, shards, *, region: str | None) -> dict:
    """One node's facts (see summarize_graph)."""
    stack = [v for v in (node.meta.get("nn_module_stack") or {}).values() if not str(v[0]).startswith("_")]
    module, module_type = stack[-1] if stack else ("", "")
    if node.op == "get_attr" and not module:  # parameters carry no stack: the module that owns them
        module = str(node.target).rpartition(".")[0]
    moe = node.meta.get(MOE_META) or {}
    d: dict[str, Any] = {
        "name": name, "op": node.op, "target": _readable_target(gm, node), "module": str(module),
        "module_type": str(module_type).rpartition(".")[2], "moe_path": moe.get("path"),
        "moe_role": moe.get("role"), "collective": None, "axis": None, "comm_forward": None,
        "comm_backward": None, "comm_bytes": None, "inputs": inputs, "shape": None, "dtype": None,
        "param": None, "param_shape": None, "param_split": None, "param_chunks": None,
        "param_full_shape": None, "region": region,
    }
    if name in values:
        d["shape"], d["dtype"], _ = values[name]
    else:
        d["shape"], d["dtype"] = _meta_shape(node)
    kind = _COLLECTIVE_FNS.get(node.target) if node.op == "call_function" else None
    if kind is not None:
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("axis")
        d.update(collective=kind, axis=str(axis), comm_forward=COLLECTIVE_KINDS[kind][0],
                 comm_backward=COLLECTIVE_KINDS[kind][1])
        # slice_for_rank sends only in its backward: the gradient of its (sliced) output.
        sent = name if kind == "slice_for_rank" else (inputs[0] if inputs else None)
        d["comm_bytes"] = values[sent][2] if sent in values else None
    if node.op == "get_attr":
        tensor = _resolve(gm, str(node.target))
        d["param"] = str(node.target)
        if isinstance(tensor, torch.Tensor):
            d["param_shape"] = list(tensor.shape)
            d["shape"], d["dtype"] = list(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        spec = shards.get(str(node.target))
        if spec is not None and spec.splits:
            d["param_split"] = [f"{axis}:{dim}" for axis, dim in spec.splits]
            d["param_chunks"] = list(spec.chunks) if spec.chunks else None
            d["param_full_shape"] = list(spec.full_shape)
    return d


def _readable_target(gm, node: fx.Node) -> str:
    """"aten.linear", "tedfx.all_to_all", "moe.dispatch", "router", "getitem", a parameter's name."""
    target = node.target
    if node.op == "call_module":
        role = (node.meta.get(MOE_META) or {}).get("role")
        module = _called_module(gm, node)
        return role or (type(module).__name__ if module is not None else str(target))
    if node.op != "call_function":
        return str(target)
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
        return f"{packet._qualified_op_name.replace('::', '.')}"
    if target in _COLLECTIVE_FNS:
        return f"tedfx.{_COLLECTIVE_FNS[target]}"
    module_name = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    if module_name.startswith("tedfx.moe"):
        return f"moe.{name}"
    if module_name in ("_operator", "operator", "builtins") or not module_name:
        return name
    return f"{module_name}.{name}"


def _called_module(gm, node: fx.Node):
    """The submodule a call_module node calls (None for other nodes)."""
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _resolve(gm, target: str) -> Any:
    """The attribute a get_attr target names, or None."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _param_shards(gm) -> dict[str, Any]:
    """{parameter name: ParamShard} of a rank graph (one built by the parallel passes), else {}."""
    ctx = getattr(gm, "meta", {}).get("tedfx_ctx")
    if ctx is None or getattr(ctx, "parallel", None) is None:
        return {}
    from .compiler import param_shards  # the pipeline module; imported only for rank graphs

    return param_shards(gm, ctx)


def _meta_shape(node: fx.Node) -> tuple[list | None, str | None]:
    """Shape and dtype from node.meta["val"], as captured (symbolic sizes as their names)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None, None
    return [int(s) if isinstance(s, int) else str(s) for s in val.shape], str(val.dtype).removeprefix("torch.")


class _ValueRecorder(fx.Interpreter):
    """Runs a graph and keeps (shape, dtype, bytes) of every tensor a node produces, by summary name."""

    def __init__(self, gm: fx.GraphModule, values: dict, prefix: str = "") -> None:
        super().__init__(gm)
        self.values, self.prefix = values, prefix

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.values[self.prefix + n.name] = (list(result.shape), str(result.dtype).removeprefix("torch."),
                                                 result.numel() * result.element_size())
        return result

    def call_module(self, target, args, kwargs) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, CheckpointRegion):  # run the region's own nodes, so they get shapes too
            return _ValueRecorder(module.region, self.values, f"{target}.").run(*args, enable_io_processing=False)
        return super().call_module(target, args, kwargs)


def _record_values(gm, example_inputs, example_kwargs, axes, values) -> None:
    """Run `gm` once on the example inputs, flattened the way its forward flattens them."""
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None and in_spec.num_children == 2 and example_kwargs:
        keys = in_spec.children_specs[1].context  # export's (args, kwargs) spec: kwargs in its key order
        example_kwargs = {k: example_kwargs[k] for k in keys}
    flat = pytree.tree_leaves((tuple(example_inputs), dict(example_kwargs)))
    with torch.random.fork_rng(devices=[]), torch.no_grad(), collectives.bind_axes(axes):
        _ValueRecorder(gm, values).run(*flat, enable_io_processing=False)


# --- display_graph ---------------------------------------------------------------------------------


def block_of(module: str) -> str | None:
    """The transformer block a module path sits in: its longest prefix ending in an index ("h.0.attn" -> "h.0")."""
    parts = module.split(".") if module else []
    for i in range(len(parts), 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return None


def _group_key(module: str) -> str:
    """Plain ops collapse per block child ("h.0.attn.c_attn" -> "h.0.attn"); outside blocks, per run."""
    block = block_of(module)
    if block is None:
        return ""
    rest = module[len(block):].lstrip(".")
    return f"{block}.{rest.split('.')[0]}" if rest else block


def display_graph(
    nodes: list[dict[str, Any]],
    *,
    collapse: bool = True,
    expand: Iterable[str] = (),
    block: str | None = None,
    max_blocks: int | None = None,
) -> list[dict[str, Any]]:
    """The boxes of a picture of a summarized graph, in graph order.

    Args:
        nodes: a `summarize_graph` list.
        collapse: merge each run of consecutive plain ops of one module (a block
            child such as "h.0.attn", or a top-level module) into one box. MoE ops,
            collectives, sharded parameters, inputs and outputs always get their own.
        expand: module paths whose plain ops are drawn one by one anyway.
        block: draw only this transformer block ("h.0"); its inputs from outside
            become "from ..." boxes.
        max_blocks: draw at most this many transformer blocks; the later ones
            become one box that counts what they hold.

    Returns:
        Dicts with keys id, kind ("io", "op", "group", "moe", "collective",
        "param", "ref", "elided"), lines (text, first line the title), axis,
        block, moe_path, module, region, split (a parameter's ["tp:0", ...]), members
        (summary node names) and inputs (ids).
    """
    expand = tuple(expand)
    shown: dict[str, str | None] = {}
    items: list[dict[str, Any]] = []
    open_group: dict[str, Any] | None = None
    used = {i for n in nodes for i in n["inputs"]}
    for n in nodes:
        kind = _kind(n, collapse, expand, used)
        if kind == "hidden":
            shown[n["name"]] = None
            continue
        if kind == "alias":  # the router's unpacked plan: drawn as the router
            shown[n["name"]] = shown.get(n["inputs"][0]) if n["inputs"] else None
            continue
        key = _group_key(n["module"]) if kind == "group" else None
        if kind == "group" and open_group is not None and (open_group["key"], open_group["region"]) == (
                key, n["region"]):
            open_group["members"].append(n)
            shown[n["name"]] = open_group["id"]
            continue
        item = {"id": n["name"], "kind": kind, "key": key, "members": [n], "region": n["region"],
                "moe_path": n["moe_path"] if kind != "group" else None,
                "block": block_of(n["moe_path"] or key or n["module"]), "axis": n["axis"], "module": n["module"],
                "split": n["param_split"]}
        items.append(item)
        shown[n["name"]] = item["id"]
        if kind != "param":  # parameters are read where they are used: they do not end a run
            open_group = item if kind == "group" else None
    for item in items:
        ids = [shown.get(i) for m in item["members"] for i in m["inputs"]]
        item["inputs"] = list(dict.fromkeys(i for i in ids if i is not None and i != item["id"]))
        item["lines"] = _lines(item)
        item["members"] = [m["name"] for m in item["members"]]
        del item["key"]
    if max_blocks is not None:
        items = _elide_blocks(items, max_blocks)
    if block is not None:
        items = _only_block(items, block)
    return items


def _kind(n: dict[str, Any], collapse: bool, expand: tuple[str, ...], used: set[str]) -> str:
    """How a summary node is drawn: its own box ("io", "param", "collective", "moe", "op"), merged into a
    "group", drawn as its input ("alias"), or not at all ("hidden")."""
    if n["op"] in ("placeholder", "output"):
        return "io"
    if n["op"] == "get_attr":
        if n["name"] not in used or (collapse and not n["param_split"]):
            return "hidden"
        return "param"
    if n["target"] == "GuardsFn" or n["target"].startswith(("aten.sym_", "aten._assert")):
        return "hidden"  # export's input guards, shape arithmetic and metadata assertions
    if n["collective"]:
        return "collective"
    if n["moe_role"] in _ROUTER_OUTPUTS and n["target"] == "getitem":
        return "alias"
    if n["moe_role"]:
        return "moe"
    if not collapse or any(n["module"] == p or n["module"].startswith(p + ".") for p in expand):
        return "op"
    return "group"


def _short(target: str) -> str:
    return target.rpartition(".")[2]


def _fmt_shape(n: dict[str, Any]) -> str:
    if n["shape"] is None:
        return ""
    return "[" + ",".join(str(s) for s in n["shape"]) + "]"


def _fmt_bytes(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int64": "i64", "int32": "i32"}


def _lines(item: dict[str, Any]) -> list[str]:
    """A box's text: its title, then what a reader needs to know about it."""
    members, kind = item["members"], item["kind"]
    n = members[-1]
    if kind == "io":
        return [f"input {n['name']}" if n["op"] == "placeholder" else "output", _fmt_shape(n)]
    if kind == "collective":
        sent = f" · {_fmt_bytes(n['comm_bytes'])}" if n["comm_bytes"] is not None else ""
        dtype = _DTYPES.get(n["dtype"], n["dtype"] or "")
        return [f"{n['collective']} ({n['axis']})", f"fwd {n['comm_forward']} · bwd {n['comm_backward']}",
                f"{_fmt_shape(n)} {dtype}{sent}".strip()]
    if kind == "param":
        chunks = f" per chunk {'/'.join(map(str, n['param_chunks']))}" if n["param_chunks"] else ""
        full = "[" + ",".join(map(str, n["param_full_shape"])) + "]" if n["param_full_shape"] else ""
        split = f"split {', '.join(n['param_split'])}{chunks}" if n["param_split"] else "replicated"
        block = item["block"]  # the block's frame names it: keep the name short
        name = n["param"][len(block) + 1:] if block and n["param"].startswith(block + ".") else n["param"]
        return [name, f"{_fmt_shape(n)} of {full}" if full else _fmt_shape(n), split]
    if kind == "moe":
        return [n["moe_role"], _fmt_shape(n)] if n["shape"] is not None else [n["moe_role"]]
    if kind == "op" or len(members) == 1:
        return [_short(n["target"]), f"{n['module']} {_fmt_shape(n)}".strip()]
    key = _group_key(n["module"])
    if key:
        name = key.rpartition(".")[2]
        name = key if name.isdigit() else name
    else:  # between or around the blocks: name the top-level modules
        tops = list(dict.fromkeys(m["module"].split(".")[0] for m in members if m["module"]))
        name = ", ".join(tops[:3]) + (", ..." if len(tops) > 3 else "") if tops else "model"
    counts = Counter(_ABBREVIATIONS.get(op, op) for op in (_short(m["target"]) for m in members))
    ops = [f"{op} ×{c}" if c > 1 else op
           for op, c in sorted(counts.items(), key=lambda oc: (oc[0] not in _COMPUTE_OPS, -oc[1]))]
    shown = ", ".join(ops[:3]) + (f", +{len(ops) - 3} more" if len(ops) > 3 else "")
    return [f"{name} ({len(members)} ops)", shown, _fmt_shape(n)]


_ABBREVIATIONS = {"scaled_dot_product_attention": "sdpa"}
_COMPUTE_OPS = {"linear", "addmm", "mm", "bmm", "matmul", "sdpa", "softmax", "layer_norm", "rms_norm", "gelu",
                "silu", "relu", "embedding", "baddbmm"}
"""Ops a reader looks for first in a collapsed box's summary."""


def _elide_blocks(items: list[dict[str, Any]], max_blocks: int) -> list[dict[str, Any]]:
    """Merge every item of the transformer blocks after the first `max_blocks` into one box."""
    blocks = list(dict.fromkeys(i["block"] for i in items if i["block"] is not None))
    hidden = set(blocks[max_blocks:])
    if not hidden:
        return items
    gone = [i for i in items if i["block"] in hidden]
    box_id = f"elided:{gone[0]['id']}"
    kinds = Counter(i["kind"] for i in gone)
    box = {"id": box_id, "kind": "elided", "axis": None, "block": None, "moe_path": None, "region": None,
           "module": "", "split": None,
           "members": [m for i in gone for m in i["members"]],
           "lines": [f"{len(hidden)} more block{'s' if len(hidden) > 1 else ''} "
                     f"({blocks[max_blocks]}{' … ' + blocks[-1] if len(hidden) > 1 else ''}), not drawn",
                     f"{kinds['moe']} MoE ops, {kinds['collective']} collectives, {kinds['param']} sharded params"]}
    gone_ids = {i["id"] for i in gone}
    box["inputs"] = list(dict.fromkeys(s for i in gone for s in i["inputs"] if s not in gone_ids))
    out: list[dict[str, Any]] = []
    for item in items:
        if item["id"] in gone_ids:
            if item is gone[0]:
                out.append(box)
            continue
        item = dict(item, inputs=list(dict.fromkeys(box_id if s in gone_ids else s for s in item["inputs"])))
        out.append(item)
    return out


def _only_block(items: list[dict[str, Any]], block: str) -> list[dict[str, Any]]:
    """The items of one block, with a "from ..." box for each value it reads from outside."""
    by_id = {i["id"]: i for i in items}
    kept = [i for i in items if i["block"] == block]
    kept_ids = {i["id"] for i in kept}
    refs: dict[str, dict[str, Any]] = {}
    for item in kept:
        for src in item["inputs"]:
            if src not in kept_ids and src not in refs:
                outside = by_id[src]
                refs[src] = {"id": f"from:{src}", "kind": "ref", "axis": None, "block": None, "moe_path": None,
                             "region": None, "module": "", "split": None, "members": [], "inputs": [],
                             "lines": [f"from {outside['lines'][0]}", *outside["lines"][1:2]]}
    return list(refs.values()) + [dict(i, inputs=[f"from:{s}" if s in refs else s for s in i["inputs"]])
                                  for i in kept]
