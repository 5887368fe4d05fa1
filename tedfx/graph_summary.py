"""A GraphModule as a plain, JSON-serialisable list of nodes.

`summarize_graph` records the facts of every node: what it computes, which
module and MoE block it belongs to, which collective on which mesh axis, its
output shape. `tedfx.display` turns such a list into the boxes of a picture,
and `tedfx.viz` draws them; neither needs torch once the summary exists.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from . import _compat, collectives
from ._compat import pytree
from .passes.checkpoint import CheckpointRegion
from .passes.graph import MOE_META, get_by_target
from .sharding import ParamShard

__all__ = ["COLLECTIVE_KINDS", "summarize_graph"]

log = logging.getLogger(__name__)

COLLECTIVE_KINDS: dict[str, tuple[str, str]] = {
    "all_reduce": ("all-reduce", "-"),
    "identity_fwd_all_reduce_bwd": ("-", "all-reduce"),
    "all_to_all": ("all-to-all", "all-to-all"),
    "all_gather": ("all-gather", "reduce-scatter"),
    "reduce_scatter": ("reduce-scatter", "all-gather"),
    "slice_for_rank": ("slice", "all-gather"),
    "gather_replicated": ("all-gather", "slice"),
    "agree_max": ("all-reduce (max of an int)", "-"),
}
"""Every tedfx collective op: (what it does in the forward, what its backward does)."""

_COLLECTIVE_FNS = {getattr(collectives, kind): kind for kind in COLLECTIVE_KINDS}


# --- summarize_graph -------------------------------------------------------------------------------


def summarize_graph(
    gm: fx.GraphModule,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    axes: dict[str, Any] | None = None,
    shards: dict[str, ParamShard] | None = None,
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
        shards: {parameter name: ParamShard} of a rank graph (tedfx.pipeline.param_shards), to show splits.

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
    shards = shards or {}
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
    tag = node.meta.get(MOE_META)
    d: dict[str, Any] = {
        "name": name, "op": node.op, "target": _readable_target(gm, node), "module": str(module),
        "module_type": str(module_type).rpartition(".")[2], "moe_path": tag.path if tag else None,
        "moe_role": str(tag.role) if tag else None, "collective": None, "axis": None, "comm_forward": None,
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
        tag = node.meta.get(MOE_META)
        module = _called_module(gm, node)
        return str(tag.role) if tag else (type(module).__name__ if module is not None else str(target))
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
    try:
        return get_by_target(gm, target)
    except AttributeError:
        return None


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
    rng = torch.random.fork_rng(devices=_compat.initialized_cuda_devices())
    with rng, torch.no_grad(), collectives.bind_axes(axes):
        _ValueRecorder(gm, values).run(*flat, enable_io_processing=False)
