"""Dropout on sharded activations: a mask per shard, the same on every recompute (docs/parallelism.md, "Dropout").

Megatron's rule for tensor parallelism, which tedfx keeps:

- An activation replicated over "tp" (the residual stream, a row-parallel output after
  its all-reduce) must be dropped identically on every tensor rank, or the replicas
  drift apart. Plain `aten.dropout` does that, because every tensor rank holds the same
  default generator state (`ParallelModule` checks it while dropout is on).
- An activation split over "tp" (a column-parallel output, the local attention heads, an
  expert's F/T slice) holds different elements on each rank; drawn from the shared
  state, every shard would get the same mask, so element j and element j + F/T would
  always be dropped together. Each shard needs its own mask.

The ops below replace `aten.dropout` and `aten.scaled_dot_product_attention` where the
graph marks the activation as sharded (tedfx/passes/shard_dropout.py). A sharded draw,
in order:

1. Draw one seed from the default CPU generator. Every tensor rank draws the same seed,
   so the replicated dropouts after it stay in step; activation checkpointing restores
   the default generator before it recomputes a region, so a recompute draws it again.
2. Mix in this rank's index on every axis that splits the activation (a hash, not a sum).
3. Run the aten op with the default generator of the activation's device seeded by the
   mixed seed, inside `torch.random.fork_rng`: afterwards the default generator continues
   as if only step 1 had drawn.

Eager only: a compiled graph breaks at these ops (`torch.compile(..., fullgraph=True)` raises on them).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator

import torch

from . import _compat
from .collectives import axis_rank

__all__ = ["ATTENTION_OPS", "DROPOUT_OPS", "shard_seed", "sharded_attention", "sharded_dropout"]

aten = torch.ops.aten


def shard_seed(axes: tuple[str, ...]) -> int | None:
    """Steps 1-2: a seed for this rank's shard, or None when no axis in `axes` splits anything (size 1).

    Consumes one number of the default CPU generator either way.

    Args:
        axes: the mesh axes that split the activation, e.g. ("ep", "tp") for an expert's F/T slice.
    """
    seed = int(torch.randint(0, 2**62, (1,)))
    coords = [(axis, *axis_rank(axis)) for axis in axes]
    if all(size == 1 for _, _, size in coords):
        return None
    key = "/".join([str(seed), *(f"{axis}={rank}" for axis, rank, _ in coords)])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Step 3: the default generator of `device` seeded with `seed` inside the block, restored after it."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    backend = torch.get_device_module(device.type)
    index = device.index if device.index is not None else backend.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        backend.default_generators[index].manual_seed(seed)
        yield


@torch.compiler.disable
def sharded_dropout(x: torch.Tensor, p: float, train: bool, *, axes: tuple[str, ...]) -> torch.Tensor:
    """`aten.dropout(x, p, train)` with a mask of this rank's own for an activation split over `axes`.

    Args:
        x: this rank's shard of the activation.
        p, train: as aten.dropout (TedGraphModule.train/eval flips `train`).
        axes: the mesh axes that split `x`.

    Returns:
        The dropped-out shard; in eval mode (or p = 0) `x` itself, drawing nothing.
    """
    if not train or p == 0:
        return aten.dropout.default(x, p, train)
    seed = shard_seed(tuple(axes))
    if seed is None:
        return aten.dropout.default(x, p, train)
    with _seeded(seed, x.device):
        return aten.dropout.default(x, p, train)


@torch.compiler.disable
def sharded_attention(*args: Any, axes: tuple[str, ...], **kwargs: Any) -> torch.Tensor:
    """`aten.scaled_dot_product_attention(*args, **kwargs)` whose attention dropout draws this rank's own mask.

    The arguments are aten's (query, key, value, attn_mask, dropout_p, is_causal, scale=, enable_gqa=),
    with this rank's heads; `axes` are the mesh axes that split the heads.
    """
    dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    if dropout_p == 0:
        return aten.scaled_dot_product_attention.default(*args, **kwargs)
    seed = shard_seed(tuple(axes))
    if seed is None:
        return aten.scaled_dot_product_attention.default(*args, **kwargs)
    with _seeded(seed, args[0].device):
        return aten.scaled_dot_product_attention.default(*args, **kwargs)


DROPOUT_OPS = (*_compat.dropout_targets, sharded_dropout)
"""Ops called (x, p, train, ...): what TedGraphModule.train/eval switches and ParallelModule looks for."""
ATTENTION_OPS = (_compat.sdpa_target, sharded_attention)
"""Ops called (query, key, value, attn_mask, dropout_p, ...): their dropout_p is switched by train/eval."""
