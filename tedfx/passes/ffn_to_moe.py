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
   Every FFN's exit, converted or not, is marked with graph.FFN_EXIT_META.
4. Delete the dense parameters (and their emptied modules) so the state dict
   holds the MoE keys in their place.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Callable

import torch
import torch.fx as fx

from ..config import MoEConfig
from ..moe import ops
from ..moe.experts import ExpertInit, ExpertWeights
from ..moe.routing import Router
from .context import MoEBlockRecord, PassContext
from .find_ffns import FFNMatch
from .graph import DENSE_FFN_META, FFN_EXIT_META, MOE_META, MoETag, Role, get_by_target, has_target
from .runner import requires

__all__ = ["ffn_to_moe_pass", "mark_ffns"]


@requires("find_ffns")
def ffn_to_moe_pass(gm: fx.GraphModule, *, ctx: PassContext, materialize: bool = True) -> fx.GraphModule:
    """Convert the FFNs `ctx.moe.layers` selects; records them in `ctx.records.moe_blocks`.

    With `materialize=False` the experts stay on the meta device with their recipe (ExpertInit), for the
    sharding passes to materialise each rank's slice: no process ever holds every expert.
    """
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
    _refuse_shared_runs(matches, selected)
    mark_ffns(matches, selected)
    records = []
    for match in selected:
        records.append(_convert(gm, match, moe, materialize=materialize, fetch=ctx.fetch_dense))
    gm.graph.eliminate_dead_code()
    _delete_unused_params(gm)
    ctx.records.moe_blocks = records
    ctx.records.ffn_matches = None  # nodes of the dense region, now erased
    return gm


def _refuse_shared_runs(matches: list[FFNMatch], selected: list[FFNMatch]) -> None:
    """One FFN module run by several layers (ALBERT shares its layers) would need one MoE block per run at the
    same module path: refused, naming the runs and how to convert one of them (docs/moe.md, "Configuration")."""
    for path, runs in Counter(m.path for m in selected).items():
        if runs > 1:
            indices = [m.index for m in matches if m.path == path]
            raise ValueError(
                f"the FFN {path!r} runs {len(indices)} times in one forward (FFN indices {indices}): one module "
                f"called by several layers shares its weights across them (as ALBERT shares its layers), and each "
                f"converted run becomes its own MoE block at that module path, so they cannot all convert. Convert "
                f"one run with MoEConfig.layers (e.g. layers=[{indices[0]}]; the other runs keep the shared dense "
                f"FFN), or give each layer its own FFN module.")


def mark_ffns(matches: list[FFNMatch], selected: list[FFNMatch]) -> None:
    """Mark every FFN's exit (the blocks of activation checkpointing), and the projections of those left dense
    (tensor parallelism must still split them; docs/parallelism.md, "Nothing left whole")."""
    chosen = {id(m) for m in selected}
    for match in matches:
        match.exit.meta[FFN_EXIT_META] = match.path
        if id(match) not in chosen:
            for ref in (match.fc1, match.up, match.fc2):
                if ref is not None:
                    ref.node.meta[DENSE_FFN_META] = match.path


def _expert_init(gm: fx.GraphModule, match: FFNMatch, moe: MoEConfig,
                 fetch: Callable[[str], torch.Tensor] | None) -> ExpertInit:
    """The recipe of the block's experts: which dense tensors they come from, and how."""
    sources: dict[str, tuple[str, bool]] = {}
    refs = {"1": match.fc1, "2": match.fc2, **({"3": match.up} if match.up is not None else {})}
    out_slices: dict[str, tuple[int, int]] = {}
    for i, ref in refs.items():
        sources[f"w{i}"] = (ref.weight, not ref.transposed)  # nn.Linear stores [out, in]
        if ref.bias is not None:
            sources[f"b{i}"] = (ref.bias, False)
        if ref.out_slice:  # a half of a fused gate_up projection
            out_slices[f"w{i}"] = out_slices[f"b{i}"] = tuple(ref.out_slice)
    # The model's own tensors, taken now: the dense parameters leave the graph at the end of the pass.
    tensors = {key: get_by_target(gm, key) for key, _ in sources.values()}

    def read(key: str) -> torch.Tensor:
        t = tensors[key]
        return fetch(key).to(t.dtype) if t.is_meta and fetch is not None else t  # in the graph's precision

    return ExpertInit(sources=sources, fetch=read, num_experts=moe.num_experts, upcycle=moe.upcycle,
                      noise=moe.expert_noise, seed=moe.seed * 7919 + match.index, out_slices=out_slices)


