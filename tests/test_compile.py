"""The torch.compile doors: the "tedfx" backend on a dense model, and torch.compile of a ParallelModule."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tedfx
from tedfx.api import compiled_module
from tedfx.released import ReleasedParameterError
from tedfx.runtime import launch

from compile_cases import run_compile_cases
from models import tiny_gpt, tiny_gpt2, tiny_gpt_with_graph_breaks, tiny_llama

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False)


# --- one process: the backend without torch.distributed converts like to_moe ---------------------------


@pytest.mark.parametrize("builder", [tiny_gpt, tiny_llama, tiny_gpt2], ids=["gpt", "llama", "gpt2"])
def test_backend_in_one_process_equals_to_moe(builder):
    """In eval mode: GPT-2's dropout modules (p=0.1) are off, and must stay off in the graph dynamo traced."""
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
    frames = torch._dynamo.utils.counters["frames"]["total"]  # every frame dynamo converts, recompiles too
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
    assert torch._dynamo.utils.counters["frames"]["total"] == frames  # the released weights did not recompile
    # A new stride does recompile (dynamo's guard); tedfx reuses its module and does not rebuild it.
    built = compiled_module(model)
    compiled(torch.randint(0, 20, (2, 9), generator=g)[:, :-1])
    assert compiled_module(model) is built


def test_backend_needs_a_moe_config():
    torch._dynamo.reset()
    model, (x,) = tiny_gpt()
    with pytest.raises(Exception, match=r"options=\{\"moe\": tedfx.MoEConfig"):
        torch.compile(model, backend="tedfx")(x)


# --- graph breaks: one converted module for the whole model ------------------------------------------


