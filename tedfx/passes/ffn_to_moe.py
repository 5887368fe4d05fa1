"""ffn_to_moe: rewrite the selected dense FFNs into MoE blocks (DESIGN §2).

For each FFN that `MoEConfig.layers` selects, in order:
1. Read the dense weights and lay them out [in, out] (nn.Linear stores
   [out, in]; HF's Conv1D already stores [in, out]).
2. Build the block's modules at the FFN's path: `router` (weights seeded by
   (seed, FFN index) only, never by the layout) and `experts` (E upcycled
   copies, plus seeded noise if asked).
3. Emit the block's named ops (tedfx.moe.ops) just before the FFN's exit,
   route the FFN's users to the block's output, and erase the dense region.
4. Delete the dense parameters (and their emptied modules) so the state dict
   holds the MoE keys in their place.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..config import MoEConfig
from ..moe import ops
from ..moe.experts import ExpertWeights
from ..moe.routing import Router
from .find_ffns import FFNMatch, LinearRef, find_ffns
from .runner import PassContext

__all__ = ["MoEBlockRecord", "ffn_to_moe_pass", "moe_blocks", "MOE_META"]

MOE_META = "tedfx_moe"
"""node.meta key on every node of an MoE block: {"path": ..., "role": ...}."""


def moe_blocks(graph: fx.Graph) -> dict[str, dict[str, fx.Node]]:
    """Every MoE block's nodes, {ffn path: {role: node}}; weights by their name ("w1", "b2", ...)."""
    blocks: dict[str, dict[str, fx.Node]] = {}
    for node in graph.nodes:
        meta = node.meta.get(MOE_META)
        if meta:
            role = node.target.rsplit(".", 1)[1] if node.op == "get_attr" else meta["role"]
            blocks.setdefault(meta["path"], {}).setdefault(role, node)
    return blocks


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


