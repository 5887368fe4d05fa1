"""Training step of tedfx with its default settings against DeepSpeed-MoE in TED mode, on one dense + MoE pair.

One launch per network (4 ranks, T=2 x X=2, loopback and an emulated 2-node cluster) builds, from the
same seeded nanoGPT of two blocks (block 0's FFN dense, block 1's an MoE block: H=256, F=1024, E=4, top-2,
capacity factor 1.0, 4 x 128 = 512 tokens per token group, fp32), with and without block activation
checkpointing:

    tedfx           tedfx.parallelize(model, ..., ParallelConfig(tensor=2, expert=2)) as a user gets it:
                    DTD on, CAC on, `check_inputs` at its default (on), a2a_chunks=1
    tedfx_chunks2   the same with ParallelConfig(a2a_chunks=2): the expert all-to-alls pipelined with expert
                    compute in 2 chunks of the capacity
    deepspeed       deepspeed.moe.layer.MoE in TED mode (benchmarks/peers.py: Megatron mpu, expert tensor
                    parallelism, Megatron attention and MLP, DeepSpeed's own DTD, no CAC), gradients averaged
                    as DeepSpeed's engine does

A step is zero_grad, forward, backward with the gradient sync, AdamW step, between barriers; the six
variants take turns step by step in a rotating order. Reported per checkpointing mode: median step ms,
the paired ratio tedfx / deepspeed (per round, then the median), and tedfx_chunks2 / tedfx.

Usage:
    python benchmarks/bench_step_vs_deepspeed.py                 # loopback and emulated (root needed)
    python benchmarks/bench_step_vs_deepspeed.py --network loopback --rounds 6
    python benchmarks/bench_step_vs_deepspeed.py --quick         # smoke run, loopback

Writes benchmarks/results/bench_step_vs_deepspeed.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tedfx
from tedfx.models.nanogpt import GPT, GPTConfig
from tedfx.runtime.mesh import Layout

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # peers, netem and bench_dtd_cac sit next to this script, also in launched ranks

import bench_dtd_cac as common  # noqa: E402, I001 - after the sys.path line above
import netem  # noqa: E402

TEDFX_VARIANTS: dict[str, dict[str, Any]] = {"tedfx": {}, "tedfx_chunks2": {"a2a_chunks": 2}}
"""tedfx variants: ParallelConfig fields beyond the layout and the checkpointing mode (none: the defaults)."""
PEER = "deepspeed"
MODES = ("none", "block")
"""Activation checkpointing, as ParallelConfig.activation_checkpointing (DeepSpeed: torch checkpoint per block)."""
TENSOR, EXPERT, WORLD = 2, 2, 4
MASTER_PORT = 29533


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    n_embd: int = 256
    n_head: int = 4
    n_layer: int = 2
    """Block 0 keeps its dense FFN, block 1's becomes the MoE block (MoEConfig.layers="every_other")."""
    ffn_mult: int = 4
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.0
    batch: int = 4
    seq: int = 128
    warmup_rounds: int = 2
    rounds: int = 8
    lr: float = 1e-4
    seed: int = 0
    modes: tuple[str, ...] = MODES
    """Activation checkpointing modes to run."""

    def gpt(self) -> GPTConfig:
        return GPTConfig(block_size=self.seq, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         ffn_mult=self.ffn_mult)

    def moe(self) -> tedfx.MoEConfig:
        return tedfx.MoEConfig(num_experts=self.num_experts, top_k=self.top_k, capacity_factor=self.capacity_factor,
                               layers="every_other", seed=self.seed)

    def parallel(self, mode: str, **fields: Any) -> tedfx.ParallelConfig:
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


