"""Per-rank side of tests/test_optimizer.py: every optimizer case of one world size, in one launch.

`run_cases(cases)` runs on every rank of a `tedfx.runtime.launch` and returns one result dict
per case; the pytest side asserts on them. The reference is the parity oracle of
tests/parallel_cases.py: `tedfx.to_moe(model)` in the same process, one backward per token group,
gradients averaged over the X * D groups (docs/validation.md, "Parity oracle").

Cases:
    NormCase        pm.clip_grad_norm_ against the single-process global norm and clipped gradients.
    TrainCase       5 steps of tedfx.optimizer (max_norm on) for zero 0 and 1, untiled and tiled, in
                    fp32 and bf16: bit-identical weights between the variants, the reference, plain
                    torch AdamW, optimizer-state bytes per group.
    Fp16Case        an inf in one rank's gradient: the step is skipped and counted everywhere, the scale adapts.
    NoSyncCase      pm.no_sync(): no all-reduce inside, the next backward averages the accumulated sum.
    LoudCase        what must raise: torch's per-rank clipping (replicas diverge), fp16 without
                    scale_loss, a non-elementwise optimizer asked to step slices.
    MemoryCase      per-rank training memory measured (AllocationTracker) for tedfx.explain to predict.
    ResumeCase      the optimizer's state dict resumes bit for bit; an LR scheduler sets every tile's lr.
    GlooDtypesCase  the collectives tedfx uses accept bf16 and fp16 on gloo.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import tedfx
from tedfx.api import parallelize
from tedfx.runtime.grad_sync import plan_buckets
from tedfx.runtime.memory import AllocationTracker

from models import VOCAB, patch_capture
from parallel_cases import (
    ADAM_EPS,
    BATCH,
    GRAD_TOL,
    LR,
    SEQ,
    TIMEOUT_S,
    TRAINED_TOL,
    _compare,
    _full_grads,
    _loss,
    _model,
)

__all__ = ["Fp16Case", "GlooDtypesCase", "LoudCase", "MemoryCase", "NoSyncCase", "NormCase", "ResumeCase", "TrainCase",
           "memory_parallel", "run_cases"]

STEPS = 5
MAX_NORM = 0.5
"""Below the gradient norm of the test GPT (about 2.7 at step 0): clipping is active in every step."""
TILE = 1000
"""Entries per tile: cuts most parameters of the test GPT into several tiles, and some tiles span parameters."""
MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)


@dataclass(frozen=True)
class _Case:
    @property
    def name(self) -> str:
        """The class name without "Case", then the field values: "norm-gpt-2-1", "fp16-2", "gloodtypes"."""
        return "-".join([type(self).__name__.removesuffix("Case").lower(),
                         *(str(getattr(self, f.name)) for f in fields(self))])


@dataclass(frozen=True)
class NormCase(_Case):
    model: str
    tensor: int
    expert: int


@dataclass(frozen=True)
class TrainCase(_Case):
    tensor: int
    expert: int


@dataclass(frozen=True)
class Fp16Case(_Case):
    expert: int = 2


@dataclass(frozen=True)
class NoSyncCase(_Case):
    expert: int = 2


@dataclass(frozen=True)
class LoudCase(_Case):
    kind: str
    """"torch_clip", "fp16_unscaled" or "not_elementwise"."""


@dataclass(frozen=True)
class MemoryCase(_Case):
    precision: str
    zero: int
    tile_numel: int | None


@dataclass(frozen=True)
class ResumeCase(_Case):
    """bf16, zero=1, tiled: a state dict saved after 2 steps resumes bit for bit; an LR scheduler drives the tiles."""


@dataclass(frozen=True)
class GlooDtypesCase(_Case):
    pass


def memory_parallel(case: MemoryCase) -> tedfx.ParallelConfig:
    """The layout of the memory cases: X = 2 in a world of 4 (dp = 4, edp = 2)."""
    return tedfx.ParallelConfig(expert=2, precision=case.precision, zero=case.zero, timeout=TIMEOUT_S)


# --- shared ----------------------------------------------------------------------------------------


def _parallelize(model: str, T: int, X: int, **options: Any):
    parallel = tedfx.ParallelConfig(tensor=T, expert=X, timeout=TIMEOUT_S, **options)
    return parallelize(_model(model), (torch.zeros(BATCH, SEQ, dtype=torch.long),), moe=MOE, parallel=parallel)


def _step_batches(n_groups: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (tokens, targets) pair per step, each [n_groups, BATCH, SEQ]: the same on every rank."""
    g = torch.Generator().manual_seed(4321)
    return [(torch.randint(0, VOCAB, (n_groups, BATCH, SEQ), generator=g),
             torch.randint(0, VOCAB, (n_groups, BATCH, SEQ), generator=g)) for _ in range(STEPS)]


