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
5. The weighted MoE loss (aux_loss_coef * aux + z_loss_coef * z) enters the
   backward through the block's output (ops.attach_aux_loss), multiplied by
   the MoE loss scale (`set_moe_loss_scale`): the weight the user's backward
   gives one forward's loss. The objective is then the user's loss plus the
   MoE losses of every forward (token group) with the same weight; a loop that
   backpropagates `loss / N` over N micro-batches sets the scale to 1 / N
   (docs/moe.md, "MoE losses").

Noise is drawn from a generator seeded by (seed, layer, call count), so every
tensor rank of a token group draws the same numbers: DTD stays exact.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import in_backward_pass
from ..config import MoEConfig

__all__ = ["MoELossScaleWarning", "RoutePlan", "Router", "assign_slots", "moe_losses", "route", "router_losses",
           "set_moe_loss_scale"]


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


def expert_counts(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of expert_N name each expert: [E] int64.

    A scatter-add into E counters, not `torch.bincount`, whose output length depends on the values:
    this shape is static, so routing needs no host sync, traces under fake tensors and compiles
    without a graph break.
    """
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device)
    return counts.scatter_add_(0, expert_N, torch.ones_like(expert_N, dtype=torch.int64))


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
    load_E = expert_counts(expert_N, num_experts)
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
    first_choice_E = expert_counts(expert_SK[:, 0], E).to(probs_SE.dtype) / S
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


ZERO_GRAD_CHECKS = 8
"""Backwards that found the router's gradient all zeros (zero_grad(set_to_none=False), no accumulation) after
which the accumulation check stops reading it (each read is a host sync)."""


class MoELossScaleWarning(UserWarning):
    """The MoE losses may weigh N times too much: a backward ran on top of an earlier one (see the message)."""


ACCUMULATION_WARNING = (
    "tedfx: a backward reached the MoE losses while the router weights already held a gradient (gradient "
    "accumulation), and the MoE loss scale was never set. The MoE aux and z "
    "losses enter every backward with weight 1.0, so if your loop backpropagates loss / N over N micro-batches "
    "they weigh N times too much. Call tedfx.set_moe_loss_scale(model, 1 / N) once (with a loss scaler: "
    "scaler.get_scale() / N each step), or tedfx.set_moe_loss_scale(model, 1.0) if you sum the micro-batch "
    "losses; either silences this warning."
)


class Router(nn.Module):
    """The MoE block's gate: a bias-free fp32 linear H -> E plus the routing rules.

    State-dict key: `<ffn_path>.router.weight` [E, H]. After each forward,
    `last_losses` holds the block's unweighted aux and z losses. The weighted
    loss it returns carries `loss_scale` (set_moe_loss_scale) into the backward.
    """

    def __init__(self, hidden_dim: int, moe: MoEConfig, layer: int) -> None:
        super().__init__()
        self.moe = moe
        self.layer = layer
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden_dim))
        self.calls = 0
        self.last_losses: dict[str, torch.Tensor] = {}
        self.loss_scale: float | torch.Tensor | None = None
        """Weight of this block's MoE loss in the backward (set_moe_loss_scale); None: 1.0, never set."""
        self._warned = False
        self._zero_grads_seen = 0

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
        if self.loss_scale is not None:
            loss = loss * self.loss_scale
        elif loss.requires_grad and not self._warned and not torch.compiler.is_compiling() \
                and not in_backward_pass():  # a recomputed loss gets no gradient of its own
            loss.register_hook(self._check_accumulation)
        return plan.expert_SK, plan.slot_SK, plan.gate_SK, plan.capacity, loss

    def _check_accumulation(self, grad: torch.Tensor) -> None:
        """In the backward, before this one adds to it: a gradient already there means an earlier backward
        since the last zero_grad, i.e. gradient accumulation, whose loop tedfx cannot see. A gradient of zeros
        (`zero_grad(set_to_none=False)`) is none; reading it syncs with the device, so after ZERO_GRAD_CHECKS
        backwards that found zeros (a loop that does not accumulate) it is no longer read."""
        grad = self.weight.grad
        if grad is None or self.loss_scale is not None or self._warned or self._zero_grads_seen >= ZERO_GRAD_CHECKS:
            return
        if bool(grad.any()):
            self._warned = True
            warnings.warn(ACCUMULATION_WARNING, MoELossScaleWarning, stacklevel=2)
        else:
            self._zero_grads_seen += 1


def moe_losses(module: nn.Module) -> dict[str, float]:
    """The last forward's MoE losses of `module`, unweighted (no coefficient, no loss scale), summed over its
    MoE blocks: for logging. The backward already includes them (set_moe_loss_scale says with what weight).

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


def set_moe_loss_scale(module: nn.Module, scale: float | torch.Tensor) -> int:
    """Weigh the MoE losses of every later forward of `module` by `scale` in the backward.

    tedfx adds each MoE block's `aux_loss_coef * aux + z_loss_coef * z` to the backward of
    the forward that computed it, without changing the model's outputs (as Megatron's
    aux-loss scaler does). tedfx cannot see how your loop weighs one forward's loss, so
    tell it: the objective it trains is then, for every forward m, the weight you give
    loss_m times (loss_m + MoE losses_m).

    - one backward per step, `loss.backward()`: 1.0 (the default; nothing to call);
    - gradient accumulation, `(loss / N).backward()` per micro-batch: 1 / N;
    - a loss scaler, `scaler.scale(loss / N).backward()`: `scaler.get_scale() / N`, set
      before each step's forwards (a 0-dim tensor is read without a host sync);
    - micro-batch losses summed, `loss.backward()` N times: 1.0.

    Until it is called, tedfx warns (MoELossScaleWarning) when it sees gradient
    accumulation, since with `loss / N` the MoE losses would weigh N times too much.
    Data parallelism needs nothing: every rank's gradients, MoE losses included, are averaged.

    Args:
        module: a module holding MoE blocks: `tedfx.to_moe`'s result, a ParallelModule,
            `tedfx.compiled_module(model)`.
        scale: a float > 0, or a 0-dim tensor.

    Returns:
        The number of MoE blocks scaled.

    Raises:
        ValueError: `module` holds no MoE block (nothing would be scaled), or `scale` is not > 0.

    Example:
        >>> tedfx.set_moe_loss_scale(moe_model, 1 / accumulation_steps)
        >>> for x, y in micro_batches:
        ...     (F.cross_entropy(moe_model(x).flatten(0, 1), y.flatten()) / accumulation_steps).backward()
    """
    routers = [m for m in module.modules() if isinstance(m, Router)]
    if not routers:
        raise ValueError(f"set_moe_loss_scale: {type(module).__name__} holds no MoE block (no tedfx Router), so "
                         f"there is no MoE loss to scale; pass the module tedfx.to_moe or tedfx.parallelize "
                         f"returned (or tedfx.compiled_module(model)).")
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(f"set_moe_loss_scale: scale must be a float or a 0-dim float tensor, got a "
                             f"{scale.dtype} tensor of shape {tuple(scale.shape)}.")
        scale = scale.detach()
    elif not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"set_moe_loss_scale: scale={scale!r} is invalid: expected a number > 0 (1 / N for "
                         f"loss / N over N micro-batches).")
    for r in routers:
        r.loss_scale = scale if isinstance(scale, torch.Tensor) else float(scale)
    return len(routers)
