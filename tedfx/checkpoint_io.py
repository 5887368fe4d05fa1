"""Checkpoints that reshard across layouts: `tedfx.save` and `tedfx.load` (docs/checkpoints.md).

A checkpoint is a torch.distributed.checkpoint (DCP) directory. Each rank describes what it holds
as boxes of the full tensors, under layout-free keys, and DCP's own planner does the rest: it writes
each box once (replicas are deduplicated) and, on load, reads into each rank the parts of the saved
boxes that overlap the boxes the rank holds in its layout. No rank ever holds a full tensor.

    model.<key>                     every tensor of the state dict, with the keys of tedfx.to_moe's
    optim.state.<param>.<name>      optimizer state (exp_avg, exp_avg_sq, master, ...): elementwise
                                    state is split like its parameter; scalars (step) are replicated
    optim.param_groups              hyperparameters, parameters by name (pickled)
    optim.loss_scaler               the fp16 loss scale (pickled)
    rng.cpu.rank<r>                 each rank's CPU generator state (rng.cuda.rank<r> on GPUs)
    extra.<name>                    tedfx.save's keyword arguments

Beside DCP's files: `tedfx.json` (layout, ParallelConfig, MoEConfig, versions) and `COMPLETE`.

A save, in order:
1. Every rank describes its tensors (views, no copies): a parameter's shard is one box, or one per
   chunk of a fused projection split per chunk; a ZeRO-1 slice or an optimizer tile covers a range of
   the shard's flattened entries, which is cut into row-major boxes first.
2. DCP writes the boxes into a staging directory `<dir>.tmp-<token>`.
3. Rank 0 writes tedfx.json and the COMPLETE marker, renames the staging directory to
   `<dir>.data-<token>` and atomically points the symbolic link `<dir>` at it; then it removes the
   previous data directory. A save killed before that leaves `<dir>` on the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .config import MoEConfig
from .moe.routing import Router
from .runtime.executor import ParallelModule
from .runtime.optimizer import TedOptimizer
from .sharding import ParamShard

__all__ = ["CheckpointError", "load", "save"]

FORMAT_VERSION = 1
INFO_FILE = "tedfx.json"
COMPLETE_FILE = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here: incomplete, or saved for another model or configuration."""


# --- where this rank's entries sit in the full tensors ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Placement:
    """The ParamShards of a module and this rank's coordinates; a plain module holds every tensor whole."""

    shards: dict[str, ParamShard]
    coords: dict[str, int]
    sizes: dict[str, int]

    @classmethod
    def of(cls, module: nn.Module) -> "_Placement":
        if isinstance(module, ParallelModule):
            layout = module.mesh.layout
            return cls(module.shards, module.mesh.coords,
                       {"tp": layout.tensor, "ep": layout.expert, "edp": layout.data})
        return cls({}, {}, {})

    def spec(self, key: str, local: torch.Tensor) -> ParamShard:
        return self.shards.get(key) or ParamShard(key, (), None, tuple(local.shape))

    def runs(self, spec: ParamShard) -> list[list[tuple[int, int, int]]]:
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


def _place(box: torch.Tensor, offsets: tuple[int, ...], runs: list[list[tuple[int, int, int]]]
           ) -> list[tuple[tuple[int, ...], torch.Tensor]]:
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


