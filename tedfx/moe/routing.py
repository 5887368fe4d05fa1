"""Routing: which experts each token goes to, in which slot, with what weight.

In order (docs/moe.md, "Routing"):
1. logits_SE = x_SH @ w_EH.T in fp32 (jitter noise scales x first, if asked).
2. probs_SE = softmax(logits); choose top-k experts (Gumbel noise is added to
   the logits for the choice only, if asked); gates are the chosen probs,
   renormalised over the k when `normalize_gates`.
3. Capacity C = max(ceil(k * cf * S / E), min_capacity), or the largest load
   when dropless. Each expert keeps at most C assignments: the ones with the
   highest probability ("probs") or the earliest, first choices before second
   choices ("position"). Kept assignments get slots 0..C-1 in that order.
4. Aux loss = E * sum_e f_e * p_e (f from first choices before dropping,
   p the mean probability); z-loss = mean(logsumexp(logits)^2).

Noise is drawn from a generator seeded by (seed, layer, call count), so every
tensor rank of a token group draws the same numbers: DTD stays exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import in_backward_pass
from ..config import MoEConfig

__all__ = ["RoutePlan", "Router", "assign_slots", "moe_losses", "route", "router_losses"]


@dataclass(frozen=True)
class RoutePlan:
    """Where each of the S tokens' K choices goes."""

    expert_SK: torch.Tensor
    """int64 expert index of each choice."""
    slot_SK: torch.Tensor
    """int64 slot within the expert's capacity, -1 when dropped."""
    gate_SK: torch.Tensor
    """fp32 weight of each choice in the combine (kept or not)."""
    capacity: int
    """C: slots per expert."""
    probs_SE: torch.Tensor
    """fp32 router probabilities (for the losses)."""


def assign_slots(
    expert_SK: torch.Tensor,
    prob_SK: torch.Tensor,
    num_experts: int,
    capacity: int | None,
    policy: str,
) -> tuple[torch.Tensor, int]:
    """Slots of each assignment within its expert; -1 beyond the capacity.

    Args:
        expert_SK: chosen experts.
        prob_SK: router probability of each choice (the "probs" priority).
        num_experts: E.
        capacity: slots per expert, None for dropless (then C = largest load).
        policy: "probs" keeps each expert's highest-probability assignments,
            "position" its earliest (all first choices before second choices).

    Returns:
        (slot_SK, capacity)
    """
    S, K = expert_SK.shape
    # Assignments in priority order "choice, then token": first choices first.
    expert_N = expert_SK.t().reshape(-1)
    if policy == "probs":
        by_prob = torch.argsort(prob_SK.t().reshape(-1), descending=True, stable=True)
        order = by_prob[torch.argsort(expert_N[by_prob], stable=True)]
    else:
        order = torch.argsort(expert_N, stable=True)
    load_E = torch.bincount(expert_N, minlength=num_experts)
    start_E = torch.cumsum(load_E, 0) - load_E
    rank_sorted = torch.arange(expert_N.numel(), device=expert_N.device) - start_E[expert_N[order]]
    slot_N = torch.empty_like(expert_N)
    slot_N[order] = rank_sorted
    if capacity is None:
        capacity = max(int(load_E.max()), 1)
    slot_N = torch.where(slot_N < capacity, slot_N, torch.full_like(slot_N, -1))
    return slot_N.view(K, S).t(), capacity


