"""Per-rank side of tests/test_parallel.py: every case of one world size, run in one launch.

`run_cases(cases)` runs on every rank of a `tedfx.runtime.launch` and returns one
result dict per case, in order. Starting ranks costs seconds, so the tests start
one world per size and run all of its cases inside; the pytest side only asserts
on the returned numbers and messages.

Parity cases follow the parity oracle (docs/architecture.md, "Tests"): the rank's ParallelModule against
`tedfx.to_moe(model)` in the same process, on the rank's token group, for the
forward, the loss of every step and the full state dict after a few AdamW steps.
The reference accumulates one backward per token group and averages, which is
what DDP semantics over the X * D token groups mean (the MoE aux loss enters each
group's backward with weight 1: its MoE loss scale is set to 1.0, the sum).

Loss-scale cases train with gradient accumulation, `loss / M` over M micro-batches and
`tedfx.set_moe_loss_scale(pm, 1 / M)`, against the objective written out in
tests/moe_reference.py over all X * D * M token groups of the step.

Check-cost cases count, with spies on every collective function tedfx calls, what `check_inputs=True`
adds to a training step and to a no-grad forward (docs/parallelism.md, "Cost of the checks").

Error cases expect a ValueError raised on every rank before any rank can hang;
they return its message. A parity case whose `parallelize` refuses the layout (its
checks raise on every rank alike) returns the message too, so the other cases still
run. Anything else that goes wrong propagates, and the launch names the case.
"""

from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tedfx
from tedfx import _compat
from tedfx.api import parallelize
from tedfx.check import CollectiveOrderError
from tedfx.moe.experts import ExpertWeights
from tedfx.moe.routing import Router
from tedfx.passes.checkpoint import CheckpointRegion
from tedfx.pipeline import build_moe_graph
from tedfx.predict import predict_rank

from models import (
    VOCAB,
    patch_capture,
    tiny_blocks,
    tiny_explicit_encoder,
    tiny_falcon,
    tiny_fused_qkv_encoder,
    tiny_gpt,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_gptj,
    tiny_gqa,
    tiny_llama,
    tiny_olmo2,
    tiny_persimmon,
    tiny_phi3,
    tiny_qwen3,
    tiny_t5,
)
from moe_reference import reference_grads

__all__ = ["Case", "CheckCostCase", "ErrorCase", "LossScaleCase", "run_cases"]

BATCH, SEQ = 2, 8
STEPS = 3
LR = 1e-3
ADAM_EPS = 1e-6
"""Adam's first step moves each weight by about lr * g / (|g| + eps). With the default eps of 1e-8, a
gradient entry of ~1e-9 (summed in another order by the tensor-parallel partial sums) moves its weight
by a visibly different amount, though the gradients agree to 1e-8; at 1e-6 the update stays a smooth
function of the gradient at this scale. The step-0 gradients are compared directly as well."""
TIMEOUT_S = 60.0
"""ParallelConfig.timeout of every case: a collective that some rank never issues fails in a minute."""
FORWARD_TOL = dict(rtol=1e-5, atol=1e-5)
TRAINED_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@dataclass(frozen=True)
class Case:
    """One parity case: a model and MoE routing on layout (T, X); D is the world size / (T * X)."""

    model: str
    """A key of BUILDERS: "gpt" (tests/models.tiny_gpt), "gpt2" or "llama" (HF, dropout off), "dict_blocks" (a GPT
    whose blocks sit in a ModuleDict driven by the parent's forward: activation checkpointing must find them from
    the graph), or one of the models written differently from ours ("explicit", "fused_qkv", "neox", "gqa",
    "phi3", "qwen3", "olmo2", "gptj", "t5", "falcon_grouped", "persimmon")."""
    tensor: int
    expert: int
    top_k: int = 1
    dropless: bool = False
    """False: capacity factor 1.0, so tokens are dropped; True: dropless routing."""
    num_experts: int = 4
    dtd: bool = True
    """ParallelConfig.dtd (duplicate token dropping)."""
    checkpointing: str = "none"
    """ParallelConfig.activation_checkpointing."""
    cac: bool = True
    """ParallelConfig.cac (only matters with checkpointing)."""
    seq: int = SEQ
    """Sequence length; 7 makes an odd capacity (14 tokens, E=4, k=2: C=7), padded to a multiple of T by DTD."""
    a2a_chunks: int = 1
    """ParallelConfig.a2a_chunks (the expert all-to-alls pipelined with expert compute)."""

    @property
    def name(self) -> str:
        routing = "dropless" if self.dropless else "cf1"
        extra = ("" if self.dtd else "-nodtd") \
            + ("" if self.checkpointing == "none" else f"-ckpt{self.checkpointing}") \
            + ("" if self.cac or self.checkpointing == "none" else "-nocac") \
            + ("" if self.seq == SEQ else f"-seq{self.seq}") \
            + ("" if self.a2a_chunks == 1 else f"-chunks{self.a2a_chunks}")
        return f"{self.model}-T{self.tensor}X{self.expert}-top{self.top_k}-{routing}{extra}"

    def parallel(self) -> tedfx.ParallelConfig:
        return tedfx.ParallelConfig(tensor=self.tensor, expert=self.expert, dtd=self.dtd, cac=self.cac,
                                    activation_checkpointing=self.checkpointing, timeout=TIMEOUT_S,
                                    a2a_chunks=self.a2a_chunks)

    def moe(self) -> tedfx.MoEConfig:
        return tedfx.MoEConfig(num_experts=self.num_experts, top_k=self.top_k, capacity_factor=1.0,
                               min_capacity=1, drop_tokens=not self.dropless)


