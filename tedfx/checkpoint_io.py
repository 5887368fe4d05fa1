"""Checkpoints that reshard across layouts: `tedfx.save` and `tedfx.load` (docs/checkpoints.md).

A checkpoint is a torch.distributed.checkpoint (DCP) directory. Each rank describes what it holds
as boxes of the full tensors, under layout-free keys (tedfx.runtime.checkpoint_state), and DCP's own
planner does the rest: it writes each box once (replicas are deduplicated) and, on load, reads into
each rank the parts of the saved boxes that overlap the boxes the rank holds in its layout. No rank
ever holds a full tensor. This module holds the doors, the checks of what a checkpoint was saved
for, the RNG states and the atomic commit.

    model.<key>                     every tensor of the state dict, with the keys of tedfx.to_moe's
    optim.state.<param>.<name>      optimizer state (exp_avg, exp_avg_sq, master, ...): elementwise
                                    state is split like its parameter; scalars (step) are replicated
    optim.param_groups              hyperparameters, parameters by name (pickled); a load matches each
                                    group of the optimizer to the saved group holding its parameters
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
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from ._compat import BoxLoadPlanner, BoxSavePlanner
from .config import MoEConfig
from .export import ExportError, dense_config_of, moe_layout
from .moe.routing import Router
from .runtime import doors
from .runtime.checkpoint_state import (
    CheckpointError,
    Placement,
    model_entries,
    optimizer_entries,
    optimizer_placeholders,
)
from .runtime.doors import CollectiveCallError
from .runtime.executor import ParallelModule

__all__ = ["CheckpointError", "CollectiveCallError", "load", "read_model_state", "save"]

FORMAT_VERSION = 1
INFO_FILE = "tedfx.json"
COMPLETE_FILE = "COMPLETE"


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
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "param_groups": len(optimizer.param_groups) if optimizer is not None else None,
            # What `tedfx export` needs to write the model for other tools without the model's code.
            "moe_layout": _moe_layout_or_none(target), "dense_config": dense_config_of(target)}


def _moe_layout_or_none(module: nn.Module) -> dict[str, Any] | None:
    try:
        return moe_layout(module)
    except ExportError:  # a module without MoE blocks saves and loads all the same
        return None


def _check_compatible(info: dict[str, Any], metadata: Metadata, target: nn.Module, module: nn.Module,
                      placement: Placement, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
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
                              f"layout and the runtime options may change between save and load.")
    if isinstance(target, ParallelModule) and info["parallel"] is not None:
        was, now = info["parallel"]["precision"], target.parallel.precision
        if was != now:
            raise CheckpointError(f"the checkpoint {path} was saved with ParallelConfig.precision={was!r}, this "
                                  f"module has precision={now!r}: 16-bit weights and their fp32 masters load "
                                  f"together.")
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
        raise CheckpointError(f"the checkpoint {path} was saved without an optimizer: call tedfx.load(dir, pm) "
                              f"without one, then build the optimizer (its fp32 master weights start from the "
                              f"weights it is built on).")
    if optimizer is not None and info.get("param_groups") != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {info.get('param_groups')} parameter groups, this one "
                              f"{len(optimizer.param_groups)}: build it with the same groups.")


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
    _write_synced(staging / INFO_FILE, json.dumps(info, indent=1, default=str))
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
    ours = re.compile(rf"{re.escape(path.name)}\.(tmp|data|link)-[0-9a-f]{{{len(token)}}}")
    for stale in path.parent.iterdir():
        if stale != data and ours.fullmatch(stale.name):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()


def _complete_checkpoint(dir: str | os.PathLike) -> Path:
    path = Path(dir)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}.")
    real = path.resolve()
    if not (real / COMPLETE_FILE).exists():
        raise CheckpointError(
            f"{path} is an incomplete checkpoint: it has no {COMPLETE_FILE} marker, so the save that wrote it "
            f"stopped before every rank had finished (or tedfx.save did not write it). Load the checkpoint it was "
            f"to replace (the same path without the '.tmp-...' suffix) instead.")
    return real


# --- the doors -------------------------------------------------------------------------------------------


def _module_and_placement(pm: nn.Module, door: str) -> tuple[nn.Module, Placement]:
    """The module and its placement; with a process group, first checks that every rank entered `door`
    (tedfx.runtime.doors: a CollectiveCallError naming the door, not the backend's bare timeout)."""
    if isinstance(pm, ParallelModule):
        if not _distributed():
            raise RuntimeError(f"{door} of a ParallelModule is a collective: call it on every rank, inside the "
                               f"process group the module was built in.")
        pm.enter_collective(door)  # rank 0 alone raises CollectiveCallError, not gloo's bare timeout
        return pm.module, Placement.of(pm)
    if not isinstance(pm, nn.Module):
        raise TypeError(f"{door} expects the ParallelModule of tedfx.parallelize or an nn.Module (e.g. the model of "
                        f"tedfx.to_moe), got {type(pm).__name__}.")
    if _distributed():  # a plain module with a process group: a collective over the world too
        doors.enter(door, None, None)
    return pm, Placement.of(pm)


def _quiet_dcp(call: Callable[..., Any], *args: Any, local: bool = False, **kwargs: Any) -> Any:
    """DCP warns that it assumes one process whenever it runs without a process group, which is what we ask.

    `local`: this process reads by itself even with a process group (no collective).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return call(*args, no_dist=local or not _distributed(), **kwargs)


def _saved_param_groups(path: Path) -> list[dict[str, Any]]:
    """The checkpoint's `optim.param_groups` (hyperparameters, parameters by name), read by each rank alone.

    Read before any tensor, so that a mismatch of the optimizer's groups raises on every rank before
    anything of the model or the optimizer changes.
    """
    planner = BoxLoadPlanner()
    _quiet_dcp(dcp.load, {"optim.param_groups": None}, checkpoint_id=path, planner=planner, local=True)
    return planner.state_dict["optim.param_groups"]


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

    Raises:
        CollectiveCallError: not every rank called it (e.g. `if rank == 0: tedfx.save(...)`): after
            ParallelConfig.timeout, before anything is written (docs/checkpoints.md, "Every rank calls it").

    Example:
        >>> tedfx.save("ckpt/latest", pm, opt, step=step, scheduler=sched.state_dict())
    """
    path = Path(dir)
    module, placement = _module_and_placement(pm, "tedfx.save")
    _check_destination(path)
    # 1. Describe what this rank holds, as views of its tensors.
    state = model_entries(module, placement)
    if optimizer is not None:
        state.update(optimizer_entries(optimizer, module, placement))
    rank = dist.get_rank() if _distributed() else 0
    state.update(_rng_entries(rank, any(p.is_cuda for p in module.parameters())))
    state.update({f"extra.{name}": value for name, value in extra.items()})
    # 2. DCP writes every box once, into the staging directory.
    staging = _staging_dir(path)
    _quiet_dcp(dcp.save, state, checkpoint_id=staging, planner=BoxSavePlanner())
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
            model, MoEConfig (naming the differences, e.g. both expert counts) or precision, or the optimizer's
            parameter groups hold other parameters than the saved ones (groups are matched by parameter
            name, in any order).
        CollectiveCallError: not every rank called it (with a process group), after ParallelConfig.timeout.

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
    state = model_entries(module, placement)
    # The optimizer's groups are matched to the saved ones by parameter name (a CheckpointError if they differ).
    install = optimizer_placeholders(optimizer, module, placement, metadata, state, _saved_param_groups(path)) \
        if optimizer is not None else None
    rank = dist.get_rank() if _distributed() else 0
    source = _rng_source(info, pm, rank)
    rng = [key for key in md if key.startswith("rng.") and key.endswith(f".rank{source}")]
    for key in rng:
        state[key] = torch.empty(md[key].size, dtype=md[key].properties.dtype)
    for key, saved in md.items():
        if key.startswith("extra."):
            state[key] = None if isinstance(saved, BytesStorageMetadata) else \
                torch.empty(saved.size, dtype=saved.properties.dtype)
    planner = BoxLoadPlanner()
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


def read_model_state(dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole model of a checkpoint, unsharded, in this process (no process group, no model code needed).

    Returns:
        ({to_moe state-dict key: tensor}, the checkpoint's tedfx.json), e.g. for `tedfx export`.
    """
    path = _complete_checkpoint(dir)
    info = json.loads((path / INFO_FILE).read_text())
    md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {key: torch.empty(saved.size, dtype=saved.properties.dtype) for key, saved in md.items()
             if key.startswith("model.") and not isinstance(saved, BytesStorageMetadata)}
    _quiet_dcp(dcp.load, state, checkpoint_id=path)
    return {key.removeprefix("model."): t for key, t in state.items()}, info

