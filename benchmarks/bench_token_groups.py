"""Why do runs with X = 2 token groups end with a higher loss than one rank? Four runs that tell the causes apart.

The demo's MoE GPT (`tedfx demo` defaults: 4 layers, hidden 128, E=4, top-2, every other FFN,
capacity factor 1.25, batch 32 x 64 bytes, AdamW with warmup and cosine decay) trained for
`--steps` steps, per seed:

    one_rank        one process, batch 32 from one data stream (the `--ranks 1` demo)
    x2              tedfx.parallelize on 2 ranks (T=1, X=2): each token group its own stream of
                    16 windows, as the parallel demo feeds it
    x2_emulated     one process, tedfx.to_moe, the same two streams of 16 windows each run as two
                    micro-batches (capacity and aux loss per micro-batch), gradients averaged: what
                    x2 computes by definition (the parity oracle), without any communication
    one_rank_same   one process, batch 32 = the two streams' 16 windows concatenated: x2's data
                    with one token group's capacity and aux loss

x2 vs x2_emulated isolates the parallel implementation; x2_emulated vs one_rank_same isolates
token-group semantics (capacity and routing statistics of 16 instead of 32 windows, the aux loss
per group) on the same data; one_rank_same vs one_rank isolates the data streams. Reported: the
final train/val loss of each (the demo's fixed evaluation batches), and the fraction of token
assignments dropped over training.

Usage:
    python benchmarks/bench_token_groups.py                      # 3 seeds, 300 steps
    python benchmarks/bench_token_groups.py --seeds 0 --steps 50 # quicker
    python benchmarks/bench_token_groups.py --variants one_rank x2_emulated --capacity-factor 2.0
                                                                 # no drops: the gap closes

Writes benchmarks/results/bench_token_groups.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import tedfx
from tedfx.data import get_batch
from tedfx.demo import DemoConfig, _lr_lambda, build_model, evaluate, lm_loss
from tedfx.moe.routing import Router

VARIANTS = ("one_rank", "x2", "x2_emulated", "one_rank_same")


class _Drops:
    """Counts dropped (token, choice) assignments of every router call while training."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.dropped = self.total = 0
        for m in module.modules():
            if isinstance(m, Router):
                m.register_forward_hook(self._hook)

    def _hook(self, router, args, out) -> None:
        if router.training:
            self.dropped += int((out[1] < 0).sum())
            self.total += out[1].numel()


def _streams(cfg: DemoConfig, groups: int) -> list[torch.Generator]:
    """The data generators of `groups` token groups, seeded as the parallel demo seeds them."""
    return [torch.Generator().manual_seed(cfg.seed * 1000 + g) for g in range(groups)]


def _train(model: torch.nn.Module, cfg: DemoConfig, variant: str, token_group: int = 0) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    drops = _Drops(model)
    streams = _streams(cfg, 1 if variant == "one_rank" else 2)
    half = cfg.batch_size // 2
    model.train()
    for _ in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        if variant == "one_rank":
            lm_loss(model, get_batch("train", cfg.batch_size, cfg.block_size, streams[0])).backward()
        elif variant == "x2":  # this rank's token group only; the gradient sync averages the two
            batches = [get_batch("train", half, cfg.block_size, g) for g in streams]
            lm_loss(model, batches[token_group]).backward()
        elif variant == "x2_emulated":  # both token groups here, one backward each, then averaged as x2 does
            for g in streams:
                lm_loss(model, get_batch("train", half, cfg.block_size, g)).backward()
            for p in model.parameters():  # not loss / 2: the MoE aux loss would still enter each backward whole
                if p.grad is not None:
                    p.grad /= 2
        else:  # one_rank_same: both streams' windows in one batch
            parts = [get_batch("train", half, cfg.block_size, g) for g in streams]
            batch = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            lm_loss(model, batch).backward()
        optimizer.step()
        schedule.step()
    return {"final_train_loss": evaluate(model, "train", cfg), "final_val_loss": evaluate(model, "val", cfg),
            "dropped_fraction": drops.dropped / max(drops.total, 1)}


def _moe(cfg: DemoConfig, capacity_factor: float | None) -> tedfx.MoEConfig:
    moe = cfg.moe()
    return moe if capacity_factor is None else replace(moe, capacity_factor=capacity_factor)


def _single(cfg: DemoConfig, variant: str, capacity_factor: float | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    dense, example = build_model(cfg)
    if variant == "x2_emulated":  # micro-batches of 16 windows: capture them at that size
        example = (example[0][: cfg.batch_size // 2],)
    model = tedfx.to_moe(dense, example, moe=_moe(cfg, capacity_factor))
    return _train(model, cfg, variant)


def _rank(cfg: DemoConfig, capacity_factor: float | None) -> dict[str, Any]:
    dense, example = build_model(cfg)
    example = (example[0][: cfg.batch_size // 2],)
    pm = tedfx.parallelize(dense, example, moe=_moe(cfg, capacity_factor),
                           parallel=tedfx.ParallelConfig(tensor=1, expert=2))
    out = _train(pm, cfg, "x2", token_group=pm.mesh.coords["ep"])
    drops = torch.tensor([out["dropped_fraction"]])
    dist.all_reduce(drops)
    out["dropped_fraction"] = float(drops) / 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="MoEConfig.capacity_factor of every variant (default: the demo's, 1.25)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_token_groups.json"))
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        cfg = replace(DemoConfig(), seed=seed, steps=args.steps, warmup=min(20, args.steps))
        for variant in args.variants:
            t0 = time.perf_counter()
            cf = args.capacity_factor
            result = tedfx.launch(_rank, 2, cfg, cf)[0] if variant == "x2" else _single(cfg, variant, cf)
            result.update(seed=seed, seconds=time.perf_counter() - t0)
            runs[variant].append(result)
            print(f"seed {seed} {variant:<14} train {result['final_train_loss']:.4f} "
                  f"val {result['final_val_loss']:.4f} dropped {result['dropped_fraction']:.3%} "
                  f"({result['seconds']:.0f} s)", flush=True)
    print(f"\n{len(args.seeds)} seeds, {args.steps} steps; mean (min..max) over seeds")
    print(f"{'variant':<15} {'final train':>22} {'final val':>22} {'dropped':>9} {'val - ' + args.variants[0]:>15}")
    base = [r["final_val_loss"] for r in runs[args.variants[0]]]
    for variant, rows in runs.items():
        def fmt(key: str) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.mean(values):.4f} ({min(values):.3f}..{max(values):.3f})"
        gap = statistics.mean(r["final_val_loss"] - b for r, b in zip(rows, base))
        print(f"{variant:<15} {fmt('final_train_loss'):>22} {fmt('final_val_loss'):>22} "
              f"{statistics.mean(r['dropped_fraction'] for r in rows):>9.3%} {gap:>+15.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "args": vars(args),
                               "runs": runs}, indent=2, default=lambda x: None if isinstance(x, float)
                              and math.isnan(x) else x))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
