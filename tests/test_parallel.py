"""parallelize on gloo against the single-process reference: the parity oracle (docs/architecture.md, "Tests").

Tier (b) of the tests. For every layout (T, X, D) the rank's ParallelModule must give
the same logits and losses as `tedfx.to_moe(model)` on the rank's token group, and
after three AdamW steps `pm.full_state_dict()` must equal the reference's state dict,
which averaged the X * D token groups' gradients as DDP does. Each rank must hold
exactly its share of the parameters, issue the collectives its layout needs and none
on axes of one rank, and bad input must fail on every rank with a clear ValueError
instead of hanging.

Starting ranks costs seconds, so there is one launch per world size (2, 4, 8): a
module-scoped fixture runs every case of that world inside it (tests/parallel_cases.py)
and the tests below assert on the returned per-rank results, one test id per case.
"""

from __future__ import annotations

import math
import re
import time

import pytest

from tedfx.runtime import launch

from parallel_cases import Case, CheckCostCase, ErrorCase, LossScaleCase, run_cases

LAUNCH_TIMEOUT_S = 60
"""Seconds a collective may block (and stragglers may lag) before the launch fails instead of hanging."""

_ROUTINGS = [(1, False), (2, False), (1, True), (2, True)]
"""(top_k, dropless) of every test-GPT case; not dropless means capacity factor 1.0 (tokens dropped)."""


def _gpt_cases(layouts: list[tuple[int, int]]) -> list[Case]:
    return [Case("gpt", T, X, top_k=k, dropless=dropless) for T, X in layouts for k, dropless in _ROUTINGS]


def _comm_cases(T: int, X: int) -> list[Case]:
    """DTD and CAC each on and off (with activation checkpointing), and an odd capacity that DTD pads."""
    return [Case("gpt", T, X, top_k=2, dtd=False),
            Case("gpt", T, X, top_k=2, checkpointing="block", cac=False),
            Case("gpt", T, X, top_k=2, checkpointing="block", cac=True),
            Case("gpt", T, X, top_k=2, checkpointing="moe", cac=False, dtd=False),
            Case("gpt", T, X, top_k=2, seq=7)]


def _hf_cases(T: int, X: int) -> list[Case]:
    return [Case("gpt2", T, X, top_k=2), Case("llama", T, X, top_k=1), Case("llama", T, X, top_k=2, dropless=True)]


ZOO = ("explicit", "fused_qkv", "neox", "gqa", "phi3")
"""Models written differently from ours (tests/models.py): attention as matmul + softmax, fused QKV viewed
(3, heads, d) and (heads, 3, d), GQA by repeat_interleave, Phi-3's sliced qkv_proj and chunked gate_up_proj."""


def _zoo_cases(T: int, X: int) -> list[Case]:
    return [Case(model, T, X, top_k=2) for model in ZOO]