@dataclass(frozen=True)
class LossScaleCase:
    """Gradient accumulation on layout (T, X): `loss / micro` per micro-batch with the MoE loss scale 1 / micro."""

    tensor: int
    expert: int
    micro: int = 4
    checkpointing: str = "block"
    """Recomputed regions run the router again: the scale must reach the backward through them too."""

    @property
    def name(self) -> str:
        return f"loss-scale-T{self.tensor}X{self.expert}-M{self.micro}-ckpt{self.checkpointing}"

    def moe(self) -> tedfx.MoEConfig:
        return tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1, aux_loss_coef=0.1,
                               z_loss_coef=0.01)


@dataclass(frozen=True)
class ErrorCase:
    """Bad input that must raise a ValueError on every rank, promptly.

    kind: "tensor_does_not_divide_world" (ParallelConfig(tensor=3) on a world not divisible by 3),
        "experts_do_not_divide" (num_experts=3 with expert=2), "different_weights" (rank 1
        perturbs one weight), "different_input_shapes" (rank 1 passes a longer sequence),
        "different_input_dtypes" (rank 1 passes int32 tokens, the others int64),
        "different_rng" (dropout on, tensor ranks seeded differently).
    """

    kind: str
    tensor: int = 1
    expert: int = 1

    @property
    def name(self) -> str:
        return f"error-{self.kind}"


@dataclass(frozen=True)
class CheckCostCase:
    """The collectives that `check_inputs=True` adds to a step on layout (T, X), dropout on (every check runs)."""

    tensor: int
    expert: int

    @property
    def name(self) -> str:
        return f"check-cost-T{self.tensor}X{self.expert}"


# --- models --------------------------------------------------------------------------------------