def _group(pm) -> int:
    c = pm.mesh.coords
    return c["edp"] * pm.parallel.expert + c["ep"]


def _reference_backward(ref: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """The reference's averaged gradient over all token groups (DDP semantics); returns each group's loss."""
    losses = []
    for i in range(tokens.shape[0]):
        loss = _loss(ref, tokens[i], targets[i])
        loss.backward()
        losses.append(float(loss.detach()))
    for p in ref.parameters():
        if p.grad is not None:
            p.grad /= tokens.shape[0]
    return losses


def _reference_training(model: str, n_groups: int, batches, max_norm: float | None) -> tuple[dict, list[list[float]]]:
    ref = tedfx.to_moe(_model(model), (batches[0][0][0],), moe=MOE)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=ADAM_EPS)
    losses = []
    for tokens, targets in batches:
        opt.zero_grad(set_to_none=True)
        losses.append(_reference_backward(ref, tokens, targets))
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt.step()
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}, losses


def _fingerprint(pm) -> list[float]:
    return [float(p.detach().double().sum()) for p in pm.graph.parameters()]


# --- clipping --------------------------------------------------------------------------------------


def _norm(case: NormCase) -> dict[str, Any]:
    pm = _parallelize(case.model, case.tensor, case.expert)
    n_groups = dist.get_world_size() // case.tensor
    tokens, targets = _step_batches(n_groups)[0]
    ref = tedfx.to_moe(_model(case.model), (tokens[0],), moe=MOE)
    group = _group(pm)
    _loss(pm, tokens[group], targets[group]).backward()
    _reference_backward(ref, tokens, targets)
    ref_grads = [p.grad for p in ref.parameters() if p.grad is not None]
    inf_norm = float(pm.clip_grad_norm_(1e30, norm_type=math.inf))  # coefficient 1: nothing changes
    ref_inf = float(torch.nn.utils.get_total_norm(ref_grads, math.inf))
    norm = float(pm.clip_grad_norm_(MAX_NORM))
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM))
    expected = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref.named_parameters()}
    _, mismatch = _compare(_full_grads(pm), expected, GRAD_TOL)
    return {"norm": norm, "ref_norm": ref_norm, "inf_norm": inf_norm, "ref_inf_norm": ref_inf,
            "clipped_grad_mismatch": mismatch}


# --- training: tiled / untiled, zero 0 / 1, fp32 / bf16 ---------------------------------------------


