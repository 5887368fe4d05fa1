"""How a parameter is split over the mesh: the record the sharding passes write and the runtime reads.

The passes slice full tensors into a rank's shard with `shard_tensor`; the
runtime reassembles full tensors from every rank's shard with `unshard_tensor`
(full_state_dict). Both read the same `ParamShard`, so they cannot disagree.
It sits outside `tedfx.passes` and `tedfx.runtime` because both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ParamShard", "shard_tensor", "tensor_whole", "unshard_tensor"]


@dataclass(frozen=True)
class ParamShard:
    """The split of one parameter. No splits: replicated on every rank.

    splits: (mesh axis, tensor dim) pairs, applied in order. "ep" splits the
        expert dim into X contiguous blocks; "tp" splits a dim into T blocks,
        or, when `chunks` is set, each chunk into T blocks (a fused projection
        such as GPT-2's c_attn = [q | k | v] keeps q, k and v heads together).
    chunks: sizes of the chunks along the "tp" dim of a fused projection.
    full_shape: shape of the unsharded parameter.
    """

    name: str
    splits: tuple[tuple[str, int], ...] = ()
    chunks: tuple[int, ...] | None = None
    full_shape: tuple[int, ...] = ()

    def local_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        shape = list(self.full_shape)
        for axis, dim in self.splits:
            shape[dim] //= sizes[axis]
        return tuple(shape)


def _tp_pieces(t: torch.Tensor, dim: int, chunks: tuple[int, ...] | None) -> list[torch.Tensor]:
    return list(torch.split(t, list(chunks), dim=dim)) if chunks else [t]


def shard_tensor(full: torch.Tensor, spec: ParamShard, coords: dict[str, int], sizes: dict[str, int]) -> torch.Tensor:
    """The shard of `full` that the rank at `coords` holds."""
    out = full
    for axis, dim in spec.splits:
        n, i = sizes[axis], coords[axis]
        if axis == "tp":
            out = torch.cat([p.chunk(n, dim=dim)[i] for p in _tp_pieces(out, dim, spec.chunks)], dim=dim)
        else:
            out = out.chunk(n, dim=dim)[i]
    # Always fresh memory: a view would keep the whole unsharded tensor alive on every rank.
    return out.clone(memory_format=torch.contiguous_format)


def unshard_tensor(shards: dict[tuple[int, ...], torch.Tensor], spec: ParamShard,
                   sizes: dict[str, int]) -> torch.Tensor:
    """Reassemble a full tensor from shards keyed by the split axes' coordinates (in `spec.splits` order)."""
    if not spec.splits:
        return next(iter(shards.values()))

    def build(level: int, prefix: tuple[int, ...]) -> torch.Tensor:
        if level == len(spec.splits):
            return shards[prefix]
        axis, dim = spec.splits[level]
        parts = [build(level + 1, prefix + (i,)) for i in range(sizes[axis])]
        if axis == "tp" and spec.chunks:
            # Each part holds its 1/T of every chunk; regroup chunk by chunk.
            local_chunks = [c // sizes[axis] for c in spec.chunks]
            per_part = [torch.split(p, local_chunks, dim=dim) for p in parts]
            return torch.cat([torch.cat([pp[c] for pp in per_part], dim=dim) for c in range(len(local_chunks))],
                             dim=dim)
        return torch.cat(parts, dim=dim)

    return build(0, ())


def tensor_whole(shards: dict[str, ParamShard]) -> frozenset[str]:
    """Names of the tensors no "tp" split divides: their gradient is the same on the T ranks of a tensor group, so
    the gradient sync splits their reduction over those ranks (docs/parallelism.md, "Gradient sync")."""
    return frozenset(name for name, spec in shards.items() if all(axis != "tp" for axis, _ in spec.splits))