def _no_dropout(model: nn.Module) -> nn.Module:
    """HF GPT-2 drops out by default: parity needs the same (no) masks in both runs."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


class _T5OnTokens(nn.Module):
    """HF T5 (tests/models.tiny_t5) called on one tensor: the tokens enter the encoder and the decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.t5 = tiny_t5()[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.t5(input_ids=tokens, decoder_input_ids=tokens, use_cache=False).logits


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "gpt": lambda: tiny_gpt()[0],
    "gpt2": lambda: _no_dropout(tiny_gpt2()[0]),
    "llama": lambda: tiny_llama()[0],
    "llama_kv1": lambda: tiny_llama(kv_heads=1)[0],
    "dict_blocks": lambda: tiny_blocks("module_dict")[0],
    "explicit": lambda: tiny_explicit_encoder()[0],
    "fused_qkv": lambda: tiny_fused_qkv_encoder()[0],
    "neox": lambda: tiny_gpt_neox()[0],
    "gqa": lambda: tiny_gqa()[0],
    "phi3": lambda: tiny_phi3()[0],
    "qwen3": lambda: tiny_qwen3()[0],
    "olmo2": lambda: tiny_olmo2()[0],
    "gptj": lambda: _no_dropout(tiny_gptj()[0]),
    "t5": _T5OnTokens,
    "falcon_grouped": lambda: tiny_falcon(new_decoder_architecture=True)[0],
    "persimmon": lambda: tiny_persimmon()[0],
}
TP_SHARDED = {
    # Non-expert weights that Megatron tensor parallelism must split when T > 1 (one per layer).
    "gpt": ("attn.c_attn.weight", "attn.c_proj.weight"),
    "gpt2": ("attn.c_attn.weight", "attn.c_proj.weight"),
    "llama": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight"),
    # One KV head does not divide by T: k and v stay replicated, each rank narrows them to its query heads.
    "llama_kv1": ("self_attn.q_proj.weight", "self_attn.o_proj.weight"),
    "dict_blocks": ("attn.c_attn.weight", "attn.c_proj.weight"),
    "explicit": ("attn.query.weight", "attn.key.weight", "attn.value.weight", "attn.out.weight"),
    "fused_qkv": ("qkv.weight", "proj.weight"),  # qkv viewed (3, heads, head_dim): split per chunk
    "neox": ("attention.query_key_value.weight", "attention.dense.weight"),  # (heads, 3, head_dim)
    "gqa": ("q.weight", "k.weight", "v.weight", "o.weight"),  # 2 KV heads, repeat_interleave
    "phi3": ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight"),  # q | k | v sliced; gate_up -> experts
    # Per-head q/k RMSNorm over head_dim (each rank normalises its own heads).
    "qwen3": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight"),
    # q/k RMSNorm across all heads: each rank's mean of squares all-reduced over "tp".
    "olmo2": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight"),
    "gptj": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.out_proj.weight"),  # stack
    # Self- and cross-attention; the per-head position bias stays whole, each rank narrowing it to its heads.
    "t5": tuple(f"{a}.{p}.weight" for a in ("SelfAttention", "EncDecAttention") for p in "qkvo"),
    # Fused q | k | v per KV group, the group's key and value picked by index: split in blocks of groups.
    "falcon_grouped": ("self_attention.query_key_value.weight", "self_attention.dense.weight"),
    # (heads, 3, head_dim) with a LayerNorm over head_dim of each head's q and k: its weight and bias get f.
    "persimmon": ("self_attn.query_key_value.weight", "self_attn.dense.weight"),
}
_models: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    """The dense model, built once per rank (every builder seeds itself: same weights everywhere)."""
    if name not in _models:
        _models[name] = BUILDERS[name]()
    return _models[name]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _loss(module: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(module(tokens)).flatten(0, 1), targets.flatten())


def _batches(n_groups: int, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets), each [n_groups, BATCH, seq]: one micro-batch per token group, same on every rank."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (n_groups, BATCH, seq), generator=g)
    targets = torch.randint(0, VOCAB, (n_groups, BATCH, seq), generator=g)
    return tokens, targets


