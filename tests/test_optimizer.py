"""tedfx.optimizer, mixed precision, ZeRO-1, the tiled step, global clipping, gradient accumulation.

Tier (a), no processes: configs, the loss scaler, ownership ranges and tiles, which rank counts a
parameter in the global norm, the replica check's verdict, the allocation tracker.
Tier (b): one launch per world size (2, 4, 8) runs every case of tests/optim_cases.py; the tests
below assert on the returned per-rank results (docs/validation.md, "Parity oracle").
"""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
from torch import nn

import tedfx
from tedfx.config import LossScaleConfig, ParallelConfig
from tedfx.runtime import Layout, launch
from tedfx.runtime.grad_norm import counted_here
from tedfx.runtime.memory import AllocationTracker
from tedfx.runtime.precision import LossScaler, low_precision_copy
from tedfx.runtime.replicas import ReplicaCheck
from tedfx.runtime.zero import FlatGroup, cut_tiles
from tedfx.sharding import ParamShard

from models import tiny_gpt
from optim_cases import (
    MAX_NORM,
    MOE,
    TILE,
    Fp16Case,
    GlooDtypesCase,
    LoudCase,
    MemoryCase,
    NormCase,
    NoSyncCase,
    ResumeCase,
    TrainCase,
    memory_parallel,
    run_cases,
)
from parallel_cases import BATCH, SEQ

LAUNCH_TIMEOUT_S = 120

MEMORY_CASES = [MemoryCase(precision, zero, tile) for precision in ("fp32", "bf16") for zero in (0, 1)
                for tile in (None, TILE)]
WORLD_CASES = {
    2: [GlooDtypesCase(), NormCase("gpt", 2, 1), NormCase("gpt", 1, 2), Fp16Case(), NoSyncCase(),
        LoudCase("torch_clip"), LoudCase("fp16_unscaled"), LoudCase("not_elementwise"), ResumeCase()],
    4: [NormCase("gpt", 2, 2), NormCase("gpt", 1, 4), NormCase("gpt2", 2, 2), NormCase("llama_kv1", 2, 2),
        TrainCase(1, 2), *MEMORY_CASES],
    8: [NormCase("gpt", 2, 2), NormCase("gpt", 2, 4), NormCase("gpt", 1, 2), TrainCase(2, 2)],
}
"""The layouts of tests/test_parallel.py's matrix for clipping; training on X = 2 with D = 2 (both "dp" and
"edp" sharded by ZeRO) and on T = 2, X = 2, D = 2."""

BF16_LOSS_RTOL = 2e-3
"""bf16 losses against the fp32 reference, every step (bf16 keeps 8 significant bits: 2**-8 = 0.0039)."""
BF16_UPDATE_RTOL = 0.25
"""bf16: |W5 - W0 - (reference W5 - W0)| / |reference W5 - W0| over all fp32 master weights after 5 steps
(measured: 0.17). No update at all gives 1.0."""
BF16_TENSOR_UPDATE_RTOL = 0.75
"""The same per tensor (measured: up to 0.52, a router, whose update moves with routing decisions that bf16
activations flip). Without fp32 master weights, AdamW's steps of 1e-3 are lost on LayerNorm weights near 1.0
(bf16 spacing 2**-8 there): 1.0 for them."""


# --- tier (a): no processes ----------------------------------------------------------------------


def test_zero_accepts_0_1_and_bools_and_refuses_the_rest():
    assert ParallelConfig(zero=True).zero == 1 and ParallelConfig(zero=False).zero == 0
    assert ParallelConfig(zero=1).zero == 1
    for bad in (2, "1", 1.0, -1):
        with pytest.raises(ValueError, match=r"ParallelConfig\.zero=.* is invalid: expected 0 \(no sharding\) or 1"):
            ParallelConfig(zero=bad)
    ParallelConfig(precision="bf16", zero=1).check_supported()  # declared and run: nothing refused


def test_loss_scale_config_names_the_field():
    with pytest.raises(ValueError, match=r"LossScaleConfig\.backoff_factor=1\.5 is invalid"):
        LossScaleConfig(backoff_factor=1.5)
    with pytest.raises(ValueError, match=r"LossScaleConfig\.growth_interval=0 is invalid"):
        LossScaleConfig(growth_interval=0)


