"""Training-step time of tedfx's TED model against the baselines a user would otherwise run.

One launch of 4 CPU ranks (gloo) builds every variant from the same seeded dense GPT
(tedfx.models.nanogpt) and times them side by side:

    ddp           the dense GPT under torch.nn.parallel.DistributedDataParallel on all ranks
    ted_T{t}X{x}  tedfx.parallelize with ParallelConfig(tensor=t, expert=x)
    ds_ep{x}      the same GPT with every FFN replaced by deepspeed.moe.layer.MoE(ep_size=x),
                  trained through deepspeed.initialize (fp32, no ZeRO, expert data parallel
                  groups made by DeepSpeed itself)

A step is forward + backward (with gradient sync) + optimizer step (AdamW). Every MoE
variant converts all FFNs with the same E, top-k, capacity factor and min capacity, experts
upcycled from the dense FFN, aux-loss weight 0.01; DeepSpeed's second expert is picked
without Gumbel sampling, as tedfx does. Variants are interleaved across repetitions, each
after warm-up steps and one untimed step after every switch; a step is framed by barriers,
so its time is the slowest rank's. Reported per variant: median step ms, ratios against DDP
and against DeepSpeed with the same X (paired per repetition), tokens/s, parameter bytes per rank, and
communication bytes per step per rank (tedfx: `pm.comm_stats()`; DeepSpeed: its
torch.distributed calls counted during the timed steps; DDP: derived, its C++ reducer
all-reduces every gradient once).

DeepSpeed is optional (`DS_BUILD_OPS=0 pip install deepspeed`); without it the ds columns
are skipped with the reason and the rest runs.

Usage:
    python benchmarks/bench_ted_vs_peers.py            # 4 layers, hidden 256, seq 128, micro-batch 4
    python benchmarks/bench_ted_vs_peers.py --quick    # tiny smoke run
    python benchmarks/bench_ted_vs_peers.py --layouts 1x2 2x2 --ds-ep 2 --repeats 7 --out r.json

Writes benchmarks/results/bench_ted_vs_peers.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tedfx
from tedfx.api import parallelize
from tedfx.models.nanogpt import GPT, GPTConfig
from tedfx.runtime import launch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_ted_vs_peers.json"
AUX_LOSS_COEF = 0.01
"""tedfx's default MoEConfig.aux_loss_coef; DeepSpeed's l_aux is added to the loss with the same weight."""
COUNTED_DIST_OPS = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor",
                    "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, hidden 64, seq 32, one repetition")
    p.add_argument("--nprocs", type=int, default=4)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int)
    p.add_argument("--micro-batch", type=int, help="sequences per token group (data-parallel replica)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--layouts", nargs="+", default=["1x2", "2x2", "1x4"], help="TED layouts TxX")
    p.add_argument("--ds-ep", type=int, nargs="+", default=[2, 4], help="DeepSpeed expert-parallel sizes")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed variants")
    p.add_argument("--warmup", type=int, help="untimed steps per variant before the first repetition")
    p.add_argument("--repeats", type=int, help="interleaved repetitions")
    p.add_argument("--steps", type=int, help="timed steps per variant per repetition")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    quick = args.quick
    defaults = dict(layers=(2, 4), hidden=(64, 256), seq=(32, 128), micro_batch=(2, 4), warmup=(1, 3),
                    repeats=(1, 8), steps=(2, 3))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.layouts = [tuple(int(v) for v in s.lower().split("x")) for s in args.layouts]
    return args


def deepspeed_status(requested: bool) -> tuple[bool, str]:
    """Whether the DeepSpeed variants run, and why not when they don't."""
    if not requested:
        return False, "skipped: --no-deepspeed"
    if importlib.util.find_spec("deepspeed") is None:
        return False, "skipped: deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import deepspeed.moe.layer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure only skips the peer column
        return False, f"skipped: importing deepspeed.moe.layer failed: {type(e).__name__}: {e}"
    return True, "ran"


# --- Per rank ------------------------------------------------------------------------------------


