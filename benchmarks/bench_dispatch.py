"""Dispatch + combine: tedfx's index path against the dense one-hot einsum path, as E and S grow.

One MoE block's token movement, forward and backward, without the experts: route S tokens
(top-2, capacity factor 1.0, so C = ceil(2 S / E)) and time

    index     tedfx.moe.ops.dispatch + combine: an index_select of the token rows into [E*C, H] and
              an index_select back, O(S*K*H) whatever E is
    one_hot   the GShard/DeepSpeed formulation: a [S, E, C] dispatch mask and combine weights,
              contracted with einsums, O(S*E*C*H) = O(S^2 * K * H): flat in E, quadratic in S

Both compute the same y_SH (checked). Runs interleave the two paths and report medians over
`--repeats`; read the ratio one_hot / index rather than absolute times.

Usage:
    python benchmarks/bench_dispatch.py                  # E 4..128, S 512..2048, H 256
    python benchmarks/bench_dispatch.py --quick

Writes benchmarks/results/bench_dispatch.json (or --out).
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


def _one_hot(x_SH, expert_SK, slot_SK, gate_SK, E, C):
    """The dense formulation: dispatch mask [S, E, C] and combine weights [S, E, C]."""
    S, K = slot_SK.shape
    kept = slot_SK >= 0
    mask_SKEC = (torch.nn.functional.one_hot(expert_SK, E).unsqueeze(-1)
                 * torch.nn.functional.one_hot(slot_SK.clamp_min(0), C).unsqueeze(-2)
                 * kept[..., None, None]).to(x_SH.dtype)
    dispatch_SEC = mask_SKEC.sum(1)
    combine_SEC = (mask_SKEC * torch.where(kept, gate_SK, 0.0)[..., None, None]).sum(1)
    x_ECH = torch.einsum("sec,sh->ech", dispatch_SEC, x_SH)
    return torch.einsum("sec,ech->sh", combine_SEC, x_ECH)


def _index(x_SH, expert_SK, slot_SK, gate_SK, E, C):
    return ops.combine(ops.dispatch(x_SH, expert_SK, slot_SK, C, num_experts=E), expert_SK, slot_SK, gate_SK)


def _time(fn, x_SH, plan, E) -> float:
    x = x_SH.detach().requires_grad_(True)
    t0 = time.perf_counter()
    fn(x, plan.expert_SK, plan.slot_SK, plan.gate_SK, E, plan.capacity).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_dispatch.json"))
    args = parser.parse_args()
    if args.quick:
        args.experts, args.tokens, args.repeats = [4, 32], [256, 512], 2
    torch.set_num_threads(1)
    load = os.getloadavg()
    rows = []
    print(f"{'S':>6} {'E':>5} {'C':>5} {'index ms':>9} {'one_hot ms':>11} {'one_hot/index':>14}")
    for S in args.tokens:
        for E in args.experts:
            g = torch.Generator().manual_seed(S * 1000 + E)
            x_SH = torch.randn(S, args.hidden, generator=g)
            plan = route(torch.randn(S, E, generator=g), top_k=2, normalize_gates=True, capacity=-(-2 * S // E))
            routed = (plan.expert_SK, plan.slot_SK, plan.gate_SK, E, plan.capacity)
            torch.testing.assert_close(_index(x_SH, *routed), _one_hot(x_SH, *routed), rtol=1e-5, atol=1e-5)
            samples = {"index": [], "one_hot": []}
            for _ in range(args.repeats):
                samples["index"].append(_time(_index, x_SH, plan, E))
                samples["one_hot"].append(_time(_one_hot, x_SH, plan, E))
            med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
            rows.append({"S": S, "E": E, "C": plan.capacity, "H": args.hidden, "median_ms": med, "samples": samples})
            print(f"{S:>6} {E:>5} {plan.capacity:>5} {med['index']:>9.2f} {med['one_hot']:>11.2f} "
                  f"{med['one_hot'] / med['index']:>14.1f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "args": vars(args),
                               "load_before": load, "load_after": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
