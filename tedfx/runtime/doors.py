"""Public calls that are collectives, entered through one small check (docs/checkpoints.md, "Every rank calls it").

`tedfx.save`, `tedfx.load`, `ParallelModule.full_state_dict` and `tedfx.export_hf` of a ParallelModule
exchange data between every rank. Called on rank 0 alone (the habit of plain PyTorch:
`if rank == 0: torch.save(model.state_dict(), ...)`), the first collective inside would wait until the
timeout and fail with the backend's bare words. `enter` runs first instead: one all-gather of 8 bytes per
rank over a process group of its own, with ParallelConfig.timeout. A timeout or a closed peer becomes a
`CollectiveCallError` naming the call and the fix; ranks that entered different calls raise alike, naming
them. The group is the mesh's own gloo group (`TedMesh.door_group`), so the check can only ever meet another
rank's check, never a collective of the training step that a rank calling alone is not in.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

__all__ = ["CollectiveCallError", "enter", "new_door_group"]


class CollectiveCallError(RuntimeError):
    """A collective call (tedfx.save, tedfx.load, full_state_dict, export_hf) that not every rank entered alike."""


_KIND = {"tedfx.save": 1, "tedfx.load": 2, "ParallelModule.full_state_dict": 3, "tedfx.export_hf": 3}
"""What each call exchanges: export_hf gathers what full_state_dict gathers, so the two may meet."""

_WHY = {
    "tedfx.save": "each rank writes its own shards and rank 0 commits the checkpoint once every rank has written; "
                  "no rank can write it alone",
    "tedfx.load": "each rank reads the parts of the checkpoint it holds",
    "ParallelModule.full_state_dict": "it all-gathers every rank's shards and returns the whole state dict on "
                                      "every rank: call it on every rank and keep rank 0's (`sd = "
                                      "pm.full_state_dict(); if rank == 0: torch.save(sd, path)`)",
    "tedfx.export_hf": "it gathers every rank's shards, then rank 0 writes the folder and the others return None",
}


def new_door_group(timeout_s: float) -> dist.ProcessGroup:
    """The group `enter` checks on: every rank, gloo (CPU, whatever the backend of the step), this timeout.

    A collective: every rank creates it (TedMesh.build).
    """
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def enter(door: str, group: dist.ProcessGroup | None, timeout_s: float | None) -> None:
    """Check that every rank of `group` (None: the default group) entered `door` before its first collective.

    Args:
        door: the public call, a key of `_KIND` (e.g. "tedfx.save").
        group: the group to check on (the mesh's door group; None: the world).
        timeout_s: the group's timeout, for the message (None: the process group's own).

    Raises:
        CollectiveCallError: a rank did not come within the timeout (or its connection closed), or the
            ranks entered different calls.
    """
    # The mesh's door group is gloo (CPU); the default group of a plain module may be NCCL (the current GPU).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([_KIND[door]], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(every, mine, group=group)
    except RuntimeError as e:  # gloo: "Timed out waiting ...", or a peer's connection closed
        if not any(word in str(e).lower() for word in ("timed out", "timeout", "closed", "connection")):
            raise
        waited = f"ParallelConfig.timeout={timeout_s:g} s" if timeout_s is not None else "the process group's timeout"
        raise CollectiveCallError(
            f"{door} is a collective: every rank must call it, not rank 0 alone ({_WHY[door]}). Rank "
            f"{dist.get_rank()} entered {door} and the other ranks did not join it within {waited} (the process "
            f"group reported: {str(e).strip()[:300]}). Call {door} on every rank, outside any `if rank == 0:`."
        ) from e
    kinds = [int(t) for t in every]
    if len(set(kinds)) > 1:
        names = {1: "tedfx.save", 2: "tedfx.load", 3: "ParallelModule.full_state_dict / tedfx.export_hf"}
        calls = "; ".join(f"rank {r}: {names[k]}" for r, k in enumerate(kinds))
        raise CollectiveCallError(f"the ranks entered different collective calls ({calls}): every rank must make "
                                  f"the same call at the same point of the program.")
