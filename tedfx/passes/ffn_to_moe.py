"""ffn_to_moe: rewrite the selected dense FFNs into MoE blocks (docs/moe.md, "The MoE block").

The projections of the FFNs `MoEConfig.layers` leaves dense are marked with
`DENSE_FFN_META`. For each FFN that `MoEConfig.layers` selects, in order:
1. Read the dense weights and lay them out [in, out] (nn.Linear stores
   [out, in]; HF's Conv1D already stores [in, out]); a fused gate_up gives
   w1 and w3 from its two halves, the gate half (found numerically) to w1.
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

import torch
import torch.fx as fx

from ..config import MoEConfig
from ..moe import ops
from ..moe.experts import ExpertWeights
from ..moe.routing import Router
from .context import MoEBlockRecord, PassContext
from .find_ffns import FFNMatch, LinearRef
from .graph import DENSE_FFN_META, MOE_META, MoETag, Role, get_by_target, has_target
from .runner import requires

__all__ = ["ffn_to_moe_pass"]


@requires("find_ffns")
def ffn_to_moe_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Convert the FFNs `ctx.moe.layers` selects; records them in `ctx.records.moe_blocks`."""
    moe = ctx.moe
    matches = ctx.records.ffn_matches
    if matches is None:
        raise RuntimeError("ffn_to_moe needs find_ffns's matches on this graph (ctx.records.ffn_matches); "
                           "run find_ffns_pass right before it.")
    selected = [m for m in matches if moe.selects(m.index, m.path, len(matches))]
    if not selected:
        raise ValueError(
            f"MoEConfig.layers={moe.layers!r} selects none of the model's {len(matches)} FFNs "
            f"({', '.join(m.path for m in matches)}); pick at least one."
        )
    chosen = {id(m) for m in selected}
    for match in matches:
        if id(match) not in chosen:  # tensor parallelism must still split these (docs/parallelism.md)
            for ref in (match.fc1, match.up, match.fc2):
                if ref is not None:
                    ref.node.meta[DENSE_FFN_META] = match.path
    records = []
    for match in selected:
        records.append(_convert(gm, match, moe))
    gm.graph.eliminate_dead_code()
    _delete_unused_params(gm)
    ctx.records.moe_blocks = records
    ctx.records.ffn_matches = None  # nodes of the dense region, now erased
    return gm


def _dense_weights(gm: fx.GraphModule, match: FFNMatch) -> dict[str, torch.Tensor | None]:
    """The FFN's weights laid out [in, out], named as in ExpertWeights."""

    def weight_in_out(ref: LinearRef) -> torch.Tensor:
        w = get_by_target(gm, ref.weight).detach()
        w = w if ref.transposed else w.t()
        return w[:, slice(*ref.out_slice)] if ref.out_slice else w  # a half of a fused gate_up

    def bias(ref: LinearRef | None) -> torch.Tensor | None:
        if ref is None or ref.bias is None:
            return None
        b = get_by_target(gm, ref.bias).detach()
        return b[slice(*ref.out_slice)] if ref.out_slice else b

    dense = {"w1": weight_in_out(match.fc1), "b1": bias(match.fc1), "w2": weight_in_out(match.fc2),
             "b2": bias(match.fc2)}
    if match.up is not None:
        dense["w3"] = weight_in_out(match.up)
        dense["b3"] = bias(match.up)
    return dense


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
        if has_target(gm, prefix + name):
            raise ValueError(f"cannot place the MoE block's {name!r} at {prefix + name!r}: the model already has it")
        gm.add_submodule(prefix + name, module)

    # 3. The block's ops, emitted before the exit so every input is defined.
    graph = gm.graph
    meta_stack = _parent_stack(match)

    def emit(op: str, target, args, kwargs=None, *, role: Role) -> fx.Node:
        node = graph.create_node(op, target, tuple(args), kwargs or {})
        node.meta["nn_module_stack"] = dict(meta_stack)
        node.meta[MOE_META] = MoETag(match.path, role, match.index)
        return node

    with graph.inserting_before(match.exit):
        x_SH = emit("call_function", ops.flatten_tokens, [match.entry], role=Role.FLATTEN_TOKENS)
        plan = emit("call_module", prefix + "router", [x_SH], role=Role.ROUTER)
        expert_SK, slot_SK, gate_SK, capacity, loss = (
            emit("call_function", operator.getitem, [plan, i], role=role)
            for i, role in enumerate((Role.EXPERT, Role.SLOT, Role.GATE, Role.CAPACITY, Role.LOSS)))
        x_ECH = emit("call_function", ops.dispatch, [x_SH, expert_SK, slot_SK, capacity],
                     {"num_experts": moe.num_experts}, role=Role.DISPATCH)
        w = {name: emit("get_attr", f"{prefix}experts.{name}", [], role=Role.WEIGHT)
             if getattr(experts, name) is not None else None for name in ("w1", "b1", "w3", "b3", "w2", "b2")}
        h_ECF = emit("call_function", ops.expert_fc1, [x_ECH, w["w1"], w["b1"], w["w3"], w["b3"]],
                     {"activation": match.activation}, role=Role.EXPERT_FC1)
        if match.dropout_p > 0:
            h_ECF = emit("call_function", torch.ops.aten.dropout.default, [h_ECF, match.dropout_p, gm.training],
                         role=Role.EXPERT_DROPOUT)
        y_ECH = emit("call_function", ops.expert_fc2, [h_ECF, w["w2"]], role=Role.EXPERT_FC2)
        if w["b2"] is not None:
            y_ECH = emit("call_function", ops.expert_bias, [y_ECH, w["b2"]], role=Role.EXPERT_BIAS)
        y_SH = emit("call_function", ops.combine, [y_ECH, expert_SK, slot_SK, gate_SK], role=Role.COMBINE)
        y_SH = emit("call_function", ops.attach_aux_loss, [y_SH, loss], role=Role.ATTACH_AUX_LOSS)
        y = emit("call_function", ops.unflatten_tokens, [y_SH, match.entry], role=Role.UNFLATTEN_TOKENS)
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
