"""The MoE training objective written out, for the tests of the MoE loss scale (docs/moe.md, "MoE losses").

The MoE losses are defined per token group (one forward's tokens), so a step over M
micro-batches, each its own token group, trains

    J = 1/M * sum_m [CE_m + sum_blocks (aux_loss_coef * aux_m + z_loss_coef * z_m)]

`reference_grads` computes J's gradients in one backward: the model's own MoE losses are
switched off (coefficients 0) and the GShard losses are recomputed here from each router's
input and weight, so the reference shares no code with the loss scaling it checks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import tedfx
from tedfx.moe.routing import Router

__all__ = ["gshard_losses", "reference_grads"]


def gshard_losses(x_SH: torch.Tensor, w_EH: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard aux loss E * sum_e f_e * p_e (f from first choices) and z-loss mean(logsumexp(logits)^2)."""
    logits = x_SH.float() @ w_EH.float().t()
    probs = logits.softmax(-1)
    E = w_EH.shape[0]
    first = torch.topk(logits, top_k, -1).indices[:, 0]
    f_E = torch.bincount(first, minlength=E).float() / x_SH.shape[0]
    return E * (f_E * probs.mean(0)).sum(), torch.logsumexp(logits, -1).square().mean()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def reference_grads(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], moe: tedfx.MoEConfig, *,
                    aux_weight: float | None = None, z_weight: float | None = None) -> dict[str, torch.Tensor]:
    """Gradients of J over `batches` [(tokens, targets), ...] for `tedfx.to_moe(model, moe=moe)`.

    aux_weight and z_weight replace moe's coefficients in J (default: moe's own).
    """
    aux_weight = moe.aux_loss_coef if aux_weight is None else aux_weight
    z_weight = moe.z_loss_coef if z_weight is None else z_weight
    ref = tedfx.to_moe(model, (batches[0][0],), moe=dataclasses.replace(moe, aux_loss_coef=0.0, z_loss_coef=0.0))
    seen: list[tuple[Router, torch.Tensor]] = []
    hooks = [r.register_forward_hook(lambda r, args, out: seen.append((r, args[0])))
             for r in ref.modules() if isinstance(r, Router)]
    total = 0.0
    for tokens, targets in batches:
        seen.clear()
        task = F.cross_entropy(_logits(ref(tokens)).flatten(0, 1), targets.flatten())
        moe_losses = 0.0
        for router, x_SH in seen:
            aux, z = gshard_losses(x_SH, router.weight, moe.top_k)
            moe_losses = moe_losses + aux_weight * aux + z_weight * z
        total = total + (task + moe_losses) / len(batches)
    for h in hooks:
        h.remove()
    total.backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