def test_loss_scaler_halves_on_overflow_and_grows_after_good_steps():
    scaler = LossScaler(LossScaleConfig(init_scale=8.0, growth_interval=3, min_scale=2.0))
    history = []
    for overflow in (False, True, False, False, False, True, True, True):
        scaler.update(found_overflow=overflow)
        history.append(scaler.scale)
    assert history == [8.0, 4.0, 4.0, 4.0, 8.0, 4.0, 2.0, 2.0]  # grows after 3 good steps, never below min_scale
    assert scaler.skipped_steps == 4
    assert LossScaler.overflowed(math.inf) and LossScaler.overflowed(math.nan) and not LossScaler.overflowed(1e30)


def test_optimizer_wants_the_parallel_module():
    with pytest.raises(TypeError, match=r"expects the ParallelModule that tedfx\.parallelize returned, got Linear"):
        tedfx.optimizer(nn.Linear(2, 2), torch.optim.AdamW)


def _params(*numels: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(n)) for n in numels]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_zero_ranges_partition_the_group_and_pad_the_last_rank(size):
    params = _params(5, 17, 1, 30)  # 53 entries
    groups = [FlatGroup("dp", torch.float32, ["a", "b", "c", "d"], params, size, r) for r in range(size)]
    chunk = math.ceil(53 / size)
    owned = [g.owned for g in groups]
    assert owned[0][0] == 0 and owned[-1][1] == 53
    assert all(a[1] == b[0] for a, b in zip(owned, owned[1:])), owned
    assert all(stop - start == chunk for start, stop in owned[:-1])
    assert 0 <= chunk * size - 53 < size  # the padding: less than one entry per rank
    for g in groups:  # pieces cover the owned range exactly, cut at parameter boundaries
        pieces = g.pieces()
        assert sum(p.numel for p in pieces) == g.owned[1] - g.owned[0]
        assert all(0 <= p.start < p.stop <= p.param.numel() for p in pieces)


def test_tiles_hold_at_most_tile_numel_and_cover_every_piece_once():
    group = FlatGroup("edp", torch.float32, ["a", "b", "c"], _params(2500, 10, 1300), 1, 0)
    tiles = cut_tiles(group.pieces(), 1000)
    assert [sum(p.numel for p in t) for t in tiles] == [1000, 1000, 1000, 810]  # 3810 entries
    covered = {}
    for tile in tiles:
        for p in tile:
            covered.setdefault(id(p.param), []).append((p.start, p.stop))
    for param in group.params:
        spans = sorted(covered[id(param)])
        assert spans[0][0] == 0 and spans[-1][1] == param.numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert cut_tiles(group.pieces(), None) == [group.pieces()]


@pytest.mark.parametrize("world, T, X", [(2, 2, 1), (2, 1, 2), (4, 2, 2), (4, 1, 4), (8, 2, 2), (8, 2, 4), (8, 1, 2)])
@pytest.mark.parametrize("splits", [(), (("tp", 0),), (("ep", 0),), (("ep", 0), ("tp", 1))])
def test_each_parameter_is_counted_once_in_the_global_norm(world, T, X, splits):
    """Over the ranks holding one shard (same coordinates on the split axes), exactly one counts it."""
    layout = Layout.build(world, ParallelConfig(tensor=T, expert=X))
    shard = ParamShard("w", splits, None, (4, 4))
    holders: dict[tuple, list[int]] = {}
    for rank in range(world):
        c = layout.coords(rank)
        holders.setdefault(tuple(c[a] for a, _ in splits), []).append(rank)
    for ranks in holders.values():
        counted = [r for r in ranks if counted_here(shard, layout.coords(r))]
        assert len(counted) == 1, (splits, ranks, counted)


def test_replica_check_names_the_parameter_and_the_disagreeing_copies():
    layout = Layout.build(4, ParallelConfig(tensor=2))  # tp groups [0, 1], [2, 3]
    params = [("replicated", nn.Parameter(torch.zeros(3))), ("split", nn.Parameter(torch.zeros(3)))]
    shards = {"replicated": ParamShard("replicated", (), None, (3,)), "split": ParamShard("split", (("tp", 0),), None,
                                                                                         (6,))}
    check = ReplicaCheck(params, shards, layout)
    table = torch.tensor([[1.0, 5.0], [1.0, 6.0], [1.0, 5.0], [1.0, 6.0]])  # shards differ by tp: fine
    assert check.divergent(table) == []
    table[3, 0] = 1.5
    assert check.divergent(table) == [("replicated", [0, 1, 2, 3])]
    table[3, 0], table[2, 1] = 1.0, 7.0  # rank 2's tp-0 shard differs from rank 0's copy of it
    assert check.divergent(table) == [("split", [0, 2])]