WORLD_CASES: dict[int, list[Case | ErrorCase | LossScaleCase | CheckCostCase]] = {
    2: [
        *_gpt_cases([(2, 1), (1, 2)]),
        *_zoo_cases(2, 1),
        Case("qwen3", 2, 1, top_k=2),  # per-head q/k RMSNorm (docs/parallelism.md, "Tensor parallelism")
        Case("olmo2", 2, 1, top_k=2),  # q/k RMSNorm across all heads: statistics all-reduced over "tp"
        Case("gptj", 2, 1, top_k=2),  # rotary's rotate_every_two by torch.stack
        # Encoder-decoder, per-head position bias narrowed per rank, blocks of two residual streams checkpointed.
        Case("t5", 2, 1, top_k=2, checkpointing="block"),
        # Fused q | k | v per KV group, key and value picked by index; `mlp_output += attention_output` on a copy
        # of the MoE output, whose exit mark the blocks are found from.
        Case("falcon_grouped", 2, 1, top_k=2, checkpointing="block"),
        Case("persimmon", 2, 1, top_k=2),  # a LayerNorm per head: its weight's gradient summed over "tp"
        ErrorCase("experts_do_not_divide", expert=2),
        ErrorCase("different_weights"),
    ],
    4: [
        *_gpt_cases([(2, 2), (1, 4)]),
        *_comm_cases(2, 2),
        *_hf_cases(2, 2),
        Case("llama_kv1", 2, 2, top_k=2),
        Case("gpt", 2, 2, top_k=2, dropless=True, dtd=False),  # the packed layout with tensor parallelism
        Case("gpt", 2, 2, top_k=2, seq=7, a2a_chunks=2),  # C=7 padded to 8 for DTD's 2 x 2 slices
        Case("gpt", 2, 2, top_k=2, checkpointing="block", a2a_chunks=2),  # CAC keeps the chunks' exchanges
        Case("dict_blocks", 2, 2, top_k=2, checkpointing="block"),
        LossScaleCase(2, 2),
        *_zoo_cases(2, 2),
        ErrorCase("tensor_does_not_divide_world", tensor=3),
        ErrorCase("different_input_shapes", tensor=2),
        ErrorCase("different_input_dtypes", tensor=2),
        ErrorCase("different_rng", tensor=2),
        CheckCostCase(2, 2),
    ],
    8: [
        *_gpt_cases([(2, 2), (2, 4), (1, 2)]),
        *_comm_cases(2, 4),  # DTD and CAC at T=2 X=2 run in world 4; the D=2 layouts above run them on
    ],
}
"""Every case, by the world size it runs in; D = world / (T * X). The zoo and the HF models run at T=2 in worlds
2 and 4, where their attention and FFN layouts are what differs; world 8 adds data parallelism (D = 2, 4) on the
GPT, 8 ranks sharing the CI machine's 2 cores."""

EXPECTED_ERRORS = {
    "experts_do_not_divide": r"MoEConfig\.num_experts=3 is not divisible by ParallelConfig\.expert=2",
    "different_weights": r"rank 1 holds different weights from rank 0 for \['h\.1\.attn\.c_proj\.weight'\]",
    "tensor_does_not_divide_world": r"world size 4 is not divisible by tensor \* expert = 3 \* 1 = 3",
    "different_input_shapes": r"different input shapes \(ranks 0, 2, 3: \[\(2, 8\)\]; rank 1: \[\(2, 16\)\]\)\. Every "
                              r"rank must pass a micro-batch of the same shape",
    "different_input_dtypes": r"inputs of different dtypes \(ranks 0, 2, 3: \[\(2, 8\) torch\.int64\]; rank 1: "
                              r"\[\(2, 8\) torch\.int32\]\)",
    "different_rng": r"tensor-parallel ranks \[\d, \d\] hold different torch RNG states while dropout is on",
}
ERROR_WITHIN_S = 30.0
"""A bad input must fail well inside the collective timeout: nothing may wait for a peer that never comes."""


def _case_id(world: int, case: Case | ErrorCase) -> str:
    if isinstance(case, ErrorCase):
        return f"w{world}-{case.name}"
    routing = "dropless" if case.dropless else "cf1"
    D = world // (case.tensor * case.expert)
    return f"{case.model}-T{case.tensor}X{case.expert}D{D}-top{case.top_k}-{routing}"


def _params(kind: type) -> list:
    return [pytest.param(world, case, id=_case_id(world, case))
            for world, cases in WORLD_CASES.items() for case in cases if isinstance(case, kind)]


def _launch(world: int) -> dict[str, list[dict]]:
    """Run every case of `world` in one launch; {case name: [rank 0's result, rank 1's, ...]}."""
    cases = WORLD_CASES[world]
    start = time.perf_counter()
    per_rank = launch(run_cases, world, cases, backend="gloo", timeout=LAUNCH_TIMEOUT_S)
    seconds = time.perf_counter() - start
    print(f"world {world}: {len(cases)} cases in one launch, {seconds:.1f} s")
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


