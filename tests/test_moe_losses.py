"""The MoE losses scale with the user's loss (docs/moe.md, "MoE losses").

tedfx puts each MoE block's `aux_loss_coef * aux + z_loss_coef * z` into the backward of the
forward that computed it, weighted by the MoE loss scale (`tedfx.set_moe_loss_scale`). The
aux loss is defined per token group (one forward's tokens: its f_e, p_e and capacity), so the
objective of a step over M micro-batches is the mean over micro-batches of
(task loss + MoE losses), each micro-batch its own token group:

    J = 1/M * sum_m [CE_m + sum_blocks (aux_coef * aux_m + z_coef * z_m)]

That is "one step on the whole batch" here; one forward of the concatenated batch would be a
different objective (one token group of M times the tokens, another capacity). The reference
computes J in one backward, with the MoE losses written out from the GShard formulas on the
router inputs of a model whose own MoE losses are switched off (coefficients 0), so it shares
no code with the scaling under test. The parallel version (X=2) is in tests/parallel_cases.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import tedfx

import moe_reference
from models import VOCAB, patch_capture, tiny_gpt

M = 4
"""Micro-batches per step."""
AUX, Z = 0.1, 0.01
"""Coefficients large enough that a wrong weight shows in every router gradient."""


def _moe(aux: float = AUX, z: float = Z) -> tedfx.MoEConfig:
    return tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1, aux_loss_coef=aux,
                           z_loss_coef=z)


def _micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, VOCAB, (2, 8), generator=g), torch.randint(0, VOCAB, (2, 8), generator=g))
            for _ in range(M)]


def _ce(module, tokens, targets) -> torch.Tensor:
    return F.cross_entropy(module(tokens).flatten(0, 1), targets.flatten())


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def reference_grads(model, batches, **weights):
    return moe_reference.reference_grads(model, batches, _moe(), **weights)


def _assert_grads_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.fixture(autouse=True)
def capture_once(monkeypatch):
    """Every to_moe of the same model and input shapes gets a deep copy of one cached capture."""
    patch_capture(monkeypatch.setattr)


@pytest.fixture(scope="module")
def dense():
    return tiny_gpt()[0]


@pytest.fixture
def expected(dense):
    return reference_grads(dense, _micro_batches())


def test_loss_over_n_with_scale_1_over_n_equals_the_whole_batch_objective(dense, expected):
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    assert tedfx.set_moe_loss_scale(moe_model, 1 / M) == 2  # both MoE blocks
    with warnings.catch_warnings():
        warnings.simplefilter("error", tedfx.MoELossScaleWarning)
        for tokens, targets in _micro_batches():
            (_ce(moe_model, tokens, targets) / M).backward()
    _assert_grads_equal(_grads(moe_model), expected)
    router_grad = expected["h.0.mlp.router.weight"]
    without_moe_losses = reference_grads(dense, _micro_batches(), aux_weight=0.0, z_weight=0.0)
    # The MoE losses move the router gradient visibly: a wrong weight would show.
    assert (router_grad - without_moe_losses["h.0.mlp.router.weight"]).abs().max() > 1e-2 * router_grad.abs().max()


def test_without_the_scale_loss_over_n_warns_and_weighs_the_moe_losses_n_times(dense):
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    with pytest.warns(tedfx.MoELossScaleWarning, match=r"set_moe_loss_scale\(model, 1 / N\)"):
        for tokens, targets in _micro_batches():
            (_ce(moe_model, tokens, targets) / M).backward()
    # Exactly what the warning says: the MoE losses enter with weight 1 per micro-batch, N times J's.
    _assert_grads_equal(_grads(moe_model), reference_grads(dense, _micro_batches(), aux_weight=AUX * M,
                                                           z_weight=Z * M))


def test_zero_grad_without_set_to_none_is_not_accumulation(dense):
    """`opt.zero_grad(set_to_none=False)` leaves a gradient of zeros: one backward per step does not warn; two
    still do."""
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    opt = torch.optim.SGD(moe_model.parameters(), lr=0.0)
    (tokens, targets), *_ = _micro_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tedfx.MoELossScaleWarning)
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            _ce(moe_model, tokens, targets).backward()
    with pytest.warns(tedfx.MoELossScaleWarning):
        _ce(moe_model, tokens, targets).backward()


def test_the_accumulation_check_stops_reading_zero_gradients_after_a_few_backwards(dense):
    """Each read of the router's gradient is a host sync: after ZERO_GRAD_CHECKS backwards onto zeros (a loop that
    does not accumulate) the check no longer reads it, so a later accumulation goes unwarned."""
    from tedfx.moe.routing import ZERO_GRAD_CHECKS

    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    opt = torch.optim.SGD(moe_model.parameters(), lr=0.0)
    (tokens, targets), *_ = _micro_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tedfx.MoELossScaleWarning)
        for _ in range(ZERO_GRAD_CHECKS + 1):  # the first backward finds no gradient yet
            opt.zero_grad(set_to_none=False)
            _ce(moe_model, tokens, targets).backward()
        _ce(moe_model, tokens, targets).backward()  # accumulates: no longer checked


def test_loss_scaler_and_accumulation_with_a_tensor_scale(dense, expected):
    """`scaler.scale(loss / N).backward()` with scale S: set S / N (a 0-dim tensor needs no host sync)."""
    S = torch.tensor(1024.0)
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    tedfx.set_moe_loss_scale(moe_model, S / M)
    for tokens, targets in _micro_batches():
        (_ce(moe_model, tokens, targets) * S / M).backward()
    _assert_grads_equal({n: g / S for n, g in _grads(moe_model).items()}, expected)


def test_summed_micro_batch_losses_keep_scale_1_and_say_so(dense):
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    tedfx.set_moe_loss_scale(moe_model, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tedfx.MoELossScaleWarning)
        for tokens, targets in _micro_batches():
            _ce(moe_model, tokens, targets).backward()
    expected_sum = {n: g * M for n, g in reference_grads(dense, _micro_batches()).items()}
    _assert_grads_equal(_grads(moe_model), expected_sum)


def test_one_backward_per_step_does_not_warn(dense):
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    opt = torch.optim.SGD(moe_model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tedfx.MoELossScaleWarning)
        for tokens, targets in _micro_batches():
            loss = _ce(moe_model, tokens, targets)
            opt.zero_grad()  # after the forward, before the backward: still one backward per step
            loss.backward()
            opt.step()


def test_moe_losses_still_reports_floats(dense):
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    tedfx.set_moe_loss_scale(moe_model, 0.25)
    tokens, targets = _micro_batches()[0]
    _ce(moe_model, tokens, targets).backward()
    reported = tedfx.moe_losses(moe_model)
    assert reported["blocks"] == 2 and isinstance(reported["aux_loss"], float)
    assert 1.0 <= reported["aux_loss"] / 2 <= 4.0  # unscaled: the GShard loss per block lies in [1, E]


def test_set_moe_loss_scale_refuses_what_it_cannot_scale(dense):
    with pytest.raises(ValueError, match="GPT holds no MoE block"):
        tedfx.set_moe_loss_scale(dense, 0.5)
    moe_model = tedfx.to_moe(dense, (_micro_batches()[0][0],), moe=_moe())
    for bad in (0, -1.0, "0.5"):
        with pytest.raises(ValueError, match="scale="):
            tedfx.set_moe_loss_scale(moe_model, bad)
    with pytest.raises(ValueError, match="0-dim float tensor"):
        tedfx.set_moe_loss_scale(moe_model, torch.ones(2))