def _loss(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def test_graph_break_per_block_trains_every_expert_like_to_moe():
    """Dynamo compiles two graphs per block (shared by the 4 blocks) and runs embeddings and head eagerly:
    every graph runs on the one module, which equals to_moe's in outputs, gradients and optimizer steps."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model, (x,) = tiny_gpt_with_graph_breaks(n_layer=4)
    moe = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False, layers="every_other")
    reference = tedfx.to_moe(copy.deepcopy(model), (x,), moe=moe)
    compiled = torch.compile(model, backend="tedfx", options={"moe": moe})
    out = compiled(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    assert graphs >= 2  # the graph break did split the model

    built = compiled_module(model)
    mine, ref = built.state_dict(), reference.state_dict()
    assert set(mine) == set(ref)  # FFN indices are the whole model's: every_other converts FFNs 1 and 3
    assert sorted(k for k in mine if k.endswith("router.weight")) == ["h.1.mlp.router.weight",
                                                                     "h.3.mlp.router.weight"]
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=0, atol=0)

    opt = torch.optim.AdamW(built.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    moe_params = {n: p for n, p in built.named_parameters() if ".experts." in n or ".router." in n}
    assert len(moe_params) == 2 * 5  # per block: router.weight, experts.{w1, b1, w2, b2}
    before = {n: p.detach().clone() for n, p in moe_params.items()}
    for step in range(2):
        tokens = torch.randint(0, 100, x.shape, generator=torch.Generator().manual_seed(step))
        loss, ref_loss = _loss(compiled(tokens), tokens), _loss(reference(tokens), tokens)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        ref_loss.backward()
        ref_grads = dict(reference.named_parameters())
        for n, p in built.named_parameters():
            assert p.grad is not None, f"step {step}: {n} got no gradient"
            torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-6)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert [n for n, p in moe_params.items() if torch.equal(p, before[n])] == []  # every expert trained
    # Every graph was compiled in the first call: training recompiled nothing (released parameters included).
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == (graphs, frames)


def test_graph_break_inside_an_ffn_is_a_clear_error():
    torch._dynamo.reset()
    model, (x,) = tiny_gpt_with_graph_breaks(n_layer=2, inside_ffn=True)
    compiled = torch.compile(model, backend="tedfx", options={"moe": MOE})
    with pytest.raises(ValueError, match=r"FFN h\.0\.mlp .*a graph break splits the FFN"):
        compiled(x)


def test_backend_converts_a_module_not_a_function():
    torch._dynamo.reset()
    model, (x,) = tiny_gpt()
    compiled = torch.compile(lambda tokens: model(tokens), backend="tedfx", options={"moe": MOE})
    with pytest.raises(Exception, match="Compile the model itself"):
        compiled(x)


# --- the dense model after compiling: replaced parameters are loud, never a crash ---------------------


@pytest.mark.parametrize("release_dense", [True, False], ids=["released", "kept"])
def test_an_optimizer_on_the_dense_parameters_is_an_error(release_dense):
    torch._dynamo.reset()
    model, (x,) = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before compiling: the dense parameters
    compiled = torch.compile(model, backend="tedfx", options={"moe": MOE, "release_dense": release_dense})
    compiled(x).sum().backward()
    with pytest.raises(ReleasedParameterError, match=r"AdamW steps parameters of the dense model \(h\.0\.mlp\.c_fc"
                                                     r"\.weight.*tedfx\.compiled_module\(model\)\.parameters\(\)"):
        opt.step()
    # The one built on the compiled module steps.
    torch.optim.AdamW(compiled_module(model).parameters(), lr=1e-3).step()


_USE_RELEASED = r"""
import sys
import torch
import tedfx
from models import tiny_gpt

model, (x,) = tiny_gpt()
fresh = tiny_gpt()[0].state_dict()
compiled = torch.compile(model, backend="tedfx", options={"moe": tedfx.MoEConfig(num_experts=4, top_k=2)})
compiled(x)
w = model.h[0].mlp.c_fc.weight
uses = {
    "sum": lambda: w.sum(),
    "add": lambda: w + 1,
    "save": lambda: torch.save(model.state_dict(), sys.argv[1]),
    "save_tensor": lambda: torch.save(w, sys.argv[2]),
    "load": lambda: model.load_state_dict(fresh),
}
for name, use in uses.items():
    try:
        use()
        print(name, "did not raise")
    except Exception as e:  # load_state_dict gathers the errors of every tensor into one RuntimeError
        print(name, "raised:", type(e).__name__, str(e).replace("\n", " "))
print("shape", tuple(w.shape), "numel", w.numel())
"""


def test_released_dense_parameter_raises_instead_of_crashing(tmp_path: Path):
    """In a subprocess: a segfault there fails this test instead of killing pytest."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    target = tmp_path / "dense.pt"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_USE_RELEASED), str(target),
                             str(tmp_path / "tensor.pt")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for use in ("sum", "add", "save", "save_tensor", "load"):
        expected = "RuntimeError" if use == "load" else "ReleasedParameterError"
        assert lines[use].startswith(f"raised: {expected} "), (use, lines[use])
        assert "h.0.mlp.c_fc.weight" in lines[use] and "tedfx.compiled_module(model)" in lines[use], lines[use]
    assert not target.exists()  # state_dict() raised before torch.save opened the file
    assert lines["shape"] == "(128, 32) numel 4096"  # metadata still answers


# --- 4 ranks, T=2 x X=2: the backend against parallelize, and a compiled ParallelModule ----------------


@pytest.fixture(scope="module")
def ranks():
    return launch(run_compile_cases, 4, backend="gloo", timeout=120)


@pytest.mark.parametrize("model", ["gpt", "gpt2", "gpt_breaks"])
def test_backend_matches_parallelize(ranks, model):
    for rank, results in enumerate(ranks):
        r = results[model]
        assert r["built_type"] == "ParallelModule"
        assert r["forward_err"] < 1e-5, f"rank {rank}: forward {r['forward_err']}"
        for step, (mine, ref) in enumerate(r["losses"]):
            assert abs(mine - ref) <= 1e-4 * abs(ref), f"rank {rank} step {step}: {mine} vs {ref}"
        assert r["state_err"] < 1e-4, f"rank {rank}: state {r['state_err']}"
        # The whole model is converted once: exactly parallelize's keys (a tied weight under both names).
        assert r["keys_extra"] == [] and r["keys_missing"] == [], (r["keys_extra"], r["keys_missing"])
        # One compile (with graph breaks: one per graph, all in the first call), then 5 training steps
        # without recompiling.
        if model == "gpt_breaks":
            assert r["graphs_first_call"] > 1 and r["unique_graphs"] == r["graphs_first_call"], r
            assert r["moe_blocks"] == ["h.1.mlp.router"]  # layers="every_other" over the whole model
        else:
            assert r["unique_graphs"] == 1, r["unique_graphs"]
        assert r["recompiles"] == 0, r["recompiles"]
        assert r["expert_grads"], f"rank {rank}: an expert or router parameter got no gradient"
        # The dense weights do not stay alive: per-rank memory within 10% of parallelize's.
        mem = r["memory"]
        assert mem["backend"] <= 1.10 * mem["parallelize"], mem


def test_compiled_parallel_module_gives_the_eager_numbers(ranks):
    for rank, results in enumerate(ranks):
        assert max(results["compiled_pm"]["errs"]) < 1e-5, f"rank {rank}: {results['compiled_pm']['errs']}"


def test_a_capacity_bound_moe_model_compiles_to_one_graph():
    # Routing, dispatch and combine have static shapes and no host sync: dynamo traces two MoE blocks whole.
    torch._dynamo.reset()
    model, (x,) = tiny_gpt(n_layer=2)
    moe_model = tedfx.to_moe(model, (x,), moe=tedfx.MoEConfig(num_experts=4, top_k=2))
    assert sum(".router." in name for name, _ in moe_model.named_parameters()) == 2
    explained = torch._dynamo.explain(moe_model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(moe_model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), moe_model(x), rtol=1e-5, atol=1e-5)


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


def _checkpointed_pieces(mode: str) -> dict:
    """One rank: the graph-break model compiled with activation checkpointing in `mode`, against to_moe."""
    torch._dynamo.reset()
    model, (x,) = tiny_gpt_with_graph_breaks(n_layer=4)
    moe = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False, layers="every_other")
    reference = tedfx.to_moe(copy.deepcopy(model), (x,), moe=moe)
    compiled = torch.compile(model, backend="tedfx",
                             options={"moe": moe, "parallel": tedfx.ParallelConfig(activation_checkpointing=mode)})
    loss, ref_loss = _loss(compiled(x), x), _loss(reference(x), x)
    loss.backward()
    ref_loss.backward()
    ref_grads = dict(reference.named_parameters())
    built = compiled_module(model)
    return {"loss": float(loss), "ref_loss": float(ref_loss),
            "grad_error": max(float((p.grad - ref_grads[n].grad).abs().max())
                              for n, p in built.graph.named_parameters())}  # a ParallelModule: its graph's names


@pytest.mark.parametrize("mode", ["block", "moe"])
def test_graph_breaks_with_activation_checkpointing(mode):
    """Each piece of a model split at graph breaks is checkpointed as far as it holds blocks: pieces without an
    FFN (or without an MoE block, in mode "moe") are left alone instead of failing."""
    [result] = tedfx.launch(_checkpointed_pieces, 1, mode, backend="gloo", timeout=120)
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-5)
    assert result["grad_error"] < 1e-5
