"""Per-rank side of tests/test_checkpoint_io.py: every checkpoint case of a world of 4, in one launch.

`run_checkpoints(root)` runs on every rank of a `tedfx.runtime.launch` and returns one result dict;
the pytest side asserts on it. Every run trains the test GPT on the same 10 global batches of 4
sequences: each of the layout's X * D token groups takes its 4 / (X * D) sequences, so every layout
(and the single-process model on all 4) minimises the same loss. The MoE is dropless and without
aux or z loss, so the step does not depend on how the batch is cut into token groups.

    resume_fp32    (T, X, D) = (2, 2, 1), torch AdamW on pm.parameters(): 10 steps straight against
                   5 steps, tedfx.save, new module and optimizer, tedfx.load, 5 steps: bit for bit.
    resume_bf16    the same with tedfx.optimizer, bf16 (fp32 master weights), ZeRO-1, tiled.
    reshard        the fp32 checkpoint loaded into (1, 4, 1) with tedfx.optimizer, ZeRO-1, tiled (each
                   rank's slices cut across parameters), saved again there at step 5, 5 steps; and
                   loaded into (2, 1, 2) with ZeRO-1 over "dp" and "edp", 5 steps. Both against the
                   straight fp32 run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import tedfx
from tedfx.api import parallelize

from models import VOCAB, patch_capture
from parallel_cases import ADAM_EPS, LR, TIMEOUT_S, _loss, _model

__all__ = ["GLOBAL_BATCH", "MOE", "SEQ", "STEPS", "batches", "run_checkpoints", "train"]

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False, aux_loss_coef=0.0, z_loss_coef=0.0)
STEPS = 10
GLOBAL_BATCH, SEQ = 4, 8
TILE = 1000
"""Entries per tile of tedfx.optimizer: most parameters are cut into several tiles."""


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, targets) of each step, [GLOBAL_BATCH, SEQ] each: the same on every rank."""
    g = torch.Generator().manual_seed(2024)
    return [(torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
             torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)) for _ in range(STEPS)]


def train(module, opt, steps, group: int = 0, groups: int = 1) -> list[float]:
    """One optimizer step per batch on this token group's share of it; returns the losses."""
    losses = []
    for tokens, targets in steps:
        per = tokens.shape[0] // groups
        loss = _loss(module, tokens[group * per:(group + 1) * per], targets[group * per:(group + 1) * per])
        (opt.scale_loss(loss) if isinstance(opt, tedfx.TedOptimizer) else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _parallelize(T: int, X: int, **options: Any):
    groups = dist.get_world_size() // T
    example = (torch.zeros(GLOBAL_BATCH // groups, SEQ, dtype=torch.long),)
    parallel = tedfx.ParallelConfig(tensor=T, expert=X, timeout=TIMEOUT_S, **options)
    return parallelize(_model("gpt"), example, moe=MOE, parallel=parallel)


def _run(pm, opt, steps) -> list[float]:
    return train(pm, opt, steps, pm.data_parallel_rank, pm.data_parallel_size)


def _torch_adamw(pm):
    return torch.optim.AdamW(pm.parameters(), lr=LR, eps=ADAM_EPS)


def _ted_adamw(pm):
    return tedfx.optimizer(pm, torch.optim.AdamW, lr=LR, eps=ADAM_EPS, tile_numel=TILE)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].numel())


def _resume(root: Path, name: str, make_opt, **options: Any) -> dict[str, Any]:
    """10 steps straight; 5 steps, save, new module and optimizer, load, 5 steps: the two runs' weights."""
    steps = batches()
    pm = _parallelize(2, 2, **options)
    opt = make_opt(pm)
    straight_losses = _run(pm, opt, steps)
    straight = pm.full_state_dict()
    masters = [m.flat.clone() for m in getattr(opt, "masters", []) if m.flat is not None]
    pm = _parallelize(2, 2, **options)
    opt = make_opt(pm)
    _run(pm, opt, steps[:5])
    at_5 = pm.full_state_dict()
    tedfx.save(root / name, pm, opt, step=5, note={"layout": "2x2x1"})
    generator_at_save = torch.get_rng_state()
    torch.manual_seed(1000 + dist.get_rank())  # a fresh start: the load must bring the generators back
    pm = _parallelize(2, 2, **options)
    opt = make_opt(pm)
    extra = tedfx.load(root / name, pm, opt)
    generator_restored = torch.equal(torch.get_rng_state(), generator_at_save)
    resumed_losses = _run(pm, opt, steps[5:])
    resumed = pm.full_state_dict()
    resumed_masters = [m.flat for m in getattr(opt, "masters", []) if m.flat is not None]
    return {"identical": _same(straight, resumed), "losses_identical": straight_losses[5:] == resumed_losses,
            "masters_identical": len(masters) == len(resumed_masters) and
            all(torch.equal(a, b) for a, b in zip(masters, resumed_masters)), "masters": len(masters),
            "extra": extra, "generator_restored": generator_restored, "straight": straight, "at_5": at_5,
            "trained": _max_diff(at_5, straight)}


def _reshard(root: Path, straight: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The (2, 2, 1) torch AdamW checkpoint at step 5 continued on (1, 4, 1) and on (2, 1, 2), ZeRO-1 both."""
    steps = batches()
    pm = _parallelize(1, 4, zero=1)  # "dp" slices over 4 ranks, tiled
    opt = _ted_adamw(pm)
    tedfx.load(root / "fp32", pm, opt)
    tedfx.save(root / "fp32_141_zero1", pm, opt, step=5)  # saved from slices: the single-process test loads it
    _run(pm, opt, steps[5:])
    out = {"diff_141": _max_diff(pm.full_state_dict(), straight)}
    pm = _parallelize(2, 1, zero=1)  # "dp" and "edp" slices over 2 ranks each, untiled
    opt = tedfx.optimizer(pm, torch.optim.AdamW, lr=LR, eps=ADAM_EPS)
    tedfx.load(root / "fp32", pm, opt)
    _run(pm, opt, steps[5:])
    out["diff_212"] = _max_diff(pm.full_state_dict(), straight)
    out["steps_212"] = sorted({float(s["step"]) for t in opt.tiles for s in t.optimizer.state.values()})
    return out


def run_checkpoints(root: str) -> dict[str, Any]:
    """Every case on this rank; the full state dicts of the fp32 run on rank 0 only."""
    patch_capture(setattr)
    root, out, start = Path(root), {}, time.perf_counter()
    fp32 = _resume(root, "fp32", _torch_adamw)
    out["resume_fp32"] = {k: v for k, v in fp32.items() if k not in ("straight", "at_5")}
    out["resume_bf16"] = {k: v for k, v in _resume(root, "bf16", _ted_adamw, precision="bf16", zero=1).items()
                          if k not in ("straight", "at_5")}
    out["reshard"] = _reshard(root, fp32["straight"])
    try:  # 16-bit weights and their fp32 masters load together: another precision is refused
        tedfx.load(root / "fp32", _parallelize(2, 2, precision="bf16"))
        out["precision_error"] = None
    except tedfx.CheckpointError as e:
        out["precision_error"] = str(e)
    if dist.get_rank() == 0:
        out["straight_fp32"], out["at_5_fp32"] = fp32["straight"], fp32["at_5"]
    out.update(rank=dist.get_rank(), seconds=time.perf_counter() - start)
    return out
