"""`tedfx.optimizer`: a torch optimizer with what ParallelConfig asks for (docs/parallelism.md, "Optimizer").

One optimizer step, in order:
1. With `max_norm` (or fp16, whose loss scaler needs to know about overflows): the global
   gradient norm, every parameter counted once, from the 16-bit gradients, one all-reduce of a
   scalar over the world (tedfx.runtime.grad_norm). fp16: a non-finite norm means an overflow
   somewhere; every rank skips the step alike and the scale shrinks.
2. Tile by tile over the entries this rank owns (all of them, or its ZeRO-1 chunk of each group,
   tedfx.runtime.zero): upcast the tile's gradients to fp32, unscale and clip them (one multiply;
   fp32 gradients are scaled in place first, as torch.nn.utils.clip_grad_norm_ does),
   let the wrapped torch optimizer update the tile's fp32 master weights and states, copy the
   masters back into the 16-bit weights, free the fp32 gradients. The step's transient memory is
   one tile's fp32 gradients and the optimizer's temporaries for one tile, not the whole model's.
3. ZeRO-1: one in-place all-gather per group brings every rank's updated chunk to the group.

The update itself is the torch optimizer's own code: each tile is a torch optimizer of
`optimizer_cls` over nn.Parameters that alias the tile's master entries, so the arithmetic
per entry is torch's, whichever tiling (tiled and untiled steps agree bit for bit). In fp32 the
masters are the weights themselves; without ZeRO and tiling the step is exactly
`optimizer_cls(pm.parameters(), **kwargs).step()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import LossScaleConfig
from .executor import ParallelModule
from .grad_norm import clip_coefficient, global_grad_norm
from .memory import tensor_bytes
from .precision import LossScaler
from .zero import FlatGroup, Piece, build_groups, cut_tiles

__all__ = ["ELEMENTWISE_OPTIMIZERS", "TedOptimizer", "optimizer"]

ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(
    getattr(torch.optim, name) for name in ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "NAdam",
                                            "RAdam", "RMSprop", "Rprop", "ASGD") if hasattr(torch.optim, name))
"""Optimizers whose update of an entry depends on that entry only: they may step any slice of a parameter."""


@dataclass
class _Tile:
    """Pieces stepped together, their fp32 masters (aliases of the master entries) and the torch optimizer."""

    pieces: list[Piece]
    masters: list[nn.Parameter]
    separate: list[bool]
    """Per piece: the master is an fp32 copy to be written back into the 16-bit weight."""
    groups: list[FlatGroup]
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class _Masters:
    """fp32 master entries of one group's owned range (None for fp32 groups: the weights are the masters)."""

    group: FlatGroup
    flat: torch.Tensor | None
    index: dict[int, int] = field(default_factory=dict)
    """id(param) -> position of the param's first entry in the group's flat index space."""

    def view(self, piece: Piece) -> torch.Tensor:
        if self.flat is None:
            return piece.values()
        start = self.index[id(piece.param)] + piece.start - self.group.owned[0]
        return self.flat[start:start + piece.numel]