def ffn_to_moe_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Convert the FFNs `ctx.moe.layers` selects; records MoEBlockRecords in ctx.records["ffn_to_moe"]."""
    moe: MoEConfig = ctx.moe
    matches = ctx.records.get("find_ffns") or find_ffns(gm)
    selected = [m for m in matches if moe.selects(m.index, m.path, len(matches))]
    if not selected:
        raise ValueError(
            f"MoEConfig.layers={moe.layers!r} selects none of the model's {len(matches)} FFNs "
            f"({', '.join(m.path for m in matches)}); pick at least one."
        )
    records = []
    for match in selected:
        records.append(_convert(gm, match, moe))
    gm.graph.eliminate_dead_code()
    _delete_unused_params(gm)
    ctx.records["ffn_to_moe"] = records
    return gm


def _dense_weights(gm: fx.GraphModule, match: FFNMatch) -> dict[str, torch.Tensor | None]:
    """The FFN's weights laid out [in, out], named as in ExpertWeights."""

    def weight_in_out(ref: LinearRef) -> torch.Tensor:
        w = gm.get_parameter(ref.weight) if _is_param(gm, ref.weight) else gm.get_buffer(ref.weight)
        return w.detach() if ref.transposed else w.detach().t()

    def bias(ref: LinearRef | None) -> torch.Tensor | None:
        if ref is None or ref.bias is None:
            return None
        return gm.get_parameter(ref.bias).detach()

    dense = {"w1": weight_in_out(match.fc1), "b1": bias(match.fc1), "w2": weight_in_out(match.fc2),
             "b2": bias(match.fc2)}
    if match.up is not None:
        dense["w3"] = weight_in_out(match.up)
        dense["b3"] = bias(match.up)
    return dense


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _convert(gm: fx.GraphModule, match: FFNMatch, moe: MoEConfig) -> MoEBlockRecord:
    # 1-2. Modules of the block, seeded by (seed, FFN index) only.
    dense = _dense_weights(gm, match)
    g = torch.Generator().manual_seed(moe.seed * 7919 + match.index)
    if moe.upcycle:
        stacked = ExpertWeights.upcycle(dense, moe.num_experts, noise=moe.expert_noise, generator=g)
    else:
        stacked = ExpertWeights.fresh(dense, moe.num_experts, generator=g)
    experts = ExpertWeights(stacked)
    router = Router(match.hidden_dim, moe, layer=match.index)
    router.reset_parameters(g)
    router.to(device=dense["w1"].device)
    prefix = f"{match.path}." if match.path else ""
    for name, module in (("router", router), ("experts", experts)):
        if _has_attr(gm, prefix + name):
            raise ValueError(f"cannot place the MoE block's {name!r} at {prefix + name!r}: the model already has it")
        gm.add_submodule(prefix + name, module)

    # 3. The block's ops, emitted before the exit so every input is defined.
    graph = gm.graph
    meta_stack = _parent_stack(match)

    def emit(op: str, target, args, kwargs=None, role: str = "") -> fx.Node:
        node = graph.create_node(op, target, tuple(args), kwargs or {})
        node.meta["nn_module_stack"] = dict(meta_stack)
        node.meta[MOE_META] = {"path": match.path, "role": role or getattr(target, "__name__", str(target)),
                               "index": match.index}
        return node

    with graph.inserting_before(match.exit):
        x_SH = emit("call_function", ops.flatten_tokens, [match.entry], role="flatten_tokens")
        plan = emit("call_module", prefix + "router", [x_SH], role="router")
        expert_SK, slot_SK, gate_SK, capacity, loss = (
            emit("call_function", operator.getitem, [plan, i], role=role)
            for i, role in enumerate(("expert", "slot", "gate", "capacity", "loss")))
        x_ECH = emit("call_function", ops.dispatch, [x_SH, expert_SK, slot_SK, capacity],
                     {"num_experts": moe.num_experts}, role="dispatch")
        w = {name: emit("get_attr", f"{prefix}experts.{name}", [], role="weight")
             if getattr(experts, name) is not None else None for name in ("w1", "b1", "w3", "b3", "w2", "b2")}
        h_ECF = emit("call_function", ops.expert_fc1, [x_ECH, w["w1"], w["b1"], w["w3"], w["b3"]],
                     {"activation": match.activation}, role="expert_fc1")
        if match.dropout_p > 0:
            h_ECF = emit("call_function", torch.ops.aten.dropout.default, [h_ECF, match.dropout_p, gm.training],
                         role="expert_dropout")
        y_ECH = emit("call_function", ops.expert_fc2, [h_ECF, w["w2"]], role="expert_fc2")
        if w["b2"] is not None:
            y_ECH = emit("call_function", ops.expert_bias, [y_ECH, w["b2"]], role="expert_bias")
        y_SH = emit("call_function", ops.combine, [y_ECH, expert_SK, slot_SK, gate_SK], role="combine")
        y_SH = emit("call_function", ops.attach_aux_loss, [y_SH, loss], role="attach_aux_loss")
        y = emit("call_function", ops.unflatten_tokens, [y_SH, match.entry], role="unflatten_tokens")
    y.meta["val"] = match.exit.meta.get("val")
    match.exit.replace_all_uses_with(y)

    # Erase the dense region, users first.
    for node in reversed(match.nodes):
        if not node.users:
            graph.erase_node(node)

    dense_params = sum(t.numel() for t in dense.values() if t is not None)
    expert_params = sum(p.numel() for p in experts.parameters())
    return MoEBlockRecord(
        index=match.index, path=match.path, kind=match.kind, activation=match.activation,
        hidden_dim=match.hidden_dim, ffn_dim=match.ffn_dim, num_experts=moe.num_experts, top_k=moe.top_k,
        dense_params=dense_params, moe_params=router.weight.numel() + expert_params,
        active_params=router.weight.numel() + expert_params * moe.top_k // moe.num_experts,
    )


def _parent_stack(match: FFNMatch) -> dict:
    """The nn_module_stack of the FFN's own module (the projections' stack, cut at the FFN's path)."""
    stack = match.fc1.node.meta.get("nn_module_stack", {})
    kept = {}
    for key, (path, typ) in stack.items():
        if path and match.path and not (match.path == path or match.path.startswith(path + ".")):
            break
        kept[key] = (path, typ)
    return kept


def _has_attr(gm: nn.Module, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _delete_unused_params(gm: fx.GraphModule) -> None:
    """Drop parameters and buffers no node reads any more, then emptied submodules."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}

    def in_use(name: str) -> bool:
        return name in used or any(name == m or name.startswith(m + ".") for m in used_modules)

    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    # A tied weight (embedding and LM head) is read under one name but owned under both: keep both.
    used_ids = {id(t) for name, t in tensors if in_use(name)}
    for name, t in tensors:
        if not in_use(name) and id(t) not in used_ids:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, attr)
    for name, module in sorted(gm.named_modules(), key=lambda item: -item[0].count(".")):
        if name and not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()) \
                and not any(name == m or name.startswith(m + ".") for m in used_modules):
            parent_path, _, attr = name.rpartition(".")
            parent = gm.get_submodule(parent_path) if parent_path else gm
            delattr(parent, attr)
