"""Parallel semantics a user can trust: dropout per shard, one micro-batch per token group, keyword inputs.

Tier (b): one launch of 2 ranks at T = 2, started by spawn (every rank draws its own Python hash
seed, as under torchrun), runs every case (tests/semantics_cases.py); the tests below assert on the
returned numbers. One more test starts the same ranks with torchrun itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tedfx.runtime import launch

from semantics_cases import SEEDS, run_semantics

LAUNCH_TIMEOUT_S = 120
K_SIGMA = 4.0
"""Bound of the dropout statistics: the parallel and single-process means of the training loss over SEEDS
seeds each differ by less than K_SIGMA standard errors of their difference (a false alarm is a 6e-5
event for normal means), and their standard deviations by less than K_SIGMA standard errors of the log
ratio, sqrt(1/(N-1)) for two samples of N."""


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return launch(run_semantics, 2, backend="gloo", timeout=LAUNCH_TIMEOUT_S, start_method="spawn")


# --- dropout -----------------------------------------------------------------------------------------------


def test_shards_draw_their_own_masks_and_replicated_activations_share_one(ranks):
    a, b = (r["dropout"] for r in ranks)
    assert a["sharded"] == ["dropout_1", "dropout_default", "scaled_dot_product_attention"]
    assert a["masks"].keys() == b["masks"].keys()
    for name, mask in a["masks"].items():
        same = torch.equal(mask, b["masks"][name])
        if name in a["sharded"]:
            assert not same, f"{name}: both tensor ranks dropped the same elements of their shards"
        else:
            assert same, f"{name}: the tensor ranks dropped a replicated activation differently"
        assert 0.2 < mask.float().mean() < 0.4, f"{name}: dropped {mask.float().mean():.2f} with p = 0.3"


def test_training_loss_with_dropout_matches_one_process_over_many_seeds(ranks):
    stats = ranks[0]["dropout"]["stats"]
    par, single = torch.tensor(stats["parallel"], dtype=torch.float64), torch.tensor(stats["single"],
                                                                                      dtype=torch.float64)
    assert len(par) == len(single) == SEEDS
    se = math.sqrt(par.var() / SEEDS + single.var() / SEEDS)
    gap = float(par.mean() - single.mean())
    print(f"mean training loss: T=2 {par.mean():.4f} +- {par.std() / SEEDS ** 0.5:.4f}, "
          f"one process {single.mean():.4f} +- {single.std() / SEEDS ** 0.5:.4f}: {gap / se:+.2f} SE")
    assert abs(gap) < K_SIGMA * se, f"means differ by {gap / se:.1f} standard errors"
    log_ratio = math.log(par.std() / single.std())
    assert abs(log_ratio) < K_SIGMA * math.sqrt(1 / (SEEDS - 1)), f"std ratio {math.exp(log_ratio):.3f}"
    assert ranks[1]["dropout"]["stats"]["parallel"] == stats["parallel"], "the tensor ranks' losses differ"


# --- token groups ------------------------------------------------------------------------------------------


def test_the_module_names_its_token_group(ranks):
    assert [r["token_groups"]["token_group"] for r in ranks] == [(0, 1, (0, 1)), (0, 1, (0, 1))]


def test_data_seeded_by_global_rank_is_verified_on_the_first_step(ranks):
    for r in ranks:
        error = r["token_groups"]["verify_error"]
        assert error and re.search(r"ranks 0 and 1 of token group 0 of 1 \(ranks \[0, 1\]\) were called with "
                                   r"different micro-batches \(these differ: input 0\)", error), error
        assert "pm.data_parallel_rank" in error
        assert r["token_groups"]["verify_right"] is None, "verify mode refused a token group fed alike"
        assert r["token_groups"]["verify_unchecked_error"] is not None, "verify mode verified nothing"


def test_targets_seeded_by_global_rank_fail_in_the_first_backward(ranks):
    for r in ranks:
        for case in ("targets_error", "in_place_targets_error"):  # the output written in place: still checked
            error = r["token_groups"][case]
            assert error and re.search(r"ranks 0 and 1 of token group 0 .* received different gradients at the "
                                       r"ParallelModule's output", error), (case, error)
            assert "pm.broadcast_batch" in error


def test_a_state_dict_of_another_ranks_shards_is_refused_naming_the_checkpoint_calls(ranks):
    """pm.state_dict() is this rank's shards, with the same keys and shapes on every rank: loading rank 0's on
    rank 1 (torch.save on rank 0 alone, then every rank loads) would train on wrong weights without an error."""
    assert ranks[0]["token_groups"]["rank0_state_dict_error"] is None
    error = ranks[1]["token_groups"]["rank0_state_dict_error"]
    assert error and "holds the shards of another rank ({'tensor': 2, 'expert': 1, 'tp': 0, 'ep': 0}), not this " \
        "rank's ({'tensor': 2, 'expert': 1, 'tp': 1, 'ep': 0})" in error, error
    assert "tedfx.save(path, pm, optimizer)" in error and "pm.full_state_dict()" in error
    assert all(r["token_groups"]["own_state_dict_error"] is None for r in ranks)


def test_an_output_written_in_place_trains_as_one_written_out_of_place(ranks):
    """`logits.div_(temperature)` on the ParallelModule's output: the gradient check hooks the output instead of
    wrapping it in an autograd function, whose output autograd refuses to write in place."""
    for r in ranks:
        losses, state = r["token_groups"]["in_place"]
        ref_losses, ref_state = r["token_groups"]["in_place_reference"]
        assert losses == ref_losses
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


@pytest.mark.parametrize("tokens, vocab", [(512, 300), (65536, 64)])
def test_one_different_target_moves_the_output_gradient_fingerprint_far_past_its_tolerance(tokens, vocab):
    """No processes: the fingerprint the token group compares after each backward tells apart two
    cross-entropy gradients whose targets differ in one token, first, middle or last."""
    import torch.nn.functional as F

    from tedfx.runtime.token_group import GRAD_RTOL, _grad_fingerprint

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    base = _grad_fingerprint(torch.autograd.grad(F.cross_entropy(logits, targets), logits)[0])
    assert torch.equal(base, _grad_fingerprint(torch.autograd.grad(F.cross_entropy(logits, targets), logits)[0]))
    for position in (0, tokens // 3, tokens - 1):
        other = targets.clone()
        other[position] = (other[position] + 1) % vocab
        moved = _grad_fingerprint(torch.autograd.grad(F.cross_entropy(logits, other), logits)[0])
        assert float((moved[:2] - base[:2]).abs().max()) > 50 * GRAD_RTOL * float(base[2]), position


def test_evaluation_on_data_seeded_by_global_rank_warns_once_on_the_ranks_whose_inputs_were_replaced(ranks):
    """No backward checks the targets in evaluation: the rank that runs its token group's first rank's inputs
    instead of its own says so, once; data drawn by the token group warns nowhere."""
    assert all(r["token_groups"]["eval_warnings"]["right"] == [] for r in ranks)
    assert ranks[0]["token_groups"]["eval_warnings"]["by_rank"] == []
    (message,) = ranks[1]["token_groups"]["eval_warnings"]["by_rank"]
    assert message.startswith("rank 1 of token group 0 of 1 (ranks [0, 1]) was called with other inputs (input 0) "
                              "than the group's first rank 0"), message
    assert "pm.broadcast_batch(x, y)" in message and "pm.data_parallel_rank" in message


def test_broadcast_batch_trains_like_a_correctly_fed_run(ranks):
    for r in ranks:
        losses, state = r["token_groups"]["shared"]
        ref_losses, ref_state = r["token_groups"]["shared_reference"]
        assert losses == ref_losses
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    assert ranks[0]["token_groups"]["right"] == ranks[1]["token_groups"]["right"]


# --- keyword inputs (HF Llama) -----------------------------------------------------------------------------


def test_hf_labels_give_the_hf_loss_of_to_moe(ranks):
    for r in ranks:
        hf = r["hf"]
        assert math.isclose(hf["loss"], hf["ref_loss"], rel_tol=1e-5), (hf["loss"], hf["ref_loss"])
        assert hf["by_name"] == hf["loss"], "input_ids by name gave another loss than by position"


def test_a_keyword_the_capture_did_not_see_is_a_clear_error(ranks):
    for r in ranks:
        hf = r["hf"]
        for key, door in (("extra_error", "tedfx.parallelize"), ("ref_extra_error", "tedfx.to_moe")):
            assert hf[key] and re.search(
                r"LlamaForCausalLM was captured with inputs \(input_ids\) and keyword inputs attention_mask=, "
                r"labels=, but this call passes position_ids=, which the capture did not see", hf[key]), hf[key]
            assert f"{door}(model, example_inputs, ..., example_kwargs={{'attention_mask': ..., 'labels': ..., " \
                   f"'position_ids': ...}})" in hf[key]
        assert re.search(r"this call leaves out labels=.*or pass labels= on every call", hf["missing_error"])


def test_hf_data_seeded_by_global_rank_trains_like_the_first_ranks_data(ranks):
    for r in ranks:
        losses, state = r["hf"]["by_rank"]
        ref_losses, ref_state = r["hf"]["first_rank"]
        assert losses == ref_losses
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


# --- torchrun ------------------------------------------------------------------------------------------------


def test_identical_seeds_pass_the_rng_check_under_torchrun(tmp_path):
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tests / "semantics_cases.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)
               if (tmp_path / f"rank{r}.json").exists()]
    assert len(results) == 2 and done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) == 3
