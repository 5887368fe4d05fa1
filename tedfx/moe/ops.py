"""The MoE block's named ops, as they appear in a rewritten graph.

An MoE block in the graph reads (shape suffixes: S tokens of one token group,
H hidden, F FFN width, E experts, C capacity slots per expert, K choices):

    x_SH   = flatten_tokens(x)                       # [..., H] -> [S, H]
    plan   = router(x_SH)                            # call_module: (expert_SK, slot_SK, gate_SK, C, loss)
    x_ECH  = dispatch(x_SH, expert_SK, slot_SK, C)   # index-based scatter into capacity slots
    h_ECF  = expert_fc1(x_ECH, w1, b1, w3, b3)       # stacked expert weights, activation
    y_ECH  = expert_fc2(h_ECF, w2)                   # no bias: a row-parallel sum comes first
    y_ECH  = expert_bias(y_ECH, b2)
    y_SH   = combine(y_ECH, expert_SK, slot_SK, gate_SK)
    y_SH   = attach_aux_loss(y_SH, loss)             # the MoE losses enter the backward here
    y      = unflatten_tokens(y_SH, x)

The parallel passes insert collectives between these ops (all-to-all around
the experts, all-reduce after expert_fc2), so each op is small and does one
thing. Dispatch and combine are index-based (index_copy / index_select): cost
O(S * K * H), never the dense one-hot einsum's O(S * E * C * H).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "attach_aux_loss",
    "combine",
    "dispatch",
    "expert_bias",
    "expert_fc1",
    "expert_fc2",
    "experts_in",
    "experts_out",
    "flatten_tokens",
    "padded_capacity",
    "unflatten_tokens",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),
}
"""The FFN activations tedfx recognises, by name."""


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [S, H]: every leading dim is a token of the token group."""
    return x.reshape(-1, x.shape[-1])


