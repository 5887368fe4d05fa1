"""Per-rank memory of `tedfx.parallelize`: peak and retained RSS growth against the rank's own parameter bytes.

A user's model: a 2-layer SwiGLU decoder (hidden 512, FFN width 2048, tedfx.models.nanogpt),
upcycled to E experts on 4 CPU ranks with T=2 x X=2, default ParallelConfig (DTD on, the
collective-order check on). Each rank builds the dense model first, then measures around
`parallelize` alone:

    own MiB       bytes of the rank's own parameters (what it must hold)
    peak MiB      peak RSS growth during parallelize (VmHWM after resetting it, minus RSS before)
    after MiB     RSS growth still held once parallelize returned (after gc and malloc_trim)
    peak / own    the goal: peak <= 2 x own + 384 MiB, flat in E/X, never the unsharded MoE

The peak is reset through /proc/self/clear_refs (Linux), so it is the peak of parallelize
alone, not of building the dense model. One launch per E, run one after the other.

Usage:
    python benchmarks/bench_parallelize_memory.py                   # E = 8, 32, 128
    python benchmarks/bench_parallelize_memory.py --experts 8 32 --out results.json

Writes benchmarks/results/bench_parallelize_memory.json (or --out).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
from pathlib import Path

import torch

import tedfx
from tedfx.models.nanogpt import GPT, GPTConfig

MIB = 2**20
GOAL_CONSTANT_MIB = 384


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so RSS shows what is still held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS


def measure(experts: int, hidden: int, layers: int, tensor: int, expert: int) -> dict:
    """On every rank: build the dense model, then measure parallelize alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=layers, n_embd=hidden, n_head=8, block_size=64, activation="swiglu", bias=False))
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    moe = tedfx.MoEConfig(num_experts=experts, top_k=2)
    parallel = tedfx.ParallelConfig(tensor=tensor, expert=expert)
    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    pm = tedfx.parallelize(model, (tokens,), moe=moe, parallel=parallel)
    peak = _status("VmHWM")
    gc.collect()
    _trim()
    after = _status("VmRSS")
    own = sum(p.numel() * p.element_size() for p in pm.parameters())
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"experts": experts, "rank": pm.mesh.rank, "own_bytes": own, "dense_bytes": dense,
            "peak_growth_bytes": peak - before, "after_growth_bytes": after - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--expert", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_parallelize_memory.json"))
    args = parser.parse_args()
    world = args.tensor * args.expert
    rows = []
    for e in args.experts:
        ranks = tedfx.launch(measure, world, e, args.hidden, args.layers, args.tensor, args.expert, timeout=900)
        worst = max(ranks, key=lambda r: r["peak_growth_bytes"])
        full_experts = args.layers * 3 * e * args.hidden * 4 * args.hidden * 4  # w1, w3, w2 per layer, fp32
        rows.append({**worst, "full_experts_bytes": full_experts,
                     "goal_bytes": 2 * worst["own_bytes"] + GOAL_CONSTANT_MIB * MIB})
    print(f"\nparallelize on {world} CPU ranks (T={args.tensor} x X={args.expert}), {args.layers}-layer SwiGLU "
          f"decoder, hidden {args.hidden}, FFN {4 * args.hidden}; worst rank per E")
    print(f"{'E':>5} {'own MiB':>9} {'peak MiB':>9} {'after MiB':>10} {'peak/own':>9} {'goal MiB':>9} "
          f"{'full experts MiB':>17}")
    for r in rows:
        print(f"{r['experts']:>5} {r['own_bytes'] / MIB:>9.0f} {r['peak_growth_bytes'] / MIB:>9.0f} "
              f"{r['after_growth_bytes'] / MIB:>10.0f} {r['peak_growth_bytes'] / r['own_bytes']:>9.2f} "
              f"{r['goal_bytes'] / MIB:>9.0f} {r['full_experts_bytes'] / MIB:>17.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "args": vars(args),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
