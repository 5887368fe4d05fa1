"""Every private or version-dependent torch API tedfx touches, in one place.

A torch upgrade should change this file and nothing else. Supported: torch 2.11-2.14.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

__all__ = ["pytree", "export_dim_auto", "dropout_targets", "sdpa_target", "is_symbolic"]

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def export_dim_auto():
    """`torch.export.Dim.AUTO`: let export decide whether a dim is dynamic."""
    return torch.export.Dim.AUTO


# Dropout as the ATen training IR spells it: aten.dropout(x, p, train).
dropout_targets = (
    torch.ops.aten.dropout.default,
    torch.ops.aten.feature_dropout.default,
    torch.ops.aten.alpha_dropout.default,
)
# Attention keeps its own dropout_p argument (position 4).
sdpa_target = torch.ops.aten.scaled_dot_product_attention.default


def is_symbolic(value: object) -> bool:
    """True for a SymInt/SymFloat whose value export left symbolic."""
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))