def test_allocation_tracker_counts_what_lives_and_forgets_what_is_freed():
    x = torch.ones(1000)
    with AllocationTracker() as mem:
        y = x * 2  # 4000 bytes
        z = y.view(10, 100)  # a view: no new storage
        w = (x + 1).sum()  # the 4000-byte temporary dies at once
        del y
    assert mem.peak == 8004 and mem.allocated == 8004
    assert mem.live == 4004  # z keeps y's storage; w is 4 bytes
    del z, w


def test_low_precision_copy_casts_floats_keeps_ties_and_leaves_the_model_alone():
    model, _ = tiny_gpt()
    model.register_buffer("steps", torch.zeros(3, dtype=torch.long))
    low = low_precision_copy(model, torch.bfloat16)
    assert low.lm_head.weight is low.wte.weight  # still tied
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert low.steps.dtype == torch.long
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# --- tier (b): one launch per world size -----------------------------------------------------------


def _case_id(world: int, case) -> str:
    return f"w{world}-{case.name}"


def _params_of(kind: type) -> list:
    return [pytest.param(world, case, id=_case_id(world, case))
            for world, cases in WORLD_CASES.items() for case in cases if isinstance(case, kind)]


def _launch(world: int) -> dict[str, list[dict]]:
    cases = WORLD_CASES[world]
    start = time.perf_counter()
    per_rank = launch(run_cases, world, cases, backend="gloo", timeout=LAUNCH_TIMEOUT_S)
    print(f"world {world}: {len(cases)} optimizer cases in one launch, {time.perf_counter() - start:.1f} s")
    return {case.name: [per_rank[rank][i] for rank in range(world)] for i, case in enumerate(cases)}


@pytest.fixture(scope="module")
def world_2() -> dict[str, list[dict]]:
    return _launch(2)


@pytest.fixture(scope="module")
def world_4() -> dict[str, list[dict]]:
    return _launch(4)


@pytest.fixture(scope="module")
def world_8() -> dict[str, list[dict]]:
    return _launch(8)


def _results(request, world: int, case) -> list[dict]:
    ranks = request.getfixturevalue(f"world_{world}")[case.name]
    assert [r["rank"] for r in ranks] == list(range(world))
    return ranks


@pytest.mark.parametrize("world, case", _params_of(NormCase))
def test_clipping_equals_the_single_process_global_norm(request, world, case):
    ranks = _results(request, world, case)
    for r in ranks:
        assert r["norm"] == ranks[0]["norm"] and r["inf_norm"] == ranks[0]["inf_norm"], "ranks disagree on the norm"
        assert math.isclose(r["norm"], r["ref_norm"], rel_tol=1e-5), (r["norm"], r["ref_norm"])
        assert math.isclose(r["inf_norm"], r["ref_inf_norm"], rel_tol=1e-5), (r["inf_norm"], r["ref_inf_norm"])
        assert r["norm"] > MAX_NORM, "the case must clip"
        assert not r["clipped_grad_mismatch"], "\n".join(f"{k}: {v}" for k, v in r["clipped_grad_mismatch"].items())


@pytest.mark.parametrize("world, case", _params_of(TrainCase))
def test_tiled_and_untiled_steps_are_bit_identical_for_zero_0_and_1(request, world, case):
    for r in _results(request, world, case):
        # Every variant against the untiled zero=0 step of its precision; "torch": plain torch.optim.AdamW on
        # pm.parameters() after pm.clip_grad_norm_, against tedfx.optimizer(fp32, zero=0, untiled, max_norm).
        assert all(r["identical"].values()), f"rank {r['rank']}: {r['identical']}"
        assert len(r["identical"]) == 9


@pytest.mark.parametrize("world, case", _params_of(TrainCase))
def test_training_matches_the_single_process_reference(request, world, case):
    for r in _results(request, world, case):
        assert not r["fp32_ref_mismatch"], "\n".join(f"{k}: {v}" for k, v in r["fp32_ref_mismatch"].items())
        ref = [group_losses[r["group"]] for group_losses in r["ref_losses"]]
        for variant, losses in r["losses"].items():
            rtol = 1e-4 if variant.startswith("fp32") else BF16_LOSS_RTOL
            assert all(math.isclose(a, b, rel_tol=rtol) for a, b in zip(losses, ref)), (variant, losses, ref)
        err = r["bf16_update_error"]
        assert err["total"] < BF16_UPDATE_RTOL, err
        assert max(err["per_tensor"].values()) < BF16_TENSOR_UPDATE_RTOL, err["per_tensor"]