def _mismatch(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> str | None:
    """None when close, else assert_close's message."""
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as e:
        return str(e)
    return None


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


# --- parity ----------------------------------------------------------------------------------------


class _DropCounter:
    """Counts dropped (token, choice) assignments (slot -1) of every Router call while enabled."""

    def __init__(self, module: nn.Module) -> None:
        self.dropped = 0
        self.assignments = 0
        self.enabled = True
        self.handles = [m.register_forward_hook(self._hook) for m in module.modules() if isinstance(m, Router)]

    def _hook(self, router, args, out) -> None:
        if self.enabled:
            slot_SK = out[1]
            self.dropped += int((slot_SK < 0).sum())
            self.assignments += slot_SK.numel()


def _parity(case: Case) -> dict[str, Any]:
    world = dist.get_world_size()
    T, X = case.tensor, case.expert
    n_groups = world // T  # X * D token groups, one per data-parallel replica
    model = _model(case.model)
    tokens, targets = _batches(n_groups, case.seq)
    moe = case.moe()
    try:
        pm = parallelize(model, (tokens[0],), moe=moe, parallel=case.parallel())
    except (ValueError, CollectiveOrderError) as e:
        # parallelize's checks raise on every rank alike, so the launch can go on to the next case.
        return {"name": case.name, "rank": dist.get_rank(), "parallelize_error": f"{type(e).__name__}: {e}"}
    ref = tedfx.to_moe(model, (tokens[0],), moe=moe)
    tedfx.set_moe_loss_scale(ref, 1.0)  # one backward per token group, summed, then averaged below
    c = pm.mesh.coords
    group = c["edp"] * X + c["ep"]  # this rank's token group; the T ranks of a tensor group share it
    result: dict[str, Any] = {"name": case.name, "rank": dist.get_rank(), "parallelize_error": None,
                              "coords": dict(c), "layout": (T, X, pm.mesh.layout.data), "group": group}
    result.update(_param_bytes(pm, ref, case))
    result["checkpoint_regions"] = [n.target for n in pm.graph.graph.nodes
                                    if n.op == "call_module" and isinstance(pm.graph.get_submodule(n.target),
                                                                            CheckpointRegion)]

    # Step 0 forward, no grad: the same logits on the rank's micro-batch.
    counter = _DropCounter(pm.graph)
    with torch.no_grad():
        out, expected = _logits(pm(tokens[group])), _logits(ref(tokens[group]))
    counter.enabled = False
    result.update(dropped=counter.dropped, assignments=counter.assignments,
                  forward_err=_max_abs(out, expected), forward_mismatch=_mismatch(out, expected, FORWARD_TOL))

    # STEPS AdamW steps on both; the reference averages the X * D groups' gradients as DDP does.
    opt = torch.optim.AdamW(pm.parameters(), lr=LR, eps=ADAM_EPS)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=ADAM_EPS)
    losses, ref_losses = [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if step == 1:
            pm.comm_stats().reset()  # count exactly one training step
        loss = _loss(pm, tokens[group], targets[group])
        loss.backward()
        if step == 0:
            grads = _full_grads(pm)
        if step == 1:
            result["step_comm"] = pm.comm_stats().table()
        opt.step()
        losses.append(float(loss.detach()))

        ref_opt.zero_grad(set_to_none=True)
        group_losses = []
        for i in range(n_groups):
            ref_loss = _loss(ref, tokens[i], targets[i])
            ref_loss.backward()
            group_losses.append(float(ref_loss.detach()))
        for p in ref.parameters():
            if p.grad is not None:
                p.grad /= n_groups
        if step == 0:
            result.update(_compare_grads(grads, ref))
        ref_opt.step()
        ref_losses.append(group_losses[group])
    result.update(losses=losses, ref_losses=ref_losses, comm=pm.comm_stats().table(),
                  predicted_comm=_predicted_comm(model, tokens[0], moe, case, pm))
    result.update(_compare_state(pm.full_state_dict(), ref.state_dict()))
    return result


def _predicted_comm(model: nn.Module, example: torch.Tensor, moe, case: Case, pm) -> list[tuple]:
    """What explain predicts this rank issues in one training step (simulated, no communication)."""
    moe_gm, moe_ctx = build_moe_graph(model, (example,), moe=moe)
    return predict_rank(moe_gm, moe_ctx, parallel=case.parallel(), layout=pm.mesh.layout, rank=dist.get_rank(),
                        example_inputs=(example,)).comm.table()


def _full_grads(pm) -> dict[str, torch.Tensor]:
    """The unsharded gradients: `pm.full_state_dict()` with each parameter's .grad in its place."""
    params = dict(pm.graph.named_parameters())
    saved = {name: p.data for name, p in params.items()}
    try:
        for p in params.values():
            p.data = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        full = pm.full_state_dict()
    finally:
        for name, p in params.items():
            p.data = saved[name]
    return {name: full[name] for name in full if name in params}


def _compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: dict
             ) -> tuple[dict[str, float], dict[str, str]]:
    """(max abs error, assert_close message of each mismatch) per key of `expected` (numel-0 tensors skipped)."""
    errs, mismatch = {}, {}
    for key, want in expected.items():
        if want.numel() == 0:
            continue
        got = actual.get(key)
        if got is None or got.shape != want.shape:
            found = "missing" if got is None else f"shape {tuple(got.shape)}"
            mismatch[key] = f"{found}, reference {tuple(want.shape)}"
            continue
        errs[key] = _max_abs(got, want)
        msg = _mismatch(got, want, tol)
        if msg is not None:
            mismatch[key] = msg
    return errs, mismatch


def _compare_grads(grads: dict[str, torch.Tensor], ref: nn.Module) -> dict[str, Any]:
    """Step-0 gradients against the reference's averaged ones (before either optimizer steps)."""
    expected = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref.named_parameters()}
    errs, mismatch = _compare(grads, expected, GRAD_TOL)
    return {"grad_err": max(errs.values(), default=0.0), "grad_mismatch": mismatch}


