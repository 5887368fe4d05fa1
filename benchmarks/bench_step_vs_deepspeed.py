"""Training step of tedfx with its default settings against DeepSpeed-MoE in TED mode, on one dense + MoE pair.

One launch per network (4 ranks, T=2 x X=2, loopback and an emulated 2-node cluster) builds, from the
same seeded nanoGPT of two blocks (block 0's FFN dense, block 1's an MoE block: H=256, F=1024, E=4, top-2,
capacity factor 1.0, 4 x 128 = 512 tokens per token group, fp32), with and without block activation
checkpointing:

    tedfx           tedfx.parallelize(model, ..., ParallelConfig(tensor=2, expert=2)) as a user gets it:
                    DTD on, CAC on, `check_inputs` at its default (on), a2a_chunks="auto" (2 chunks where the
                    expert all-to-all crosses nodes: on the emulated cluster; 1 on loopback)
    tedfx_chunks1   the same with ParallelConfig(a2a_chunks=1): no pipelining of the expert all-to-alls
    deepspeed       deepspeed.moe.layer.MoE in TED mode (benchmarks/peers.py: Megatron mpu, expert tensor
                    parallelism, Megatron attention and MLP, DeepSpeed's own DTD, no CAC), gradients averaged
                    as DeepSpeed's engine does

A step is zero_grad, forward, backward with the gradient sync, AdamW step, between barriers; the six
variants take turns step by step in a rotating order. Reported per checkpointing mode: median step ms,
the paired ratio tedfx / deepspeed (per round, then the median), and tedfx / tedfx_chunks1; the same
ratio of rank 0's process CPU time in the step (on loopback the 4 ranks share 2 cores, so the step is
about their CPU time over 2), and each variant's GFLOP per step (torch's FLOP counter, rank 0).

Usage:
    python benchmarks/bench_step_vs_deepspeed.py                 # loopback and emulated (root needed)
    python benchmarks/bench_step_vs_deepspeed.py --network loopback --rounds 6
    python benchmarks/bench_step_vs_deepspeed.py --quick         # smoke run, loopback

Writes benchmarks/results/bench_step_vs_deepspeed.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import tedfx
from tedfx.models.nanogpt import GPT
from tedfx.runtime.mesh import Layout

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # peers, netem and bench_dtd_cac sit next to this script, also in launched ranks

import bench_dtd_cac as common  # noqa: E402, I001 - after the sys.path line above
import netem  # noqa: E402

TEDFX_VARIANTS: dict[str, dict[str, Any]] = {"tedfx": {}, "tedfx_chunks1": {"a2a_chunks": 1}}
"""tedfx variants: ParallelConfig fields beyond the layout and the checkpointing mode (none: the defaults)."""
PEER = "deepspeed"
MODES = ("none", "block")
"""Activation checkpointing, as ParallelConfig.activation_checkpointing (DeepSpeed: torch checkpoint per block)."""
TENSOR, EXPERT, WORLD = 2, 2, 4
MASTER_PORT = 29533


@dataclass(frozen=True, kw_only=True)
class StepConfig(common.BenchConfig):
    """bench_dtd_cac's config with this benchmark's sizes: block 0 keeps its dense FFN, block 1's becomes the
    MoE block (MoEConfig.layers="every_other")."""

    n_embd: int = 256
    n_head: int = 4
    num_experts: int = 4
    capacity_factor: float = 1.0
    modes: tuple[str, ...] = MODES
    """Activation checkpointing modes to run."""

    def moe(self) -> tedfx.MoEConfig:
        return replace(super().moe(), layers="every_other")

    def parallel(self, mode: str, **fields: Any) -> tedfx.ParallelConfig:  # type: ignore[override]
        return tedfx.ParallelConfig(tensor=TENSOR, expert=EXPERT, activation_checkpointing=mode,
                                    timeout=common.LAUNCH_TIMEOUT_S, **fields)


FULL = StepConfig()
QUICK = StepConfig(n_embd=64, batch=2, seq=32, warmup_rounds=1, rounds=2)


@dataclass(frozen=True)
class Spec:
    config: StepConfig
    network: str
    result_path: str | None = None


def _name(variant: str, mode: str) -> str:
    return f"{variant}/{mode}"


def run_rank(spec: Spec) -> dict[str, Any] | None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    cfg = spec.config
    rank = dist.get_rank()
    layout = Layout.build(WORLD, cfg.parallel("none"))
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt())
    tokens, targets = common._token_group(cfg, layout, rank)
    runners, chunks_choice = {}, None
    for mode in cfg.modes:
        for variant, fields in TEDFX_VARIANTS.items():  # everything else at tedfx's defaults, check_inputs too
            runners[_name(variant, mode)], pm = common.tedfx_runner(model, tokens, targets, moe=cfg.moe(), lr=cfg.lr,
                                                                    parallel=cfg.parallel(mode, **fields))
            if variant == "tedfx":
                chunks_choice = pm.a2a_chunks_reason
        runners[_name(PEER, mode)] = common.deepspeed_runner(model, tokens, targets, moe=cfg.moe(), tensor=TENSOR,
                                                             expert=EXPERT, checkpoint_blocks=mode == "block",
                                                             lr=cfg.lr)
    rec = common._time_rounds(runners, cfg)
    flops = {name: _step_gflop(runner) for name, runner in runners.items()}
    return {"rank": rank, "runs": rec, "default_a2a_chunks": chunks_choice, "gflop": flops} if rank == 0 else None


def _step_gflop(runner) -> float:
    """GFLOP of one more step on this rank (torch's FLOP counter: the matmuls and attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        runner.step()
    return counter.get_total_flops() / 1e9


def _load_spec(raw: dict) -> Spec:
    return Spec(**{**raw, "config": StepConfig(**{**raw["config"], "modes": tuple(raw["config"]["modes"])})})


def _launch(spec: Spec, cluster: netem.Cluster | None) -> dict[str, Any]:
    if cluster is None:
        return tedfx.launch(run_rank, WORLD, spec, timeout=common.LAUNCH_TIMEOUT_S)[0]
    layout = Layout.build(WORLD, spec.config.parallel("none"))
    return common.launch_emulated(str(Path(__file__).resolve()), spec,
                                  [common.node_of_rank(r, layout) for r in range(WORLD)], cluster, MASTER_PORT,
                                  "bench-step-")


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b (the two ran back to back in each round)."""
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(raw: dict[str, Any], network: str, cfg: StepConfig) -> dict[str, Any]:
    runs = raw["runs"]
    out: dict[str, Any] = {"network": network, "default_a2a_chunks": raw.get("default_a2a_chunks"), "modes": {}}
    for mode in cfg.modes:
        ms = {v: runs[_name(v, mode)]["step_ms"] for v in (*TEDFX_VARIANTS, PEER)}
        cpu = {v: runs[_name(v, mode)]["cpu_ms"] for v in ms}
        row = {v: {"median_ms": statistics.median(t), "min_ms": min(t), "step_ms": t,
                   "median_cpu_ms": statistics.median(cpu[v]), "cpu_ms": cpu[v],
                   "gflop_per_step": raw["gflop"][_name(v, mode)],
                   "losses": runs[_name(v, mode)]["loss"], "comm_per_step": runs[_name(v, mode)]["counts"][-1]}
               for v, t in ms.items()}
        out["modes"][mode] = {
            "variants": row,
            "tedfx_over_deepspeed": _paired(ms["tedfx"], ms[PEER]),
            "tedfx_over_deepspeed_cpu": _paired(cpu["tedfx"], cpu[PEER]),
            "tedfx_over_deepspeed_of_medians": row["tedfx"]["median_ms"] / row[PEER]["median_ms"],
            "tedfx_over_chunks1": _paired(ms["tedfx"], ms["tedfx_chunks1"]),
            "chunks1_over_deepspeed": _paired(ms["tedfx_chunks1"], ms[PEER]),
            "tedfx_losses_max_diff": max(abs(a - b) for a, b in zip(row["tedfx"]["losses"],
                                                                     row["tedfx_chunks1"]["losses"])),
        }
    return out


def print_run(s: dict[str, Any], rate: str | None) -> None:
    where = f"emulated 2-node cluster, {rate} each way" if s["network"] == "emulated" else "loopback"
    print(f"\n== {where}: world 4 = T 2 x X 2 (tensor groups inside a node, expert groups across)")
    print(f"   tedfx's default: {s['default_a2a_chunks']}")
    print(f"   {'checkpointing':<13} {'tedfx ms':>9} {'chunks1 ms':>11} {'deepspeed ms':>13} {'tedfx/ds':>9} "
          f"{'chunks1/ds':>11} {'tedfx/chunks1':>14} {'CPU tedfx/ds':>13} {'GFLOP tedfx, ds':>16}")
    for mode, m in s["modes"].items():
        v = m["variants"]
        print(f"   {mode:<13} {v['tedfx']['median_ms']:>9.0f} {v['tedfx_chunks1']['median_ms']:>11.0f} "
              f"{v[PEER]['median_ms']:>13.0f} {m['tedfx_over_deepspeed']:>8.2f}x {m['chunks1_over_deepspeed']:>10.2f}x "
              f"{m['tedfx_over_chunks1']:>13.2f}x {m['tedfx_over_deepspeed_cpu']:>12.2f}x "
              f"{v['tedfx']['gflop_per_step']:>8.3f}, {v[PEER]['gflop_per_step']:.3f}")
    print("   (medians of the step; ratios are medians over rounds of the paired ratio; < 1 means faster;\n"
          "    CPU: rank 0's process CPU time in the step; GFLOP: rank 0's matmuls and attention in one step)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--network", choices=("loopback", "emulated", "both"), default="both")
    p.add_argument("--rate", default=netem.DEFAULT_RATE)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None, help="n_embd (H)")
    p.add_argument("--ffn-mult", type=int, default=None, help="F = ffn_mult * H")
    p.add_argument("--batch", type=int, default=None, help="sequences per token group")
    p.add_argument("--modes", default=None, help="comma-separated checkpointing modes from none,block")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.worker_main(args.worker, _load_spec, run_rank)
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    cfg = QUICK if args.quick else FULL
    for field, value in (("rounds", args.rounds), ("n_embd", args.hidden), ("ffn_mult", args.ffn_mult),
                         ("batch", args.batch)):
        if value:
            cfg = replace(cfg, **{field: value})
    if args.modes:
        cfg = replace(cfg, modes=tuple(args.modes.split(",")))
    networks, skipped = common._networks("loopback" if args.quick else args.network)
    if skipped:
        print(f"emulated network skipped, running on loopback only: {skipped}")
    print(f"model: nanoGPT n_embd={cfg.n_embd} ffn_mult={cfg.ffn_mult} n_layer={cfg.n_layer} (block 0 dense FFN, "
          f"block 1 MoE: E="
          f"{cfg.num_experts} top-{cfg.top_k} capacity factor {cfg.capacity_factor}); {cfg.batch}x{cfg.seq} tokens "
          f"per token group; fp32; {cfg.rounds} timed rounds after {cfg.warmup_rounds} warm-up")
    summaries = []
    for network in networks:
        with (netem.emulated_cluster(args.rate) if network == "emulated" else contextlib.nullcontext()) as cluster:
            t0, load = time.perf_counter(), os.getloadavg()
            s = summarize(_launch(Spec(cfg, network), cluster), network, cfg)
            s["launch_s"], s["load_average_before_after"] = time.perf_counter() - t0, [load, os.getloadavg()]
            print_run(s, args.rate if cluster else None)
            summaries.append(s)
    name = f"bench_step_vs_deepspeed{'_quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else HERE / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bench_step_vs_deepspeed", "config": asdict(cfg), "rate": args.rate,
                               "emulated_skipped": skipped, "runs": summaries,
                               "env": {"torch": torch.__version__, "python": platform.python_version(),
                                       "cpus": os.cpu_count(), "deepspeed": common._deepspeed_version()}},
                              indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