def _results(request, world: int, case: Case | ErrorCase) -> list[dict]:
    ranks = request.getfixturevalue(f"world_{world}")[case.name]
    assert len(ranks) == world and all(r["name"] == case.name for r in ranks)
    if isinstance(case, Case):
        refused = _problems(ranks, "parallelize_error")
        assert not refused, "parallelize raised:\n" + "\n".join(refused)
    return ranks


def _problems(ranks: list[dict], key: str) -> list[str]:
    return [f"rank {r['rank']}: {r[key]}" for r in ranks if r[key]]


# --- parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, case", _params(Case))
def test_parity_with_single_process_reference(request, world, case):
    ranks = _results(request, world, case)
    T, X = case.tensor, case.expert
    D = world // (T * X)
    for r in ranks:
        assert r["layout"] == (T, X, D), f"rank {r['rank']}: layout {r['layout']}"
        assert r["group"] == r["coords"]["edp"] * X + r["coords"]["ep"]
    # Step 0: the same logits on each rank's token group.
    assert not _problems(ranks, "forward_mismatch"), "\n".join(_problems(ranks, "forward_mismatch"))
    # Every step's loss on the rank's token group.
    for r in ranks:
        for step, (loss, ref_loss) in enumerate(zip(r["losses"], r["ref_losses"])):
            assert math.isclose(loss, ref_loss, rel_tol=1e-5 if step == 0 else 1e-4), \
                f"rank {r['rank']} step {step}: loss {loss} != reference {ref_loss}"
    # The T ranks of a tensor group share their token group: identical losses.
    for r in ranks:
        peer = ranks[r["rank"] - r["coords"]["tp"]]
        assert r["losses"] == peer["losses"], f"ranks {peer['rank']} and {r['rank']} disagree within a tensor group"
    # Step 0's gradients, gathered over the mesh, equal the reference's average over the token groups.
    for r in ranks:
        assert not r["grad_mismatch"], f"rank {r['rank']}: " + "\n".join(
            f"{key}: {msg}" for key, msg in r["grad_mismatch"].items())
    # After the steps: the full state dict equals the reference, key for key.
    for r in ranks:
        assert r["missing_keys"] == [] and r["extra_keys"] == [], \
            f"rank {r['rank']}: missing {r['missing_keys']}, extra {r['extra_keys']}"
        assert not r["state_mismatch"], f"rank {r['rank']}: " + "\n".join(
            f"{key}: {msg}" for key, msg in r["state_mismatch"].items())
    # Losses actually moved: the steps trained something.
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]


@pytest.mark.parametrize("world, case", _params(Case))
def test_capacity_drops_tokens_unless_dropless(request, world, case):
    ranks = _results(request, world, case)
    dropped = [r["dropped"] for r in ranks]
    assert all(r["assignments"] > 0 for r in ranks), "no Router ran in the forward"
    if case.dropless:
        assert dropped == [0] * world, f"dropless routing dropped assignments: {dropped}"
    else:
        # Capacity factor 1.0 on unbalanced routing: parity above covered dropped tokens.
        assert sum(dropped) > 0, "capacity factor 1.0 dropped nothing on any rank: the case tests no dropping"


# --- per-rank parameters and collectives -------------------------------------------------------------


@pytest.mark.parametrize("world, case", _params(Case))
def test_each_rank_holds_its_share_of_the_parameters(request, world, case):
    ranks = _results(request, world, case)
    T, X = case.tensor, case.expert
    for r in ranks:
        where = f"rank {r['rank']}"
        assert not r["bytes_wrong"], f"{where}: " + "\n".join(f"{k}: {v}" for k, v in r["bytes_wrong"].items())
        local, full = r["local_bytes"], r["full_bytes"]
        assert full["expert"] > 0 and local["expert"] * T * X == full["expert"], \
            f"{where}: expert bytes {local}, {full}"
        assert local["expert_b2"] * X == full["expert_b2"], f"{where}: expert b2 bytes {local}, {full}"
        if T == 1:
            assert local["dense"] == full["dense"] and r["tp_sharded"] == [], f"{where}: T=1 splits {r['tp_sharded']}"
        else:
            assert r["missing_tp_shards"] == [], f"{where}: not split over tp: {r['missing_tp_shards']}"
            assert local["dense"] < full["dense"]


