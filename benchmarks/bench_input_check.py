"""What ParallelModule's default input checks (`check_inputs=True`) cost in a training step.

One launch of 4 CPU ranks (gloo), layout T=2 X=2 (D=1), on the demo's MoE GPT (`tedfx demo`
defaults: 4 layers, hidden 128, 4 heads, E=4, top-2, every other FFN, 16 windows of 64 bytes per
token group), trained with AdamW. Two models, one after the other in the same launch:

    demo          dropout 0, the demo's model: the world shape check and the output-gradient check run
    demo+dropout  dropout 0.1: the token group's RNG check runs as well

Per model, one ParallelModule whose `check_inputs` is switched on and off step by step (the order
alternates each round), each step (zero_grad, forward, loss, backward with the gradient sync,
AdamW step) between two barriers. Reported per model:

    step on / off   median step ms with the checks on and off (rank 0, between barriers)
    ratio           median over rounds of (on / off), the two steps of a round paired
    checks          ms per checked step spent inside the check code, by check: the world shape check
                    (ParallelModule._check_same_shapes), the token group's comparison of RNG digests
                    (TokenGroupFeed._compare issues it, _judge_inputs waits and judges) and the output-gradient
                    check (_check_grad issues it, _judge_grad waits and judges). Per step the least over the
                    ranks: the rank that reached the shape check's all-reduce last waited for no one, so its
                    time is the checks' own cost; then the median over steps
    share           checks / median step off (the target is <= 1 %)
    rank 0, share   the same at rank 0, including its waits for slower ranks at the shape check (time it
                    would otherwise wait at the graph's first collective): an upper bound
    pickles         torch.distributed.all_gather_object calls per checked step, any rank (the target is 0)

Step times on a shared machine are noisy: a ratio within a few percent of 1.0 is noise; the
"checks" column is the precise measure of the checks' own cost.

Usage:
    python benchmarks/bench_input_check.py              # 40 rounds per model
    python benchmarks/bench_input_check.py --quick      # 4 rounds, a smoke run
    python benchmarks/bench_input_check.py --rounds 80 --out r.json

Writes benchmarks/results/bench_input_check.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tedfx
from tedfx.demo import DemoConfig
from tedfx.models.nanogpt import GPT

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_input_check.json"
MODELS = {"demo": 0.0, "demo+dropout": 0.1}
"""Model name -> dropout probability."""
CHECKS = {"shapes": ("_check_same_shapes",), "token_group": ("_compare", "_judge_inputs"),
          "output_grad": ("_check_grad", "_judge_grad")}
"""The per-step checks and the functions timed for each: of the ParallelModule, then of its TokenGroupFeed."""
WARMUP_ROUNDS = 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 4 rounds")
    p.add_argument("--rounds", type=int, help="timed rounds per model (one checked and one unchecked step each)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    args.rounds = args.rounds or (4 if args.quick else 40)
    return args


# --- On every rank --------------------------------------------------------------------------------


class _Timers:
    """Wraps the check functions of one ParallelModule with timers; counts all_gather_object calls."""

    pickles = 0
    """torch.distributed.all_gather_object calls in this process (counted once `count_pickles()` ran)."""

    def __init__(self, pm: tedfx.ParallelModule) -> None:
        self.ms = dict.fromkeys(CHECKS, 0.0)
        self._pickles_seen = _Timers.pickles
        for key, names in CHECKS.items():
            for name in names:
                owner = pm if name == "_check_same_shapes" else pm._feed
                if hasattr(owner, name):  # earlier tedfx versions judged inside the issuing function
                    self._wrap(owner, name, key)

    @staticmethod
    def count_pickles() -> None:
        original = dist.all_gather_object

        def counted(*args, **kwargs):
            _Timers.pickles += 1
            return original(*args, **kwargs)

        dist.all_gather_object = counted  # the module looks it up on torch.distributed at each call

    def _wrap(self, owner: Any, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[key] += (time.perf_counter() - t0) * 1e3

        setattr(owner, name, timed)  # an instance attribute: the module calls it through self

    def take(self) -> tuple[dict[str, float], int]:
        """The time per check and the pickles since the last take; resets them."""
        out = (dict(self.ms), _Timers.pickles - self._pickles_seen)
        self.ms, self._pickles_seen = dict.fromkeys(CHECKS, 0.0), _Timers.pickles
        return out


def _build(dropout: float) -> tuple[tedfx.ParallelModule, Callable[[], float]]:
    cfg = DemoConfig()
    torch.manual_seed(cfg.seed)
    dense = GPT(replace(cfg.gpt(), dropout=dropout))
    groups = cfg.batch_size // (cfg.ranks // cfg.tensor)  # windows per token group
    example = torch.zeros(groups, cfg.block_size, dtype=torch.long)
    pm = tedfx.parallelize(dense, (example,), moe=cfg.moe(), parallel=cfg.parallel())
    g = torch.Generator().manual_seed(1000 + pm.data_parallel_rank)
    xy = torch.randint(0, 256, (groups, cfg.block_size + 1), generator=g)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
    torch.manual_seed(cfg.seed + pm.data_parallel_rank)  # the token group's ranks draw the same masks
    pm.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(pm(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        return float(loss.detach())

    return pm, step


def _time_rounds(pm: tedfx.ParallelModule, step: Callable[[], float], timers: _Timers,
                 rounds: int) -> dict[str, list]:
    rec: dict[str, list] = {"on_ms": [], "off_ms": [], "in_place_ms": [], "pickles": []}
    for r in range(WARMUP_ROUNDS + rounds):
        for checking in ((True, False) if r % 2 == 0 else (False, True)):
            pm.check_inputs = checking
            timers.take()
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dist.barrier()
            ms = (time.perf_counter() - t0) * 1e3
            checks, pickles = timers.take()
            if r < WARMUP_ROUNDS:
                continue
            rec["on_ms" if checking else "off_ms"].append(ms)
            if checking:
                rec["in_place_ms"].append(checks)
                rec["pickles"].append(pickles)
    pm.check_inputs = True
    return rec


def run_rank(rounds: int) -> dict[str, Any] | None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # deep copies of exported graphs warn on 2.13
    _Timers.count_pickles()
    results = {}
    for name, dropout in MODELS.items():
        pm, step = _build(dropout)
        results[name] = _time_rounds(pm, step, _Timers(pm), rounds)
    return results


# --- Summary --------------------------------------------------------------------------------------


def summarize(ranks: list[dict[str, list]]) -> dict[str, Any]:
    """Step times of rank 0 (between barriers: the slowest rank's); check times per step at the rank that spent
    least in each (it arrived last, so it waited for no one: the checks' own cost), and at rank 0."""
    rec = ranks[0]
    on, off = statistics.median(rec["on_ms"]), statistics.median(rec["off_ms"])
    steps = list(zip(*(r["in_place_ms"] for r in ranks)))  # per checked step, every rank's times
    checks = {k: statistics.median(min(c[k] for c in step) for step in steps) for k in CHECKS}
    total = statistics.median(min(sum(c.values()) for c in step) for step in steps)
    rank0 = statistics.median(sum(c.values()) for c in rec["in_place_ms"])
    return {"on_ms": on, "off_ms": off,
            "ratio": statistics.median(a / b for a, b in zip(rec["on_ms"], rec["off_ms"])),
            "checks_ms": checks, "checks_total_ms": total, "share": total / off,
            "rank0_checks_ms": rank0, "rank0_share": rank0 / off,
            "pickles_per_step": max(max(r["pickles"], default=0) for r in ranks)}


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    print(f"{'model':<14} {'step on':>9} {'step off':>9} {'ratio':>7} {'checks':>8} {'share':>7} {'rank 0':>8} "
          f"{'share':>7} {'pickles':>8}")
    for name, s in summaries.items():
        print(f"{name:<14} {s['on_ms']:>7.1f}ms {s['off_ms']:>7.1f}ms {s['ratio']:>7.3f} "
              f"{s['checks_total_ms']:>6.2f}ms {s['share']:>7.2%} {s['rank0_checks_ms']:>6.2f}ms "
              f"{s['rank0_share']:>7.2%} {s['pickles_per_step']:>8}")
    for name, s in summaries.items():
        parts = ", ".join(f"{k} {s['checks_ms'][k]:.3f}" for k in CHECKS)
        print(f"  {name}: ms per checked step (least over ranks): {parts}")


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    per_rank = tedfx.launch(run_rank, 4, args.rounds, backend="gloo", timeout=600)
    raw = {name: [r[name] for r in per_rank] for name in MODELS}
    seconds = time.perf_counter() - t0
    summaries = {name: summarize(rec) for name, rec in raw.items()}
    print(f"4 ranks (gloo), T=2 X=2, demo MoE GPT; {args.rounds} rounds; {seconds:.0f} s")
    print_table(summaries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summaries, "raw": raw}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