class Variant:
    """One trainable setup on this rank: a step function, its batch and what it reports.

    `comm()` returns cumulative bytes by collective since the variant was built; the timed
    blocks read it before and after, so untimed steps are not counted. `derived_comm` is a
    per-step count computed rather than observed (DDP's reducer runs in C++).
    """

    def __init__(self, name: str, step: Callable[[], None], tokens_per_step: int, module: nn.Module, *,
                 comm: Callable[[], dict[str, int]] = dict, derived_comm: dict[str, int] | None = None,
                 counting: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.name, self.step, self.tokens_per_step, self.module = name, step, tokens_per_step, module
        self.comm, self.derived_comm, self.counting = comm, derived_comm, counting
        self.times: list[float] = []
        self.comm_timed: dict[str, int] = {}


def _batch(cfg: dict, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch of token group `group` (identical on the tensor ranks of a group)."""
    g = torch.Generator().manual_seed(1000 + group)
    xy = torch.randint(0, cfg["vocab"], (cfg["micro_batch"], cfg["seq"] + 1), generator=g)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())  # distinct tensors: tied counts once


def build_ddp(dense: GPT, cfg: dict) -> Variant:
    model = nn.parallel.DistributedDataParallel(copy.deepcopy(dense))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = _batch(cfg, dist.get_rank())

    def step() -> None:
        _ce(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Variant("ddp", step, dist.get_world_size() * x.numel(), model.module,
                   derived_comm={"all_reduce dp backward": _param_bytes(model.module)})


def build_ted(dense: GPT, cfg: dict, tensor: int, expert: int) -> Variant:
    moe = _moe_config(cfg)
    group = dist.get_rank() // tensor  # tensor ranks (consecutive) share their token group
    x, y = _batch(cfg, group)
    # check_inputs=False: the per-call shape check is a safety all-gather the peers do not make.
    pm = parallelize(copy.deepcopy(dense), (x,), moe=moe, parallel=tedfx.ParallelConfig(tensor=tensor, expert=expert),
                     check_inputs=False)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)

    def step() -> None:
        _ce(pm(x), y).backward()  # the MoE aux loss enters the backward inside pm
        opt.step()
        opt.zero_grad(set_to_none=True)

    def comm() -> dict[str, int]:
        return {f"{kind} {axis} {phase}": nbytes for kind, axis, phase, _, nbytes in pm.comm_stats().table()}

    tokens = dist.get_world_size() // tensor * x.numel()
    return Variant(f"ted_T{tensor}X{expert}", step, tokens, pm, comm=comm)


def _moe_config(cfg: dict) -> tedfx.MoEConfig:
    return tedfx.MoEConfig(num_experts=cfg["experts"], top_k=cfg["top_k"], capacity_factor=cfg["capacity_factor"],
                           min_capacity=cfg["min_capacity"], drop_tokens=True, aux_loss_coef=AUX_LOSS_COEF)


class DeepSpeedFFN(nn.Module):
    """A block's FFN as deepspeed.moe.layer.MoE, upcycled from the dense MLP; keeps the last l_aux."""

    def __init__(self, mlp: nn.Module, cfg: dict, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(cfg["hidden"], expert=mlp, num_experts=cfg["experts"], ep_size=ep_size, k=cfg["top_k"],
                       capacity_factor=cfg["capacity_factor"], min_capacity=cfg["min_capacity"], drop_tokens=True,
                       top2_2nd_expert_sampling=False)
        self.l_aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.l_aux, _ = self.moe(x)
        return out


def build_deepspeed(dense: GPT, cfg: dict, ep_size: int) -> Variant:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = copy.deepcopy(dense)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints every group it creates
        for block in model.h:
            block.mlp = DeepSpeedFFN(block.mlp, cfg, ep_size)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "all"})
        opt = torch.optim.AdamW(groups, lr=1e-4)
        ds_config = {"train_micro_batch_size_per_gpu": cfg["micro_batch"], "gradient_accumulation_steps": 1,
                     "steps_per_print": 10**9, "wall_clock_breakdown": False}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    ffns = [b.mlp for b in engine.module.h]
    x, y = _batch(cfg, dist.get_rank())
    counts: dict[str, int] = {}

    def step() -> None:
        loss = _ce(engine(x), y) + AUX_LOSS_COEF * sum(f.l_aux for f in ffns)
        engine.backward(loss)
        engine.step()

    return Variant(f"ds_ep{ep_size}", step, dist.get_world_size() * x.numel(), engine.module,
                   comm=lambda: dict(counts), counting=lambda: _count_dist_calls(counts))


@contextlib.contextmanager
def _count_dist_calls(counts: dict[str, int]):
    """Count the bytes this rank sends into torch.distributed collectives (the CommStats convention).

    DeepSpeed reaches torch.distributed through deepspeed.comm, which looks each function up
    at call time, so replacing the module attributes for the timed steps sees every call.
    """
    originals = {name: getattr(dist, name) for name in COUNTED_DIST_OPS}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            if group is not None and dist.get_world_size(group) == 1:
                return fn(*args, **kwargs)  # sends nothing; CommStats does not count these either
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            # all_to_all_single(output, input), *_into_tensor(output, input): the input is the 2nd tensor.
            sent = tensors[1] if len(tensors) > 1 and name != "all_reduce" else tensors[0] if tensors else None
            key = f"{name} (counted)"
            counts[key] = counts.get(key, 0) + (sent.numel() * sent.element_size() if sent is not None else 0)
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _timed_step(v: Variant) -> float:
    dist.barrier()
    start = time.perf_counter()
    v.step()
    dist.barrier()
    return time.perf_counter() - start


def _timed_block(v: Variant, steps: int) -> None:
    """`steps` timed steps; adds the communication they issued to v.comm_timed."""
    with v.counting():
        before = v.comm()
        for _ in range(steps):
            v.times.append(_timed_step(v))
        after = v.comm()
    for key, nbytes in after.items():
        v.comm_timed[key] = v.comm_timed.get(key, 0) + nbytes - before.get(key, 0)


def rank_main(cfg: dict) -> dict:
    """Build every variant on this rank, warm up, run interleaved timed repetitions; return the raw numbers."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Deep-copying a captured graph's pytree specs warns once per copy on torch 2.13; noise here.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    if cfg["deepspeed"]:
        import deepspeed

        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)  # several ranks share the cores
    torch.manual_seed(0)
    dense = GPT(GPTConfig(n_layer=cfg["layers"], n_embd=cfg["hidden"], n_head=cfg["heads"], block_size=cfg["seq"],
                          vocab_size=cfg["vocab"]))
    variants = [build_ddp(dense, cfg)]
    variants += [build_ted(dense, cfg, t, x) for t, x in cfg["layouts"]]
    if cfg["deepspeed"]:
        variants += [build_deepspeed(dense, cfg, ep) for ep in cfg["ds_ep"]]
    for v in variants:
        for _ in range(cfg["warmup"]):
            v.step()
    for rep in range(cfg["repeats"]):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.step()  # untimed: the first step after a switch pays for cold caches
            _timed_block(v, cfg["steps"])
    out = {}
    for v in variants:
        n = len(v.times)
        comm = dict(v.derived_comm) if v.derived_comm is not None else {k: b // n for k, b in v.comm_timed.items()}
        out[v.name] = {"times": v.times, "tokens_per_step": v.tokens_per_step, "param_bytes": _param_bytes(v.module),
                       "comm_bytes_per_step": comm, "comm_derived": v.derived_comm is not None}
    return out


# --- In the parent -------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _layout(name: str, world: int) -> dict[str, int | None]:
    if name.startswith("ted_T"):
        t, x = (int(v) for v in name.removeprefix("ted_T").split("X"))
    elif name.startswith("ds_ep"):
        t, x = 1, int(name.removeprefix("ds_ep"))
    else:
        t, x = 1, None
    return {"T": t, "X": x, "D": world // (t * (x or 1))}


def aggregate(per_rank: list[dict], world: int, steps_per_rep: int) -> dict[str, dict]:
    """Per variant: step times (slowest rank per step), throughput, bytes, and ratios to DDP and DeepSpeed.

    Ratios are paired: within each repetition the variants ran back to back, so the ratio of
    their medians in that repetition is taken first, then the median over repetitions. That
    cancels most of a slow drift in machine load; ratios of the overall medians are kept too.
    """
    rows: dict[str, dict] = {}
    for name, r0 in per_rank[0].items():
        steps = [max(rank[name]["times"][i] for rank in per_rank) for i in range(len(r0["times"]))]
        median_s = statistics.median(steps)
        rows[name] = {
            **_layout(name, world),
            "step_ms_median": 1e3 * median_s,
            "step_ms_p25": 1e3 * _percentile(steps, 0.25), "step_ms_p75": 1e3 * _percentile(steps, 0.75),
            "timed_steps": len(steps),
            "tokens_per_step": r0["tokens_per_step"],
            "tokens_per_s": r0["tokens_per_step"] / median_s,
            "param_bytes_per_rank": max(rank[name]["param_bytes"] for rank in per_rank),
            "comm_bytes_per_step_rank0": r0["comm_bytes_per_step"],
            "comm_bytes_per_step_total_rank0": sum(r0["comm_bytes_per_step"].values()),
            "comm_source": ("derived" if r0["comm_derived"] else
                            "pm.comm_stats()" if name.startswith("ted_") else "counted torch.distributed calls"),
            "step_ms_samples": [1e3 * s for s in steps],
            "rep_medians_ms": [1e3 * statistics.median(steps[i:i + steps_per_rep])
                               for i in range(0, len(steps), steps_per_rep)],
        }
    for name, row in rows.items():
        peer_name = f"ds_ep{row['X']}" if name.startswith("ted_") and f"ds_ep{row['X']}" in rows else None
        row["deepspeed_peer"] = peer_name
        for label, other in (("ddp", rows["ddp"]), ("deepspeed", rows.get(peer_name) if peer_name else None)):
            if other is None:
                row[f"step_ratio_vs_{label}"] = row[f"throughput_ratio_vs_{label}"] = None
                continue
            paired = statistics.median(a / b for a, b in zip(row["rep_medians_ms"], other["rep_medians_ms"]))
            row[f"step_ratio_vs_{label}"] = paired
            row[f"throughput_ratio_vs_{label}"] = row["tokens_per_step"] / other["tokens_per_step"] / paired
            row[f"step_ratio_vs_{label}_of_medians"] = row["step_ms_median"] / other["step_ms_median"]
    return rows


def notes(args: argparse.Namespace, ds_ran: bool, ds_reason: str, capacity: int) -> list[str]:
    """What was compared, in words, for the printout and the JSON."""
    out = [
        "ddp trains the dense GPT (no MoE): less compute per token than every MoE variant. It is the run a user "
        "would make without MoE, not the same model.",
        f"Every MoE variant: E={args.experts}, top-{args.top_k}, capacity factor {args.capacity_factor}, min capacity "
        f"{args.min_capacity}: {capacity} slots per expert per token group of {args.micro_batch * args.seq} tokens, "
        f"all FFNs converted, experts upcycled, aux-loss weight {AUX_LOSS_COEF}.",
        f"A token group is one micro-batch of {args.micro_batch} x {args.seq}; tensor ranks share theirs, so "
        f"ted with T=2 trains {args.nprocs // 2} token groups per step where the others train {args.nprocs}: "
        "compare tokens/s (throughput ratio), not step time, for T=2.",
        "tedfx: ParallelConfig defaults (fp32, DTD on, no activation checkpointing), check_inputs=False, "
        "torch.optim.AdamW on pm.parameters().",
        f"{args.nprocs} ranks on {os.cpu_count()} CPU cores, one thread each, gloo over loopback: a step's time "
        "includes waiting for a core; communication is memory copies, so this does not model a network.",
    ]
    if ds_ran:
        out += [
            "DeepSpeed: deepspeed.moe.layer.MoE(drop_tokens=True, top2_2nd_expert_sampling=False) in every block, "
            "trained through deepspeed.initialize (fp32, no ZeRO) with torch.optim.AdamW; no mpu, so no tensor "
            "parallelism: ds_ep2 is the peer of both ted_T1X2 and ted_T2X2 (the latter gets the T=2 caveat above).",
            "Routing differs in one detail: DeepSpeed drops over-capacity assignments by position, tedfx by "
            "router probability; capacity and the expert buffers are the same size.",
            "Communication bytes: tedfx from pm.comm_stats(), DeepSpeed from its torch.distributed calls during the "
            "timed steps, DDP derived (one all-reduce of every gradient); bytes a rank sends in, per step.",
        ]
    else:
        out.append(f"DeepSpeed column {ds_reason}.")
    return out


def print_report(rows: dict[str, dict], args: argparse.Namespace, note_lines: list[str], ds_reason: str) -> None:
    mib = 2**20
    print(f"\nGPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, micro-batch "
          f"{args.micro_batch}, {args.nprocs} ranks; median of {rows['ddp']['timed_steps']} timed steps per variant")
    head = (f"{'variant':<10} {'T,X,D':>7} {'step ms':>9} {'p25-p75':>13} {'vs ddp':>7} {'vs ds':>6} "
            f"{'tokens/s':>9} {'tput/ddp':>8} {'tput/ds':>7} {'params MiB':>10} {'comm MiB/step':>13}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        layout = f"{r['T']},{r['X'] or '-'},{r['D']}"
        vs_ds = f"{r['step_ratio_vs_deepspeed']:.2f}" if r["step_ratio_vs_deepspeed"] else "-"
        tput_ds = f"{r['throughput_ratio_vs_deepspeed']:.2f}" if r["throughput_ratio_vs_deepspeed"] else "-"
        comm = r["comm_bytes_per_step_total_rank0"] / mib
        print(f"{name:<10} {layout:>7} {r['step_ms_median']:>9.1f} {r['step_ms_p25']:>6.0f}-{r['step_ms_p75']:<6.0f} "
              f"{r['step_ratio_vs_ddp']:>7.2f} {vs_ds:>6} {r['tokens_per_s']:>9.0f} "
              f"{r['throughput_ratio_vs_ddp']:>8.2f} {tput_ds:>7} {r['param_bytes_per_rank'] / mib:>10.2f} "
              f"{comm:>12.2f}{'*' if r['comm_source'] == 'derived' else ''}")
    print("vs ddp / vs ds: step-time ratios (>1 = slower), tput: tokens/s ratios (>1 = faster); both paired per "
          "repetition, median over repetitions; * derived")
    print("\ncommunication per step, rank 0 (MiB):")
    for name, r in rows.items():
        parts = ", ".join(f"{k} {v / mib:.2f}" for k, v in sorted(r["comm_bytes_per_step_rank0"].items()) if v)
        print(f"  {name:<10} {parts or 'none'}")
    if not ds_reason == "ran":
        print(f"\nDeepSpeed column {ds_reason}")
    print("\nnotes:")
    for line in note_lines:
        print(f"  - {line}")


def main() -> None:
    args = parse_args()
    ds_ran, ds_reason = deepspeed_status(not args.no_deepspeed)
    if not ds_ran:
        print(f"DeepSpeed column {ds_reason}")
    for t, x in args.layouts:
        tedfx.ParallelConfig(tensor=t, expert=x).data_degree(args.nprocs)  # a bad layout fails here, not in a rank
    cfg = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "seq": args.seq,
           "micro_batch": args.micro_batch, "vocab": args.vocab, "experts": args.experts, "top_k": args.top_k,
           "capacity_factor": args.capacity_factor, "min_capacity": args.min_capacity, "layouts": args.layouts,
           "ds_ep": args.ds_ep, "deepspeed": ds_ran, "warmup": args.warmup, "repeats": args.repeats,
           "steps": args.steps}
    load_before = os.getloadavg()
    start = time.perf_counter()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ranks inherit it: no accelerator probing
    per_rank = launch(rank_main, args.nprocs, cfg, timeout=600)
    wall_s = time.perf_counter() - start
    rows = aggregate(per_rank, args.nprocs, args.steps)
    capacity = tedfx.MoEConfig(num_experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                               min_capacity=args.min_capacity).capacity(args.micro_batch * args.seq)
    note_lines = notes(args, ds_ran, ds_reason, capacity)
    print_report(rows, args, note_lines, ds_reason)
    result = {
        "benchmark": "bench_ted_vs_peers",
        "config": {**cfg, "layouts": [f"{t}x{x}" for t, x in args.layouts], "nprocs": args.nprocs},
        "deepspeed": ds_reason,
        "capacity_per_expert": capacity,
        "environment": {"torch": torch.__version__, "tedfx": tedfx.__version__, "python": platform.python_version(),
                        "deepspeed": _version("deepspeed") if ds_ran else None, "cpus": os.cpu_count(),
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "launch_wall_s": wall_s},
        "variants": rows,
        "notes": note_lines,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nload average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; launch took {wall_s:.0f} s")
    print(f"wrote {args.out.relative_to(Path.cwd()) if args.out.is_relative_to(Path.cwd()) else args.out.name}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
