"""What a rank holds, as entries of a torch.distributed.checkpoint state dict (docs/checkpoints.md, "Format").

DCP plans reads and writes of chunks: boxes (offsets, sizes) of a tensor's full shape. A rank's
entries here are views of its own tensors, each described as boxes of the full tensor:

- a parameter's shard is one box per dim run (`Placement.runs`): one box, or one per chunk of a fused
  projection that tensor parallelism splits per chunk (each chunk's 1/T block sits elsewhere);
- a range of a shard's flattened entries (a ZeRO-1 slice of a flat group, an optimizer tile) is first
  cut into row-major boxes, each contiguous in memory (`row_major_boxes`), then placed like a shard.

`Boxes` hands them to DCP through its checkpointable protocol (the one DTensor implements), and
DCP's default planners, taught to look boxes up (tedfx._compat: BoxSavePlanner, BoxLoadPlanner), read and
write them. Replicas of a box carry the same (key, offsets), so DCP's save planner keeps one writer per box.

Optimizer state is keyed by parameter name (`optim.state.<param>.<name>`): elementwise state is split
like its parameter, whatever the optimizer's own slicing; scalars (AdamW's step) are replicated. The
parameter groups' hyperparameters are matched by the names of the groups' parameters too, not by position.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from ..sharding import ParamShard
from .executor import ParallelModule
from .optimizer import TedOptimizer

__all__ = ["Boxes", "CheckpointError", "Placement", "Runs", "match_param_groups", "model_entries",
           "optimizer_entries", "optimizer_placeholders", "place", "range_boxes", "row_major_boxes"]


Runs = list[list[tuple[int, int, int]]]
"""Per dim of a rank's shard: (local start, length, start in the full tensor) of each contiguous run."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here: incomplete, or saved for another model or configuration."""


# --- where this rank's entries sit in the full tensors ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
    """The ParamShards of a module and this rank's coordinates; a plain module holds every tensor whole."""

    shards: dict[str, ParamShard]
    coords: dict[str, int]
    sizes: dict[str, int]

    @classmethod
    def of(cls, module: nn.Module) -> "Placement":
        if isinstance(module, ParallelModule):
            layout = module.mesh.layout
            return cls(module.shards, module.mesh.coords,
                       {"tp": layout.tensor, "ep": layout.expert, "edp": layout.data})
        return cls({}, {}, {})

    def spec(self, key: str, local: torch.Tensor) -> ParamShard:
        return self.shards.get(key) or ParamShard(key, (), None, tuple(local.shape))

    def runs(self, spec: ParamShard) -> Runs:
        """Per dim: (local start, length, full start) of each contiguous run of this rank's shard."""
        axis_of_dim: dict[int, str] = {}
        for axis, dim in spec.splits:
            if dim in axis_of_dim:
                raise ValueError(f"{spec.name} is split twice along dim {dim} ({spec.splits}): a checkpoint "
                                 f"describes at most one split per dim.")
            axis_of_dim[dim] = axis
        runs = []
        for dim, full in enumerate(spec.full_shape):
            axis = axis_of_dim.get(dim)
            if axis is None:
                runs.append([(0, full, 0)])
                continue
            n, i = self.sizes[axis], self.coords[axis]
            chunks = spec.chunks if axis == "tp" and spec.chunks else (full,)
            dim_runs, local, start = [], 0, 0
            for chunk in chunks:  # each chunk of a fused projection holds its own 1/n block
                if chunk % n:
                    raise ValueError(f"{spec.name}: {chunk} entries along dim {dim} do not split into {n} blocks.")
                dim_runs.append((local, chunk // n, start + i * (chunk // n)))
                local, start = local + chunk // n, start + chunk
            runs.append(dim_runs)
        return runs


def place(box: torch.Tensor, offsets: tuple[int, ...], runs: Runs) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """A box of the local shard (a view starting at `offsets`) as boxes of the full tensor: (offsets, view)."""
    placed: list[tuple[tuple[int, ...], torch.Tensor]] = [((), box)]
    for dim, (lo, dim_runs) in enumerate(zip(offsets, runs)):
        hi = lo + box.shape[dim]
        cut = []
        for full_offsets, view in placed:
            for local, length, start in dim_runs:
                a, b = max(lo, local), min(hi, local + length)
                if a < b:
                    cut.append(((*full_offsets, start + a - local), view.narrow(dim, a - lo, b - a)))
        placed = cut
    return placed


def row_major_boxes(start: int, stop: int, shape: tuple[int, ...]
                    ) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Entries [start, stop) of a row-major tensor of `shape` as boxes contiguous in memory: (first, offsets, sizes).

    A partial first row, a block of whole rows, a partial last row; partial rows recursively.
    """
    if start >= stop:
        return []
    if not shape:
        return [(start, (), ())]
    inner = math.prod(shape[1:])
    first, head = divmod(start, inner)
    last, tail = divmod(stop, inner)

    def row(i: int, a: int, b: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
        return [(i * inner + s, (i, *o), (1, *z)) for s, o, z in row_major_boxes(a, b, shape[1:])]

    if first == last:
        return row(first, head, tail)
    boxes = []
    if head:
        boxes += row(first, head, inner)
        first += 1
    if last > first:
        boxes.append((first * inner, (first, *[0] * (len(shape) - 1)), (last - first, *shape[1:])))
    if tail:
        boxes += row(last, 0, tail)
    return boxes


def range_boxes(values: torch.Tensor, start: int, stop: int, local_shape: tuple[int, ...],
                 runs: Runs) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Boxes of the full tensor for `values`, the entries [start, stop) of this rank's flattened shard."""
    flat = values.view(-1)
    boxes = []
    for first, offsets, sizes in row_major_boxes(start, stop, local_shape):
        view = flat[first - start:first - start + math.prod(sizes)].view(sizes)
        boxes += place(view, offsets, runs)
    return boxes


class Boxes:
    """One checkpoint tensor as DCP sees it: its full shape and the boxes of it this rank holds (views).

    Implements DCP's checkpointable protocol (__create_write_items__, __create_chunk_list__,
    __get_tensor_shard__), through which DCP plans writes and reads of DTensor shards.
    """

    def __init__(self, full_shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], torch.Tensor]]) -> None:
        self.full_shape = torch.Size(full_shape)
        self.boxes = {tuple(offsets): view for offsets, view in boxes}

    def size(self) -> torch.Size:
        return self.full_shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(offsets, view),
                                                      properties=TensorProperties.create_from_tensor(view),
                                                      size=self.full_shape))
                for offsets, view in self.boxes.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk(offsets, view) for offsets, view in self.boxes.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.boxes[tuple(index.offset)]

    @staticmethod
    def _chunk(offsets: tuple[int, ...], view: torch.Tensor) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=view.shape)