def _row_major_boxes(start: int, stop: int, shape: tuple[int, ...]
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
        return [(i * inner + s, (i, *o), (1, *z)) for s, o, z in _row_major_boxes(a, b, shape[1:])]

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


def _range_boxes(values: torch.Tensor, start: int, stop: int, local_shape: tuple[int, ...],
                 runs: list[list[tuple[int, int, int]]]) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Boxes of the full tensor for `values`, the entries [start, stop) of this rank's flattened shard."""
    flat = values.view(-1)
    boxes = []
    for first, offsets, sizes in _row_major_boxes(start, stop, local_shape):
        view = flat[first - start:first - start + math.prod(sizes)].view(sizes)
        boxes += _place(view, offsets, runs)
    return boxes


class _Boxes:
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


class _SavePlanner(DefaultSavePlanner):
    """DCP's default save planner on a flat state dict (a list or dict value is one pickled entry); a _Boxes
    entry hands over the box a write item names."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        entry = self.state_dict[index.fqn]
        return entry.__get_tensor_shard__(index) if isinstance(entry, _Boxes) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner on a flat state dict, reading straight into the boxes' views."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        # The default first materialises meta tensors, which replaces objects it does not know with None.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        entry = self.state_dict[index.fqn]
        return entry.__get_tensor_shard__(index) if isinstance(entry, _Boxes) else super().lookup_tensor(index)


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


def _slot_boxes(slot: _Slot, values: torch.Tensor, runs: list[list[tuple[int, int, int]]]
                ) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Boxes of the parameter's full tensor for elementwise state `values` of the slot."""
    if slot.flat:
        return _range_boxes(values, slot.start, slot.stop, tuple(slot.param.shape), runs)
    return _place(values, (0,) * values.dim(), runs)


def _optimizer_entries(optimizer: torch.optim.Optimizer, module: nn.Module, placement: _Placement
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
        entries[key] = _Boxes(full_shape, key_boxes)
    entries["optim.param_groups"] = [{**{k: v for k, v in g.items() if k != "params"},
                                      "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    if isinstance(optimizer, TedOptimizer) and optimizer.loss_scaler is not None:
        entries["optim.loss_scaler"] = optimizer.loss_scaler.state_dict()
    return entries


def _optimizer_placeholders(optimizer: torch.optim.Optimizer, module: nn.Module, placement: _Placement,
                            metadata: Metadata, entries: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Entries to load the optimizer's state into; returns what installs them once DCP has read them."""
    names = {id(p): n for n, p in module.named_parameters()}
    md = metadata.state_dict_metadata
    saved_names: dict[str, list[str]] = {}
    for key in md:
        if key.startswith("optim.state."):
            param, _, state_name = key.removeprefix("optim.state.").rpartition(".")
            saved_names.setdefault(param, []).append(state_name)
    boxes: dict[str, tuple[tuple[int, ...], list]] = {}
    wanted: list[tuple[_Slot, dict[str, Any]]] = []  # per slot: {state name: tensor, or the key of a shared one}
    for slot in _slots(optimizer, names):
        spec = placement.spec(slot.name, slot.param)
        state: dict[str, Any] = {}
        for state_name in saved_names.get(slot.name, []):
            key = f"optim.state.{slot.name}.{state_name}"
            saved = md[key]
            if state_name == "master":
                if slot.master is not None:  # read straight into the fp32 master entries
                    boxes.setdefault(key, (spec.full_shape, []))[1].extend(
                        _slot_boxes(slot, slot.master, placement.runs(spec)))
                continue
            if isinstance(saved, BytesStorageMetadata) or len(saved.size) == 0:
                entries.setdefault(key, None if isinstance(saved, BytesStorageMetadata) else
                                   torch.empty((), dtype=saved.properties.dtype))
                state[state_name] = key
            elif tuple(saved.size) == spec.full_shape and slot.param.dim() > 0:
                values = torch.empty(slot.stop - slot.start if slot.flat else slot.param.shape,
                                     dtype=saved.properties.dtype, device=slot.param.device)
                boxes.setdefault(key, (spec.full_shape, []))[1].extend(
                    _slot_boxes(slot, values, placement.runs(spec)))
                state[state_name] = values
            elif not spec.splits and not slot.flat:
                entries[key] = torch.empty(saved.size, dtype=saved.properties.dtype, device=slot.param.device)
                state[state_name] = key
            else:
                raise CheckpointError(f"optimizer state {key} has shape {tuple(saved.size)}, neither a scalar nor "
                                      f"the shape {spec.full_shape} of {slot.name}.")
        wanted.append((slot, state))
    for key, (full_shape, key_boxes) in boxes.items():
        entries[key] = _Boxes(full_shape, key_boxes)
    entries["optim.param_groups"] = None
    if "optim.loss_scaler" in md:
        entries["optim.loss_scaler"] = None

    def install(loaded: dict[str, Any]) -> None:
        groups = loaded["optim.param_groups"]
        if len(groups) != len(optimizer.param_groups):
            raise CheckpointError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this one "
                                  f"{len(optimizer.param_groups)}.")
        by_optimizer: dict[int, tuple[torch.optim.Optimizer, dict[int, dict[str, Any]]]] = {}
        for slot, state in wanted:
            # Shared entries (scalars such as step) are copied: torch steps each state's own tensor in place.
            values = {n: (loaded[v].clone() if isinstance(loaded[v], torch.Tensor) else loaded[v])
                      if isinstance(v, str) else v for n, v in state.items()}
            if values:
                by_optimizer.setdefault(id(slot.optimizer), (slot.optimizer, {}))[1][id(slot.key)] = values
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        targets = {id(t.optimizer): t.optimizer for t in optimizer.tiles} if isinstance(optimizer, TedOptimizer) \
            else {id(optimizer): optimizer}
        for torch_opt in targets.values():
            state = by_optimizer.get(id(torch_opt), (None, {}))[1]
            current = torch_opt.state_dict()
            params = [p for g in torch_opt.param_groups for p in g["params"]]
            current["state"] = {i: state[id(p)] for i, p in enumerate(params) if id(p) in state}
            # A tile's torch optimizer has one group, with the hyperparameters of tedfx.optimizer's only group.
            tile_hyper = hyper if torch_opt is optimizer else [hyper[0]] * len(current["param_groups"])
            for g, saved in zip(current["param_groups"], tile_hyper):
                g.update(saved)
            torch_opt.load_state_dict(current)
        if isinstance(optimizer, TedOptimizer):
            optimizer.param_groups[0].update(hyper[0])
            if optimizer.loss_scaler is not None and loaded.get("optim.loss_scaler") is not None:
                optimizer.loss_scaler.load_state_dict(loaded["optim.loss_scaler"])

    return install


# --- what the checkpoint was saved for ----------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return "<callable>" if callable(value) else repr(value)


def _moe_config(module: nn.Module) -> MoEConfig | None:
    return next((m.moe for m in module.modules() if isinstance(m, Router)), None)


def _config_json(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _info(target: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from . import __version__

    parallel = target.parallel if isinstance(target, ParallelModule) else None
    layout = target.mesh.layout if isinstance(target, ParallelModule) else None
    return {"format": FORMAT_VERSION, "tedfx": __version__, "torch": torch.__version__,
            "world_size": dist.get_world_size() if _distributed() else 1,
            "layout": {"data": layout.data, "expert": layout.expert, "tensor": layout.tensor} if layout else None,
            "parallel": _config_json(parallel), "moe": _config_json(_moe_config(module)),
            "optimizer": type(optimizer).__name__ if optimizer is not None else None}


def _check_compatible(info: dict[str, Any], metadata: Metadata, target: nn.Module, module: nn.Module,
                      placement: _Placement, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Everything but the layout must match; every rank checks the same files and raises alike."""
    if info.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {info.get('format')}, this tedfx reads {FORMAT_VERSION}.")
    saved, here = info["moe"] or {}, _config_json(_moe_config(module)) or {}
    if saved.get("num_experts") != here.get("num_experts"):
        raise CheckpointError(
            f"the checkpoint {path} holds MoE blocks of {saved.get('num_experts')} experts, this model's MoE blocks "
            f"have {here.get('num_experts')} (MoEConfig.num_experts). Build the model with "
            f"MoEConfig(num_experts={saved.get('num_experts')}) to load it.")
    diff = [f"{name}: checkpoint {saved.get(name)!r}, this model {here.get(name)!r}" for name in sorted({*saved, *here})
            if saved.get(name) != here.get(name) and "<callable>" not in (saved.get(name), here.get(name))]
    if diff:
        raise CheckpointError(f"the checkpoint {path} was saved with another MoEConfig ({'; '.join(diff)}). Only the "
                              f"layout may change between save and load.")
    if isinstance(target, ParallelModule) and info["parallel"] is not None:
        was, now = info["parallel"]["precision"], target.parallel.precision
        if was != now:
            raise CheckpointError(f"the checkpoint {path} was saved with ParallelConfig.precision={was!r}, this "
                                  f"module has precision={now!r}. Only the layout may change between save and load.")
    md = metadata.state_dict_metadata
    saved_shapes = {k.removeprefix("model."): tuple(m.size) for k, m in md.items()
                    if k.startswith("model.") and not isinstance(m, BytesStorageMetadata)}
    shapes = {key: placement.spec(key, t).full_shape for key, t in module.state_dict().items()}
    missing, unexpected = sorted(shapes.keys() - saved_shapes.keys()), sorted(saved_shapes.keys() - shapes.keys())
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint {path} holds other tensors than this model: missing "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}.")
    wrong = [f"{k}: checkpoint {saved_shapes[k]}, this model {s}" for k, s in shapes.items() if saved_shapes[k] != s]
    if wrong:
        raise CheckpointError(f"the checkpoint {path} holds tensors of other shapes: {'; '.join(wrong[:5])}.")
    if optimizer is not None and "optim.param_groups" not in md:
        raise CheckpointError(f"the checkpoint {path} was saved without an optimizer: call tedfx.load without one.")


# --- RNG states --------------------------------------------------------------------------------------


def _rng_entries(rank: int, on_cuda: bool) -> dict[str, torch.Tensor]:
    entries = {f"rng.cpu.rank{rank}": torch.get_rng_state()}
    if on_cuda:
        entries[f"rng.cuda.rank{rank}"] = torch.cuda.get_rng_state()
    return entries


def _rng_source(info: dict[str, Any], target: nn.Module, rank: int) -> int:
    """Whose saved states this rank takes: its own in the same layout, else rank 0's (the same on every rank)."""
    layout = target.mesh.layout if isinstance(target, ParallelModule) else None
    here = {"data": layout.data, "expert": layout.expert, "tensor": layout.tensor} if layout else None
    return rank if here == info["layout"] and rank < info["world_size"] else 0


# --- the atomic commit ---------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_destination(path: Path) -> None:
    """`path` is a checkpoint link made by tedfx.save, an empty directory or nothing (checked on every rank)."""
    if path.is_symlink() or not path.exists():
        return
    if not path.is_dir() or any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a checkpoint written by tedfx.save (a link to its data "
                              f"directory): save to another path, or remove it first.")


def _staging_dir(path: Path) -> Path:
    """A fresh `<dir>.tmp-<token>`, the same on every rank."""
    token = [uuid.uuid4().hex[:12]]
    if _distributed():
        dist.broadcast_object_list(token, src=0)
    return path.with_name(f"{path.name}.tmp-{token[0]}")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(path: Path, staging: Path, info: dict[str, Any]) -> None:
    """Step 3, on rank 0 once every rank has written: marker last, then one atomic rename of a link."""
    _write_synced(staging / INFO_FILE, json.dumps(info, indent=1))
    _write_synced(staging / COMPLETE_FILE, "every rank finished writing this checkpoint\n")
    token = staging.name.rpartition(".tmp-")[2]
    data = path.with_name(f"{path.name}.data-{token}")
    os.replace(staging, data)
    link = path.with_name(f"{path.name}.link-{token}")
    os.symlink(data.name, link)
    if path.is_dir() and not path.is_symlink():
        path.rmdir()  # empty (checked before the save)
    os.replace(link, path)  # readers see the previous checkpoint or this one, never neither
    _fsync_dir(path.parent)
    # What a killed save left behind (recognisably incomplete: no COMPLETE marker) and the previous data.
    for stale in path.parent.glob(f"{path.name}.*-*"):
        kind = stale.name.removeprefix(f"{path.name}.").partition("-")[0]
        if stale != data and kind in ("tmp", "data", "link"):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()


def _complete_checkpoint(dir: str | os.PathLike) -> Path:
    path = Path(dir)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}.")
    real = path.resolve()
    if not (real / COMPLETE_FILE).exists():
        raise CheckpointError(
            f"{path} is an incomplete checkpoint: it has no {COMPLETE_FILE} marker, so the save that wrote it "
            f"stopped before every rank had finished. Load the checkpoint it was to replace (the same path "
            f"without the '.tmp-...' suffix) instead.")
    return real


# --- the doors -------------------------------------------------------------------------------------------


def _module_and_placement(pm: nn.Module, door: str) -> tuple[nn.Module, _Placement]:
    if isinstance(pm, ParallelModule):
        if not _distributed():
            raise RuntimeError(f"{door} of a ParallelModule is a collective: call it on every rank, inside the "
                               f"process group the module was built in.")
        return pm.module, _Placement.of(pm)
    if not isinstance(pm, nn.Module):
        raise TypeError(f"{door} expects the ParallelModule of tedfx.parallelize or an nn.Module (e.g. the model of "
                        f"tedfx.to_moe), got {type(pm).__name__}.")
    return pm, _Placement.of(pm)


def _quiet_dcp(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """DCP warns that it assumes one process whenever it runs without a process group, which is what we ask."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return call(*args, no_dist=not _distributed(), **kwargs)


def save(dir: str | os.PathLike, pm: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         **extra: Any) -> Path:
    """Save a checkpoint that loads into any layout; a collective: call it on every rank.

    Args:
        dir: the checkpoint's path. It becomes a link to the data directory `<dir>.data-<token>` once every
            rank has written (the previous checkpoint at `dir` stays loadable until then).
        pm: the ParallelModule of tedfx.parallelize, or a plain module (e.g. tedfx.to_moe's; without a process
            group, one process saves it whole).
        optimizer: tedfx.optimizer(pm, ...) (any precision, ZeRO-1, tiled), or a torch optimizer on
            pm.parameters(); its state is saved by parameter name, split like the parameters.
        **extra: anything else to keep (step counters, scheduler and data-loader states): tensors or
            picklable objects, the same on every rank (one copy is kept); `tedfx.load` returns them.

    Returns:
        The checkpoint's path.

    Example:
        >>> tedfx.save("ckpt/latest", pm, opt, step=step, scheduler=sched.state_dict())
    """
    path = Path(dir)
    module, placement = _module_and_placement(pm, "tedfx.save")
    _check_destination(path)
    # 1. Describe what this rank holds, as views of its tensors.
    state: dict[str, Any] = {}
    for key, local in module.state_dict().items():
        spec = placement.spec(key, local)
        state[f"model.{key}"] = _Boxes(spec.full_shape, _place(local, (0,) * local.dim(), placement.runs(spec))) \
            if spec.splits else local
    if optimizer is not None:
        state.update(_optimizer_entries(optimizer, module, placement))
    rank = dist.get_rank() if _distributed() else 0
    state.update(_rng_entries(rank, any(p.is_cuda for p in module.parameters())))
    state.update({f"extra.{name}": value for name, value in extra.items()})
    # 2. DCP writes every box once, into the staging directory.
    staging = _staging_dir(path)
    _quiet_dcp(dcp.save, state, checkpoint_id=staging, planner=_SavePlanner())
    # 3. Commit on rank 0 after every rank has written (DCP's save ends with rank 0 writing its metadata).
    if rank == 0:
        _commit(path, staging, _info(pm, module, optimizer))
    if _distributed():
        dist.barrier()
    return path


def load(dir: str | os.PathLike, pm: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint of `tedfx.save` into this layout, whatever layout saved it; a collective with a process group.

    The weights load in place, each rank reading only the parts of the saved boxes it holds; the
    optimizer's state is rebuilt for this rank's parameters, ZeRO-1 slices and tiles; each rank's CPU
    (and CUDA) generator takes its own saved state in the same layout, rank 0's in another.

    Args:
        dir: a checkpoint path given to tedfx.save.
        pm: the ParallelModule to load into, built with the same model and MoEConfig (any T, X, D and ZeRO;
            the same precision); or a plain module such as tedfx.to_moe's (no process group needed).
        optimizer: the optimizer to restore (built on `pm` as for tedfx.save, not necessarily of the same kind).

    Returns:
        The `**extra` given to tedfx.save.

    Raises:
        CheckpointError: the checkpoint is incomplete (its save was interrupted), or was saved for another
            model, MoEConfig (naming the differences, e.g. both expert counts) or precision.

    Example:
        >>> extra = tedfx.load("ckpt/latest", pm, opt)
        >>> step = extra["step"]
    """
    module, placement = _module_and_placement(pm, "tedfx.load")
    path = _complete_checkpoint(dir)
    info = json.loads((path / INFO_FILE).read_text())
    metadata = dcp.FileSystemReader(path).read_metadata()
    _check_compatible(info, metadata, pm, module, placement, optimizer, Path(dir))
    md = metadata.state_dict_metadata
    # Placeholders: the module's own tensors (read in place), fresh tensors for the optimizer's state.
    state: dict[str, Any] = {}
    for key, local in module.state_dict().items():
        spec = placement.spec(key, local)
        state[f"model.{key}"] = _Boxes(spec.full_shape, _place(local, (0,) * local.dim(), placement.runs(spec))) \
            if spec.splits else local
    install = _optimizer_placeholders(optimizer, module, placement, metadata, state) if optimizer is not None else None
    rank = dist.get_rank() if _distributed() else 0
    source = _rng_source(info, pm, rank)
    rng = [key for key in md if key.startswith("rng.") and key.endswith(f".rank{source}")]
    for key in rng:
        state[key] = torch.empty(md[key].size, dtype=md[key].properties.dtype)
    for key, saved in md.items():
        if key.startswith("extra."):
            state[key] = None if isinstance(saved, BytesStorageMetadata) else \
                torch.empty(saved.size, dtype=saved.properties.dtype)
    planner = _LoadPlanner()
    _quiet_dcp(dcp.load, state, checkpoint_id=path, planner=planner)
    loaded = planner.state_dict
    if install is not None:
        install(loaded)
    for key in rng:
        if key.startswith("rng.cpu."):
            torch.set_rng_state(loaded[key])
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(loaded[key])
    return {key.removeprefix("extra."): loaded[key] for key in md if key.startswith("extra.")}
