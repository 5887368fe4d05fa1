"""Routing semantics of the MoE block (docs/moe.md), against hand-computed numbers.

Tier (a) of the tests (docs/architecture.md, "Tests"): no processes, no graph capture. Every expectation here
is written out by hand from the formulas of the design, so a change to
capacity, slot assignment, gate normalisation, the losses, their gradients,
dispatch/combine or the seeded noise shows up as a failing number.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tedfx import MoEConfig, ParallelConfig
from tedfx.moe import ops
from tedfx.moe.routing import Router, assign_slots, route, router_losses


def _router(moe: MoEConfig, hidden: int = 8, *, layer: int = 0, weight: torch.Tensor | None = None) -> Router:
    router = Router(hidden, moe, layer=layer)
    with torch.no_grad():
        if weight is None:
            weight = torch.randn(moe.num_experts, hidden, generator=torch.Generator().manual_seed(1))
        router.weight.copy_(weight)
    return router


# Router probabilities of 4 tokens over 3 experts, chosen without ties in the top 2.
PROBS_SE = torch.tensor([
    [0.50, 0.30, 0.20],   # top 2: expert 0, expert 1
    [0.10, 0.60, 0.30],   # top 2: expert 1, expert 2
    [0.25, 0.15, 0.60],   # top 2: expert 2, expert 0
    [0.45, 0.05, 0.50],   # top 2: expert 2, expert 0
])
# Per-token shifts of the logits: softmax ignores them, logsumexp(logits) equals them.
SHIFT_S = torch.tensor([0.5, -1.0, 2.0, 0.0])
LOGITS_SE = PROBS_SE.log() + SHIFT_S[:, None]


# --- capacity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "E, k, cf, min_cap, S, expected",
    [
        (4, 2, 1.25, 4, 10, 7),     # ceil(2 * 1.25 * 10 / 4) = ceil(6.25)
        (4, 2, 1.25, 4, 4, 4),      # ceil(2.5) = 3, raised to min_capacity
        (4, 2, 1.25, 0, 4, 3),
        (8, 1, 1.0, 0, 64, 8),      # exactly 8: no rounding up
        (10, 1, 1.1, 0, 100, 11),   # 1.1 * 100 / 10 is 11, though 1.1 * 100 in binary floats is 110.00000000000001
        (3, 3, 0.5, 1, 7, 4),       # ceil(3 * 0.5 * 7 / 3) = ceil(3.5)
    ],
)
def test_capacity_formula(E, k, cf, min_cap, S, expected):
    moe = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=min_cap)
    assert moe.capacity(S) == expected
    assert moe.capacity(S, training=False) == expected


def test_eval_capacity_factor_applies_in_eval_only():
    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
    assert moe.capacity(10, training=True) == 7     # ceil(2 * 1.25 * 10 / 4) = ceil(6.25)
    assert moe.capacity(10, training=False) == 10   # ceil(2 * 2.0 * 10 / 4)
    assert moe.capacity(2, training=False) == 4     # ceil(2) raised to min_capacity


def test_router_capacity_follows_train_and_eval_mode():
    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
    router = _router(moe)
    x_SH = torch.randn(10, 8)
    assert router.train()(x_SH)[3] == 7
    assert router.eval()(x_SH)[3] == 10
    # S is the tokens of the call: 24 tokens -> ceil(2 * 1.25 * 24 / 4) = 15.
    assert router.train()(torch.randn(24, 8))[3] == 15


def test_dropless_capacity_is_max_load_and_drops_nothing():
    # Every token's first choice is expert 0: the load of expert 0 is S.
    weight = torch.zeros(4, 8)
    weight[0, 0], weight[1, 0] = 5.0, 2.0
    moe = MoEConfig(num_experts=4, top_k=2, drop_tokens=False, min_capacity=0)
    x_SH = torch.randn(20, 8).abs() + 0.1
    expert_SK, slot_SK, _, capacity, _ = _router(moe, weight=weight)(x_SH)
    assert (expert_SK[:, 0] == 0).all() and (expert_SK[:, 1] == 1).all()
    assert capacity == 20 > moe.capacity(20)
    assert (slot_SK >= 0).all()
    assert sorted(slot_SK[:, 0].tolist()) == list(range(20))

    slot, cap = assign_slots(torch.tensor([[0, 1], [0, 2], [0, 1]]), torch.rand(3, 2), 3, None, "probs")
    assert cap == 3 and (slot >= 0).all()


# --- slot assignment --------------------------------------------------------------------------------------

# 4 tokens, 2 experts, both choices of every token.
EXPERT_SK = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])


def test_position_policy_keeps_first_choices_before_second_in_token_order():
    # Expert 0 receives, in priority order: t0/1st, t1/1st, t3/1st, then t2/2nd.
    # Expert 1 receives: t2/1st, then t0/2nd, t1/2nd, t3/2nd.
    slot, cap = assign_slots(EXPERT_SK, torch.rand(4, 2), 2, 3, "position")
    assert cap == 3
    assert slot.tolist() == [[0, 1], [1, 2], [0, -1], [2, -1]]
    slot, cap = assign_slots(EXPERT_SK, torch.rand(4, 2), 2, None, "position")
    assert cap == 4
    assert slot.tolist() == [[0, 1], [1, 2], [0, 3], [2, 3]]


def test_probs_policy_keeps_highest_probability_assignments():
    prob_SK = torch.tensor([[0.50, 0.30], [0.60, 0.10], [0.70, 0.20], [0.40, 0.35]])
    # Expert 0 by probability: t1 0.60, t0 0.50, t3 0.40, t2 0.20 (2nd choice).
    # Expert 1 by probability: t2 0.70, t3 0.35 (2nd choice), t0 0.30, t1 0.10.
    slot, cap = assign_slots(EXPERT_SK, prob_SK, 2, 2, "probs")
    assert cap == 2
    assert slot.tolist() == [[1, -1], [0, -1], [0, -1], [-1, 1]]
    # "position" keeps other assignments: the first choices of t0, t1, t2 and the second choice of t0.
    assert assign_slots(EXPERT_SK, prob_SK, 2, 2, "position")[0].tolist() == [[0, 1], [1, -1], [0, -1], [-1, -1]]


def test_probs_policy_breaks_ties_by_position():
    slot_probs, _ = assign_slots(EXPERT_SK, torch.full((4, 2), 0.5), 2, 3, "probs")
    slot_pos, _ = assign_slots(EXPERT_SK, torch.full((4, 2), 0.5), 2, 3, "position")
    assert torch.equal(slot_probs, slot_pos)


def test_route_on_hand_built_logits():
    plan = route(LOGITS_SE, top_k=2, normalize_gates=False, capacity=None)
    assert plan.expert_SK.tolist() == [[0, 1], [1, 2], [2, 0], [2, 0]]
    torch.testing.assert_close(plan.probs_SE, PROBS_SE)
    torch.testing.assert_close(plan.gate_SK, torch.tensor([[0.5, 0.3], [0.6, 0.3], [0.6, 0.25], [0.5, 0.45]]))
    # Dropless, loads: expert 0 <- t0, t2, t3; expert 1 <- t0, t1; expert 2 <- t1, t2, t3.
    assert plan.capacity == 3
    assert (plan.slot_SK >= 0).all()


def test_route_capacity_and_policies_on_hand_built_logits():
    # Position: expert 0 takes t0/1st, t2/2nd, drops t3/2nd; expert 1 takes t1/1st, t0/2nd;
    #           expert 2 takes t2/1st, t3/1st, drops t1/2nd.
    plan = route(LOGITS_SE, top_k=2, normalize_gates=False, capacity=2, drop_policy="position")
    assert plan.capacity == 2
    assert plan.slot_SK.tolist() == [[0, 1], [0, -1], [0, 1], [1, -1]]
    # Probs: expert 0 keeps t0 (0.50) and t3 (0.45), drops t2 (0.25); expert 1 ranks t1 (0.60) before t0 (0.30);
    #        expert 2 keeps t2 (0.60) and t3 (0.50), drops t1 (0.30).
    plan = route(LOGITS_SE, top_k=2, normalize_gates=False, capacity=2, drop_policy="probs")
    assert plan.slot_SK.tolist() == [[0, 1], [0, -1], [0, -1], [1, 1]]


def test_dropless_route_capacity_is_max_load():
    plan = route(LOGITS_SE, top_k=2, normalize_gates=True, capacity=None)
    # Loads per expert: 3, 2, 3.
    assert plan.capacity == 3
    assert (plan.slot_SK >= 0).all()


def test_normalize_gates_renormalises_over_the_k():
    plan = route(LOGITS_SE, top_k=2, normalize_gates=True, capacity=1)
    expected = torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9],
                             [0.6 / 0.85, 0.25 / 0.85], [0.5 / 0.95, 0.45 / 0.95]])
    torch.testing.assert_close(plan.gate_SK, expected)
    torch.testing.assert_close(plan.gate_SK.sum(-1), torch.ones(4))
    # k = 1 without normalisation: the gate is the router probability (Switch).
    plan1 = route(LOGITS_SE, top_k=1, normalize_gates=False, capacity=None)
    torch.testing.assert_close(plan1.gate_SK[:, 0], torch.tensor([0.5, 0.6, 0.6, 0.5]))


def test_probs_policy_ranks_by_router_probability_not_by_normalised_gate():
    # k = 1 with normalize_gates: every normalised gate is 1, yet "probs" must keep t1 (0.9) over t0 (0.55).
    logits_SE = torch.tensor([[0.55, 0.45], [0.9, 0.1]]).log()
    plan = route(logits_SE, top_k=1, normalize_gates=True, capacity=1, drop_policy="probs")
    assert plan.slot_SK.tolist() == [[-1], [0]]
    # k = 2, both tokens choose experts 2 then 0. On expert 0 the probabilities rank t1 (0.35) before
    # t0 (0.30); the normalised gates would rank t0 (0.30 / 0.75 = 0.4) before t1 (0.35 / 0.95 = 0.37).
    logits_SE = torch.tensor([[0.30, 0.25, 0.45], [0.35, 0.05, 0.60]]).log()
    for normalize in (False, True):
        plan = route(logits_SE, top_k=2, normalize_gates=normalize, capacity=1, drop_policy="probs")
        assert plan.expert_SK.tolist() == [[2, 0], [2, 0]]
        assert plan.slot_SK.tolist() == [[-1, -1], [0, 0]]


@pytest.mark.parametrize("k, expected", [(1, False), (2, True), (3, True)])
def test_normalize_gates_default(k, expected):
    assert MoEConfig(num_experts=4, top_k=k).normalize_gates is expected
    assert MoEConfig(num_experts=4, top_k=k, normalize_gates=not expected).normalize_gates is (not expected)


def test_router_gates_sum_to_one_when_normalised():
    x_SH = torch.randn(12, 8)
    _, _, gate_SK, _, _ = _router(MoEConfig(num_experts=4, top_k=2))(x_SH)
    torch.testing.assert_close(gate_SK.sum(-1), torch.ones(12))
    _, _, gate_S1, _, _ = _router(MoEConfig(num_experts=4, top_k=1))(x_SH)
    probs_SE = torch.softmax(x_SH @ _router(MoEConfig(num_experts=4, top_k=1)).weight.detach().t(), -1)
    torch.testing.assert_close(gate_S1[:, 0], probs_SE.max(-1).values)
    assert (gate_S1 < 1).all()


# --- losses -----------------------------------------------------------------------------------------------


def test_aux_and_z_loss_hand_computed():
    plan = route(LOGITS_SE, top_k=2, normalize_gates=True, capacity=1, drop_policy="position")
    assert (plan.slot_SK == -1).any()  # dropping happened, and must not change f
    aux, z = router_losses(LOGITS_SE, plan.probs_SE, plan.expert_SK)
    # f from first choices [0, 1, 2, 2] = [1/4, 1/4, 2/4]; p = column means [1.3, 1.1, 1.6] / 4.
    assert aux.item() == pytest.approx(3 * (0.25 * 0.325 + 0.25 * 0.275 + 0.5 * 0.4))  # 1.05
    # logsumexp of each row is its shift: mean([0.25, 1, 4, 0]).
    assert z.item() == pytest.approx((0.25 + 1.0 + 4.0 + 0.0) / 4)


def test_router_losses_use_first_choices_before_dropping():
    # All first choices on expert 0, capacity 1: f_0 = 1 although expert 0 keeps one token.
    weight = torch.zeros(2, 4)
    weight[0, 0] = 3.0
    moe = MoEConfig(num_experts=2, top_k=1, capacity_factor=0.01, min_capacity=1)
    x_SH = torch.rand(6, 4) + 0.5
    router = _router(moe, 4, weight=weight)
    _, slot_SK, _, capacity, _ = router(x_SH)
    assert capacity == 1 and (slot_SK >= 0).sum() == 1
    probs_SE = torch.softmax(x_SH @ weight.t(), -1)
    torch.testing.assert_close(router.last_losses["aux_loss"], 2 * probs_SE[:, 0].mean())


def _moe_forward(router: Router, x_SH: torch.Tensor) -> torch.Tensor:
    """A whole MoE block around `router`, with expert e multiplying its tokens by (e + 1)."""
    expert_SK, slot_SK, gate_SK, capacity, loss = router(x_SH)
    x_ECH = ops.dispatch(x_SH, expert_SK, slot_SK, capacity, num_experts=router.moe.num_experts)
    scale_E11 = torch.arange(1, router.moe.num_experts + 1, dtype=x_SH.dtype).view(-1, 1, 1)
    y_SH = ops.combine(x_ECH * scale_E11, expert_SK, slot_SK, gate_SK)
    return ops.attach_aux_loss(y_SH, loss)


def _loss_formula_grad(weight: torch.Tensor, x_SH: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """d(aux_coef * aux + z_coef * z)/d(weight), by autograd on the formula of docs/moe.md."""
    w = weight.detach().clone().requires_grad_(True)
    logits_SE = x_SH @ w.t()
    probs_SE = torch.softmax(logits_SE, -1)
    first_S = torch.topk(logits_SE, moe.top_k, -1).indices[:, 0]
    f_E = F.one_hot(first_S, moe.num_experts).float().mean(0)
    aux = moe.num_experts * (f_E * probs_SE.mean(0)).sum()
    z = torch.logsumexp(logits_SE, -1).square().mean()
    (moe.aux_loss_coef * aux + moe.z_loss_coef * z).backward()
    return w.grad


def test_moe_losses_reach_router_weight_gradient():
    moe = MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05, min_capacity=2)
    x_SH = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    router = _router(moe)
    # Zero main loss: only the MoE losses reach the router.
    (0.0 * _moe_forward(router, x_SH).sum()).backward()
    expected = _loss_formula_grad(router.weight, x_SH, moe)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(router.weight.grad, expected, rtol=1e-5, atol=1e-7)


def test_moe_losses_add_to_the_main_gradient_without_changing_the_output():
    moe = MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05, min_capacity=2)
    no_losses = MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0, min_capacity=2)
    x_SH = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    with_losses, without = _router(moe), _router(no_losses)
    y = _moe_forward(with_losses, x_SH)
    y_plain = _moe_forward(without, x_SH)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    y.square().mean().backward()
    y_plain.square().mean().backward()
    assert without.weight.grad.abs().max() > 1e-2  # the gates carry a main gradient too
    torch.testing.assert_close(with_losses.weight.grad - without.weight.grad,
                               _loss_formula_grad(with_losses.weight, x_SH, moe), rtol=1e-4, atol=1e-6)


# --- dispatch and combine ---------------------------------------------------------------------------------


def _routed(S=24, E=4, k=2, capacity=5, H=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_SH = torch.randn(S, H, generator=g)
    plan = route(torch.randn(S, E, generator=g) * 2, top_k=k, normalize_gates=True, capacity=capacity)
    return x_SH, plan


def test_dispatch_combine_round_trip():
    E = 4
    x_SH, plan = _routed(E=E)
    kept_SK = plan.slot_SK >= 0
    all_kept, none_kept = kept_SK.all(-1), ~kept_SK.any(-1)
    assert all_kept.any() and none_kept.any() and (~all_kept & ~none_kept).any()

    x_ECH = ops.dispatch(x_SH, plan.expert_SK, plan.slot_SK, plan.capacity, num_experts=E)
    assert x_ECH.shape == (E, 5, 5)
    y_SH = ops.combine(x_ECH, plan.expert_SK, plan.slot_SK, plan.gate_SK)
    # Identity experts, normalised gates: kept tokens come back unchanged, dropped ones as zeros.
    torch.testing.assert_close(y_SH[all_kept], x_SH[all_kept])
    assert (y_SH[none_kept] == 0).all()
    partial_gate_S = (plan.gate_SK * kept_SK).sum(-1, keepdim=True)
    torch.testing.assert_close(y_SH[~none_kept], (partial_gate_S * x_SH)[~none_kept])


def test_dispatch_places_tokens_in_their_slots_and_combine_weights_by_expert():
    E = 4
    x_SH, plan = _routed(E=E)
    x_ECH = ops.dispatch(x_SH, plan.expert_SK, plan.slot_SK, plan.capacity, num_experts=E)
    filled = torch.zeros(E, plan.capacity, dtype=torch.bool)
    for s, kk in (plan.slot_SK >= 0).nonzero().tolist():
        e, c = plan.expert_SK[s, kk].item(), plan.slot_SK[s, kk].item()
        assert torch.equal(x_ECH[e, c], x_SH[s])
        filled[e, c] = True
    assert (x_ECH[~filled] == 0).all()
    # Expert e scales by (e + 1): each token gets sum over kept choices of gate * (e + 1) * x.
    scale_E11 = torch.arange(1, E + 1, dtype=torch.float32).view(-1, 1, 1)
    y_SH = ops.combine(x_ECH * scale_E11, plan.expert_SK, plan.slot_SK, plan.gate_SK)
    weight_S = ((plan.expert_SK + 1) * plan.gate_SK * (plan.slot_SK >= 0)).sum(-1, keepdim=True)
    torch.testing.assert_close(y_SH, weight_S * x_SH)


def test_dispatch_sends_each_slot_gradient_to_its_token_and_none_from_empty_or_dropped():
    E = 4
    x_SH, plan = _routed(E=E, capacity=10)  # some experts overflow, others leave slots empty
    x = x_SH.clone().requires_grad_()
    x_ECH = ops.dispatch(x, plan.expert_SK, plan.slot_SK, plan.capacity, num_experts=E)
    g_ECH = torch.randn(x_ECH.shape, generator=torch.Generator().manual_seed(5))
    x_ECH.backward(g_ECH)
    expected = torch.zeros_like(x_SH)
    for s, kk in (plan.slot_SK >= 0).nonzero().tolist():
        expected[s] += g_ECH[plan.expert_SK[s, kk], plan.slot_SK[s, kk]]
    filled = torch.zeros(E, plan.capacity, dtype=torch.bool)
    filled[plan.expert_SK[plan.slot_SK >= 0], plan.slot_SK[plan.slot_SK >= 0]] = True
    assert (plan.slot_SK < 0).any() and not filled.all()  # dropped choices and empty slots both occur
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("pad_multiple", [2, 4, 8])
def test_padded_capacity_gives_identical_results(pad_multiple):
    E = 4
    x_SH, plan = _routed(E=E, capacity=3)
    args = (plan.expert_SK, plan.slot_SK, plan.capacity)
    x_ECH = ops.dispatch(x_SH, *args, num_experts=E)
    padded_ECH = ops.dispatch(x_SH, *args, num_experts=E, pad_multiple=pad_multiple)
    C_pad = math.ceil(3 / pad_multiple) * pad_multiple
    assert padded_ECH.shape == (E, C_pad, 5)
    assert torch.equal(padded_ECH[:, :3], x_ECH) and (padded_ECH[:, 3:] == 0).all()
    scale_E11 = torch.arange(1, E + 1, dtype=torch.float32).view(-1, 1, 1)
    y = ops.combine(x_ECH * scale_E11, plan.expert_SK, plan.slot_SK, plan.gate_SK)
    y_pad = ops.combine(padded_ECH * scale_E11, plan.expert_SK, plan.slot_SK, plan.gate_SK)
    torch.testing.assert_close(y_pad, y, rtol=0, atol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_dispatch_and_combine_are_index_based():
    # H small and S * E * C large: a one-hot [S, E, C] tensor would dwarf every tensor the ops need.
    S, E, k, H = 256, 8, 2, 2
    x_SH, plan = _routed(S=S, E=E, k=k, capacity=64, H=H)
    C = plan.capacity
    x_SH.requires_grad_(True)
    with _LargestTensor() as probe:
        x_ECH = ops.dispatch(x_SH, plan.expert_SK, plan.slot_SK, C, num_experts=E)
        y_SH = ops.combine(x_ECH, plan.expert_SK, plan.slot_SK, plan.gate_SK)
        y_SH.sum().backward()
    assert probe.largest <= max((E * C + 1) * H, S * k * H)  # the E * C slots and dispatch's trash row
    assert probe.largest < S * E * C // 16


# --- seeded noise -----------------------------------------------------------------------------------------


def _noisy(kind: str, *, seed: int = 0, layer: int = 0, E: int = 4) -> Router:
    moe = MoEConfig(num_experts=E, top_k=1, noisy_gate=kind, jitter_eps=0.2, seed=seed)
    # rsample: zero logits, so the choice is decided by the Gumbel noise alone.
    weight = torch.zeros(E, 8) if kind == "rsample" else torch.randn(E, 8, generator=torch.Generator().manual_seed(2))
    return _router(moe, layer=layer, weight=weight)


def _noise_signature(kind: str, router: Router, x_SH: torch.Tensor) -> torch.Tensor:
    expert_SK, _, gate_SK, _, _ = router(x_SH)
    return expert_SK.float() if kind == "rsample" else gate_SK


@pytest.mark.parametrize("kind", ["jitter", "rsample"])
def test_noise_is_identical_on_separately_built_routers(kind):
    # Two tensor ranks of one token group build their own Router: they must draw the same noise.
    x_SH = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    rank0, rank1 = _noisy(kind), _noisy(kind)
    for _ in range(3):
        assert torch.equal(_noise_signature(kind, rank0, x_SH), _noise_signature(kind, rank1, x_SH))


@pytest.mark.parametrize("kind", ["jitter", "rsample"])
def test_noise_changes_between_calls_seeds_and_layers(kind):
    x_SH = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    router = _noisy(kind)
    first, second = _noise_signature(kind, router, x_SH), _noise_signature(kind, router, x_SH)
    assert not torch.equal(first, second)
    assert not torch.equal(first, _noise_signature(kind, _noisy(kind, seed=1), x_SH))
    assert not torch.equal(first, _noise_signature(kind, _noisy(kind, layer=1), x_SH))


@pytest.mark.parametrize("kind", ["jitter", "rsample"])
def test_noise_streams_of_layers_do_not_overlap(kind):
    # The noise of (seed, layer, call) must not repeat as the noise of another (seed, layer, call).
    x_SH = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    layer0 = _noisy(kind, layer=0)
    seen = [_noise_signature(kind, _noisy(kind, layer=1), x_SH), _noise_signature(kind, _noisy(kind, seed=1), x_SH)]
    for calls in (10_007, 1_000_003):
        layer0.calls = calls
        assert not any(torch.equal(_noise_signature(kind, layer0, x_SH), s) for s in seen)


@pytest.mark.parametrize("kind", ["jitter", "rsample"])
def test_noise_is_off_in_eval_mode(kind):
    x_SH = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    router = _noisy(kind).eval()
    expert_SK, _, gate_SK, _, _ = router(x_SH)
    plan = route(x_SH @ router.weight.detach().t(), top_k=1, normalize_gates=False, capacity=None)
    assert torch.equal(expert_SK, plan.expert_SK)
    torch.testing.assert_close(gate_SK, plan.gate_SK, rtol=0, atol=0)
    assert router.calls == 0
    assert torch.equal(router(x_SH)[2], gate_SK)


def test_jitter_scales_the_router_input_within_eps():
    # With one input feature, jitter scales each token's logits by u in [1 - eps, 1 + eps].
    moe = MoEConfig(num_experts=2, top_k=1, noisy_gate="jitter", jitter_eps=0.2)
    router = _router(moe, 1, weight=torch.tensor([[1.0], [-1.0]]))
    x_S1 = torch.full((256, 1), 1.0)
    _, _, gate_SK, _, _ = router(x_S1)
    # gate = softmax([u, -u])[0] = sigmoid(2u).
    u_S = torch.logit(gate_SK[:, 0].double()) / 2
    assert u_S.min() >= 0.8 - 1e-5 and u_S.max() <= 1.2 + 1e-5
    assert u_S.max() - u_S.min() > 0.3  # the noise spans most of the interval


# --- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k", "5"),
        ({"top_k": 0}, "top_k", "0"),
        ({"capacity_factor": 0}, "capacity_factor", "0"),
        ({"capacity_factor": -1.5}, "capacity_factor", "-1.5"),
        ({"eval_capacity_factor": 0.0}, "eval_capacity_factor", "0.0"),
        ({"drop_policy": "random"}, "drop_policy", "'random'"),
        ({"noisy_gate": "gaussian"}, "noisy_gate", "'gaussian'"),
        ({"num_experts": 0}, "num_experts", "0"),
        ({"layers": "odd"}, "layers", "'odd'"),
    ],
)
def test_moe_config_rejects_invalid_values(kwargs, field, value):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}={re.escape(value)} is invalid") as info:
        MoEConfig(**kwargs)
    assert "expected" in str(info.value)


def test_layers_out_of_range_names_indices_and_ffn_count():
    moe = MoEConfig(layers=[0, 7, 9])
    with pytest.raises(ValueError) as info:
        moe.selects(0, "h.0.mlp", 4)
    message = str(info.value)
    assert "MoEConfig.layers" in message and "[7, 9]" in message and "4 FFNs" in message
    assert MoEConfig(layers=[1, 3]).selects(3, "h.3.mlp", 4)
    assert not MoEConfig(layers=[1, 3]).selects(2, "h.2.mlp", 4)


def test_precision_and_zero_accept_what_runs_and_name_anything_else():
    """Both options run now (tests/test_optimizer.py); a value they cannot run is a ValueError naming the field."""
    assert ParallelConfig(zero=True).zero == 1 and ParallelConfig(zero=False).zero == 0
    for precision in ("fp32", "bf16", "fp16"):
        ParallelConfig(precision=precision).check_supported()
    with pytest.raises(ValueError, match=r"ParallelConfig.precision='fp8' is invalid"):
        ParallelConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"ParallelConfig.zero=2 is invalid"):
        ParallelConfig(zero=2)