def unflatten_tokens(y_SH: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[S, H] -> the shape of the FFN's input."""
    return y_SH.view(like.shape)


def padded_capacity(capacity: int, multiple: int) -> int:
    """Capacity slots rounded up to a multiple (T, so each tensor rank owns whole slots)."""
    return math.ceil(capacity / multiple) * multiple


def _flat_slots(expert_SK: torch.Tensor, slot_SK: torch.Tensor, capacity: int) -> torch.Tensor:
    return expert_SK * capacity + slot_SK


def dispatch(
    x_SH: torch.Tensor,
    expert_SK: torch.Tensor,
    slot_SK: torch.Tensor,
    capacity: int,
    *,
    num_experts: int,
    pad_multiple: int = 1,
) -> torch.Tensor:
    """Scatter each kept (token, choice) into its expert's capacity slot.

    Args:
        x_SH: token activations.
        expert_SK: expert chosen by each token's k-th choice.
        slot_SK: slot in that expert's buffer, -1 where the assignment was dropped.
        capacity: C, slots per expert the router filled at most.
        num_experts: E.
        pad_multiple: C is padded to a multiple of this (empty slots stay zero).

    Returns:
        x_ECH: [E, C_padded, H], zeros in unused slots.
    """
    S, H = x_SH.shape
    K = slot_SK.shape[1]
    C = padded_capacity(capacity, pad_multiple)
    # Dropped assignments are written to one extra trash row past the E * C slots, which is cut off:
    # no boolean-mask indexing, so every shape is static (no host sync, no graph break).
    trash = num_experts * C
    flat_SK = torch.where(slot_SK >= 0, _flat_slots(expert_SK, slot_SK, C), trash)
    rows = x_SH.unsqueeze(1).expand(S, K, H).reshape(S * K, H)
    buffer = x_SH.new_zeros(trash + 1, H).index_copy_(0, flat_SK.reshape(-1), rows)
    return buffer[:trash].view(num_experts, C, H)


def combine(
    y_ECH: torch.Tensor,
    expert_SK: torch.Tensor,
    slot_SK: torch.Tensor,
    gate_SK: torch.Tensor,
) -> torch.Tensor:
    """Gather each token's expert outputs and sum them weighted by the gates.

    Dropped assignments (slot -1) contribute zero, so a token dropped by every
    choice leaves the FFN as zeros and the residual carries it on.

    Returns:
        y_SH in the dtype of y_ECH.
    """
    E, C, H = y_ECH.shape
    S, K = slot_SK.shape
    kept = slot_SK >= 0
    flat = _flat_slots(expert_SK, slot_SK.clamp_min(0), C)
    y_SKH = y_ECH.reshape(E * C, H).index_select(0, flat.reshape(-1)).view(S, K, H)
    weight_SK = torch.where(kept, gate_SK, torch.zeros_like(gate_SK)).to(y_ECH.dtype)
    return torch.einsum("skh,sk->sh", y_SKH, weight_SK)


def expert_fc1(
    x_ECH: torch.Tensor,
    w1_EHF: torch.Tensor,
    b1_EF: torch.Tensor | None = None,
    w3_EHF: torch.Tensor | None = None,
    b3_EF: torch.Tensor | None = None,
    *,
    activation: str,
) -> torch.Tensor:
    """First expert projection and activation, batched over experts.

    MLP: act(x @ w1 + b1). GLU: act(x @ w1 + b1) * (x @ w3 + b3).
    Column-parallel over "tp": every argument may be a slice of F.
    """
    h_ECF = torch.bmm(x_ECH, w1_EHF)
    if b1_EF is not None:
        h_ECF = h_ECF + b1_EF.unsqueeze(1)
    h_ECF = ACTIVATIONS[activation](h_ECF)
    if w3_EHF is not None:
        up_ECF = torch.bmm(x_ECH, w3_EHF)
        if b3_EF is not None:
            up_ECF = up_ECF + b3_EF.unsqueeze(1)
        h_ECF = h_ECF * up_ECF
    return h_ECF


def expert_fc2(h_ECF: torch.Tensor, w2_EFH: torch.Tensor) -> torch.Tensor:
    """Second expert projection without bias (row-parallel over "tp": a partial sum)."""
    return torch.bmm(h_ECF, w2_EFH)


def expert_bias(y_ECH: torch.Tensor, b2_EH: torch.Tensor) -> torch.Tensor:
    """Add the second projection's bias, after any row-parallel reduction.

    y's leading dim may hold several blocks of the E experts of b2 (the
    source-major [X * E_local, C, H] buffer of expert parallelism).
    """
    E = b2_EH.shape[0]
    return (y_ECH.unflatten(0, (-1, E)) + b2_EH[:, None, :]).flatten(0, 1)


def experts_in(x_GECH: torch.Tensor, groups: int) -> torch.Tensor:
    """[G * E_local, C, H] as received from G ranks -> [E_local, G * C, H], one batch per local expert."""
    GE, C, H = x_GECH.shape
    return x_GECH.view(groups, GE // groups, C, H).transpose(0, 1).reshape(GE // groups, groups * C, H)


def experts_out(y_EGCH: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of experts_in: [E_local, G * C, H] -> [G * E_local, C, H], ready to send back."""
    E, GC, H = y_EGCH.shape
    return y_EGCH.view(E, groups, GC // groups, H).transpose(0, 1).reshape(groups * E, GC // groups, H)


class _AuxLossScaler(torch.autograd.Function):
    """Identity on y whose backward also sends gradient 1 into the MoE loss.

    The loss arrives weighted by its coefficients and by the MoE loss scale
    (routing.set_moe_loss_scale: 1 / N for `loss / N` gradient accumulation),
    so the backward behaves as if the user's loss were
    `scale * (loss + aux_coef * aux + z_coef * z)` for the user's weight `scale`
    of this forward's loss, without the model's outputs changing.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape = loss.shape
        ctx.loss_dtype = loss.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad_y.device)


def attach_aux_loss(y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Return y unchanged; a backward through y also backpropagates `loss` (already scaled by the router)."""
    if not loss.requires_grad:
        return y
    return _AuxLossScaler.apply(y, loss)