@pytest.mark.parametrize("world, case", _params_of(TrainCase))
def test_zero1_holds_one_over_the_group_of_each_groups_optimizer_state(request, world, case):
    ranks = _results(request, world, case)
    layout = Layout.build(world, ParallelConfig(tensor=case.tensor, expert=case.expert))
    sharded_groups = 0
    for precision in ("fp32", "bf16"):
        for r in ranks:
            unsharded = r["state_bytes"][f"{precision}-zero0-tileNone"]
            for axis, dtype, numel, size, index, (start, stop) in r["groups"][f"{precision}-zero1-tileNone"]:
                key = f"{axis}/{dtype}"
                assert size == layout.size(axis)
                chunk = math.ceil(numel / size)
                assert stop - start == (chunk if index < size - 1 else numel - (size - 1) * chunk)
                # AdamW: exp_avg and exp_avg_sq, fp32, for the owned entries only (no state for padding).
                assert r["state_bytes"][f"{precision}-zero1-tileNone"][key] == 8 * (stop - start)
                assert unsharded[key] == 8 * numel
                peers = [ranks[p] for p in layout.group_of(r["rank"], axis)]
                total = sum(p["state_bytes"][f"{precision}-zero1-tileNone"][key] for p in peers)
                assert total == unsharded[key], (key, total, unsharded[key])
                sharded_groups += size > 1
    assert sharded_groups > 0


def test_fp16_overflow_on_one_rank_is_skipped_and_counted_everywhere(request):
    for r in _results(request, 2, Fp16Case()):
        assert "torch.float16" in r["dtypes"] and "torch.float32" in r["dtypes"]  # routers stay fp32
        assert r["changed"] == [True, False, True, True, True], r  # step 1 (inf on rank 1) left the weights alone
        assert r["skipped"] == [0, 1, 1, 1, 1]
        assert r["scales"] == [1024.0, 512.0, 512.0, 1024.0, 1024.0]  # halved, then doubled after 2 good steps
        assert all(math.isfinite(loss) for loss in r["losses"])


def test_no_sync_accumulates_without_communication(request):
    for r in _results(request, 2, NoSyncCase()):
        assert r["all_reduces_inside"] == 0
        assert r["all_reduces_after"] == r["planned_all_reduces"] > 0  # one per bucket, over both micro-batches
        assert r["grads_in_buckets"], "a .grad is not a view into its bucket"
        assert not r["grad_mismatch"], r["grad_mismatch"]


def _frozen_after_parallelize() -> dict[str, object]:
    """Freeze wpe (a "dp" bucket) and one expert weight (a one-rank "edp" bucket) after parallelize, take 2 AdamW
    steps with weight decay, then unfreeze wpe for a third (docs/parallelism.md, "Gradient sync")."""
    torch.set_num_threads(1)
    model, _ = tiny_gpt(n_layer=1)
    pm = tedfx.parallelize(model, (torch.zeros(BATCH, SEQ, dtype=torch.long),), moe=MOE,
                           parallel=ParallelConfig(expert=2, timeout=LAUNCH_TIMEOUT_S))
    params = dict(pm.graph.named_parameters())
    frozen = ["wpe.weight", "h.0.mlp.experts.w1"]
    for name in frozen:
        params[name].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(pm.data_parallel_rank)
    grads_none, unfrozen_grad = [], None
    for step in range(3):
        if step == 2:
            params["wpe.weight"].requires_grad_(True)
        tokens, targets = (torch.randint(0, 100, (BATCH, SEQ), generator=g) for _ in range(2))
        nn.functional.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten()).backward()
        if step < 2:
            grads_none.append([params[n].grad is None for n in frozen])
        else:
            unfrozen_grad = params["wpe.weight"].grad is not None
        opt.step()
        opt.zero_grad()
        if step == 1:
            after_two = {n: p.detach().clone() for n, p in params.items()}
    # Frozen before parallelize: no bucket, so training it later would let the replicas drift apart.
    model, _ = tiny_gpt(n_layer=1)
    model.wpe.weight.requires_grad_(False)
    pm = tedfx.parallelize(model, (torch.zeros(BATCH, SEQ, dtype=torch.long),), moe=MOE,
                           parallel=ParallelConfig(expert=2, timeout=LAUNCH_TIMEOUT_S))
    pm.graph.get_parameter("wpe.weight").requires_grad_(True)
    try:
        nn.functional.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten()).backward()
        thaw_error = None
    except RuntimeError as e:
        thaw_error = str(e)
    return {"grads_none": grads_none, "unfrozen_grad": unfrozen_grad, "thaw_error": thaw_error,
            "frozen_moved": [n for n in frozen if not torch.equal(after_two[n], before[n])],
            "others_still": [n for n in params if n not in frozen and torch.equal(after_two[n], before[n])],
            "unfrozen_moved": not torch.equal(params["wpe.weight"].detach(), after_two["wpe.weight"])}


