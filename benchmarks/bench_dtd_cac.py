"""DTD and CAC: what TED's two communication optimizations buy, next to DeepSpeed-MoE.

For each (network, world size) one launch runs, side by side on the same ranks, a
nanoGPT MoE trained with `tedfx.parallelize` in three variants and DeepSpeed-MoE as
the peer, all with block activation checkpointing (so that CAC has work to save):

    baseline   dtd=False, cac=False   all-to-alls carry the T-fold duplicated tokens, 6 per MoE layer
    dtd        dtd=True,  cac=False   each tensor rank sends 1/T of the capacity: all-to-all bytes / T
    dtd+cac    dtd=True,  cac=True    recomputation reuses the saved all-to-all outputs: 4 per MoE layer
    cac        dtd=False, cac=True    CAC alone
    auto+cac   dtd="auto", cac=True   DTD decided from the nodes (LOCAL_WORLD_SIZE, as torchrun sets it): on
               the emulated cluster the expert groups cross nodes (on), on loopback all is one node (off);
               it should never be slower than the better of dtd+cac and cac
    deepspeed  DeepSpeed-MoE in TED mode (Megatron mpu, expert tensor parallelism); it always
               drops duplicate tokens with T > 1 and has no CAC

Settings other than a user's defaults, the same for every tedfx variant: block activation
checkpointing (above), `check_inputs=False` (the per-call input check is one more collective) and
`a2a_chunks=1` (the default "auto" chunks the all-to-alls across the emulated nodes, which would
mix overlap into what DTD and CAC buy). bench_step_vs_deepspeed.py measures the defaults.

A step is zero_grad, forward, backward (with the data-parallel gradient sync) and an
AdamW step, between two barriers. The variants take turns step by step, in a rotating
order, so drift in the machine's speed hits all alike; the table reports medians.
Each tedfx variant's collectives per step (rank 0, from `pm.comm_stats()`) are
checked against `tedfx.explain`'s prediction, call for call and byte for byte.

Two networks:
  loopback   all ranks on the host's loopback: every link is a memory copy, so moving
             fewer bytes saves little and DTD's extra all-gather can cost more than it saves;
  emulated   two "nodes" (network namespaces, benchmarks/netem.py) joined by a veth limited
             to --rate each way; tensor groups inside a node, expert groups across nodes, as
             in the paper. Here the expert all-to-alls cross the slow link, and DTD and CAC
             cut exactly that traffic. Needs root and iproute2; otherwise it is skipped and
             the output says why.

Usage:
    python benchmarks/bench_dtd_cac.py                         # both networks, worlds 4 and 8
    python benchmarks/bench_dtd_cac.py --quick                 # small model, few steps, world 4
    python benchmarks/bench_dtd_cac.py --network emulated --rate 1gbit --worlds 8

Results: tables on stdout, JSON in benchmarks/results/bench_dtd_cac.json
(bench_dtd_cac_quick.json with --quick).
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
from collections.abc import Callable
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
sys.path.insert(0, str(HERE))  # peers and netem sit next to this script, also in launched ranks

import netem  # noqa: E402 - after the sys.path line above

VARIANTS: dict[str, dict[str, bool | str]] = {
    "baseline": {"dtd": False, "cac": False},
    "dtd": {"dtd": True, "cac": False},
    "dtd+cac": {"dtd": True, "cac": True},
    "cac": {"dtd": False, "cac": True},
    "auto+cac": {"dtd": "auto", "cac": True},
}
PEER = "deepspeed"
LAYOUTS: dict[int, tuple[int, int]] = {4: (2, 2), 8: (2, 4)}
"""World size -> (T, X); D = world / (T * X). World 8 uses X = 4 so that expert groups span both nodes."""
MASTER_PORT = 29531
"""Rank 0's port on the emulated node A (a fresh namespace: nothing else listens there)."""
LAUNCH_TIMEOUT_S = 1800.0
MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Model, routing and timing of every launch."""

    n_embd: int = 512
    n_head: int = 8
    n_layer: int = 2
    """Few layers, every FFN an MoE block: the all-to-alls are a large share of the step."""
    ffn_mult: int = 4
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    batch: int = 4
    """Sequences per token group (one data-parallel replica's micro-batch)."""
    seq: int = 128
    warmup_rounds: int = 2
    """Rounds (one step of every variant) not timed: first-call allocations and thread start-up."""
    rounds: int = 8
    """Timed rounds; each variant's step time is the median over them."""
    lr: float = 1e-4
    seed: int = 0

    def gpt(self) -> GPTConfig:
        return GPTConfig(block_size=self.seq, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         ffn_mult=self.ffn_mult)

    def moe(self) -> tedfx.MoEConfig:
        return tedfx.MoEConfig(num_experts=self.num_experts, top_k=self.top_k,
                               capacity_factor=self.capacity_factor, layers="all", seed=self.seed)

    def parallel(self, tensor: int, expert: int, variant: str) -> tedfx.ParallelConfig:
        # a2a_chunks=1: the variants differ in DTD and CAC alone (a2a_chunks="auto" would chunk across nodes).
        return tedfx.ParallelConfig(tensor=tensor, expert=expert, activation_checkpointing="block",
                                    timeout=LAUNCH_TIMEOUT_S, a2a_chunks=1, **VARIANTS[variant])


FULL = BenchConfig()
QUICK = BenchConfig(n_embd=128, n_head=4, num_experts=4, batch=2, seq=64, warmup_rounds=1, rounds=2)


@dataclass(frozen=True)
class RunSpec:
    """One launch: which world and layout, on which network; plain data, sent to every rank."""

    config: BenchConfig
    world: int
    tensor: int
    expert: int
    network: str
    result_path: str | None = None
    """Emulated runs: where rank 0 writes its result (the ranks are not children of a launch)."""


# --- On every rank --------------------------------------------------------------------------------


@dataclass
class _Runner:
    """One model under test on this rank: a training step and its communication counters."""

    step: Callable[[], float]
    reset_counts: Callable[[], None]
    counts: Callable[[], Any]


def _token_group(cfg: BenchConfig, layout: Layout, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch: one per data-parallel replica (d, x), the same on its T tensor ranks."""
    c = layout.coords(rank)
    g = torch.Generator().manual_seed(1000 + c["edp"] * layout.expert + c["ep"])
    vocab = cfg.gpt().vocab_size
    tokens = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=g)
    targets = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=g)
    return tokens, targets


def tedfx_runner(model: GPT, tokens, targets, *, moe: tedfx.MoEConfig, parallel: tedfx.ParallelConfig, lr: float,
                 **parallelize_kwargs: Any) -> tuple[_Runner, Any]:
    """A training step of `tedfx.parallelize(model, ...)` with AdamW, and its ParallelModule."""
    pm = tedfx.parallelize(model, (tokens,), moe=moe, parallel=parallel, **parallelize_kwargs)
    opt = torch.optim.AdamW(pm.parameters(), lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten())
        loss.backward()  # MoE aux loss included; gradients averaged over the data-parallel groups
        opt.step()
        return loss.item()

    stats = pm.comm_stats()
    return _Runner(step, stats.reset, lambda: [list(row) for row in stats.table()]), pm


def deepspeed_runner(model: GPT, tokens, targets, *, moe: tedfx.MoEConfig, tensor: int, expert: int,
                     checkpoint_blocks: bool, lr: float) -> _Runner:
    """A training step of the same GPT on DeepSpeed-MoE (peers.py), gradients averaged as its engine does."""
    import peers

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its group creation on every rank
        ds = peers.build_deepspeed_moe(model, moe=moe, tensor=tensor, expert=expert,
                                       checkpoint_blocks=checkpoint_blocks)
    opt = torch.optim.AdamW(ds.parameters(), lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits, aux = ds(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        (loss + aux).backward()
        peers.sync_gradients(ds)
        opt.step()
        return loss.item()

    counts = peers.all_to_all_counts
    return _Runner(step, counts.reset, lambda: {"calls": counts.calls, "bytes": counts.nbytes})


def _probe_links(groups: dict[str, dist.ProcessGroup], repeats: int = 5) -> dict[str, float]:
    """Median ms of a 1 MiB all-to-all over "ep" (across nodes when emulated) and all-reduce over "tp"."""
    x = torch.ones(MiB // 4)
    out = {}
    for name, axis, op in (("all_to_all_1MiB_ep_ms", "ep", "a2a"), ("all_reduce_1MiB_tp_ms", "tp", "ar")):
        group = groups.get(axis)
        if group is None or dist.get_world_size(group) == 1:
            continue
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            if op == "a2a":
                dist.all_to_all_single(torch.empty_like(x), x, group=group)
            else:
                dist.all_reduce(x.clone(), group=group)
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def _time_rounds(runners: dict[str, _Runner], cfg: BenchConfig) -> dict[str, dict[str, list]]:
    """Every runner steps once per round, in an order rotated each round; barriers around each step.

    Records the step's wall time and this rank's process CPU time (on loopback, where the ranks share the
    cores, the step is about the ranks' CPU divided by the cores)."""
    names = list(runners)
    rec = {n: {"step_ms": [], "cpu_ms": [], "loss": [], "counts": []} for n in names}
    for r in range(cfg.warmup_rounds + cfg.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runner = runners[name]
            runner.reset_counts()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = runner.step()
            c1 = time.process_time()  # CPU of this rank's process (all its threads) in the step
            dist.barrier()
            ms = (time.perf_counter() - t0) * 1e3
            if r >= cfg.warmup_rounds:
                rec[name]["step_ms"].append(ms)
                rec[name]["cpu_ms"].append((c1 - c0) * 1e3)
                rec[name]["loss"].append(loss)
                rec[name]["counts"].append(runner.counts())
    return rec


def run_rank(spec: RunSpec) -> dict[str, Any] | None:
    """Build every variant and the peer on this rank, time them; rank 0 returns the record."""
    # torch 2.13 warns on every deep copy of an exported graph (its pytree LeafSpec is deprecated).
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    cfg = spec.config
    rank = dist.get_rank()
    layout = Layout.build(spec.world, cfg.parallel(spec.tensor, spec.expert, "baseline"))
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt())  # same weights on every rank
    tokens, targets = _token_group(cfg, layout, rank)
    runners, build_s = {}, {}
    dtd_auto = None
    pm = None
    for variant in VARIANTS:
        t0 = time.perf_counter()
        runners[variant], pm = tedfx_runner(model, tokens, targets, moe=cfg.moe(), lr=cfg.lr,
                                            parallel=cfg.parallel(spec.tensor, spec.expert, variant),
                                            check_inputs=False)  # the per-call shape check is an extra collective
        build_s[variant] = time.perf_counter() - t0
        if VARIANTS[variant]["dtd"] == "auto":
            dtd_auto = pm.dtd_reason
    t0 = time.perf_counter()
    runners[PEER] = deepspeed_runner(model, tokens, targets, moe=cfg.moe(), tensor=spec.tensor, expert=spec.expert,
                                     checkpoint_blocks=True, lr=cfg.lr)
    build_s[PEER] = time.perf_counter() - t0
    probe = _probe_links(pm.mesh.groups())
    rec = _time_rounds(runners, cfg)
    return {"rank": rank, "build_s": build_s, "probe": probe, "runs": rec, "dtd_auto": dtd_auto} if rank == 0 else None


def worker_main(spec_path: str, load_spec: Callable[[dict], Any], run: Callable[[Any], Any]) -> None:
    """Entry of a rank started by hand in an emulated node (RANK, WORLD_SIZE, ... from the environment): runs
    `run(spec)` and writes rank 0's result where the spec's `result_path` says."""
    with open(spec_path) as fh:
        spec = load_spec(json.load(fh))
    tedfx.init_distributed(timeout=LAUNCH_TIMEOUT_S, backend="gloo")
    try:
        result = run(spec)
        if result is not None:
            tmp = spec.result_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(result, fh)
            os.replace(tmp, spec.result_path)
    finally:
        dist.destroy_process_group()


def _worker_main(spec_path: str) -> None:
    worker_main(spec_path, lambda raw: RunSpec(**{**raw, "config": BenchConfig(**raw["config"])}), run_rank)


# --- Launching ---------------------------------------------------------------------------------


def node_of_rank(rank: int, layout: Layout) -> int:
    """0 (node A) or 1 (node B): the lower half of the expert indices on A, the upper half on B.

    A tensor group (consecutive ranks, one x) stays inside a node; every expert group
    (fixed d and t, x varying) spans both nodes, as in the paper.
    """
    return 0 if layout.coords(rank)["ep"] < layout.expert // 2 else 1


def _launch_loopback(spec: RunSpec) -> dict[str, Any]:
    results = tedfx.launch(run_rank, spec.world, spec, timeout=LAUNCH_TIMEOUT_S)
    return results[0]


def launch_emulated(script: str, spec: Any, nodes: list[int], cluster: netem.Cluster, master_port: int,
                    prefix: str) -> dict[str, Any]:
    """Start rank r of `script --worker SPEC` in node `nodes[r]`'s namespace (torchrun's environment) and return
    rank 0's result. `spec` is a dataclass with a `result_path` field."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        spec = replace(spec, result_path=os.path.join(tmp, "result.json"))
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as fh:
            json.dump(asdict(spec), fh)
        netem.run_ranks(cluster, [sys.executable, script, "--worker", spec_path], nodes, master_port=master_port,
                        timeout_s=LAUNCH_TIMEOUT_S, log_dir=tmp)
        with open(spec.result_path) as fh:
            return json.load(fh)


def _launch_emulated(spec: RunSpec, cluster: netem.Cluster) -> dict[str, Any]:
    layout = Layout.build(spec.world, spec.config.parallel(spec.tensor, spec.expert, "baseline"))
    if layout.expert % 2:
        raise ValueError(f"X={layout.expert} is odd: the emulated cluster splits every expert group over 2 nodes.")
    return launch_emulated(str(Path(__file__).resolve()), spec, [node_of_rank(r, layout) for r in range(spec.world)],
                           cluster, MASTER_PORT, "bench-dtd-cac-")


# --- Prediction and summary ------------------------------------------------------------------------


def predict(cfg: BenchConfig, world: int, tensor: int, expert: int, ranks_per_node: int) -> dict[str, list[list]]:
    """Rank 0's collectives per step for each variant, as `tedfx.explain` predicts them without processes
    (dtd="auto" resolved for nodes of `ranks_per_node` ranks, as the launched ranks resolve it)."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt())
    tokens = torch.zeros(cfg.batch, cfg.seq, dtype=torch.long)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for variant in VARIANTS:
            parallel = replace(cfg.parallel(tensor, expert, variant), ranks_per_node=ranks_per_node)
            report = tedfx.explain(model, (tokens,), moe=cfg.moe(), parallel=parallel, world_size=world)
            out[variant] = [list(row) for row in report.comm_table]
    return out


def _a2a(table: list[list]) -> tuple[int, int]:
    """(calls, bytes) of the all-to-alls in a comm table."""
    rows = [r for r in table if r[0] == "all_to_all"]
    return sum(r[3] for r in rows), sum(r[4] for r in rows)


def _cross_node_a2a_bytes(a2a_bytes: int, layout: Layout) -> float:
    """Bytes of one rank's all-to-all input that leave its node: the share of its ep group on the other node."""
    return a2a_bytes * (layout.expert // 2) / layout.expert


def summarize(raw: dict[str, Any], predicted: dict[str, list[list]], spec: RunSpec,
              rate_mbit: float | None) -> dict[str, Any]:
    """Medians, speedups, per-step communication and the explain() check of one launch."""
    runs = raw["runs"]
    layout = Layout.build(spec.world, spec.config.parallel(spec.tensor, spec.expert, "baseline"))
    base_ms = statistics.median(runs["baseline"]["step_ms"])
    base_min = min(runs["baseline"]["step_ms"])
    variants = {}
    for name in (*VARIANTS, PEER):
        rec = runs[name]
        med = statistics.median(rec["step_ms"])
        q1, _, q3 = statistics.quantiles(rec["step_ms"], n=4) if len(rec["step_ms"]) > 1 else [med] * 3
        row = {"median_ms": med, "p25_ms": q1, "p75_ms": q3, "min_ms": min(rec["step_ms"]), "step_ms": rec["step_ms"],
               "speedup_vs_baseline": base_ms / med, "speedup_vs_baseline_min": base_min / min(rec["step_ms"]),
               "first_loss": rec["loss"][0], "losses": rec["loss"]}
        if name in VARIANTS:
            table = rec["counts"][-1]
            calls, nbytes = _a2a(table)
            row.update(comm_per_step=table, comm_constant=all(c == table for c in rec["counts"]),
                       predicted=predicted[name], matches_explain=table == predicted[name],
                       a2a_calls=calls, a2a_bytes=nbytes)
        else:
            c = rec["counts"][-1]
            row.update(a2a_calls=c["calls"], a2a_bytes=c["bytes"], comm_constant=all(x == c for x in rec["counts"]),
                       mode=(f"TED mode: Megatron mpu (T={spec.tensor}), expert tensor parallelism, "
                             f"DeepSpeed's own DTD, no CAC" if spec.tensor > 1 else "expert parallelism only"))
        if rate_mbit:
            # Both tensor ranks of a group send their share at once, nodes have world/2 ranks: bytes per direction.
            per_direction = _cross_node_a2a_bytes(row["a2a_bytes"], layout) * spec.world / 2
            row["a2a_cross_node_ms_at_link_rate"] = per_direction * 8 / (rate_mbit * 1e6) * 1e3
        variants[name] = row
    tedfx_losses = [runs[v]["loss"] for v in VARIANTS]
    return {
        "network": spec.network, "world": spec.world, "layout": str(layout),
        "tensor": spec.tensor, "expert": spec.expert, "data": layout.data,
        "nodes": ([[r for r in range(spec.world) if node_of_rank(r, layout) == n] for n in (0, 1)]
                  if spec.network == "emulated" else None),
        "probe": raw["probe"], "build_s": raw["build_s"], "variants": variants,
        "dtd_speedup": variants["dtd"]["speedup_vs_baseline"],
        "dtd_auto": raw.get("dtd_auto"),
        "auto_over_best_of_on_off": variants["auto+cac"]["median_ms"] / min(variants["dtd+cac"]["median_ms"],
                                                                             variants["cac"]["median_ms"]),
        "dtd_cac_speedup": variants["dtd+cac"]["speedup_vs_baseline"],
        "deepspeed_over_dtd_cac": variants[PEER]["median_ms"] / variants["dtd+cac"]["median_ms"],
        "tedfx_variants_loss_max_diff": max(abs(a - b) for ls in zip(*tedfx_losses) for a in ls for b in ls),
    }


# --- Output ---------------------------------------------------------------------------------------


def _fmt_mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.2f}"


def print_run(s: dict[str, Any], rate: str | None) -> None:
    where = f"emulated 2-node cluster, {rate} each way between nodes" if s["network"] == "emulated" else "loopback"
    print(f"\n== {where}: world {s['world']} = T {s['tensor']} x X {s['expert']} x D {s['data']}")
    if s["nodes"]:
        print(f"   node A ranks {s['nodes'][0]}, node B ranks {s['nodes'][1]} (tensor groups inside a node, "
              f"expert groups across)")
    probe = ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in s["probe"].items())
    print(f"   link probe (median of 5): {probe}")
    (before, _, _), (after, _, _) = s["load_average_before_after"]
    print(f"   1-min load average {before:.1f} before, {after:.1f} after ({os.cpu_count()} CPUs)")
    head = (f"   {'variant':<10} {'median ms':>9} {'p25-p75':>13} {'speedup':>8} {'min ms':>7} {'speedup':>8} "
            f"{'a2a calls':>10} {'a2a MiB':>8}  {'= explain':<9} loss@1")
    print(head)
    for name, v in s["variants"].items():
        check = ("yes" if v["matches_explain"] else "NO") if "matches_explain" in v else "-"
        spread = f"{v['p25_ms']:.0f}-{v['p75_ms']:.0f}"
        print(f"   {name:<10} {v['median_ms']:>9.0f} {spread:>13} {v['speedup_vs_baseline']:>7.2f}x "
              f"{v['min_ms']:>7.0f} {v['speedup_vs_baseline_min']:>7.2f}x "
              f"{v['a2a_calls']:>10} {_fmt_mib(v['a2a_bytes']):>8}  {check:<9} {v['first_loss']:.4f}")
    print("   (per step; speedup = baseline / variant, of medians and of minima; the minimum is the step least\n"
          "   disturbed by other load. a2a calls and MiB: rank 0's all-to-alls, bytes it feeds into them)")
    print(f"   deepspeed: {s['variants'][PEER]['mode']}; its step / tedfx dtd+cac step = "
          f"{s['deepspeed_over_dtd_cac']:.2f}")
    print(f"   {s['dtd_auto']}; auto+cac step / best of dtd+cac and cac = {s['auto_over_best_of_on_off']:.2f}")
    print(f"   tedfx variants' losses agree to {s['tedfx_variants_loss_max_diff']:.1e} (DTD and CAC change no numbers)")
    for name, v in s["variants"].items():
        if name in VARIANTS and not v["matches_explain"]:
            print(f"   {name}: measured {v['comm_per_step']} != explain {v['predicted']}")
    _print_why(s)


def _print_why(s: dict[str, Any]) -> None:
    base = s["variants"]["baseline"]
    if s["network"] == "emulated":
        t = base["a2a_cross_node_ms_at_link_rate"]
        print(f"   communication matters here: the baseline feeds {_fmt_mib(base['a2a_bytes'])} MiB per rank per step "
              f"into all-to-alls, half of it for the other node: >= {t:.0f} ms of transfer per step at the link rate, "
              f"{100 * t / base['median_ms']:.0f}% of its median step. DTD divides those bytes by T, CAC the calls "
              f"from 6 to 4 per MoE layer; the rest is compute on shared cores, in-node tensor collectives and the "
              f"cross-node gradient all-reduce.")
    else:
        print("   on loopback every link is a memory copy made by the cores that also compute: all-to-all bytes are "
              "cheap, and DTD trades each expert all-reduce for an all-gather plus a reduce-scatter (more calls).")


def print_summary(summaries: list[dict[str, Any]]) -> None:
    print("\n== Summary: median step ms (speedup vs baseline of medians / of minima)")
    names = ("dtd", "dtd+cac", "cac", "auto+cac", PEER)
    print(f"   {'network':<9} {'world':>5} {'layout':<10} {'baseline':>9} " + " ".join(f"{n:>21}" for n in names)
          + "  auto / best of on, off")
    for s in summaries:
        v = s["variants"]
        cells = [f"{v[n]['median_ms']:.0f} ({v[n]['speedup_vs_baseline']:.2f}x/{v[n]['speedup_vs_baseline_min']:.2f}x)"
                 for n in names]
        layout = f"T{s['tensor']} X{s['expert']} D{s['data']}"
        print(f"   {s['network']:<9} {s['world']:>5} {layout:<10} {v['baseline']['median_ms']:>9.0f} "
              + " ".join(f"{c:>21}" for c in cells) + f"  {s['auto_over_best_of_on_off']:.2f}")


# --- Main -----------------------------------------------------------------------------------------


def _rate_mbit(rate: str) -> float:
    units = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
    for unit in sorted(units, key=len, reverse=True):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * units[unit]
    raise ValueError(f"rate={rate!r}: expected a tc rate such as '200mbit'.")


def _networks(requested: str) -> tuple[list[str], str | None]:
    """The networks to run and, when the emulated one must be skipped, why (loopback then runs in its place)."""
    wanted = ["loopback", "emulated"] if requested == "both" else [requested]
    reason = netem.unavailable_reason() if "emulated" in wanted else None
    if reason:
        wanted = ["loopback"]
    return wanted, reason


def _wait_for_quiet(threshold: float, max_wait_s: float) -> None:
    """Wait until the 1-minute load average is below `threshold` (other jobs on a shared machine).

    Waits at most `max_wait_s`.
    """
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    if load >= threshold:
        print(f"   waiting for the 1-min load average ({load:.1f}) to fall below {threshold} ...", flush=True)
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(10)
        load = os.getloadavg()[0]


def run_all(cfg: BenchConfig, worlds: list[int], networks: list[str], rate: str,
            quiet_load: float | None = None, max_wait_s: float = 600.0) -> list[dict[str, Any]]:
    summaries = []
    for network in networks:
        with (netem.emulated_cluster(rate) if network == "emulated" else contextlib.nullcontext()) as cluster:
            if cluster is not None:
                print(f"\nemulated cluster up: {cluster.describe()}")
            for world in worlds:
                spec = RunSpec(cfg, world, *LAYOUTS[world], network=network)
                if quiet_load is not None:
                    _wait_for_quiet(quiet_load, max_wait_s)
                t0, load_before = time.perf_counter(), os.getloadavg()
                raw = _launch_emulated(spec, cluster) if cluster else _launch_loopback(spec)
                predicted = predict(cfg, world, *LAYOUTS[world], ranks_per_node=world // 2 if cluster else world)
                s = summarize(raw, predicted, spec, _rate_mbit(rate) if cluster else None)
                s["launch_s"] = time.perf_counter() - t0
                s["load_average_before_after"] = [load_before, os.getloadavg()]
                print_run(s, rate if cluster else None)
                summaries.append(s)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 timed rounds, world 4: a smoke run")
    parser.add_argument("--network", choices=("loopback", "emulated", "both"), default="both")
    parser.add_argument("--rate", default=netem.DEFAULT_RATE, help="emulated inter-node rate each way (tc syntax)")
    parser.add_argument("--worlds", default=None, help="comma-separated world sizes from 4, 8 (default: 4,8; quick: 4)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_dtd_cac[_quick].json)")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each launch wait (up to --max-wait s) for the 1-min load average to fall "
                              "below this")
    parser.add_argument("--max-wait", type=float, default=600.0, help="longest wait for --quiet-load, s")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return 0
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also through a pipe
    cfg = QUICK if args.quick else FULL
    if args.rounds:
        cfg = replace(cfg, rounds=args.rounds)
    worlds = [int(w) for w in (args.worlds or ("4" if args.quick else "4,8")).split(",")]
    bad = [w for w in worlds if w not in LAYOUTS]
    if bad:
        parser.error(f"--worlds {bad}: supported world sizes are {sorted(LAYOUTS)}")
    if args.quick:
        print("quick: a smoke run of every code path. Its all-to-alls are too small for the link's bandwidth to "
              "matter (latency and extra calls dominate), so its speedups say nothing about DTD and CAC.")
    networks, skipped = _networks(args.network)
    if skipped:
        print(f"emulated network skipped, running on loopback only: {skipped}")
    print(f"model: nanoGPT n_embd={cfg.n_embd} n_layer={cfg.n_layer} n_head={cfg.n_head}, every FFN an MoE with "
          f"E={cfg.num_experts} top-{cfg.top_k} capacity factor {cfg.capacity_factor}; micro-batch "
          f"{cfg.batch}x{cfg.seq} tokens per token group; fp32, activation checkpointing per block; "
          f"{cfg.rounds} timed rounds after {cfg.warmup_rounds} warm-up")
    summaries = run_all(cfg, worlds, networks, args.rate, args.quiet_load, args.max_wait)
    print_summary(summaries)
    out = Path(args.out) if args.out else HERE / "results" / f"bench_dtd_cac{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_dtd_cac", "config": asdict(cfg), "variants": VARIANTS, "rate": args.rate,
        "emulated_skipped": skipped, "runs": summaries,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "deepspeed": _deepspeed_version()},
    }
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}")
    return 0


def _deepspeed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
