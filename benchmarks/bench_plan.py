"""The layout planner on paper and against measurement.

Three parts (docs/planner.md):

  paper     The paper's claim on 128 V100s of 32 GB: the largest GPT-3-shaped base model
            (16 experts on every other FFN) that fits with TED (T up to 8 inside a node)
            against expert x data parallelism alone (T = 1). For each base model, the
            smallest predicted per-rank memory over T in {1, 2, 4, 8} at X = 16 (fewer
            experts per rank only adds memory) and over the options (checkpointing
            none/block, ZeRO 0/1, untiled/tiled step), in fp16.
  memory    Predicted against measured memory of rank 0 of small layouts: the tensor bytes
            held after a step (weights, gradients, optimizer states) and the peak of the
            tensors allocated during a step, measured on real shards in this process (the
            collectives simulated), and the process's peak resident memory growth.
  speed     Seconds to plan one layout of the ted-6.7b preset (simulated at depths 2 and 4).

Usage:
    python benchmarks/bench_plan.py                  # all three
    python benchmarks/bench_plan.py --part paper

Results: tables on stdout, JSON in benchmarks/results/bench_plan.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch

import tedfx
from tedfx import pipeline
from tedfx.layout_cost import ModelSource, layout_cost, measure_rank_step
from tedfx.models.decoder import Decoder, DecoderConfig
from tedfx.plan import PRESETS, Cluster, Options, plan

GiB = 2**30
V100_CLUSTER = Cluster(world_size=128, gpus_per_node=8, memory_gib=32, reserve_gib=2, intra_node_gbps=150,
                       inter_node_gbps=12.5, tflops=60)
"""128 V100s of 32 GB, 8 per node (NVLink inside, 100 Gb/s InfiniBand across); 2 GiB held back per device."""
PAPER_MOE = PRESETS["ted-6.7b"].moe
PAPER_LADDER = {
    "1.3B": DecoderConfig(layers=24, hidden=2048, heads=16, ffn=8192, vocab=51200, seq=2048),
    "2.7B": DecoderConfig(layers=32, hidden=2560, heads=32, ffn=10240, vocab=51200, seq=2048),
    "6.7B": DecoderConfig(layers=32, hidden=4096, heads=32, ffn=16384, vocab=51200, seq=2048),
    "13B": DecoderConfig(layers=40, hidden=5120, heads=40, ffn=20480, vocab=51200, seq=2048),
    "18B": DecoderConfig(layers=40, hidden=6144, heads=48, ffn=24576, vocab=51200, seq=2048),
    "30B": DecoderConfig(layers=48, hidden=7168, heads=56, ffn=28672, vocab=51200, seq=2048),
}
"""GPT-3's shapes (Brown et al. 2020, table 2.1) up to 13B, then two wider ones on the same aspect ratio."""
PAPER_OPTIONS = Options(dtd=(True,), activation_checkpointing=("none", "block"), zero=(0, 1),
                        tile_numel=(None, 2**24), precision=("fp16",))


def paper_table(tensors=(1, 2, 4, 8)) -> list[dict]:
    """Per base model: the smallest per-rank memory at each T (X = 16), and whether it fits."""
    usable = (V100_CLUSTER.memory_gib - V100_CLUSTER.reserve_gib) * GiB
    rows = []
    for name, cfg in PAPER_LADDER.items():
        result = plan(cfg, cluster=V100_CLUSTER, moe=PAPER_MOE, micro_batch=1, options=PAPER_OPTIONS,
                      layouts=[(t, 16) for t in tensors])
        row = {"base": name, "base_params": result.base_params, "moe_params": result.params}
        for t in tensors:
            best = min((r for r in result.rows if r.tensor == t), key=lambda r: r.cost.total_memory)
            row[f"T{t}"] = {"gib": best.cost.total_memory / GiB, "fits": best.cost.total_memory <= usable,
                            "options": best.options(), "memory": best.cost.memory}
        rows.append(row)
        print(f"{name:>5} ({result.base_params / 1e9:5.2f}B base, {result.params / 1e9:6.1f}B MoE): " + "  ".join(
            f"T={t}: {row[f'T{t}']['gib']:6.2f} GiB {'fits' if row[f'T{t}']['fits'] else '-   '}" for t in tensors),
            flush=True)
    xd = max((r for r in rows if r["T1"]["fits"]), key=lambda r: r["base_params"])
    ted = max((r for r in rows if any(r[f"T{t}"]["fits"] for t in tensors)), key=lambda r: r["base_params"])
    print(f"largest base: expert x data {xd['base']}, TED {ted['base']}: "
          f"{ted['base_params'] / xd['base_params']:.2f}x")
    return rows