def test_a_parameter_frozen_after_parallelize_keeps_grad_none_and_does_not_move_and_one_frozen_before_cannot_thaw():
    for r in launch(_frozen_after_parallelize, 2, backend="gloo", timeout=LAUNCH_TIMEOUT_S):
        assert r["grads_none"] == [[True, True]] * 2, r  # after each backward and its gradient sync
        assert r["frozen_moved"] == [], r  # AdamW's weight decay skips a parameter whose .grad is None
        assert r["others_still"] == [], r
        assert r["unfrozen_grad"] and r["unfrozen_moved"], r  # requires_grad_(True) trains it again
        assert re.search(r"\['wpe\.weight'\] did not require grad when tedfx\.parallelize ran.*Parallelize with "
                         r"them trainable", r["thaw_error"] or ""), r["thaw_error"]


LOUD = {
    "torch_clip": r"ReplicaDivergenceError: replicated parameters no longer agree .*wte\.weight differs between "
                  r"ranks \[0, 1\].*pm\.clip_grad_norm_\(max_norm\)",
    "fp16_unscaled": r"call opt\.scale_loss\(loss\)\.backward\(\)",
    "not_elementwise": r"Adafactor cannot step slices of parameters \(ParallelConfig\.zero=1 cut them\)",
}


@pytest.mark.parametrize("kind", sorted(LOUD))
def test_what_would_go_wrong_silently_raises_on_every_rank(request, kind):
    for r in _results(request, 2, LoudCase(kind)):
        assert r["error"] is not None and re.search(LOUD[kind], r["error"]), r["error"]


def test_state_dict_resumes_bit_for_bit_and_schedulers_drive_every_tile(request):
    for r in _results(request, 2, ResumeCase()):
        assert r["resumed_identical"], "steps 3-5 after load_state_dict differ from the uninterrupted run"
        assert r["frozen_by_scheduler"], "LambdaLR's lr = 0 did not reach the tiles"
        assert r["wrong_layout"] and "load it with the same ParallelConfig and tile_numel" in r["wrong_layout"]


def test_gloo_reduces_gathers_and_exchanges_16_bit_tensors(request):
    for r in _results(request, 2, GlooDtypesCase()):
        assert r["bf16_sum_exact"]
        failed = {k: v for k, v in r.items() if "/" in k and v != "ok"}
        assert not failed, failed


@pytest.fixture(scope="module")
def explained() -> dict[str, tedfx.Report]:
    model, _ = tiny_gpt()
    example = (torch.zeros(BATCH, SEQ, dtype=torch.long),)
    return {precision: tedfx.explain(model, example, moe=MOE, parallel=memory_parallel(MemoryCase(precision, 0, None)),
                                     world_size=4, tile_numel=TILE) for precision in ("fp32", "bf16")}


@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: c.name)
def test_explain_predicts_training_memory_within_10_percent(request, explained, case):
    measured = _results(request, 4, case)[0]
    rows = explained[case.precision].training_memory["rows"]
    predicted = next(row for row in rows if row["zero"] == case.zero and row["tile_numel"] == case.tile_numel)
    for key in ("weights", "grads", "master", "optimizer_states", "step_transient"):
        assert math.isclose(predicted[key], measured[key], rel_tol=0.1), (key, predicted[key], measured[key])
    if case.tile_numel is not None:  # one tile's fp32 gradients and AdamW's two temporaries
        assert measured["step_transient"] <= 3 * 4 * case.tile_numel
