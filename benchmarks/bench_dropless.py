"""Dropless MoE: the packed layout against capacity slots padded to the largest load.

One MoE block's dispatch, experts (an MLP, H -> F -> H) and combine, forward and backward, in one
process, on routing skewed like a trained router's (router logits plus a per-expert bias whose
softmax follows a Zipf law of exponent `--skew`; 0 is uniform). Both layouts keep every choice:

    padded   capacity slots: C = the largest expert load, dispatch into [E, C, H], a batched matmul
             over all E experts (what a dropless block did before the packed layout)
    packed   tedfx.moe.ops with `loads=`: the S*K rows sorted by expert, [S*K, H], a loop over the
             experts, each on its own rows (docs/moe.md, "Dropless: the packed layout")

Reported: the dispatch buffer's bytes (E * C * H vs S * K * H values, fp32) and the median time of a
forward + backward, the two layouts interleaved; their outputs are checked equal.

Usage:
    python benchmarks/bench_dropless.py                   # E 8, 32, 128; S 2048; H 256, F 1024
    python benchmarks/bench_dropless.py --quick

Writes benchmarks/results/bench_dropless.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tedfx.moe import ops
from tedfx.moe.routing import route


def _block(x_SH, plan, w1, w2, loads):
    """dispatch -> gelu MLP experts -> combine; `loads` None: capacity slots, else the packed layout."""
    E = w1.shape[0]
    kw = {} if loads is None else {"loads": loads}
    x = ops.dispatch(x_SH, plan.expert_SK, plan.slot_SK, plan.capacity, num_experts=E, **kw)
    h = ops.expert_fc1(x, w1, activation="gelu", **kw)
    y = ops.expert_fc2(h, w2, **kw)
    return ops.combine(y, plan.expert_SK, plan.slot_SK, plan.gate_SK, **kw), x.numel() * x.element_size()


def _time(fn) -> float:
    t0 = time.perf_counter()
    out, _ = fn()
    out.sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the expert popularity; 0: uniform")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_dropless.json"))
    args = parser.parse_args()
    if args.quick:
        args.experts, args.tokens, args.repeats = [8, 32], 512, 2
    torch.set_num_threads(1)
    load = os.getloadavg()
    S, H, F = args.tokens, args.hidden, args.ffn
    rows = []
    print(f"S={S} H={H} F={F} top-2, expert popularity ~ 1/rank^{args.skew}")
    print(f"{'E':>5} {'max load':>9} {'mean load':>10} {'padded MiB':>11} {'packed MiB':>11} {'padded ms':>10} "
          f"{'packed ms':>10} {'packed/padded':>14}")
    for E in args.experts:
        g = torch.Generator().manual_seed(E)
        bias = -args.skew * torch.log(torch.arange(1, E + 1, dtype=torch.float32))
        plan = route(torch.randn(S, E, generator=g) + bias, top_k=2, normalize_gates=True, capacity=None)
        loads = ops.expert_loads(plan.expert_SK, num_experts=E)
        x_SH = torch.randn(S, H, generator=g)
        w1 = torch.randn(E, H, F, generator=g) * H ** -0.5
        w2 = torch.randn(E, F, H, generator=g) * F ** -0.5

        def run(packed: bool):
            x = x_SH.detach().requires_grad_(True)
            return _block(x, plan, w1.detach().requires_grad_(True), w2.detach().requires_grad_(True),
                          loads if packed else None)

        (padded_out, padded_bytes), (packed_out, packed_bytes) = run(False), run(True)
        torch.testing.assert_close(packed_out, padded_out, rtol=1e-4, atol=1e-4)
        assert packed_bytes == int(loads.sum()) * H * 4
        samples = {"padded": [], "packed": []}
        for _ in range(args.repeats):
            samples["padded"].append(_time(lambda: run(False)))
            samples["packed"].append(_time(lambda: run(True)))
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        row = {"E": E, "max_load": int(loads.max()), "mean_load": float(loads.float().mean()),
               "padded_bytes": padded_bytes, "packed_bytes": packed_bytes, "median_ms": med, "samples": samples}
        rows.append(row)
        print(f"{E:>5} {row['max_load']:>9} {row['mean_load']:>10.1f} {padded_bytes / 2**20:>11.2f} "
              f"{packed_bytes / 2**20:>11.2f} {med['padded']:>10.1f} {med['packed']:>10.1f} "
              f"{med['packed'] / med['padded']:>14.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "args": vars(args),
                               "load_before": load, "load_after": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
