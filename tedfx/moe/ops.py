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
thing. Dispatch and combine are index-based (index_select of rows): cost
O(S * K * H), never the dense one-hot einsum's O(S * E * C * H).

Dropless routing (MoEConfig.drop_tokens=False) uses the packed layout instead
of capacity slots (docs/moe.md, "Dropless: the packed layout"): the block also
computes `loads_E = expert_loads(expert_SK)`, and every op given `loads=`
works on x_NH, the S * K rows sorted by expert (expert e's rows at
offsets[e]..offsets[e] + loads[e]), so no expert is padded to the largest load.
The packed ops read the loads on the host (split sizes); they are not meant
for a static-shape compile.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .routing import expert_counts

__all__ = [
    "ACTIVATIONS",
    "attach_aux_loss",
    "capacity_cat",
    "capacity_chunk",
    "combine",
    "dispatch",
    "expert_bias",
    "expert_fc1",
    "expert_fc2",
    "expert_loads",
    "experts_in",
    "experts_out",
    "flatten_tokens",
    "local_loads",
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


def expert_loads(expert_SK: torch.Tensor, *, num_experts: int) -> torch.Tensor:
    """Rows per expert of the packed layout: how many (token, choice) pairs chose each expert, [E] int64."""
    return expert_counts(expert_SK.reshape(-1), num_experts)


def local_loads(loads_GE: torch.Tensor) -> torch.Tensor:
    """[G, E_local] rows received from each of G ranks per local expert -> [E_local] rows per local expert."""
    return loads_GE.sum(0)


def _packed_rows(expert_SK: torch.Tensor, slot_SK: torch.Tensor, loads_E: torch.Tensor) -> torch.Tensor:
    """Row of each (token, choice) in the packed layout: its expert's offset plus its slot (all kept)."""
    offsets_E = torch.cumsum(loads_E, 0) - loads_E
    return offsets_E[expert_SK] + slot_SK


def _splits(loads: torch.Tensor) -> list[int]:
    return loads.reshape(-1).tolist()  # a host sync: the packed layout's split sizes


def dispatch(
    x_SH: torch.Tensor,
    expert_SK: torch.Tensor,
    slot_SK: torch.Tensor,
    capacity: int,
    *,
    num_experts: int,
    pad_multiple: int = 1,
    loads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scatter each kept (token, choice) into its expert's capacity slot.

    Args:
        x_SH: token activations.
        expert_SK: expert chosen by each token's k-th choice.
        slot_SK: slot in that expert's buffer, -1 where the assignment was dropped.
        capacity: C, slots per expert the router filled at most.
        num_experts: E.
        pad_multiple: C is padded to a multiple of this (empty slots stay zero).
        loads: dropless only: `expert_loads(expert_SK)`; gives the packed layout.

    Returns:
        x_ECH: [E, C_padded, H], zeros in unused slots; with `loads`, x_NH: [S * K, H] sorted by expert.
    """
    S, H = x_SH.shape
    K = slot_SK.shape[1]
    # A gather, not a scatter: the token each row of the buffer holds is scattered (one int per slot), then
    # one index_select reads the rows, with no zero-filled buffer and no copy of every token per choice (half
    # the time, forward and backward; the same values and gradients).
    token = torch.arange(S, device=x_SH.device).repeat_interleave(K)  # of each (token, choice), token-major
    if loads is not None:
        # Dropless keeps every choice, so the rows are a permutation of the S * K choices.
        rows = _packed_rows(expert_SK, slot_SK, loads).reshape(-1)
        return x_SH.index_select(0, torch.empty_like(rows).index_copy_(0, rows, token))
    C = padded_capacity(capacity, pad_multiple)
    # Dropped assignments point at one extra trash slot past the E * C ones, which is cut off, and empty slots
    # at a zero row past the S tokens: no boolean-mask indexing, so every shape is static (no host sync, no
    # graph break).
    trash = num_experts * C
    flat_SK = torch.where(slot_SK >= 0, _flat_slots(expert_SK, slot_SK, C), trash)
    source = torch.full((trash + 1,), S, dtype=torch.long, device=x_SH.device).index_copy_(0, flat_SK.reshape(-1),
                                                                                           token)
    padded = torch.cat([x_SH, x_SH.new_zeros(1, H)])
    return padded.index_select(0, source[:trash]).view(num_experts, C, H)


def combine(
    y_ECH: torch.Tensor,
    expert_SK: torch.Tensor,
    slot_SK: torch.Tensor,
    gate_SK: torch.Tensor,
    *,
    loads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather each token's expert outputs and sum them weighted by the gates.

    Dropped assignments (slot -1) contribute zero, so a token dropped by every
    choice leaves the FFN as zeros and the residual carries it on. With `loads`,
    y is the packed [S * K, H] (see dispatch).

    Returns:
        y_SH in the dtype of y_ECH.
    """
    S, K = slot_SK.shape
    H = y_ECH.shape[-1]
    if loads is not None:
        y_SKH = y_ECH.index_select(0, _packed_rows(expert_SK, slot_SK, loads).reshape(-1)).view(S, K, H)
        return _weighted_sum(y_SKH, gate_SK.to(y_ECH.dtype))
    E, C, _ = y_ECH.shape
    kept = slot_SK >= 0
    flat = _flat_slots(expert_SK, slot_SK.clamp_min(0), C)
    y_SKH = y_ECH.reshape(E * C, H).index_select(0, flat.reshape(-1)).view(S, K, H)
    weight_SK = torch.where(kept, gate_SK, torch.zeros_like(gate_SK)).to(y_ECH.dtype)
    return _weighted_sum(y_SKH, weight_SK)


def _weighted_sum(y_SKH: torch.Tensor, w_SK: torch.Tensor) -> torch.Tensor:
    """sum_k w[s, k] * y[s, k, :] as one batched [1, K] @ [K, H] product per token: forward and backward in a
    third of the time of the equivalent einsum on CPU, whose backward permutes and copies its operands.

    Both operands contiguous: the slots come out of the router choice-major, so the kept-choice weights
    (torch.where follows its mask's strides) are column-major, and a batched product with such strides falls
    back to one small product per token (15x slower here).
    """
    return torch.bmm(w_SK.contiguous().unsqueeze(1), y_SKH.contiguous()).squeeze(1)


def _expert_matmul(x: torch.Tensor, w_EIO: torch.Tensor, loads: torch.Tensor | None) -> torch.Tensor:
    """x [E, C, I] @ w [E, I, O] per expert; packed x [N, I] (rows sorted by expert, `loads` each): a loop over
    the experts, each on its own rows."""
    if loads is None:
        return torch.bmm(x, w_EIO)
    # unbind, not w[e]: the backward of each index would add a whole zero [E, I, O] gradient per expert.
    parts = [rows @ w for rows, w in zip(torch.split(x, _splits(loads)), w_EIO.unbind(0))]
    return torch.cat(parts) if parts else x.new_zeros(0, w_EIO.shape[-1])


def _expert_rows(b_EO: torch.Tensor, x: torch.Tensor, loads: torch.Tensor | None) -> torch.Tensor:
    """A per-expert bias laid out like x: [E, 1, O] for capacity slots, [N, O] for packed rows."""
    if loads is None:
        return b_EO.unsqueeze(1)
    return b_EO.repeat_interleave(loads, dim=0, output_size=x.shape[0])


def expert_fc1(
    x_ECH: torch.Tensor,
    w1_EHF: torch.Tensor,
    b1_EF: torch.Tensor | None = None,
    w3_EHF: torch.Tensor | None = None,
    b3_EF: torch.Tensor | None = None,
    *,
    activation: str,
    loads: torch.Tensor | None = None,
) -> torch.Tensor:
    """First expert projection and activation, batched over experts.

    MLP: act(x @ w1 + b1). GLU: act(x @ w1 + b1) * (x @ w3 + b3).
    Column-parallel over "tp": every argument may be a slice of F.
    With `loads` ([E] rows per expert), x is packed: [N, H] -> [N, F].
    """
    h_ECF = ACTIVATIONS[activation](_expert_linear(x_ECH, w1_EHF, b1_EF, loads))
    if w3_EHF is not None:
        h_ECF = h_ECF * _expert_linear(x_ECH, w3_EHF, b3_EF, loads)
    return h_ECF


def _expert_linear(x: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor | None,
                   loads: torch.Tensor | None) -> torch.Tensor:
    """x @ w + b per expert; on capacity slots the bias is added inside the GEMM (baddbmm, as addmm does for a
    linear), which saves a pass over the [E, C, O] output."""
    if b_EO is None:
        return _expert_matmul(x, w_EIO, loads)
    if loads is None:
        return torch.baddbmm(b_EO.unsqueeze(1), x, w_EIO)
    h = _expert_matmul(x, w_EIO, loads)
    return h + _expert_rows(b_EO, h, loads)


def expert_fc2(h_ECF: torch.Tensor, w2_EFH: torch.Tensor, *, loads: torch.Tensor | None = None) -> torch.Tensor:
    """Second expert projection without bias (row-parallel over "tp": a partial sum); packed with `loads`."""
    return _expert_matmul(h_ECF, w2_EFH, loads)


def expert_bias(y_ECH: torch.Tensor, b2_EH: torch.Tensor, *, loads: torch.Tensor | None = None) -> torch.Tensor:
    """Add the second projection's bias, after any row-parallel reduction.

    y's leading dim may hold several blocks of the E experts of b2 (the
    source-major [X * E_local, C, H] buffer of expert parallelism). Packed,
    `loads` gives the rows of each (block, expert): [E] or [X, E].
    """
    E = b2_EH.shape[0]
    if loads is not None:
        blocks = loads.numel() // E
        return y_ECH + _expert_rows(b2_EH.repeat(blocks, 1), y_ECH, loads.reshape(-1))
    return (y_ECH.unflatten(0, (-1, E)) + b2_EH[:, None, :]).flatten(0, 1)


def experts_in(x_GECH: torch.Tensor, groups: int, *, loads: torch.Tensor | None = None) -> torch.Tensor:
    """[G * E_local, C, H] as received from G ranks -> [E_local, G * C, H], one batch per local expert.

    Packed, `loads` [G, E_local] gives the rows received from each rank for each local expert: the
    source-major rows are reordered expert-major, each expert's rows contiguous.
    """
    if loads is not None:
        return _reorder(x_GECH, loads)
    GE, C, H = x_GECH.shape
    return x_GECH.view(groups, GE // groups, C, H).transpose(0, 1).reshape(GE // groups, groups * C, H)


def experts_out(y_EGCH: torch.Tensor, groups: int, *, loads: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of experts_in: [E_local, G * C, H] -> [G * E_local, C, H], ready to send back."""
    if loads is not None:
        return _reorder(y_EGCH, loads.t())
    E, GC, H = y_EGCH.shape
    return y_EGCH.view(E, groups, GC // groups, H).transpose(0, 1).reshape(groups * E, GC // groups, H)


def capacity_chunk(x_ECH: torch.Tensor, index: int, chunks: int) -> torch.Tensor:
    """Chunk `index` of `chunks` equal chunks of the capacity dim (C already a multiple of `chunks`)."""
    C = x_ECH.shape[1]
    return x_ECH.narrow(1, index * (C // chunks), C // chunks)


def capacity_cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The capacity chunks joined again: [E, C / n, H] x n -> [E, C, H]."""
    return torch.cat(chunks, dim=1)


def _reorder(x: torch.Tensor, loads_AB: torch.Tensor) -> torch.Tensor:
    """Rows stored in (a, b) blocks of loads_AB[a, b] rows each -> the same blocks in (b, a) order."""
    A, B = loads_AB.shape
    blocks = torch.split(x, _splits(loads_AB))
    return torch.cat([blocks[a * B + b] for b in range(B) for a in range(A)]) if blocks else x


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