def _compare_state(full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    errs, mismatch = _compare(full, {k: v for k, v in ref.items() if k in full}, TRAINED_TOL)
    return {"missing_keys": sorted(set(ref) - set(full)), "extra_keys": sorted(set(full) - set(ref)),
            "state_err": max(errs.values(), default=0.0), "state_mismatch": mismatch}


def _is_expert(module: nn.Module, name: str) -> bool:
    owner = module.get_submodule(name.rpartition(".")[0])
    return isinstance(owner, ExpertWeights)


def _param_bytes(pm, ref: nn.Module, case: Case) -> dict[str, Any]:
    """Bytes this rank holds per state-dict tensor, against what the layout says it must hold.

    Expert weights (w1, w3, w2) and first biases (b1, b3) hold 1/(T*X) of the full tensor: E/X
    experts, F/T of each. b2 [E/X, H] is added after the tensor-parallel sum, so it holds 1/X.
    Non-expert tensors hold 1/T when `pm.shards` splits them over "tp", else all of it.

    Returns:
        The rank's byte totals (expert tensors without b2, expert b2, non-expert), the full
        sizes of the same, the non-expert keys split over "tp", every tensor whose local size or
        recorded split disagrees with the layout, and the attention projections that T > 1
        should have split but did not.
    """
    T, X = case.tensor, case.expert
    ref_state = ref.state_dict()
    local_bytes = {"expert": 0, "expert_b2": 0, "dense": 0}
    full_bytes = dict.fromkeys(local_bytes, 0)
    wrong, tp_sharded = {}, []
    for name, local in pm.graph.state_dict().items():
        full = ref_state[name]
        spec = pm.shards[name]
        axes = sorted(axis for axis, _ in spec.splits)
        if _is_expert(pm.graph, name):
            kind = "expert_b2" if name.endswith(".b2") else "expert"
            expected_axes = sorted(a for a, size in (("ep", X), ("tp", T if kind == "expert" else 1)) if size > 1)
            divisor = X if kind == "expert_b2" else T * X
        else:
            kind = "dense"
            expected_axes = ["tp"] if "tp" in axes else []
            divisor = T if "tp" in axes else 1
            if "tp" in axes:
                tp_sharded.append(name)
        local_bytes[kind] += local.numel() * local.element_size()
        full_bytes[kind] += full.numel() * full.element_size()
        if (tuple(spec.full_shape) != tuple(full.shape) or axes != expected_axes
                or local.numel() * divisor != full.numel()):
            wrong[name] = (f"local {tuple(local.shape)}, full {tuple(full.shape)}, splits {spec.splits}, "
                           f"recorded full shape {spec.full_shape}, expected 1/{divisor} split over {expected_axes}")
    missing_tp = [n for n in ref_state if T > 1 and n.endswith(TP_SHARDED[case.model]) and n not in tp_sharded]
    return {"local_bytes": local_bytes, "full_bytes": full_bytes, "tp_sharded": tp_sharded,
            "bytes_wrong": wrong, "missing_tp_shards": missing_tp}


# --- MoE loss scale --------------------------------------------------------------------------------


def _loss_scale(case: LossScaleCase) -> dict[str, Any]:
    """One step of `case.micro` micro-batches per token group; gradients against the written-out objective."""
    import warnings

    world = dist.get_world_size()
    M = case.micro
    n_groups = world // case.tensor
    tokens, targets = _batches(n_groups * M)  # micro-batch m of token group g: index m * n_groups + g
    moe = case.moe()
    parallel = tedfx.ParallelConfig(tensor=case.tensor, expert=case.expert, activation_checkpointing=case.checkpointing,
                                    timeout=TIMEOUT_S)
    pm = parallelize(_model("gpt"), (tokens[0],), moe=moe, parallel=parallel)
    c = pm.mesh.coords
    group = c["edp"] * case.expert + c["ep"]
    tedfx.set_moe_loss_scale(pm, 1 / M)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", tedfx.MoELossScaleWarning)
        for m in range(M):
            i = m * n_groups + group
            (_loss(pm, tokens[i], targets[i]) / M).backward()
    grads = _full_grads(pm)
    expected = reference_grads(_model("gpt"), list(zip(tokens, targets)), moe)
    without = reference_grads(_model("gpt"), list(zip(tokens, targets)), moe, aux_weight=0.0, z_weight=0.0)
    errs, mismatch = _compare(grads, expected, GRAD_TOL)
    router = next(n for n in expected if n.endswith("router.weight"))
    return {"name": case.name, "rank": dist.get_rank(), "grad_err": max(errs.values(), default=0.0),
            "grad_mismatch": mismatch, "warnings": [str(w.message) for w in caught],
            "router_moe_loss_share": _max_abs(expected[router], without[router]) / float(expected[router].abs().max())}


# --- the cost of the input checks ----------------------------------------------------------------------

SPIED = {
    dist: ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
           "broadcast", "broadcast_object_list", "all_to_all_single", "reduce_scatter_tensor", "barrier"),
    _compat: ("all_gather_into", "funcol_all_gather", "funcol_reduce_scatter"),
    _compat.funcol: ("all_reduce", "all_gather_tensor", "broadcast", "all_to_all_single", "reduce_scatter_tensor"),
}
"""Every collective function tedfx calls, where it looks them up at call time (the module's attribute)."""


