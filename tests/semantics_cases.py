"""Per-rank side of tests/test_parallel_semantics.py: dropout, token groups and keyword inputs at T = 2.

`run_semantics()` runs every case on each rank of one launch (world 2, T = 2, started by spawn, so
each rank has its own Python hash seed) and returns plain numbers and messages; the pytest side
asserts on them. Run as a script under torchrun, `run_torchrun()` trains with dropout on the ranks
torchrun started.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import tedfx
from tedfx import collectives, rng

from models import VOCAB, patch_capture, tiny_dropout_lm, tiny_gpt, tiny_llama

__all__ = ["run_semantics", "run_torchrun"]

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)
PARALLEL = tedfx.ParallelConfig(tensor=2, timeout=60.0)
SEEDS = 200
"""Seeds of the dropout statistics: each trains STAT_STEPS SGD steps from the same weights."""
STAT_STEPS = 3
STAT_LR = 0.5
BATCH, SEQ = 4, 16


def _batch(seed: int, *, with_mask: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randint(1, VOCAB, (BATCH, SEQ), generator=g),
             "y": torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)}
    if with_mask:
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[:, : int(torch.randint(0, SEQ // 2, (1,), generator=g))] = 0  # left padding, HF style
        batch["mask"] = mask
    return batch


def _loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(module(x).flatten(0, 1), y.flatten())


# --- dropout ---------------------------------------------------------------------------------------------


def _sgd_losses(module: nn.Module, batch: dict, seed: int) -> list[float]:
    """STAT_STEPS SGD steps with dropout from the module's current weights (restored afterwards)."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    opt = torch.optim.SGD(module.parameters(), lr=STAT_LR)
    torch.manual_seed(seed)
    losses = []
    for _ in range(STAT_STEPS):
        loss = _loss(module, batch["x"], batch["y"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    module.load_state_dict(saved)
    return losses


def _dropout_statistics(pm: nn.Module, model: nn.Module, batch: dict) -> dict[str, Any]:
    """Mean SGD loss per seed at T = 2 (seeds 0..SEEDS-1) and in one process (other seeds)."""
    ref = tedfx.to_moe(model, (batch["x"],), moe=MOE)
    return {"parallel": [sum(_sgd_losses(pm, batch, s)) / STAT_STEPS for s in range(SEEDS)],
            "single": [sum(_sgd_losses(ref, batch, 10**6 + s)) / STAT_STEPS for s in range(SEEDS)]}


def _masks(pm, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """{dropout node: which of its nonzero inputs it zeroed} in one forward of the rank's graph."""
    torch.manual_seed(seed)
    interp = fx.Interpreter(pm.graph, garbage_collect_values=False)
    with torch.no_grad(), collectives.bind_axes(pm.mesh.groups()):
        interp.run(x)
    return {n.name: ((interp.env[n] == 0) & (interp.env[n.args[0]] != 0))
            for n in pm.graph.graph.nodes if n.op == "call_function" and n.target in rng.DROPOUT_OPS}


def _dropout_cases() -> dict[str, Any]:
    model = tiny_dropout_lm(0.3)[0]
    batch = _batch(7)
    pm = tedfx.parallelize(model, (batch["x"],), moe=MOE, parallel=PARALLEL)
    sharded = {n.name for n in pm.graph.graph.nodes if n.target in (rng.sharded_dropout, rng.sharded_attention)}
    return {"masks": _masks(pm, batch["x"], seed=11), "sharded": sorted(sharded),
            "stats": _dropout_statistics(pm, model, batch)}


# --- token groups ----------------------------------------------------------------------------------------


def _expect(error: type[Exception], fn: Callable[[], Any]) -> str | None:
    """The message of the `error` that fn raises, or None when it returns."""
    try:
        fn()
    except error as e:
        return str(e)
    return None


def _train_gpt(pm, batches: list[dict], *, share_targets: bool = False,
               temperature: str | None = None) -> tuple[list[float], dict]:
    """AdamW steps; `temperature`: the logits divided by 2 "in_place" (`logits.div_(2)`) or "out_of_place"."""
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    losses = []
    for b in batches:
        x, y = pm.broadcast_batch(b["x"], b["y"]) if share_targets else (b["x"], b["y"])
        if temperature is None:
            loss = _loss(pm, x, y)
        else:
            logits = pm(x)
            logits = logits.div_(2.0) if temperature == "in_place" else logits / 2.0
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, pm.full_state_dict()


def _token_group_cases() -> dict[str, Any]:
    """GPT, targets outside the model: data seeded by the token group (right) or by the global rank (the DDP habit)."""
    rank, model = dist.get_rank(), tiny_gpt()[0]
    example = _batch(0)["x"]

    def build(mode: str = "broadcast", check_inputs: bool = True):
        parallel = tedfx.ParallelConfig(tensor=2, timeout=60.0, token_group_inputs=mode)
        return tedfx.parallelize(model, (example,), moe=MOE, parallel=parallel, check_inputs=check_inputs)

    pm = build()
    right = [_batch(100 * pm.data_parallel_rank + i) for i in range(3)]
    by_rank = [_batch(100 * rank + 1000 + i) for i in range(3)]  # rank 0's are not right's either: a fresh run
    by_rank_right = [_batch(100 * 0 + 1000 + i) for i in range(3)]  # what the token group's first rank drew
    out: dict[str, Any] = {"token_group": (pm.data_parallel_rank, pm.data_parallel_size, pm.token_group.ranks)}
    out["shared"] = _train_gpt(build(), by_rank, share_targets=True)
    out["shared_reference"] = _train_gpt(build(), by_rank_right)
    out["right"] = _train_gpt(pm, right)[0]
    out["verify_error"] = _expect(ValueError, lambda: build("verify")(by_rank[0]["x"]))
    out["verify_right"] = _expect(ValueError, lambda: _train_gpt(build("verify"), right))
    # "verify" is chosen instead of the broadcast: switching the shape checks off does not switch it off.
    out["verify_unchecked_error"] = _expect(ValueError, lambda: build("verify", check_inputs=False)(by_rank[0]["x"]))
    out["targets_error"] = _expect(ValueError, lambda: _train_gpt(build(), by_rank))
    # The output written in place (a temperature): it trains as out of place, and the gradient check still runs.
    out["in_place"] = _train_gpt(build(), right, temperature="in_place")
    out["in_place_reference"] = _train_gpt(build(), right, temperature="out_of_place")
    out["in_place_targets_error"] = _expect(ValueError, lambda: _train_gpt(build(), by_rank, temperature="in_place"))
    # Evaluation on data seeded by global rank: no backward to check the targets, so a warning, once.
    out["eval_warnings"] = {}
    for name, batches, module in (("right", right, build()), ("by_rank", by_rank, build())):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            for b in batches[:2]:
                module(b["x"])
        out["eval_warnings"][name] = [str(w.message) for w in caught if "token_group_inputs" in str(w.message)]
    # The DDP habit `if rank == 0: torch.save(pm.state_dict())`, loaded on every rank: rank 1 gets rank 0's shards.
    shared = [pm.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    out["rank0_state_dict_error"] = _expect(ValueError, lambda: pm.load_state_dict(shared[0]))
    out["own_state_dict_error"] = _expect(ValueError, lambda: pm.load_state_dict(pm.state_dict()))
    return out


# --- keyword inputs (HF) ---------------------------------------------------------------------------------


def _hf_cases() -> dict[str, Any]:
    """Llama captured with attention_mask and labels: the HF loss, keyword errors, data seeded by global rank."""
    rank, model = dist.get_rank(), tiny_llama()[0]
    example = _batch(0, with_mask=True)
    kwargs = {"attention_mask": example["mask"], "labels": example["y"]}

    def build():
        return tedfx.parallelize(model, (example["x"],), moe=MOE, parallel=PARALLEL, example_kwargs=kwargs)

    def train(pm, batches):
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
        losses = []
        for b in batches:
            loss = pm(b["x"], attention_mask=b["mask"], labels=b["y"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return losses, pm.full_state_dict()

    pm = build()
    ref = tedfx.to_moe(model, (example["x"],), moe=MOE, example_kwargs=kwargs)
    b = _batch(5, with_mask=True)
    out: dict[str, Any] = {
        "loss": float(pm(b["x"], attention_mask=b["mask"], labels=b["y"]).loss),
        "by_name": float(pm(input_ids=b["x"], attention_mask=b["mask"], labels=b["y"]).loss),
        "ref_loss": float(ref(b["x"], attention_mask=b["mask"], labels=b["y"]).loss),
        "extra_error": _expect(TypeError, lambda: pm(b["x"], attention_mask=b["mask"], labels=b["y"],
                                                     position_ids=torch.arange(SEQ).expand(BATCH, SEQ))),
        "missing_error": _expect(TypeError, lambda: pm(b["x"], attention_mask=b["mask"])),
        "ref_extra_error": _expect(TypeError, lambda: ref(b["x"], attention_mask=b["mask"], labels=b["y"],
                                                          position_ids=torch.arange(SEQ).expand(BATCH, SEQ))),
    }
    by_rank = [_batch(100 * rank + 2000 + i, with_mask=True) for i in range(3)]
    first_rank = [_batch(2000 + i, with_mask=True) for i in range(3)]
    out["by_rank"] = train(build(), by_rank)
    out["first_rank"] = train(build(), first_rank)
    return out


# --- entry points ------------------------------------------------------------------------------------------


def run_semantics() -> dict[str, Any]:
    """Every case on this rank (world 2, T = 2); ranks seed torch identically, as the RNG check asks."""
    patch_capture(setattr)
    torch.manual_seed(0)
    return {"rank": dist.get_rank(), "dropout": _dropout_cases(), "token_groups": _token_group_cases(),
            "hf": _hf_cases()}


def run_torchrun() -> dict[str, Any]:
    """Train a few steps with dropout at T = 2, every rank seeded alike."""
    model, (x,) = tiny_dropout_lm(0.3)
    pm = tedfx.parallelize(model, (x,), moe=MOE, parallel=PARALLEL)
    torch.manual_seed(0)
    losses, _ = _train_gpt(pm, [_batch(i) for i in range(3)])
    return {"rank": dist.get_rank(), "losses": losses}


if __name__ == "__main__":  # torchrun --nproc-per-node 2 tests/semantics_cases.py OUT_DIR
    result = tedfx.launch(run_torchrun, nprocs=2)[0]
    (Path(sys.argv[1]) / f"rank{result['rank']}.json").write_text(json.dumps(result))