def _convert(gm: fx.GraphModule, match: FFNMatch, moe: MoEConfig, *, materialize: bool,
             fetch: Callable[[str], torch.Tensor] | None) -> MoEBlockRecord:
    # 1-2. Modules of the block, seeded by (seed, FFN index) only; experts materialised only when asked
    # (a parallel layout materialises each rank's slice from the same recipe instead).
    init = _expert_init(gm, match, moe, fetch)
    experts = ExpertWeights(init, materialize=materialize)
    router = Router(match.hidden_dim, moe, layer=match.index)
    router.reset_parameters(torch.Generator().manual_seed(moe.seed * 7919 + match.index))
    device = init.dense("w1").device
    router.to(device="cpu" if device.type == "meta" else device)
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
        # Dropless: the packed layout, every op told the rows per expert (docs/moe.md, "Dropless: the packed
        # layout"); shard_experts may turn it back into capacity slots where DTD needs them.
        packed = {}
        if not moe.drop_tokens:
            packed = {"loads": emit("call_function", ops.expert_loads, [expert_SK], {"num_experts": moe.num_experts},
                                    role=Role.LOADS)}
        x_ECH = emit("call_function", ops.dispatch, [x_SH, expert_SK, slot_SK, capacity],
                     {"num_experts": moe.num_experts, **packed}, role=Role.DISPATCH)
        w = {name: emit("get_attr", f"{prefix}experts.{name}", [], role=Role.WEIGHT)
             if getattr(experts, name) is not None else None for name in ("w1", "b1", "w3", "b3", "w2", "b2")}
        h_ECF = emit("call_function", ops.expert_fc1, [x_ECH, w["w1"], w["b1"], w["w3"], w["b3"]],
                     {"activation": match.activation, **packed}, role=Role.EXPERT_FC1)
        if match.dropout_p > 0:
            h_ECF = emit("call_function", torch.ops.aten.dropout.default, [h_ECF, match.dropout_p, gm.training],
                         role=Role.EXPERT_DROPOUT)
        y_ECH = emit("call_function", ops.expert_fc2, [h_ECF, w["w2"]], packed, role=Role.EXPERT_FC2)
        if w["b2"] is not None:
            y_ECH = emit("call_function", ops.expert_bias, [y_ECH, w["b2"]], packed, role=Role.EXPERT_BIAS)
        y_SH = emit("call_function", ops.combine, [y_ECH, expert_SK, slot_SK, gate_SK], packed, role=Role.COMBINE)
        y_SH = emit("call_function", ops.attach_aux_loss, [y_SH, loss], role=Role.ATTACH_AUX_LOSS)
        y = emit("call_function", ops.unflatten_tokens, [y_SH, match.entry], role=Role.UNFLATTEN_TOKENS)
    y.meta["val"] = match.exit.meta.get("val")
    y.meta[FFN_EXIT_META] = match.path
    match.exit.replace_all_uses_with(y)
    _copy_if_written(y)

    # Erase the dense region, users first.
    for node in reversed(match.nodes):
        if not node.users:
            graph.erase_node(node)

    dense_params = sum(init.dense(name).numel() for name in init.sources)
    expert_params = sum(p.numel() for p in experts.parameters())
    return MoEBlockRecord(
        index=match.index, path=match.path, kind=match.kind, activation=match.activation,
        hidden_dim=match.hidden_dim, ffn_dim=match.ffn_dim, num_experts=moe.num_experts, top_k=moe.top_k,
        dense_params=dense_params, moe_params=router.weight.numel() + expert_params,
        active_params=router.weight.numel() + expert_params * moe.top_k // moe.num_experts,
    )


def _copy_if_written(y: fx.Node) -> None:
    """Give the model a copy of the block's output if it writes that output in place (Falcon's
    `mlp_output += attention_output`), directly or through a view of it.

    The output leaves `attach_aux_loss`, a custom autograd Function that returns its input as a view, and autograd
    forbids writing such a view in place ("... was created inside a custom Function"). A copy costs one
    activation-sized buffer per block, on such models only (docs/moe.md, "The MoE block")."""
    if not _written(y):
        return
    with y.graph.inserting_after(y):
        copy = y.graph.call_function(torch.ops.aten.clone.default, (y,))
    y.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    # The model's own op, after the block: the value leaving the FFN, as the model reads it.
    copy.meta = {"val": y.meta.get("val"), "nn_module_stack": y.meta.get("nn_module_stack", {}),
                 FFN_EXIT_META: y.meta.pop(FFN_EXIT_META)}


def _written(node: fx.Node) -> bool:
    """Whether an op writes `node`'s memory in place: its first argument `node` or a view of it."""
    for user in node.users:
        target = user.target
        if target is operator.getitem:  # an item of split/unbind's views
            if _written(user):
                return True
            continue
        if not isinstance(target, torch._ops.OpOverload) or not user.args or user.args[0] is not node:
            continue
        alias = target._schema.arguments[0].alias_info if target._schema.arguments else None
        if alias is not None and (alias.is_write or _written(user)):  # written, or a view of it written
            return True
    return False


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