@pytest.mark.parametrize("world, case", _params(Case))
def test_collectives_follow_the_layout(request, world, case):
    ranks = _results(request, world, case)
    T, X = case.tensor, case.expert
    sizes = {"tp": T, "ep": X, "edp": world // (T * X), "dp": world // T}
    for r in ranks:
        issued = {(kind, axis, phase) for kind, axis, phase, calls, nbytes in r["comm"] if calls and nbytes}
        used_axes = {axis for _, axis, _ in issued}
        assert all(sizes[axis] > 1 for axis in used_axes), \
            f"rank {r['rank']}: collectives on one-rank axes: {issued}"
        expected = set()
        if X > 1:
            expected |= {("all_to_all", "ep", "forward"), ("all_to_all", "ep", "backward")}
        if T > 1:
            expected |= {("all_reduce", "tp", "forward"), ("all_reduce", "tp", "backward")}
        for axis in ("dp", "edp"):  # gradient averaging over each parameter's data-parallel group
            if sizes[axis] > 1:
                expected.add(("all_reduce", axis, "backward"))
        assert expected <= issued, f"rank {r['rank']}: missing {sorted(expected - issued)}; issued {sorted(issued)}"


def _by_key(table) -> dict[tuple, tuple[int, int]]:
    return {(kind, axis, phase): (calls, nbytes) for kind, axis, phase, calls, nbytes in table}


@pytest.mark.parametrize("world, case", _params(Case))
def test_comm_stats_of_a_step_equal_explains_prediction(request, world, case):
    """pm.comm_stats() of one training step == tedfx.explain's simulated prediction: kinds, axes, calls, bytes."""
    if case.dropless:
        pytest.skip("dropless: the capacity follows each step's routing, so bytes are predicted for the example only")
    for r in _results(request, world, case):
        assert _by_key(r["step_comm"]) == _by_key(r["predicted_comm"]), \
            f"rank {r['rank']}: measured {r['step_comm']}\npredicted {r['predicted_comm']}"


def _packed(case: Case) -> bool:
    """Dropless blocks move packed rows unless DTD keeps capacity slots (docs/moe.md)."""
    return case.dropless and case.expert > 1 and not (case.dtd and case.tensor > 1)


@pytest.mark.parametrize("world, case", [p for p in _params(Case) if _packed(p.values[1])])
def test_dropless_all_to_alls_move_exactly_the_routed_rows(request, world, case):
    """The packed layout pads nothing: every rank sends its S * K routed rows of H values to the experts (and,
    over all ranks, gets as many back), plus E int64 loads per MoE layer; capacity slots would send
    E * (largest load) rows each way."""
    ranks = _results(request, world, case)
    layers, hidden, E = 2, 32, case.num_experts  # tests/models.tiny_gpt: every FFN is an MoE block
    sent = 0
    for r in ranks:
        calls, nbytes = _by_key(r["step_comm"])[("all_to_all", "ep", "forward")]
        assert calls == 3 * layers, f"rank {r['rank']}: {calls} forward all-to-alls (loads, rows out, rows back)"
        sent += nbytes
    routed_rows = sum(r["assignments"] for r in ranks)  # S * K per MoE layer per rank, all kept (dropless)
    assert sent == 2 * routed_rows * hidden * 4 + len(ranks) * layers * E * 8


COMM_WORLDS = [(4, 2, 2), (8, 2, 4)]


@pytest.mark.parametrize("world, T, X", COMM_WORLDS)
def test_dtd_divides_all_to_all_bytes_by_T(request, world, T, X):
    with_dtd = _results(request, world, Case("gpt", T, X, top_k=2))
    without = _results(request, world, Case("gpt", T, X, top_k=2, dtd=False))
    for a, b in zip(with_dtd, without):
        a2a, base = _by_key(a["step_comm"]), _by_key(b["step_comm"])
        for phase in ("forward", "backward"):
            calls, nbytes = a2a[("all_to_all", "ep", phase)]
            base_calls, base_bytes = base[("all_to_all", "ep", phase)]
            assert calls == base_calls and nbytes * T == base_bytes, \
                f"rank {a['rank']} {phase}: DTD {calls} calls / {nbytes} B, baseline {base_calls} / {base_bytes} B"


@pytest.mark.parametrize("world, T, X", COMM_WORLDS)
def test_cac_issues_4_all_to_alls_per_moe_layer_instead_of_6(request, world, T, X):
    layers = 2  # tests/models.tiny_gpt: every FFN is an MoE block
    cases = {cac: Case("gpt", T, X, top_k=2, checkpointing="block", cac=cac) for cac in (True, False)}
    for cac, expected in ((True, 4), (False, 6)):
        for r in _results(request, world, cases[cac]):
            calls = sum(c for (kind, axis, _), (c, _) in _by_key(r["step_comm"]).items() if kind == "all_to_all")
            assert calls == expected * layers, f"rank {r['rank']} cac={cac}: {calls} all-to-alls per step"


def test_checkpoint_regions_of_module_dict_blocks(request):
    """The ModuleDict model's blocks are found from the graph: its parity case above ran them checkpointed
    (CAC cuts each of the 2 blocks' regions around its 2 all-to-alls: 3 pieces each), and each MoE layer
    sends its 2 forward all-to-alls and their 2 backward partners, no more."""
    for r in _results(request, 4, Case("dict_blocks", 2, 2, top_k=2, checkpointing="block")):
        assert len(r["checkpoint_regions"]) == 3 * 2, f"rank {r['rank']}: regions {r['checkpoint_regions']}"
        calls = sum(c for (kind, _, _), (c, _) in _by_key(r["step_comm"]).items() if kind == "all_to_all")
        assert calls == 4 * 2, f"rank {r['rank']}: {calls} all-to-alls per step"


def test_moe_loss_scale_with_accumulation_equals_the_step_objective(request):
    """T=2, X=2, checkpointed: `loss / 4` over 4 micro-batches per token group with set_moe_loss_scale(pm, 1 / 4)
    gives the gradient of the mean over all 8 token groups of (task loss + MoE losses) (tests/moe_reference.py)."""
    case = LossScaleCase(2, 2)
    ranks = request.getfixturevalue("world_4")[case.name]
    for r in ranks:
        assert not r["grad_mismatch"], f"rank {r['rank']}: " + "\n".join(
            f"{key}: {msg}" for key, msg in r["grad_mismatch"].items())
        assert r["warnings"] == [], f"rank {r['rank']}: {r['warnings']}"
        assert r["router_moe_loss_share"] > 1e-2, "the MoE losses hardly move the router: the case tests nothing"


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, case", _params(ErrorCase))
def test_bad_input_raises_on_every_rank(request, world, case):
    ranks = _results(request, world, case)
    pattern = EXPECTED_ERRORS[case.kind]
    for r in ranks:
        assert r["error"] is not None, f"rank {r['rank']}: no error raised"
        assert re.search(pattern, r["error"]), f"rank {r['rank']}: {r['error']!r} does not match {pattern!r}"
        assert r["seconds"] < ERROR_WITHIN_S, f"rank {r['rank']} took {r['seconds']:.1f} s to fail"


def test_the_input_checks_are_a_few_small_tensor_collectives_and_no_pickle(request):
    """check_inputs=True adds to a training step (T=2, X=2, dropout on) one all-reduce of 16 bytes over the world
    (the input shapes and dtypes), one all-gather over "tp" of the RNG digests and one of the output gradient's
    fingerprint (3 x 8 bytes per rank each), and no all_gather_object; to a no-grad forward only the all-reduce.
    The loud path of the same check is test_bad_input_raises_on_every_rank's "different_input_*" cases."""
    case = CheckCostCase(2, 2)
    ranks = request.getfixturevalue("world_4")[case.name]
    assert len(ranks) == 4
    for r in ranks:
        for step, expected in (("train", [(2, 48), (2, 48), (4, 16)]), ("eval", [(4, 16)])):
            counted = r[step]
            assert counted["pickles"] == [], f"rank {r['rank']} {step}: {counted['pickles']}"
            assert counted["missing"] == [], f"rank {r['rank']} {step}: the checks removed {counted['missing']}"
            assert sorted((size, nbytes) for _, size, nbytes in counted["extra"]) == expected, \
                f"rank {r['rank']} {step}: the checks added {counted['extra']}"


MISSING_PEER_TIMEOUT_S = 5
"""ParallelConfig.timeout of the missing-peer launch: it also bounds how far apart the two ranks may finish
parallelize (on a loaded machine one can build 2 s later than the other)."""


@pytest.fixture(scope="module")
def missing_peer(tmp_path_factory) -> dict:
    """Rank 0's forward, tedfx.save and full_state_dict while rank 1 sleeps (one launch, a short timeout)."""
    from parallel_cases import run_missing_peer

    root = tmp_path_factory.mktemp("missing_peer")
    rank0, _ = launch(run_missing_peer, 2, float(MISSING_PEER_TIMEOUT_S), str(root), backend="gloo",
                      timeout=LAUNCH_TIMEOUT_S)
    assert not any(root.iterdir()), "rank 0 alone wrote something of the checkpoint"
    return rank0


def test_a_missing_peer_fails_within_the_timeout_instead_of_hanging(missing_peer):
    rank0 = missing_peer
    assert rank0["error"] is not None, "rank 0's forward returned without its peer"
    assert rank0["seconds"] < 3 * MISSING_PEER_TIMEOUT_S, \
        f"rank 0 waited {rank0['seconds']:.1f} s with a {MISSING_PEER_TIMEOUT_S} s timeout"


def test_save_on_rank_0_alone_says_it_is_a_collective(missing_peer):
    """`if rank == 0: tedfx.save(...)` waits ParallelConfig.timeout, then raises naming the call and the fix
    (docs/checkpoints.md, "Every rank calls it"), not gloo's bare timeout; so does full_state_dict after it."""
    rank0 = missing_peer
    assert rank0["save_error"] is not None and rank0["save_error"].startswith(
        "CollectiveCallError: tedfx.save is a collective: every rank must call it, not rank 0 alone (each rank "
        "writes its own shards"), rank0["save_error"]
    assert ("Rank 0 entered tedfx.save and the other ranks did not join it within ParallelConfig.timeout="
            f"{MISSING_PEER_TIMEOUT_S} s") in rank0["save_error"] and "Timed out" in rank0["save_error"], \
        rank0["save_error"]
    assert MISSING_PEER_TIMEOUT_S - 0.5 < rank0["save_seconds"] < 3 * MISSING_PEER_TIMEOUT_S, \
        f"tedfx.save on rank 0 alone took {rank0['save_seconds']:.1f} s"
    assert rank0["state_error"] is not None and rank0["state_error"].startswith(
        "CollectiveCallError: ParallelModule.full_state_dict is a collective: every rank must call it, not rank 0 "
        "alone (it all-gathers every rank's shards"), rank0["state_error"]


def test_gradient_accumulation_averages_each_backward_once():
    """Expert gradients reduce over "edp" (D ranks) but average over X * D token groups: with two backwards
    per step, the second must not re-average the first's already-averaged gradient."""
    from parallel_cases import run_accumulation

    errors = launch(run_accumulation, 2, backend="gloo", timeout=LAUNCH_TIMEOUT_S)
    assert max(errors) < 1e-6, errors
