"""find_ffns: locate the dense FFN blocks of a captured model (DESIGN §3).

Match records only; `ffn_to_moe` does the rewriting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

__all__ = ["LinearRef", "FFNMatch", "NoFFNFoundError", "find_ffns", "find_ffns_pass"]


@dataclass(frozen=True)
class LinearRef:
    """One projection of an FFN as it stands in the graph."""

    node: fx.Node
    """The aten.linear / aten.addmm / aten.mm / aten.matmul node."""
    weight: str
    """get_attr target of the weight."""
    bias: str | None
    """get_attr target of the bias, None when there is none."""
    transposed: bool
    """True when the weight is stored [in, out] (HF Conv1D via addmm); False for nn.Linear's [out, in]."""


@dataclass(frozen=True)
class FFNMatch:
    """A single-entry single-exit FFN region: linear -> activation -> linear, or its GLU variant."""

    index: int
    """Position among the model's FFNs, in graph order (what MoEConfig.layers indexes)."""
    path: str
    """Module path of the FFN: the longest common module path of its projections, e.g. "transformer.h.0.mlp"."""
    kind: Literal["mlp", "glu"]
    activation: str
    """"gelu", "gelu_tanh", "relu", "silu" or "relu2"."""
    hidden_dim: int
    """H: width of the FFN's input and output."""
    ffn_dim: int
    """F: width of the FFN's inner activation."""
    entry: fx.Node
    """The tensor the FFN reads, shape [..., H]."""
    exit: fx.Node
    """The node producing the FFN's result, shape [..., H]."""
    nodes: tuple[fx.Node, ...]
    """Every node of the region in graph order: entry excluded, exit included, get_attr excluded."""
    fc1: LinearRef
    """The up projection (for GLU: the gate, the projection under the activation)."""
    fc2: LinearRef
    """The down projection."""
    up: LinearRef | None = None
    """GLU only: the projection multiplied by the activated gate."""
    dropout_p: float = 0.0
    """Dropout probability between the activation and fc2 (0.0 when there is none)."""


class NoFFNFoundError(ValueError):
    """The graph has no FFN region tedfx can convert."""
