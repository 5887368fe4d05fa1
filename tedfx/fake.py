"""Run a rank's graph on fake tensors: shapes, dtypes and collectives without a byte of parameter data.

`tedfx.explain` and the layout-wide collective-order check predict what each
rank sends by running its graph against simulated process groups
(tedfx.predict). What they need is every tensor's shape and dtype, never its
values: so the rank graph is built with `shard_for_rank(materialize=False)`
(every tensor on the meta device with the rank's shapes) and run under torch's
FakeTensorMode, where each op computes only the shape and dtype of its result.
Predicting a layout of a model of any size then costs memory for its graphs,
not for its parameters (docs/architecture.md, "Predicting without processes").

Routing is written with static shapes (tedfx.moe.routing), so a capacity-bound
MoE block runs on fake tensors as it runs on real ones. A graph whose shapes
follow its values (dropless capacities, an op torch has no fake kernel for)
raises `FakeUnsupported`; the caller then simulates that rank on real tensors.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)

from ._compat import pytree
from .module_tree import module_tree

__all__ = ["FakeRun", "FakeUnsupported"]


class FakeUnsupported(RuntimeError):
    """A graph's shapes depend on tensor values (or an op has no fake kernel): simulate it on real tensors."""


_VALUE_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


class FakeRun:
    """A fake-tensor mode and a rank graph whose tensors were swapped for fake ones of the same shapes.

    Example:
        >>> gm, ctx = shard_for_rank(moe_gm, moe_ctx, parallel=parallel, coords=coords, materialize=False)
        >>> run = FakeRun(gm, device=torch.device("cpu"))
        >>> with run.active():
        ...     out = gm(*run.inputs(example_inputs))
    """

    def __init__(self, gm: nn.Module, device: torch.device) -> None:
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.device = device
        fakes: dict[int, Any] = {}
        originals: list[torch.Tensor] = []  # alive while swapping: a freed tensor's id could name a later one
        for module in module_tree(gm):
            for store in (module._parameters, module._buffers):
                for key, t in list(store.items()):
                    if t is None:
                        continue
                    if id(t) not in fakes:
                        fake = self._fake_like(t)
                        fakes[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) \
                            if isinstance(t, nn.Parameter) else fake
                    originals.append(t)
                    store[key] = fakes[id(t)]

    def _fake_like(self, t: torch.Tensor) -> torch.Tensor:
        device = self.device if t.is_meta else t.device
        with self.mode:
            return torch.empty(t.shape, dtype=t.dtype, device=device)

    def inputs(self, tree: Any) -> Any:
        """`tree` with every tensor replaced by a fake one (same shape, dtype, device and requires_grad)."""
        def fake(x: Any) -> Any:
            return self.mode.from_tensor(x) if isinstance(x, torch.Tensor) else x

        return pytree.tree_map(fake, tree)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside: ops on the graph's tensors compute shapes only. A value-dependent op raises FakeUnsupported."""
        try:
            with self.mode:
                yield
        except _VALUE_DEPENDENT as e:
            raise FakeUnsupported(f"{type(e).__name__}: {e}") from e


def device_of(tree: Any, module: nn.Module | None = None) -> torch.device:
    """Where the simulated tensors live: the first real tensor of `tree` or of `module`, else the CPU."""
    leaves = [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]
    if module is not None:
        leaves += [*module.parameters(), *module.buffers()]
    return next((t.device for t in leaves if not t.is_meta), torch.device("cpu"))