def router_losses(logits_SE: torch.Tensor, probs_SE: torch.Tensor,
                  expert_SK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GShard load-balancing loss, z-loss) of one token group."""
    S, E = probs_SE.shape
    first_choice_E = torch.bincount(expert_SK[:, 0], minlength=E).to(probs_SE.dtype) / S
    aux = E * torch.sum(first_choice_E * probs_SE.mean(0))
    z = torch.logsumexp(logits_SE, dim=-1).square().mean()
    return aux, z


def route(
    logits_SE: torch.Tensor,
    *,
    top_k: int,
    normalize_gates: bool,
    capacity: int | None,
    drop_policy: str = "probs",
    choice_noise_SE: torch.Tensor | None = None,
) -> RoutePlan:
    """Steps 2-3 of the module docstring on fp32 logits."""
    probs_SE = torch.softmax(logits_SE, dim=-1)
    choice_SE = logits_SE if choice_noise_SE is None else logits_SE + choice_noise_SE
    expert_SK = torch.topk(choice_SE, top_k, dim=-1).indices
    prob_SK = probs_SE.gather(1, expert_SK)
    gate_SK = prob_SK
    if normalize_gates:
        gate_SK = gate_SK / gate_SK.sum(-1, keepdim=True).clamp_min(torch.finfo(gate_SK.dtype).eps)
    # "probs" ranks by router probability: normalised gates would all be 1 for k = 1 and reorder tokens for k >= 2.
    slot_SK, capacity = assign_slots(expert_SK, prob_SK.detach(), logits_SE.shape[-1], capacity, drop_policy)
    return RoutePlan(expert_SK, slot_SK, gate_SK, capacity, probs_SE)


class Router(nn.Module):
    """The MoE block's gate: a bias-free fp32 linear H -> E plus the routing rules.

    State-dict key: `<ffn_path>.router.weight` [E, H]. After each forward,
    `last_losses` holds the block's unweighted aux and z losses.
    """

    def __init__(self, hidden_dim: int, moe: MoEConfig, layer: int) -> None:
        super().__init__()
        self.moe = moe
        self.layer = layer
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden_dim))
        self.calls = 0
        self.last_losses: dict[str, torch.Tensor] = {}

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * 0.02)

    def _noise_generator(self, device: torch.device, call: int) -> torch.Generator:
        # The same (seed, layer, call) on every rank of a token group: same noise. Hashed, not summed:
        # a linear mix would replay layer l's noise as layer l + 1's, 10_007 calls later.
        key = hashlib.blake2b(f"{self.moe.seed}/{self.layer}/{call}".encode(), digest_size=8).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(key, "little") >> 1)
        return g

    def forward(self, x_SH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """Returns (expert_SK, slot_SK, gate_SK, capacity, weighted MoE loss)."""
        moe = self.moe
        x_SH = x_SH.float()
        noisy = self.training and moe.noisy_gate is not None
        g = None
        if noisy:
            # Activation checkpointing runs this forward again inside the backward: draw the
            # noise of the forward being recomputed (the latest one), not new noise.
            recompute = in_backward_pass()
            g = self._noise_generator(x_SH.device, self.calls - 1 if recompute else self.calls)
            if not recompute:
                self.calls += 1
        if noisy and moe.noisy_gate == "jitter":
            u = torch.rand(x_SH.shape, generator=g, device=x_SH.device)
            x_SH = x_SH * (1.0 - moe.jitter_eps + 2.0 * moe.jitter_eps * u)
        logits_SE = F.linear(x_SH, self.weight.float())
        choice_noise = None
        if noisy and moe.noisy_gate == "rsample":
            u = torch.rand(logits_SE.shape, generator=g, device=x_SH.device)
            choice_noise = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))  # Gumbel(0, 1)
        capacity = moe.capacity(x_SH.shape[0], training=self.training) if moe.drop_tokens else None
        plan = route(logits_SE, top_k=moe.top_k, normalize_gates=bool(moe.normalize_gates), capacity=capacity,
                     drop_policy=moe.drop_policy, choice_noise_SE=choice_noise)
        aux, z = router_losses(logits_SE, plan.probs_SE, plan.expert_SK)
        self.last_losses = {"aux_loss": aux.detach(), "z_loss": z.detach()}
        loss = moe.aux_loss_coef * aux + moe.z_loss_coef * z
        return plan.expert_SK, plan.slot_SK, plan.gate_SK, plan.capacity, loss


def moe_losses(module: nn.Module) -> dict[str, float]:
    """The last forward's MoE losses of `module`, unweighted and summed over its MoE blocks.

    Returns:
        {"aux_loss": ..., "z_loss": ..., "blocks": number of MoE blocks}
    """
    routers = [m for m in module.modules() if isinstance(m, Router)]
    totals: dict[str, float] = {"aux_loss": 0.0, "z_loss": 0.0}
    for r in routers:
        for key, value in r.last_losses.items():
            totals[key] += float(value)
    totals["blocks"] = len(routers)
    return totals