@contextlib.contextmanager
def _spy_collectives(calls: list[tuple[str, int, int]]) -> Iterator[None]:
    """Append (function, ranks of its group, largest tensor argument in bytes) for each collective called."""
    saved = [(module, name, getattr(module, name)) for module, names in SPIED.items() for name in names
             if hasattr(module, name)]

    def spy(name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            values = [*args, *kwargs.values()]
            group = next((v for v in values if isinstance(v, dist.ProcessGroup)), None)
            nbytes = max((v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)), default=0)
            calls.append((name, dist.get_world_size(group), nbytes))
            return fn(*args, **kwargs)
        return call

    for module, name, fn in saved:
        setattr(module, name, spy(name, fn))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _check_cost(case: CheckCostCase) -> dict[str, Any]:
    """One training step and one no-grad forward with check_inputs on and off: the collectives the checks add."""
    world = dist.get_world_size()
    tokens, targets = _batches(world // case.tensor)
    parallel = tedfx.ParallelConfig(tensor=case.tensor, expert=case.expert, timeout=TIMEOUT_S)
    pm = parallelize(tiny_gpt(dropout=0.1)[0], (tokens[0],), moe=tedfx.MoEConfig(num_experts=4, top_k=2),
                     parallel=parallel)
    torch.manual_seed(0)  # the tensor ranks of a token group draw the same dropout masks
    x, y = tokens[pm.data_parallel_rank], targets[pm.data_parallel_rank]

    def train() -> None:
        _loss(pm, x, y).backward()
        pm.zero_grad(set_to_none=True)

    def evaluate() -> None:
        with torch.no_grad():
            pm.eval()
            pm(x)
            pm.train()

    out: dict[str, Any] = {"name": case.name, "rank": dist.get_rank()}
    for name, step in (("train", train), ("eval", evaluate)):
        step()  # first calls allocate; every step after a backward runs the replica check, on and off alike
        counted = {}
        for checking in (True, False):
            pm.check_inputs = checking
            counted[checking] = []
            with _spy_collectives(counted[checking]):
                step()
        pm.check_inputs = True
        extra = collections.Counter(counted[True])
        extra.subtract(collections.Counter(counted[False]))
        out[name] = {"extra": sorted(extra.elements()), "missing": sorted((-extra).elements()),
                     "pickles": [c for c in counted[True] if c[0].endswith("_object")]}
    return out


# --- errors ------------------------------------------------------------------------------------------


def _error(case: ErrorCase) -> dict[str, Any]:
    rank = dist.get_rank()
    tokens, _ = _batches(1)
    x = tokens[0]
    moe = tedfx.MoEConfig(num_experts=4, top_k=1, min_capacity=1)
    parallel = tedfx.ParallelConfig(tensor=case.tensor, expert=case.expert, timeout=TIMEOUT_S)
    model = _model("gpt")
    try:
        if case.kind == "experts_do_not_divide":
            moe = tedfx.MoEConfig(num_experts=3, top_k=1, min_capacity=1)
        elif case.kind == "different_weights":
            model = BUILDERS["gpt"]()  # a fresh copy: the shared one stays intact
            if rank == 1:
                with torch.no_grad():
                    model.h[1].attn.c_proj.weight[0, 0] += 1e-3
        elif case.kind == "different_rng":
            model = tiny_gpt(dropout=0.1)[0]
        pm = parallelize(model, (x,), moe=moe, parallel=parallel)
        if case.kind == "different_rng":
            torch.manual_seed(1000 + rank)  # per-rank seeds: the tensor ranks' dropout masks would differ
            pm(x)
        if case.kind == "different_input_shapes":
            long = torch.randint(0, VOCAB, (BATCH, 2 * SEQ), generator=torch.Generator().manual_seed(7))
            pm(long if rank == 1 else x)
        if case.kind == "different_input_dtypes":
            pm(x.int() if rank == 1 else x)
    except ValueError as e:
        return {"name": case.name, "rank": rank, "error": str(e)}
    return {"name": case.name, "rank": rank, "error": None}


# --- entry point -------------------------------------------------------------------------------------


def run_cases(cases: list[Case | ErrorCase | LossScaleCase | CheckCostCase]) -> list[dict[str, Any]]:
    """Run every case on this rank, in order (all ranks run the same list).

    Returns:
        One result dict per case, with "name", "rank" and "seconds" (this rank's time on the case).
    """
    patch_capture(setattr)
    results = []
    for case in cases:
        start = time.perf_counter()
        try:
            if isinstance(case, ErrorCase):
                result = _error(case)
            elif isinstance(case, LossScaleCase):
                result = _loss_scale(case)
            elif isinstance(case, CheckCostCase):
                result = _check_cost(case)
            else:
                result = _parity(case)
        except Exception as e:
            e.add_note(f"in case {case.name}")
            raise
        result["seconds"] = time.perf_counter() - start
        results.append(result)
    return results


def run_missing_peer(timeout_s: float, root: str) -> dict[str, Any]:
    """Rank 1 never calls forward, tedfx.save or full_state_dict: rank 0's collectives must fail within the
    ParallelConfig timeout, not hang; the checkpoint calls with a CollectiveCallError naming the fix. The
    forward's timeout closes the world group's connection, the save's check runs on the mesh's door group."""
    tokens, _ = _batches(1)
    pm = parallelize(_model("gpt"), (tokens[0],), moe=tedfx.MoEConfig(num_experts=4, top_k=1, min_capacity=1),
                     parallel=tedfx.ParallelConfig(expert=2, timeout=timeout_s))
    if dist.get_rank() == 1:
        time.sleep(4 * timeout_s)  # alive but silent: only the timeout can end rank 0's waits
        return {"error": None, "seconds": 0.0}
    out = {}
    for name, call in (("", lambda: pm(tokens[0])), ("save_", lambda: tedfx.save(f"{root}/rank0_alone", pm)),
                       ("state_", pm.full_state_dict)):
        start = time.perf_counter()
        try:
            call()
            out[f"{name}error"] = None
        except Exception as e:  # gloo reports the forward's timeout as a RuntimeError
            out[f"{name}error"] = f"{type(e).__name__}: {e}"
        out[f"{name}seconds"] = time.perf_counter() - start
    return out


def run_accumulation() -> float:
    """Two backwards before reading the grads (gradient accumulation) on X=2: the largest gradient error
    against the reference accumulating all four token-group backwards and averaging."""
    from tedfx.sharding import shard_tensor

    tokens, targets = _batches(4)  # micro-batch m of token group g: index 2 * m + g
    moe = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
    pm = parallelize(_model("gpt"), (tokens[0],), moe=moe, parallel=tedfx.ParallelConfig(expert=2))
    ref = tedfx.to_moe(_model("gpt"), (tokens[0],), moe=moe)
    for module in (pm, ref):
        tedfx.set_moe_loss_scale(module, 1.0)  # the two backwards are summed, not averaged
    group = pm.mesh.coords["ep"]
    for micro in range(2):
        _loss(pm, tokens[2 * micro + group], targets[2 * micro + group]).backward()
        for g in range(2):
            _loss(ref, tokens[2 * micro + g], targets[2 * micro + g]).backward()
    full = dict(ref.named_parameters())
    sizes = {"tp": 1, "ep": 2, "edp": 1}
    return max(_max_abs(p.grad, shard_tensor(full[name].grad / 2, pm.shards[name], pm.mesh.coords, sizes))
               for name, p in pm.graph.named_parameters())