def _tedfx_runner(model: GPT, cfg: StepConfig, mode: str, fields: dict, tokens, targets) -> common._Runner:
    pm = tedfx.parallelize(model, (tokens,), moe=cfg.moe(), parallel=cfg.parallel(mode, **fields))
    opt = torch.optim.AdamW(pm.parameters(), lr=cfg.lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        return loss.item()

    stats = pm.comm_stats()
    return common._Runner(step, stats.reset, lambda: [list(row) for row in stats.table()])


def _deepspeed_runner(model: GPT, cfg: StepConfig, mode: str, tokens, targets) -> common._Runner:
    import peers

    with contextlib.redirect_stdout(io.StringIO()):
        ds = peers.build_deepspeed_moe(model, moe=cfg.moe(), tensor=TENSOR, expert=EXPERT,
                                       checkpoint_blocks=mode == "block")
    opt = torch.optim.AdamW(ds.parameters(), lr=cfg.lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits, aux = ds(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        (loss + aux).backward()
        peers.sync_gradients(ds)
        opt.step()
        return loss.item()

    counts = peers.all_to_all_counts
    return common._Runner(step, counts.reset, lambda: {"calls": counts.calls, "bytes": counts.nbytes})


def run_rank(spec: Spec) -> dict[str, Any] | None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    cfg = spec.config
    rank = dist.get_rank()
    layout = Layout.build(WORLD, cfg.parallel("none"))
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt())
    tokens, targets = common._token_group(cfg, layout, rank)
    runners = {}
    for mode in cfg.modes:
        for variant, fields in TEDFX_VARIANTS.items():
            runners[_name(variant, mode)] = _tedfx_runner(model, cfg, mode, fields, tokens, targets)
        runners[_name(PEER, mode)] = _deepspeed_runner(model, cfg, mode, tokens, targets)
    rec = common._time_rounds(runners, cfg)
    return {"rank": rank, "runs": rec} if rank == 0 else None


def _worker_main(spec_path: str) -> None:
    with open(spec_path) as fh:
        raw = json.load(fh)
    spec = Spec(**{**raw, "config": StepConfig(**{**raw["config"], "modes": tuple(raw["config"]["modes"])})})
    tedfx.init_distributed(timeout=common.LAUNCH_TIMEOUT_S, backend="gloo")
    try:
        result = run_rank(spec)
        if result is not None:
            tmp = spec.result_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(result, fh)
            os.replace(tmp, spec.result_path)
    finally:
        dist.destroy_process_group()


def _launch(spec: Spec, cluster: netem.Cluster | None) -> dict[str, Any]:
    if cluster is None:
        return tedfx.launch(run_rank, WORLD, spec, timeout=common.LAUNCH_TIMEOUT_S)[0]
    layout = Layout.build(WORLD, spec.config.parallel("none"))
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        spec = replace(spec, result_path=os.path.join(tmp, "result.json"))
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as fh:
            json.dump(asdict(spec), fh)
        netem.run_ranks(cluster, [sys.executable, str(Path(__file__).resolve()), "--worker", spec_path],
                        [common.node_of_rank(r, layout) for r in range(WORLD)], master_port=MASTER_PORT,
                        timeout_s=common.LAUNCH_TIMEOUT_S, log_dir=tmp)
        with open(spec.result_path) as fh:
            return json.load(fh)


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b (the two ran back to back in each round)."""
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(raw: dict[str, Any], network: str, cfg: StepConfig) -> dict[str, Any]:
    runs = raw["runs"]
    out: dict[str, Any] = {"network": network, "modes": {}}
    for mode in cfg.modes:
        ms = {v: runs[_name(v, mode)]["step_ms"] for v in (*TEDFX_VARIANTS, PEER)}
        row = {v: {"median_ms": statistics.median(t), "min_ms": min(t), "step_ms": t,
                   "losses": runs[_name(v, mode)]["loss"], "comm_per_step": runs[_name(v, mode)]["counts"][-1]}
               for v, t in ms.items()}
        out["modes"][mode] = {
            "variants": row,
            "tedfx_over_deepspeed": _paired(ms["tedfx"], ms[PEER]),
            "tedfx_over_deepspeed_of_medians": row["tedfx"]["median_ms"] / row[PEER]["median_ms"],
            "chunks2_over_tedfx": _paired(ms["tedfx_chunks2"], ms["tedfx"]),
            "chunks2_over_deepspeed": _paired(ms["tedfx_chunks2"], ms[PEER]),
            "tedfx_losses_max_diff": max(abs(a - b) for a, b in zip(row["tedfx"]["losses"],
                                                                     row["tedfx_chunks2"]["losses"])),
        }
    return out


def print_run(s: dict[str, Any], rate: str | None) -> None:
    where = f"emulated 2-node cluster, {rate} each way" if s["network"] == "emulated" else "loopback"
    print(f"\n== {where}: world 4 = T 2 x X 2 (tensor groups inside a node, expert groups across)")
    print(f"   {'checkpointing':<13} {'tedfx ms':>9} {'chunks2 ms':>11} {'deepspeed ms':>13} {'tedfx/ds':>9} "
          f"{'chunks2/ds':>11} {'chunks2/tedfx':>14}")
    for mode, m in s["modes"].items():
        v = m["variants"]
        print(f"   {mode:<13} {v['tedfx']['median_ms']:>9.0f} {v['tedfx_chunks2']['median_ms']:>11.0f} "
              f"{v[PEER]['median_ms']:>13.0f} {m['tedfx_over_deepspeed']:>8.2f}x {m['chunks2_over_deepspeed']:>10.2f}x "
              f"{m['chunks2_over_tedfx']:>13.2f}x")
    print("   (medians of the step; ratios are medians over rounds of the paired ratio; < 1 means faster)")


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
        _worker_main(args.worker)
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
