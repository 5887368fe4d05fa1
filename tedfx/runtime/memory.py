"""Counting the bytes a block of code allocates: what the optimizer step's transient memory is measured with.

CPU tensors have no allocator statistics in torch, so `AllocationTracker` watches every op
through a TorchDispatchMode: a tensor returned by an op whose storage is none of the op's
inputs' storages is a new allocation, counted until its storage is freed (a finalizer on the
storage's Python object, which torch keeps alive exactly as long as the storage). Storages
that existed before the block are not counted. Memory allocated inside a kernel and freed
before it returns (scratch space) and inside collectives' backends is not seen.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .._compat import TorchDispatchMode, pytree, storage_key
from .zero import cut_tiles, plan_groups

__all__ = ["AllocationTracker", "predict_training_memory", "tensor_bytes"]


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind the tensors of a pytree (a view counts its storage once)."""
    seen: dict[int, int] = {}
    for t in pytree.tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensors allocated inside the block.

    Attributes:
        live: bytes allocated inside the block and not yet freed.
        peak: the largest `live` seen.
        allocated: bytes allocated in all (freed or not).

    Example:
        >>> with AllocationTracker() as mem:
        ...     opt.step()
        >>> mem.peak   # the step's transient memory, in bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocated = 0
        self._tracked: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = storage_key(t)
            if key in inputs or key in self._tracked:
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            self._tracked[key] = nbytes
            self.live += nbytes
            self.allocated += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._tracked.pop(key, 0)


ADAM_STATES = 2
"""fp32 tensors Adam/AdamW keep per entry (exp_avg, exp_avg_sq), plus one 0-dim fp32 `step` per parameter it steps."""


def predict_training_memory(params: list[tuple[str, torch.nn.Parameter, str]], *, zero: int, sizes: dict[str, int],
                            ranks: dict[str, int], tile_numel: int | None, foreach: bool = False) -> dict[str, int]:
    """Bytes one rank holds to train with `tedfx.optimizer(pm, torch.optim.AdamW, ...)`, activations excluded.

    The same grouping, ownership and tiling code as the optimizer (tedfx.runtime.zero), applied to
    the rank's parameters as they are in the graph (16-bit with bf16/fp16, routers fp32).

    Args:
        params: (name, parameter, data-parallel axis) of the rank's trained parameters.
        zero: ParallelConfig.zero.
        sizes: {"dp": X*D, "edp": D}; ranks: {"dp": ..., "edp": ...}, this rank's index in each group.
        tile_numel: the optimizer's tile_numel (None: untiled).
        foreach: torch's multi-tensor AdamW (the default on GPUs; single-tensor on CPUs).

    Returns:
        {"weights", "grads", "master", "optimizer_states", "step_transient", "peak"}: the first four are
        held across steps; step_transient is the most the step allocates at once on top of them
        (fp32 copies of a tile's 16-bit gradients and AdamW's temporaries: one tile-sized tensor with
        foreach; without, two per piece plus the previous piece's quotient); peak is their sum.
    """
    trained = [(n, p, a) for n, p, a in params if p.requires_grad]
    groups = plan_groups(trained, zero=zero, sizes=sizes, ranks=ranks)
    out = dict.fromkeys(("weights", "grads", "master", "optimizer_states", "step_transient"), 0)
    for g in groups:
        item = torch.empty((), dtype=g.dtype).element_size()
        padded = g.chunk * g.size if g.size > 1 else g.numel
        out["weights"] += padded * item
        out["grads"] += g.numel * item
        start, stop = g.owned
        if g.dtype != torch.float32:
            out["master"] += (stop - start) * 4
        tiles = cut_tiles(g.pieces(), tile_numel)
        out["optimizer_states"] += ADAM_STATES * 4 * (stop - start) + 4 * sum(len(t) for t in tiles)
    out["step_transient"] = _step_transient(groups, tile_numel, foreach)
    out["peak"] = sum(out.values())
    return out


def _step_transient(groups: list, tile_numel: int | None, foreach: bool) -> int:
    """The most one tile allocates: fp32 copies of its 16-bit gradients plus AdamW's temporaries."""
    tiles = [[(g.dtype, p) for p in t] for g in groups for t in cut_tiles(g.pieces(), tile_numel)]
    if tile_numel is None:  # one torch optimizer over every group's pieces, as the untiled optimizer steps
        tiles = [[entry for t in tiles for entry in t]]
    worst = 0
    for tile in tiles:
        copies = sum(4 * p.numel for dtype, p in tile if dtype != torch.float32)
        if foreach:  # one sqrt(exp_avg_sq) per piece, all at once
            temps = 4 * sum(p.numel for _, p in tile)
        else:  # per piece sqrt and its quotient, while the previous piece's quotient (the loop's `denom`) lives on
            sizes = [0] + [p.numel for _, p in tile]
            temps = 4 * max((2 * n + prev for prev, n in zip(sizes, sizes[1:])), default=0)
        worst = max(worst, copies + temps)
    return worst
