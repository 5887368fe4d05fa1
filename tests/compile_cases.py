"""Per-rank side of tests/test_compile.py: the torch.compile doors against parallelize, in one launch."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tedfx
from tedfx.api import compiled_module

from models import VOCAB, tiny_gpt, tiny_gpt2, tiny_gpt_with_graph_breaks

__all__ = ["run_compile_cases"]

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
# The graph-break model converts FFN 1 only: FFN 0 stays dense and tensor-parallel, bound like the attention.
MOE_BY_MODEL = {"gpt_breaks": tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1,
                                              layers="every_other")}
PARALLEL = tedfx.ParallelConfig(tensor=2, expert=2, timeout=60.0)
STEPS = 5


def _build(name: str) -> nn.Module:
    if name == "gpt":
        return tiny_gpt()[0]
    if name == "gpt_breaks":
        return tiny_gpt_with_graph_breaks(n_layer=2)[0]
    model = tiny_gpt2()[0]
    model.config.use_cache = False
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _storage_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct storages behind every parameter and buffer of `modules` (freed ones are 0)."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen or storage.nbytes() == 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _batches() -> list[torch.Tensor]:
    group = dist.get_rank() // PARALLEL.tensor  # tensor ranks share a token group
    g = torch.Generator().manual_seed(100 + group)
    return [torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(STEPS + 1)]


def _backend_vs_parallelize(name: str) -> dict[str, Any]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    xs = _batches()
    moe = MOE_BY_MODEL.get(name, MOE)
    pm = tedfx.parallelize(_build(name), (xs[0],), moe=moe, parallel=PARALLEL)
    model = _build(name)
    compiled = torch.compile(model, backend="tedfx", options={"moe": moe, "parallel": PARALLEL})
    forward_err = float((_logits(compiled(xs[0])) - _logits(pm(xs[0]))).abs().max())
    counters = torch._dynamo.utils.counters
    graphs_first_call, frames_first_call = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    built = compiled_module(model)
    # Memory after the first step: what the compiled model keeps alive vs parallelize's module.
    memory = {"backend": _storage_bytes(model, built), "parallelize": _storage_bytes(pm)}
    opt = torch.optim.AdamW(built.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    losses = []
    for i in range(STEPS):
        pair = []
        for module, optimizer in ((compiled, opt), (pm, ref_opt)):
            optimizer.zero_grad()
            loss = F.cross_entropy(_logits(module(xs[i])).flatten(0, 1), xs[i + 1].flatten())
            loss.backward()
            optimizer.step()
            pair.append(float(loss))
        losses.append(pair)
    mine, ref = built.full_state_dict(), pm.full_state_dict()
    state_err = max(float((mine[k] - ref[k]).abs().max()) for k in mine if mine[k].numel())
    return {"forward_err": forward_err, "losses": losses, "state_err": state_err,
            "keys_missing": sorted(set(ref) - set(mine)), "keys_extra": sorted(set(mine) - set(ref)),
            "unique_graphs": counters["stats"]["unique_graphs"],
            # Frames dynamo converted during training (any recompile counts; the released weights must not cause one).
            "recompiles": counters["frames"]["total"] - frames_first_call,
            "graphs_first_call": graphs_first_call, "memory": memory, "built_type": type(built).__name__,
            "moe_blocks": sorted(n for n, _ in built.module.named_modules() if n.endswith(".router")),
            "expert_grads": _expert_grads_nonzero(compiled, built, xs)}


def _expert_grads_nonzero(compiled: nn.Module, built: nn.Module, xs: list[torch.Tensor]) -> bool:
    """One more backward: every local expert and router parameter gets a non-zero gradient."""
    built.zero_grad()
    F.cross_entropy(_logits(compiled(xs[0])).flatten(0, 1), xs[1].flatten()).backward()
    moe = [p for n, p in built.named_parameters() if ".experts." in n or ".router." in n]
    return bool(moe) and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in moe)


def _compiled_parallel_module() -> dict[str, Any]:
    torch._dynamo.reset()
    xs = _batches()
    pm = tedfx.parallelize(_build("gpt"), (xs[0],), moe=MOE, parallel=PARALLEL)
    twin = tedfx.parallelize(_build("gpt"), (xs[0],), moe=MOE, parallel=PARALLEL)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    errs = []
    opt, twin_opt = torch.optim.SGD(pm.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    for i in range(2):
        a, b = pm(xs[i]), compiled(xs[i])
        errs.append(float((a - b).abs().max()))
        for out, optimizer in ((a, opt), (b, twin_opt)):
            F.cross_entropy(out.flatten(0, 1), xs[i + 1].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {"errs": errs}


def run_compile_cases() -> dict[str, Any]:
    return {"gpt": _backend_vs_parallelize("gpt"), "gpt2": _backend_vs_parallelize("gpt2"),
            "gpt_breaks": _backend_vs_parallelize("gpt_breaks"), "compiled_pm": _compiled_parallel_module()}
