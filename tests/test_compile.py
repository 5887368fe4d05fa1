"""The torch.compile doors: the "tedfx" backend on a dense model, and torch.compile of a ParallelModule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tedfx
from tedfx.api import compiled_module
from tedfx.runtime import launch

from compile_cases import run_compile_cases
from models import tiny_gpt, tiny_llama

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False)


# --- one process: the backend without torch.distributed converts like to_moe ---------------------------


@pytest.mark.parametrize("builder", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
def test_backend_in_one_process_equals_to_moe(builder):
    torch._dynamo.reset()
    model, (x,) = builder()
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache makes dynamo break the graph
    model.eval()
    expected = tedfx.to_moe(model, (x,), moe=MOE).eval()(x)
    compiled = torch.compile(model, backend="tedfx", options={"moe": MOE})
    out = compiled(x)
    logits = out.logits if hasattr(out, "logits") else out
    expected = expected.logits if hasattr(expected, "logits") else expected
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    built = compiled_module(model)
    assert any(".experts.w1" in name for name, _ in built.named_parameters())
    # Each dense parameter is either the compiled module's own (shared, unchanged) or released (replaced).
    own = {id(p) for p in built.parameters()}
    released = [n for n, p in model.named_parameters() if id(p) not in own]
    assert released and all(model.get_parameter(n).untyped_storage().nbytes() == 0 for n in released)
    assert all(".mlp." in n for n in released)  # one process: only the FFN weights are replaced


def test_backend_trains_without_recompiling():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, (x,) = tiny_gpt()
    compiled = torch.compile(model, backend="tedfx", options={"moe": MOE})
    compiled(x)
    opt = torch.optim.AdamW(compiled_module(model).parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(5):
        tokens = torch.randint(0, 20, (2, 9), generator=g)  # a small alphabet: learnable in a few steps
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:]  # the strides of the first call's input
        loss = F.cross_entropy(compiled(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert sum(torch._dynamo.utils.counters["recompiles"].values()) == 0
    # A new stride does recompile (dynamo's guard); tedfx reuses its module and does not rebuild it.
    built = compiled_module(model)
    compiled(torch.randint(0, 20, (2, 9), generator=g)[:, :-1])
    assert compiled_module(model) is built


def test_backend_needs_a_moe_config():
    torch._dynamo.reset()
    model, (x,) = tiny_gpt()
    with pytest.raises(Exception, match=r"options=\{\"moe\": tedfx.MoEConfig"):
        torch.compile(model, backend="tedfx")(x)


# --- 4 ranks, T=2 x X=2: the backend against parallelize, and a compiled ParallelModule ----------------


@pytest.fixture(scope="module")
def ranks():
    return launch(run_compile_cases, 4, backend="gloo", timeout=120)


@pytest.mark.parametrize("model", ["gpt", "gpt2"])
def test_backend_matches_parallelize(ranks, model):
    for rank, results in enumerate(ranks):
        r = results[model]
        assert r["built_type"] == "ParallelModule"
        assert r["forward_err"] < 1e-5, f"rank {rank}: forward {r['forward_err']}"
        for step, (mine, ref) in enumerate(r["losses"]):
            assert abs(mine - ref) <= 1e-4 * abs(ref), f"rank {rank} step {step}: {mine} vs {ref}"
        assert r["state_err"] < 1e-4, f"rank {rank}: state {r['state_err']}"
        assert r["keys_extra"] == []
        # Dynamo deduplicates a tied weight into one graph input: only its alias key is absent.
        assert r["keys_missing"] in ([], ["lm_head.weight"]), r["keys_missing"]
        # One compile, then 5 training steps without recompiling.
        assert r["unique_graphs"] == 1 and r["recompiles"] == 0, (r["unique_graphs"], r["recompiles"])
        # The dense weights do not stay alive: per-rank memory within 10% of parallelize's.
        mem = r["memory"]
        assert mem["backend"] <= 1.10 * mem["parallelize"], mem


def test_compiled_parallel_module_gives_the_eager_numbers(ranks):
    for rank, results in enumerate(ranks):
        assert max(results["compiled_pm"]["errs"]) < 1e-5, f"rank {rank}: {results['compiled_pm']['errs']}"


def test_backend_can_run_the_rewritten_graph_through_inductor():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, (x,) = tiny_gpt()
    moe = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)
    reference = tedfx.to_moe(model, (x,), moe=moe)
    expected = reference(x)
    compiled = torch.compile(model, backend="tedfx", options={"moe": moe, "inductor": True})
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"] + \
        torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"] > 0  # inductor compiled graphs
    out.sum().backward()
    built = compiled_module(model)
    assert all(p.grad is not None for name, p in built.named_parameters() if ".experts." in name)
    # The whole model is converted once: the keys of to_moe's, the tied embedding/LM-head weight under both.
    assert set(reference.state_dict()) == set(built.state_dict())
    # The dense model's storage is released: using it again is a clear error, not a crash.
    with pytest.raises(ValueError, match="released"):
        tedfx.to_moe(model, (x,), moe=moe)