def _train(pm, make_opt: Callable, batches, group: int) -> tuple[Any, list[float]]:
    opt = make_opt(pm)
    losses = []
    for tokens, targets in batches:
        loss = _loss(pm, tokens[group], targets[group])
        scaled = opt.scale_loss(loss) if isinstance(opt, tedfx.TedOptimizer) else loss
        scaled.backward()
        if not isinstance(opt, tedfx.TedOptimizer):
            pm.clip_grad_norm_(MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return opt, losses


def _masters(pm, opt) -> dict[str, torch.Tensor]:
    """The unsharded fp32 master weights of an unsharded optimizer (every rank owns all of its entries)."""
    local = {id(p): p.detach().float().clone() for p in pm.graph.parameters()}
    for masters in opt.masters:
        if masters.flat is not None:
            for piece in masters.group.pieces():
                local[id(piece.param)].view(-1)[piece.start:piece.stop] = masters.view(piece)
    params = dict(pm.graph.named_parameters())
    saved = {name: p.data for name, p in params.items()}
    try:
        for p in params.values():
            p.data = local[id(p)]
        return pm.full_state_dict()
    finally:
        for name, p in params.items():
            p.data = saved[name]


def _update_error(master: dict, initial: dict, ref: dict, ref_initial: dict) -> dict[str, Any]:
    """|update - reference update| / |reference update|, over all tensors and per tensor (update = after - before)."""
    per_tensor, diff_sq, ref_sq = {}, 0.0, 0.0
    for name, want in ref.items():
        if name not in master:
            continue
        ref_update = want - ref_initial[name]
        diff = float((master[name] - initial[name].float() - ref_update).norm())
        diff_sq, ref_sq = diff_sq + diff**2, ref_sq + float(ref_update.norm()) ** 2
        if float(ref_update.norm()) > 0:
            per_tensor[name] = diff / float(ref_update.norm())
    return {"total": math.sqrt(diff_sq / ref_sq), "per_tensor": per_tensor}


def _train_case(case: TrainCase) -> dict[str, Any]:
    T, X = case.tensor, case.expert
    n_groups = dist.get_world_size() // T
    batches = _step_batches(n_groups)
    ref_state, ref_losses = _reference_training("gpt", n_groups, batches, MAX_NORM)
    ref_initial = tedfx.to_moe(_model("gpt"), (batches[0][0][0],), moe=MOE).state_dict()
    out: dict[str, Any] = {"ref_losses": ref_losses}
    for precision in ("fp32", "bf16"):
        for zero in (0, 1):
            pm = _parallelize("gpt", T, X, precision=precision, zero=zero)
            group = _group(pm)
            out["group"] = group
            initial = {n: p.detach().clone() for n, p in pm.graph.named_parameters()}
            full_initial = pm.full_state_dict()
            for tile in (None, TILE):
                with torch.no_grad():
                    for n, p in pm.graph.named_parameters():
                        p.copy_(initial[n])
                opt, losses = _train(pm, lambda m, t=tile: tedfx.optimizer(m, torch.optim.AdamW, lr=LR, eps=ADAM_EPS,
                                                                           tile_numel=t, max_norm=MAX_NORM),
                                     batches, group)
                key = f"{precision}-zero{zero}-tile{tile}"
                out[key] = {"state": pm.full_state_dict(), "losses": losses,
                            "state_bytes": {f"{a}/{d}": b for (a, d), b in opt.state_bytes_by_group().items()},
                            "groups": [(g.axis, str(g.dtype), g.numel, g.size, g.rank, g.owned)
                                       for g in opt.flat_groups],
                            "memory": opt.memory()}
                if precision == "bf16" and zero == 0 and tile is None:
                    masters = _masters(pm, opt)
                    out["bf16_update_error"] = _update_error(masters, full_initial, ref_state, ref_initial)
            if precision == "fp32" and zero == 0:  # plain torch AdamW, clipped by pm.clip_grad_norm_
                with torch.no_grad():
                    for n, p in pm.graph.named_parameters():
                        p.copy_(initial[n])
                _, losses = _train(pm, lambda m: torch.optim.AdamW(m.parameters(), lr=LR, eps=ADAM_EPS), batches, group)
                out["torch"] = {"state": pm.full_state_dict(), "losses": losses}
    _, mismatch = _compare(out["fp32-zero0-tileNone"]["state"], ref_state, TRAINED_TOL)
    out["fp32_ref_mismatch"] = mismatch
    out["ref_state"] = ref_state
    return out


def _summarise_train(out: dict[str, Any]) -> dict[str, Any]:
    """Bitwise comparisons done on the rank: full state dicts are too large to send back from every case."""
    variants = [k for k in out if k.startswith(("fp32-", "bf16-"))]
    same = {}
    for k in variants:
        base = out[k.split("-")[0] + "-zero0-tileNone"]["state"]
        same[k] = all(torch.equal(out[k]["state"][n], base[n]) for n in base)
    same["torch"] = all(torch.equal(out["torch"]["state"][n], out["fp32-zero0-tileNone"]["state"][n])
                        for n in out["torch"]["state"])
    bf16 = out["bf16-zero0-tileNone"]["state"]
    return {"identical": same, "fp32_ref_mismatch": out["fp32_ref_mismatch"],
            "bf16_update_error": out["bf16_update_error"],
            "bf16_weight_err": max(float((bf16[n].float() - out["ref_state"][n]).abs().max()) for n in bf16),
            "losses": {k: out[k]["losses"] for k in variants}, "torch_losses": out["torch"]["losses"],
            "ref_losses": out["ref_losses"], "group": out["group"],
            "state_bytes": {k: out[k]["state_bytes"] for k in variants},
            "groups": {k: out[k]["groups"] for k in variants}, "memory": {k: out[k]["memory"] for k in variants}}


# --- fp16 loss scaling ------------------------------------------------------------------------------


def _fp16(case: Fp16Case) -> dict[str, Any]:
    """Step 1 gets an inf in rank 1's gradient: skipped and counted on every rank; the scale halves, then grows."""
    pm = _parallelize("gpt", 1, case.expert, precision="fp16")
    scale = tedfx.LossScaleConfig(init_scale=2.0**10, growth_interval=2)
    opt = tedfx.optimizer(pm, torch.optim.AdamW, lr=LR, eps=ADAM_EPS, loss_scale=scale)
    batches = _step_batches(dist.get_world_size())
    group = _group(pm)
    scales, skipped, changed, losses = [], [], [], []
    for step, (tokens, targets) in enumerate(batches):
        loss = _loss(pm, tokens[group], targets[group])
        opt.scale_loss(loss).backward()
        if step == 1 and dist.get_rank() == 1:
            next(iter(pm.graph.parameters())).grad.view(-1)[0] = float("inf")
        before = _fingerprint(pm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        changed.append(before != _fingerprint(pm))
        scales.append(opt.loss_scale)
        skipped.append(opt.skipped_steps)
        losses.append(float(loss.detach()))
    return {"scales": scales, "skipped": skipped, "changed": changed, "losses": losses,
            "dtypes": sorted({str(p.dtype) for p in pm.parameters()})}


# --- accumulation with no_sync ---------------------------------------------------------------------


def _no_sync(case: NoSyncCase) -> dict[str, Any]:
    """Micro-batch 0 inside no_sync, micro-batch 1 synced: the average of the sums of both, one all-reduce."""
    pm = _parallelize("gpt", 1, case.expert)
    n_groups = dist.get_world_size()
    (tokens0, targets0), (tokens1, targets1) = _step_batches(n_groups)[:2]
    group = _group(pm)
    buffers = {b.data_ptr(): b.numel() * b.element_size() for b in pm.grad_buffers()}
    pm.comm_stats().reset()
    with pm.no_sync():
        _loss(pm, tokens0[group], targets0[group]).backward()
    inside = pm.comm_stats().calls("all_reduce", phase="backward")
    _loss(pm, tokens1[group], targets1[group]).backward()
    after = pm.comm_stats().calls("all_reduce", phase="backward")
    in_buckets = all(any(0 <= p.grad.data_ptr() - start < size for start, size in buffers.items())
                     for p in pm.graph.parameters())
    ref = tedfx.to_moe(_model("gpt"), (tokens0[0],), moe=MOE)
    for i in range(n_groups):
        _loss(ref, tokens0[i], targets0[i]).backward()
        _loss(ref, tokens1[i], targets1[i]).backward()
    expected = {n: p.grad / n_groups for n, p in ref.named_parameters()}
    _, mismatch = _compare(_full_grads(pm), expected, GRAD_TOL)
    sizes = {axis: pm.mesh.size(axis) for axis in ("dp", "edp")}
    planned = len(plan_buckets(pm.sync_params, sizes, pm.parallel.bucket_mb))
    return {"all_reduces_inside": inside, "all_reduces_after": after, "planned_all_reduces": planned,
            "grads_in_buckets": in_buckets, "grad_mismatch": mismatch}


# --- what must fail loudly ---------------------------------------------------------------------------


def _loud(case: LoudCase) -> dict[str, Any]:
    tokens, targets = _step_batches(dist.get_world_size())[0]
    try:
        if case.kind == "torch_clip":
            pm = _parallelize("gpt", 1, 2)
            opt = torch.optim.AdamW(pm.parameters(), lr=LR)
            _loss(pm, tokens[_group(pm)], targets[_group(pm)]).backward()
            torch.nn.utils.clip_grad_norm_(pm.parameters(), MAX_NORM)  # each rank: the norm of its own shards
            opt.step()
            pm(tokens[_group(pm)])
        elif case.kind == "fp16_unscaled":
            pm = _parallelize("gpt", 1, 2, precision="fp16")
            opt = tedfx.optimizer(pm, torch.optim.AdamW, lr=LR)
            _loss(pm, tokens[_group(pm)], targets[_group(pm)]).backward()
            opt.step()
        elif case.kind == "not_elementwise":
            pm = _parallelize("gpt", 1, 2, zero=1)
            tedfx.optimizer(pm, torch.optim.Adafactor, lr=LR)
    except (ValueError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


# --- memory -----------------------------------------------------------------------------------------


def _memory(case: MemoryCase) -> dict[str, Any]:
    """Training memory of this rank after three steps; the third step's allocations tracked."""
    pm = parallelize(_model("gpt"), (torch.zeros(BATCH, SEQ, dtype=torch.long),), moe=MOE,
                     parallel=memory_parallel(case))
    opt = tedfx.optimizer(pm, torch.optim.AdamW, lr=LR, tile_numel=case.tile_numel, max_norm=MAX_NORM)
    tokens, targets = _step_batches(dist.get_world_size())[0]
    group = _group(pm)
    for step in range(3):
        opt.scale_loss(_loss(pm, tokens[group], targets[group])).backward()
        with AllocationTracker() as mem:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return {**opt.memory(), "step_transient": mem.peak}


def _resume(case: ResumeCase) -> dict[str, Any]:
    pm = _parallelize("gpt", 1, 2, precision="bf16", zero=1)
    batches = _step_batches(dist.get_world_size())
    group = _group(pm)

    def make(m):
        opt = tedfx.optimizer(m, torch.optim.AdamW, lr=LR, tile_numel=TILE, max_norm=MAX_NORM)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 4 else 1.0)

    def run(opt, sched, steps):
        for tokens, targets in steps:
            opt.scale_loss(_loss(pm, tokens[group], targets[group])).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    opt, sched = make(pm)
    run(opt, sched, batches[:2])
    weights = {n: p.detach().clone() for n, p in pm.graph.named_parameters()}
    saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
    run(opt, sched, batches[2:4])
    after_4 = _fingerprint(pm)
    run(opt, sched, batches[4:])  # lr 0 from the scheduler: nothing moves
    first = pm.full_state_dict()
    with torch.no_grad():
        for n, p in pm.graph.named_parameters():
            p.copy_(weights[n])
    opt, sched = make(pm)
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    run(opt, sched, batches[2:])
    second = pm.full_state_dict()
    try:
        tedfx.optimizer(pm, torch.optim.AdamW, lr=LR).load_state_dict(saved[0])  # untiled: another layout
        wrong_layout = None
    except ValueError as e:
        wrong_layout = str(e)
    return {"resumed_identical": all(torch.equal(first[k], second[k]) for k in first),
            "frozen_by_scheduler": after_4 == _fingerprint(pm), "wrong_layout": wrong_layout}


def _gloo_dtypes(case: GlooDtypesCase) -> dict[str, Any]:
    """Every collective tedfx issues, on bf16 and fp16 tensors: ok, or the error."""
    out = {}
    rank, world = dist.get_rank(), dist.get_world_size()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.full((2 * world,), rank + 1.0, dtype=dtype)
        calls = {
            "all_reduce": lambda: dist.all_reduce(x.clone()),
            "all_gather_into": lambda: tedfx._compat.all_gather_into(torch.empty(2 * world * world, dtype=dtype), x),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(torch.empty(2, dtype=dtype), x),
            "all_to_all_single": lambda: dist.all_to_all_single(torch.empty_like(x), x),
        }
        for name, call in calls.items():
            try:
                call()
                out[f"{name}/{dtype}"] = "ok"
            except Exception as e:  # noqa: BLE001 - the test reports which dtype and collective failed
                out[f"{name}/{dtype}"] = f"{type(e).__name__}: {e}"
    summed = torch.full((4,), rank + 1.0, dtype=torch.bfloat16)
    dist.all_reduce(summed)
    out["bf16_sum_exact"] = bool((summed == world * (world + 1) / 2).all())
    return out


# --- entry point -------------------------------------------------------------------------------------

_RUNNERS = {NormCase: _norm, TrainCase: lambda c: _summarise_train(_train_case(c)), Fp16Case: _fp16,
            NoSyncCase: _no_sync, LoudCase: _loud, MemoryCase: _memory, GlooDtypesCase: _gloo_dtypes,
            ResumeCase: _resume}


def run_cases(cases: list) -> list[dict[str, Any]]:
    """Run every case on this rank, in order; one result dict per case with "name", "rank" and "seconds"."""
    patch_capture(setattr)
    results = []
    for case in cases:
        start = time.perf_counter()
        try:
            result = _RUNNERS[type(case)](case)
        except Exception as e:
            e.add_note(f"in case {case.name}")
            raise
        result.update(name=case.name, rank=dist.get_rank(), seconds=time.perf_counter() - start)
        results.append(result)
    return results