def model_entries(module: nn.Module, placement: Placement) -> dict[str, Any]:
    """`model.<key>` for every tensor of the module's state dict: Boxes when split, the tensor when replicated.

    Views of the module's own tensors: a save writes them, a load reads into them in place.
    """
    entries: dict[str, Any] = {}
    for key, local in module.state_dict().items():
        spec = placement.spec(key, local)
        entries[f"model.{key}"] = Boxes(spec.full_shape, place(local, (0,) * local.dim(), placement.runs(spec))) \
            if spec.splits else local
    return entries


# --- optimizer state by parameter name --------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    """One parameter's state in one torch optimizer: entries [start, stop) of this rank's shard of it."""

    name: str
    param: nn.Parameter
    start: int
    stop: int
    optimizer: torch.optim.Optimizer
    key: torch.Tensor
    """What the torch optimizer keys the state by: the parameter, or a tile's master entries."""
    flat: bool
    """The state tensors are 1-D over the range (tedfx.optimizer's pieces), not shaped like the parameter."""
    master: torch.Tensor | None = None
    """fp32 master entries kept apart from the 16-bit weight (tedfx.optimizer in bf16 and fp16)."""


def _slots(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[_Slot]:
    """Every (parameter, range) the optimizer steps on this rank, in the optimizer's order."""
    if isinstance(optimizer, TedOptimizer):
        return [_Slot(names[id(piece.param)], piece.param, piece.start, piece.stop, tile.optimizer, master, True,
                      master.detach() if separate else None)
                for tile in optimizer.tiles
                for piece, master, separate in zip(tile.pieces, tile.masters, tile.separate)]
    slots = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(f"the optimizer steps a parameter of shape {tuple(p.shape)} that is not in the "
                                 f"module: build it on the module's parameters (pm.parameters()).")
            slots.append(_Slot(names[id(p)], p, 0, p.numel(), optimizer, p, False))
    return slots


def _slot_boxes(slot: _Slot, values: torch.Tensor, runs: Runs
                ) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Boxes of the parameter's full tensor for elementwise state `values` of the slot."""
    if slot.flat:
        return range_boxes(values, slot.start, slot.stop, tuple(slot.param.shape), runs)
    return place(values, (0,) * values.dim(), runs)


def optimizer_entries(optimizer: torch.optim.Optimizer, module: nn.Module, placement: Placement
                       ) -> dict[str, Any]:
    names = {id(p): n for n, p in module.named_parameters()}
    entries: dict[str, Any] = {}
    boxes: dict[str, tuple[tuple[int, ...], list]] = {}
    for slot in _slots(optimizer, names):
        spec = placement.spec(slot.name, slot.param)
        state = dict(slot.optimizer.state.get(slot.key, {}))
        if slot.master is not None:
            state["master"] = slot.master
        for state_name, value in state.items():
            key = f"optim.state.{slot.name}.{state_name}"
            elementwise = isinstance(value, torch.Tensor) and value.dim() > 0 and slot.param.dim() > 0 and \
                value.numel() == slot.stop - slot.start and (value.dim() == 1 if slot.flat else
                                                             value.shape == slot.param.shape)
            if elementwise:
                boxes.setdefault(key, (spec.full_shape, []))[1].extend(
                    _slot_boxes(slot, value.detach(), placement.runs(spec)))
            elif not isinstance(value, torch.Tensor) or value.dim() == 0 or not spec.splits and not slot.flat:
                entries.setdefault(key, value.detach() if isinstance(value, torch.Tensor) else value)  # replicated
            else:
                raise ValueError(f"{type(slot.optimizer).__name__} keeps state {state_name!r} of {slot.name} with "
                                 f"shape {tuple(value.shape)}, neither a scalar nor the parameter's shard shape "
                                 f"{tuple(slot.param.shape)}: a checkpoint cannot say how it is split over the ranks.")
    for key, (full_shape, key_boxes) in boxes.items():
        entries[key] = Boxes(full_shape, key_boxes)
    entries["optim.param_groups"] = [{**{k: v for k, v in g.items() if k != "params"},
                                      "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    if isinstance(optimizer, TedOptimizer) and optimizer.loss_scaler is not None:
        entries["optim.loss_scaler"] = optimizer.loss_scaler.state_dict()
    return entries


def optimizer_placeholders(optimizer: torch.optim.Optimizer, module: nn.Module, placement: Placement,
                           metadata: Metadata, entries: dict[str, Any], saved_groups: list[dict[str, Any]]
                           ) -> Callable[[dict[str, Any]], None]:
    """Add to `entries` what the optimizer's saved state loads into; returns what installs it once DCP has read it.

    Per slot (a whole parameter, or a ZeRO-1 slice or tile of one): fresh tensors for its elementwise state,
    described as the boxes it covers; the fp32 masters are read in place; scalars (step) are shared entries.
    `saved_groups` is the checkpoint's `optim.param_groups` (read before any tensor): each of the optimizer's
    groups takes the hyperparameters of the saved group that holds its parameters (`match_param_groups`).
    """
    names = {id(p): n for n, p in module.named_parameters()}
    md = metadata.state_dict_metadata
    saved_names: dict[str, list[str]] = {}
    for key in md:
        if key.startswith("optim.state."):
            param, _, state_name = key.removeprefix("optim.state.").rpartition(".")
            saved_names.setdefault(param, []).append(state_name)
    boxes: dict[str, tuple[tuple[int, ...], list]] = {}
    wanted = [_Wanted(slot, _slot_placeholders(slot, placement, md, saved_names.get(slot.name, []), entries, boxes),
                      slot.master is not None and "master" not in saved_names.get(slot.name, []))
              for slot in _slots(optimizer, names)]
    for key, (full_shape, key_boxes) in boxes.items():
        entries[key] = Boxes(full_shape, key_boxes)
    order = match_param_groups(optimizer, names, saved_groups)
    hyper = [{k: v for k, v in saved_groups[i].items() if k != "params"} for i in order]
    if "optim.loss_scaler" in md:
        entries["optim.loss_scaler"] = None
    return functools.partial(_install, optimizer, wanted, hyper)


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def match_param_groups(optimizer: torch.optim.Optimizer, names: dict[int, str],
                       saved_groups: list[dict[str, Any]]) -> list[int]:
    """For each of the optimizer's parameter groups, the index of the saved group that holds its parameters.

    Groups are matched by the names of their parameters, never by position: a group built in another order
    still takes its own hyperparameters. Parameters that only one side holds (e.g. frozen ones) are not
    compared; a group holding parameters of several saved groups, two groups holding parameters of the
    same saved group, or a group holding none of the saved ones is a CheckpointError naming them.
    """
    saved_group_of = {name: j for j, g in enumerate(saved_groups) for name in g["params"]}
    order: list[int] = []
    taken: dict[int, int] = {}
    for i, group in enumerate(optimizer.param_groups):
        group_names = [names[id(p)] for p in group["params"] if id(p) in names]
        by_saved: dict[int, list[str]] = {}
        for name in group_names:
            if name in saved_group_of:
                by_saved.setdefault(saved_group_of[name], []).append(name)
        if len(by_saved) > 1:
            held = "; ".join(f"{_listed(ns)} of its group {j}" for j, ns in sorted(by_saved.items()))
            raise CheckpointError(
                f"parameter group {i} of this optimizer holds parameters of several of the checkpoint's groups: "
                f"{held}. Build the optimizer with the same groups (each holding the parameters it held when "
                f"saved, in any order).")
        if not by_saved:
            raise CheckpointError(
                f"parameter group {i} of this optimizer holds none of the parameters of the checkpoint's groups "
                f"(it holds {_listed(group_names)}): build the optimizer with the same groups.")
        (j, ns), = by_saved.items()
        if j in taken:
            first = [n for n in (names[id(p)] for p in optimizer.param_groups[taken[j]]["params"] if id(p) in names)
                     if saved_group_of.get(n) == j]
            raise CheckpointError(
                f"parameter groups {taken[j]} and {i} of this optimizer both hold parameters of the checkpoint's "
                f"group {j}: {_listed(first)} and {_listed(ns)}. Build the optimizer with the same groups (each "
                f"holding the parameters it held when saved, in any order).")
        taken[j] = i
        order.append(j)
    return order


@dataclasses.dataclass
class _Wanted:
    slot: _Slot
    state: dict[str, Any]
    """{state name: its tensor, or the key of an entry shared by the parameter's slots (scalars, pickled state)}."""
    masters_from_weights: bool
    """The checkpoint has no fp32 masters for this slot (saved in fp32 or from a plain module)."""


def _slot_placeholders(slot: _Slot, placement: Placement, md: dict[str, Any], state_names: list[str],
                       entries: dict[str, Any], boxes: dict[str, tuple[tuple[int, ...], list]]) -> dict[str, Any]:
    spec = placement.spec(slot.name, slot.param)
    state: dict[str, Any] = {}
    for state_name in state_names:
        key = f"optim.state.{slot.name}.{state_name}"
        saved = md[key]
        if state_name == "master":
            if slot.master is not None:  # read straight into the fp32 master entries
                boxes.setdefault(key, (spec.full_shape, []))[1].extend(
                    _slot_boxes(slot, slot.master, placement.runs(spec)))
        elif isinstance(saved, BytesStorageMetadata) or len(saved.size) == 0:
            entries.setdefault(key, None if isinstance(saved, BytesStorageMetadata) else
                               torch.empty((), dtype=saved.properties.dtype))
            state[state_name] = key
        elif tuple(saved.size) == spec.full_shape and slot.param.dim() > 0:
            values = torch.empty(slot.stop - slot.start if slot.flat else slot.param.shape,
                                 dtype=saved.properties.dtype, device=slot.param.device)
            boxes.setdefault(key, (spec.full_shape, []))[1].extend(_slot_boxes(slot, values, placement.runs(spec)))
            state[state_name] = values
        elif not spec.splits and not slot.flat:
            entries[key] = torch.empty(saved.size, dtype=saved.properties.dtype, device=slot.param.device)
            state[state_name] = key
        else:
            raise CheckpointError(f"optimizer state {key} has shape {tuple(saved.size)}, neither a scalar nor "
                                  f"the shape {spec.full_shape} of {slot.name}.")
    return state


def _install(optimizer: torch.optim.Optimizer, wanted: list[_Wanted], hyper: list[dict[str, Any]],
             loaded: dict[str, Any]) -> None:
    """Give the loaded state to each torch optimizer (tedfx.optimizer's tiles, or the optimizer): load_state_dict.

    `hyper`: the saved hyperparameters of each of the optimizer's groups, matched by parameter name; the state
    of each parameter is its own name's (`by_key` holds it by the parameter, whatever its place).
    """
    by_key: dict[int, dict[str, Any]] = {}
    for w in wanted:
        if w.masters_from_weights:
            w.slot.master.copy_(w.slot.param.detach().reshape(-1)[w.slot.start:w.slot.stop])
        # Shared entries are copied: torch steps each state's own tensor (e.g. step) in place.
        values = {n: (loaded[v].clone() if isinstance(loaded[v], torch.Tensor) else loaded[v]) if isinstance(v, str)
                  else v for n, v in w.state.items()}
        if values:
            by_key[id(w.slot.key)] = values
    torch_optimizers = [t.optimizer for t in optimizer.tiles] if isinstance(optimizer, TedOptimizer) else [optimizer]
    for torch_opt in torch_optimizers:
        current = torch_opt.state_dict()
        params = [p for g in torch_opt.param_groups for p in g["params"]]
        current["state"] = {i: by_key[id(p)] for i, p in enumerate(params) if id(p) in by_key}
        # A tile's torch optimizer has one group, with the hyperparameters of tedfx.optimizer's only group.
        group_hyper = hyper if torch_opt is optimizer else [hyper[0]] * len(current["param_groups"])
        for group, saved in zip(current["param_groups"], group_hyper):
            group.update(saved)
        torch_opt.load_state_dict(current)
    if isinstance(optimizer, TedOptimizer):
        optimizer.param_groups[0].update(hyper[0])
        if optimizer.loss_scaler is not None and loaded.get("optim.loss_scaler") is not None:
            optimizer.loss_scaler.load_state_dict(loaded["optim.loss_scaler"])
