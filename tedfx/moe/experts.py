"""Stacked expert weights of one MoE block, upcycled from the dense FFN, materialised only where needed.

An MoE block's E experts are never built whole unless asked: `ExpertInit` is the
recipe "expert e of this block = the dense FFN's weights (+ seeded noise), or a
seeded fresh initialisation", and `ExpertWeights` holds either real tensors or
meta tensors plus that recipe. A rank materialises only its own slice (its E/X
experts, each its 1/T of F) with `ExpertInit.materialize`, reading the dense
weights through `fetch` one at a time (docs/moe.md, "Upcycling").

Every value depends on (seed, FFN index, tensor name, expert) only, never on
the layout, so any slice equals the same slice of the fully built experts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["EXPERT_TENSORS", "ExpertInit", "ExpertWeights"]

EXPERT_TENSORS = ("w1", "b1", "w3", "b3", "w2", "b2")
"""The stacked tensors of a block, in state-dict order."""


@dataclass(frozen=True, eq=False)
class ExpertInit:
    """How to compute any slice of one block's stacked expert tensors.

    Attributes:
        sources: {"w1": (dense key, transposed), ...}: where each tensor comes from. `fetch(key)` of a
            weight gives the dense tensor as stored; `transposed` says it is [out, in] (nn.Linear) and
            must be transposed into tedfx's [in, out] layout. A GLU's fused gate_up weight names the
            same key twice, with `out_slices` to pick its half.
        fetch: dense state-dict key -> tensor (the model's own tensor: never copied whole).
        num_experts: E.
        upcycle: experts start as copies of the dense FFN; False: normal(0, 0.02) weights, zero biases.
        noise: relative std of seeded Gaussian noise added to each upcycled weight.
        seed: the block's seed (MoEConfig.seed and the FFN index).
        out_slices: {"w1": (start, stop), ...}: the output features a tensor takes of a fused projection
            (a GLU's gate_up split in two halves).
    """

    sources: dict[str, tuple[str, bool]]
    fetch: Callable[[str], torch.Tensor]
    num_experts: int
    upcycle: bool
    noise: float
    seed: int
    out_slices: dict[str, tuple[int, int]] | None = None

    def __deepcopy__(self, memo: dict) -> "ExpertInit":
        return self  # immutable, and it references the dense model's tensors, which must never be copied

    def dense(self, name: str) -> torch.Tensor:
        """The dense FFN's tensor `name` in tedfx's layout ([in, out] for weights), a view where possible."""
        key, transposed = self.sources[name]
        t = self.fetch(key).detach()
        t = t.t() if transposed and t.dim() == 2 else t
        if self.out_slices and name in self.out_slices:
            start, stop = self.out_slices[name]
            t = t.narrow(t.dim() - 1, start, stop - start)
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        """Full stacked shape [E, ...] of tensor `name`."""
        return (self.num_experts, *self.dense(name).shape)

    def _generator(self, name: str, expert: int) -> torch.Generator:
        key = hashlib.blake2b(f"{self.seed}/{name}/{expert}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)

    def expert(self, name: str, e: int, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e's tensor `name` (a new tensor)."""
        dense = self.dense(name) if dense is None else dense
        is_weight = name.startswith("w")
        if not self.upcycle:
            if not is_weight:
                return torch.zeros(dense.shape, dtype=dense.dtype, device=dense.device)
            g = self._generator(name, e)
            return (torch.randn(dense.shape, generator=g) * 0.02).to(dense.dtype).to(dense.device)
        out = dense.clone(memory_format=torch.contiguous_format)
        if self.noise > 0 and is_weight:
            scale = self.noise * float(dense.float().std())
            out += (scale * torch.randn(dense.shape, generator=self._generator(name, e))).to(out.dtype)
        return out

    def materialize(self, name: str, experts: range, slices: dict[int, tuple[int, int]] | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` of `experts` only, each cut to `slices` {stacked dim: (start, stop)}.

        Peak extra memory: the result plus one expert's full tensor (its noise is drawn whole so that any
        slice equals the same slice of the whole).
        """
        dense = self.dense(name)
        parts = []
        for e in experts:
            t = self.expert(name, e, dense)
            for dim, (start, stop) in (slices or {}).items():
                t = t.narrow(dim - 1, start, stop - start)
            parts.append(t.to(dtype) if dtype is not None else t)
        return torch.stack(parts).contiguous()


class ExpertWeights(nn.Module):
    """The E experts of one MoE block as stacked tensors, laid out [E, in, out].

    State-dict keys under `<ffn_path>.experts.`:
        w1 [E, H, F]  first projection (the gate for GLU)
        b1 [E, F]     its bias (absent when the dense FFN had none)
        w3 [E, H, F]  GLU only: the up projection; b3 [E, F] its bias
        w2 [E, F, H]  second projection; b2 [E, H] its bias

    The [E, in, out] layout makes expert compute a plain `bmm`, and tensor
    parallelism a slice of F (dim 2 of w1/w3, dim 1 of w2).

    Built with `materialize=False`, the tensors are on the meta device and `init`
    computes any slice of them (what each rank of a parallel layout does).
    """

    def __init__(self, init: ExpertInit, *, materialize: bool = True) -> None:
        super().__init__()
        # The recipe stays only while something is left to materialise: it references the dense model.
        self.init = None if materialize else init
        for name in EXPERT_TENSORS:
            if name not in init.sources:
                setattr(self, name, None)
                continue
            if materialize:
                t = init.materialize(name, range(init.num_experts))
            else:
                dense = init.dense(name)
                t = torch.empty(init.shape(name), dtype=dense.dtype, device="meta")
            setattr(self, name, nn.Parameter(t))

    @property
    def materialized(self) -> bool:
        return not any(p.is_meta for p in self.parameters())