class TedOptimizer(torch.optim.Optimizer):
    """A torch optimizer class run with master weights, ZeRO-1, the tiled step and global clipping.

    Build it with `tedfx.optimizer(pm, torch.optim.AdamW, lr=...)`. It is a torch Optimizer:
    `zero_grad`, `param_groups` (one group; LR schedulers work) and `state_dict` behave as usual.

    Attributes:
        last_grad_norm: the global gradient norm of the last step (None when it was not needed).
        loss_scaler: the fp16 LossScaler (None otherwise).
    """

    def __init__(self, pm: ParallelModule, optimizer_cls: type[torch.optim.Optimizer], *, tile_numel: int | None = None,
                 max_norm: float | None = None, loss_scale: LossScaleConfig | None = None, **kwargs: Any) -> None:
        _check_arguments(pm, optimizer_cls, tile_numel, max_norm, loss_scale)
        self.pm = pm
        self.optimizer_cls = optimizer_cls
        self.tile_numel = tile_numel
        self.max_norm = max_norm
        self.zero = pm.parallel.zero
        precision = pm.parallel.precision
        self.loss_scaler = LossScaler(loss_scale or LossScaleConfig()) if precision == "fp16" else None
        self.last_grad_norm: float | None = None
        self._loss_scaled = False
        self._named = [(name, p) for name, p, _ in pm.sync_params]
        probe = optimizer_cls([nn.Parameter(torch.zeros(1))], **kwargs)
        super().__init__([p for _, p in self._named], dict(probe.defaults))
        self.flat_groups = build_groups(pm.sync_params, zero=self.zero, groups=pm.mesh.groups())
        for group in self.flat_groups:
            _make_contiguous(group)
            if self.zero:
                group.flatten()
        self.masters = [_allocate_masters(group) for group in self.flat_groups]
        self.tiles = self._cut_tiles()
        for tile in self.tiles:
            tile.optimizer = optimizer_cls(tile.masters, **kwargs)

    def _cut_tiles(self) -> list[_Tile]:
        tiles = []
        for masters in self.masters:
            for pieces in cut_tiles(masters.group.pieces(), self.tile_numel):
                tiles.append(_Tile(pieces, [nn.Parameter(masters.view(p)) for p in pieces],
                                   [masters.flat is not None] * len(pieces), [masters.group] * len(pieces)))
        if self.tile_numel is None and tiles:  # untiled: one torch optimizer over every piece, as on pm.parameters()
            tiles = [_Tile([p for t in tiles for p in t.pieces], [m for t in tiles for m in t.masters],
                           [s for t in tiles for s in t.separate], [g for t in tiles for g in t.groups])]
        return tiles

    # --- the step ---------------------------------------------------------------------------------

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the loss scale with fp16, unchanged otherwise.

        Example:
            >>> opt.scale_loss(loss).backward(); opt.step(); opt.zero_grad()
        """
        self._loss_scaled = True
        return loss * self.loss_scaler.scale if self.loss_scaler is not None else loss

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 without fp16)."""
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the fp16 gradients overflowed (the same count on every rank)."""
        return self.loss_scaler.skipped_steps if self.loss_scaler is not None else 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step on every rank (a collective: every rank must call it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaler = self.loss_scaler
        if scaler is not None and not self._loss_scaled:
            raise RuntimeError(
                "ParallelConfig(precision='fp16') trains with a dynamic loss scale, but this step's gradients "
                "were not scaled: call opt.scale_loss(loss).backward() instead of loss.backward().")
        self._loss_scaled = False
        scale = scaler.scale if scaler is not None else 1.0
        self.last_grad_norm = None
        if self.max_norm is not None or scaler is not None:
            self.last_grad_norm = self.global_grad_norm() / scale
            if scaler is not None and LossScaler.overflowed(self.last_grad_norm):
                scaler.update(found_overflow=True)  # every rank saw the same norm: every rank skips
                return loss
        coef = clip_coefficient(self.last_grad_norm, self.max_norm) if self.max_norm is not None else 1.0
        self._copy_hyperparameters()
        multiplier = coef / scale
        if multiplier != 1.0:  # fp32 gradients are scaled in place, as torch.nn.utils.clip_grad_norm_ does
            for p in (p for g in self.flat_groups if g.dtype == torch.float32 for p in g.params):
                if p.grad is not None:
                    p.grad.mul_(multiplier)
        for tile in self.tiles:
            _step_tile(tile, multiplier)
        for group in self.flat_groups:
            group.all_gather(self.pm.comm_stats())
        if scaler is not None:
            scaler.update(found_overflow=False)
        return loss

    def global_grad_norm(self) -> float:
        """The 2-norm of the whole model's gradient (as it is in .grad, scaled with fp16), equal on every rank."""
        return global_grad_norm(self._named, self.pm.shards, self.pm.mesh.coords, stats=self.pm.comm_stats(),
                                check_every_copy=self.loss_scaler is not None)

    def _copy_hyperparameters(self) -> None:
        """What a user or LR scheduler set on `param_groups[0]` applies to every tile."""
        settings = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        for tile in self.tiles:
            for group in tile.optimizer.param_groups:
                group.update(settings)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "tiles", None) is not None:
            raise ValueError("tedfx.optimizer steps every parameter of the ParallelModule with one set of "
                             "hyperparameters; it takes no further parameter groups.")
        super().add_param_group(param_group)

    # --- state and memory -------------------------------------------------------------------------

    def layout_key(self) -> dict[str, Any]:
        """What a state dict depends on: groups, ownership and tiling (a different one cannot be loaded)."""
        return {"zero": self.zero, "tile_numel": self.tile_numel,
                "groups": [(g.axis, str(g.dtype), g.numel, g.size, g.rank) for g in self.flat_groups]}

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.layout_key(), "tiles": [t.optimizer.state_dict() for t in self.tiles],
                "masters": [m.flat for m in self.masters if m.flat is not None],
                "param_groups": [{k: v for k, v in self.param_groups[0].items() if k != "params"}],
                "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["layout"] != self.layout_key():
            raise ValueError(f"this optimizer state was saved with layout {state_dict['layout']}, but this optimizer "
                             f"has {self.layout_key()}: load it with the same ParallelConfig and tile_numel.")
        for tile, state in zip(self.tiles, state_dict["tiles"]):
            tile.optimizer.load_state_dict(state)
        for masters, saved in zip([m for m in self.masters if m.flat is not None], state_dict["masters"]):
            masters.flat.copy_(saved)
        self.param_groups[0].update(state_dict["param_groups"][0])
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(state_dict["loss_scaler"])

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds for training, by kind (no activations): what tedfx.explain predicts.

        weights: the model's parameters (with ZeRO, their padded flat buffers); grads: the gradient
        buckets (and gradients outside them); master: fp32 master weights kept apart from 16-bit
        weights; optimizer_states: the torch optimizer's state tensors. Storages are counted once.
        """
        params = [p for _, p in self._named]
        states = [v for t in self.tiles for s in t.optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor)]
        grads = [*self.pm.grad_buffers(), *(p.grad for p in params if p.grad is not None)]
        return {"weights": tensor_bytes(params), "grads": tensor_bytes(grads),
                "master": tensor_bytes([m.flat for m in self.masters if m.flat is not None]),
                "optimizer_states": tensor_bytes(states)}

    def state_bytes_by_group(self) -> dict[tuple[str, str], int]:
        """Bytes of per-entry optimizer state (tensors shaped like their piece) of each (axis, dtype) group."""
        out: dict[tuple[str, str], int] = {(g.axis, str(g.dtype)): 0 for g in self.flat_groups}
        for tile in self.tiles:
            for master, group in zip(tile.masters, tile.groups):
                for v in tile.optimizer.state.get(master, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == master.shape:
                        out[(group.axis, str(group.dtype))] += v.numel() * v.element_size()
        return out


def _step_tile(tile: _Tile, multiplier: float) -> None:
    """Upcast, unscale and clip (16-bit gradients; fp32 ones are scaled already), update, copy back, free: one tile."""
    with torch.no_grad():
        for piece, master in zip(tile.pieces, tile.masters):
            g = piece.grad()
            if g is None:
                continue  # as torch: a parameter without a gradient is not stepped
            if g.dtype != torch.float32:
                g = g.float()
                if multiplier != 1.0:
                    g.mul_(multiplier)
            master.grad = g
        tile.optimizer.step()
        for piece, master, separate in zip(tile.pieces, tile.masters, tile.separate):
            master.grad = None
            if separate:
                piece.values().copy_(master)


def _allocate_masters(group: FlatGroup) -> _Masters:
    if group.dtype == torch.float32:
        return _Masters(group, None)
    start, stop = group.owned
    masters = _Masters(group, torch.empty(stop - start, dtype=torch.float32, device=group.params[0].device),
                       {id(p): offset for p, offset in zip(group.params, group.offsets)})
    for piece in group.pieces():
        masters.view(piece).copy_(piece.values())
    return masters


def _make_contiguous(group: FlatGroup) -> None:
    """Pieces are slices of flattened parameters: a non-contiguous parameter gets contiguous storage."""
    for p in group.params:
        if not p.is_contiguous():
            p.data = p.detach().contiguous()


def _check_arguments(pm: Any, optimizer_cls: Any, tile_numel: int | None, max_norm: float | None,
                     loss_scale: LossScaleConfig | None) -> None:
    if not isinstance(pm, ParallelModule):
        raise TypeError(f"tedfx.optimizer expects the ParallelModule that tedfx.parallelize returned, got "
                        f"{type(pm).__name__}. For a tedfx.to_moe model use any torch optimizer directly.")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"tedfx.optimizer expects a torch.optim.Optimizer class such as torch.optim.AdamW, got "
                        f"{optimizer_cls!r}.")
    if tile_numel is not None and (not isinstance(tile_numel, int) or tile_numel < 1):
        raise ValueError(f"tile_numel={tile_numel!r} is invalid: expected None (untiled) or an int >= 1.")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} is invalid: expected None (no clipping) or a number > 0.")
    if loss_scale is not None and pm.parallel.precision != "fp16":
        raise ValueError(f"loss_scale is set, but ParallelConfig.precision={pm.parallel.precision!r}: loss scaling "
                         f"is for precision='fp16' only.")
    sliced = [what for what, on in (("tile_numel", tile_numel is not None), ("ParallelConfig.zero=1", pm.parallel.zero))
              if on]
    if sliced and not issubclass(optimizer_cls, ELEMENTWISE_OPTIMIZERS):
        raise ValueError(
            f"{optimizer_cls.__name__} cannot step slices of parameters ({' and '.join(sliced)} cut them), because "
            f"its update of an entry may depend on other entries of the same tensor. Use one of "
            f"{sorted(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)}, or tile_numel=None and zero=0.")


def optimizer(pm: ParallelModule, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, *,
              tile_numel: int | None = None, max_norm: float | None = None,
              loss_scale: LossScaleConfig | None = None, **kwargs: Any) -> TedOptimizer:
    """Wrap a torch optimizer class with what the ParallelModule's ParallelConfig asks for.

    - precision "bf16"/"fp16": fp32 master weights of the 16-bit weights; "fp16" also scales the
      loss dynamically (call `opt.scale_loss(loss).backward()`), skipping steps that overflow.
    - zero=1: master weights and optimizer states sharded over each parameter's data-parallel
      group, the updated weights all-gathered after the step.
    - tile_numel: step that many entries at a time (the step's transient memory is one tile).
    - max_norm: clip by the norm of the whole model's gradient, the same on every rank.

    Args:
        pm: the ParallelModule of `tedfx.parallelize`.
        optimizer_cls: a torch optimizer class; with tile_numel or zero=1 an elementwise one
            (ELEMENTWISE_OPTIMIZERS).
        tile_numel: entries per tile; None steps everything at once.
        max_norm: the largest global gradient norm; None does not clip.
        loss_scale: the fp16 loss scaling settings (default LossScaleConfig()).
        **kwargs: the optimizer's own arguments (lr, betas, weight_decay, foreach, ...).

    Returns:
        A TedOptimizer (a torch.optim.Optimizer).

    Example:
        >>> pm = tedfx.parallelize(model, (tokens,), moe=moe, parallel=tedfx.ParallelConfig(expert=2, precision="bf16",
        ...                                                                                  zero=1))
        >>> opt = tedfx.optimizer(pm, torch.optim.AdamW, lr=3e-4, tile_numel=2**20, max_norm=1.0)
        >>> opt.scale_loss(loss_fn(pm(x), y)).backward(); opt.step(); opt.zero_grad()
    """
    return TedOptimizer(pm, optimizer_cls, tile_numel=tile_numel, max_norm=max_norm, loss_scale=loss_scale, **kwargs)
