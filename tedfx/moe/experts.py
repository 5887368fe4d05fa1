"""Stacked expert weights of one MoE block, upcycled from the dense FFN."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExpertWeights"]


class ExpertWeights(nn.Module):
    """The E experts of one MoE block as stacked tensors, laid out [E, in, out].

    State-dict keys under `<ffn_path>.experts.`:
        w1 [E, H, F]  first projection (the gate for GLU)
        b1 [E, F]     its bias (absent when the dense FFN had none)
        w3 [E, H, F]  GLU only: the up projection; b3 [E, F] its bias
        w2 [E, F, H]  second projection; b2 [E, H] its bias

    The [E, in, out] layout makes expert compute a plain `bmm`, and tensor
    parallelism a slice of F (dim 2 of w1/w3, dim 1 of w2).
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name in ("w1", "b1", "w3", "b3", "w2", "b2"):
            t = tensors.get(name)
            setattr(self, name, nn.Parameter(t) if t is not None else None)

    @staticmethod
    def upcycle(
        dense: dict[str, torch.Tensor | None],
        num_experts: int,
        *,
        noise: float,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """E copies of the dense FFN's weights (already [in, out]), each plus seeded noise.

        Noise on a weight is `noise * std(weight) * N(0, 1)`, drawn per expert;
        biases are copied exactly.
        """
        stacked: dict[str, torch.Tensor] = {}
        for name, t in dense.items():
            if t is None:
                continue
            t = t.detach()
            copies = t.unsqueeze(0).expand(num_experts, *t.shape).clone()  # one copy of the bytes
            if noise > 0 and name.startswith("w"):
                scale = noise * float(t.float().std())
                copies += scale * torch.randn(copies.shape, generator=generator).to(copies.dtype)
            stacked[name] = copies
        return stacked

    @staticmethod
    def fresh(
        dense: dict[str, torch.Tensor | None],
        num_experts: int,
        *,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Experts initialised from scratch (normal std 0.02, zero biases), shapes as upcycled."""
        stacked: dict[str, torch.Tensor] = {}
        for name, t in dense.items():
            if t is None:
                continue
            shape = (num_experts, *t.shape)
            if name.startswith("w"):
                stacked[name] = (torch.randn(shape, generator=generator) * 0.02).to(t.dtype)
            else:
                stacked[name] = torch.zeros(shape, dtype=t.dtype)
        return stacked