def _small_source(meta: bool) -> ModelSource:
    cfg = DecoderConfig(layers=4, hidden=128, heads=4, ffn=512, vocab=256, seq=64)

    def build(depth):
        torch.manual_seed(0)
        tokens = torch.randint(0, cfg.vocab, (4, cfg.seq))
        with torch.device("meta" if meta else "cpu"):
            return Decoder(dataclasses.replace(cfg, layers=depth or cfg.layers)), (tokens,)

    return ModelSource(build=build, moe=tedfx.MoEConfig(num_experts=4, top_k=2, layers="every_other"),
                       layers=cfg.layers)


def measure_step(parallel: tedfx.ParallelConfig, world: int) -> dict[str, int]:
    """Rank 0's real shards: bytes held after a step, and the peak of one steady-state step (AdamW)."""
    import resource

    source = _small_source(meta=False)
    dense, inputs = source.build(None)
    moe_gm, ctx = pipeline.build_moe_graph(dense, inputs, moe=source.moe, lazy=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held, peak = measure_rank_step(moe_gm, ctx, inputs, parallel, world)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"held": held, "peak": peak, "rss_growth": rss1 - rss0}


def memory_table() -> list[dict]:
    source = _small_source(meta=True)
    rows = []
    layouts = [(4, dict(tensor=2, expert=2)), (4, dict(tensor=2, expert=2, activation_checkpointing="block")),
               (4, dict(tensor=1, expert=4)), (8, dict(tensor=2, expert=4, activation_checkpointing="block"))]
    for world, fields in layouts:
        parallel = tedfx.ParallelConfig(**fields)
        predicted = layout_cost(source, parallel, world, tile_numel=None)
        m = predicted.memory
        held = m["weights"] + m["grads"] + m["master"] + m["optimizer_states"]
        measured = measure_step(parallel, world)
        rows.append({"world": world, **fields, "predicted_held": held, "measured_held": measured["held"],
                     "predicted_peak": predicted.total_memory, "measured_peak": measured["peak"],
                     "rss_growth": measured["rss_growth"]})
        peak = predicted.total_memory
        print(f"world {world} {fields}: held {held / 2**20:.2f} MiB predicted, {measured['held'] / 2**20:.2f} "
              f"measured ({held / measured['held'] - 1:+.1%}); peak {peak / 2**20:.2f} MiB predicted, "
              f"{measured['peak'] / 2**20:.2f} measured ({peak / measured['peak'] - 1:+.1%})", flush=True)
    return rows


def speed() -> dict:
    t0 = time.perf_counter()
    result = plan("ted-6.7b", cluster=V100_CLUSTER, options=Options(dtd=(True,), activation_checkpointing=("block",),
                                                                     zero=(1,), tile_numel=(None,),
                                                                     precision=("fp16",)), layouts=[(8, 16)])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan("ted-6.7b", cluster=V100_CLUSTER, options=Options(dtd=(True,), activation_checkpointing=("none",),
                                                            zero=(1,), tile_numel=(None,), precision=("fp16",)),
         layouts=[(4, 16)])
    second = time.perf_counter() - t0
    print(f"ted-6.7b: one layout planned in {first:.1f} s (captures included), another in {second:.1f} s; "
          f"best {result.rows[0].cost.total_memory / GiB:.2f} GiB per rank", flush=True)
    return {"first_layout_s": first, "another_layout_s": second}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("paper", "memory", "speed", "all"), default="all")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_plan.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    out = {}
    if args.part in ("paper", "all"):
        out["paper"] = paper_table()
    if args.part in ("memory", "all"):
        out["memory"] = memory_table()
    if args.part in ("speed", "all"):
        out["speed"] = speed()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
