"""explain and the layout-wide order check run ranks on fake tensors: the same predictions, no parameter data."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import tedfx
from tedfx.check import check_layout
from tedfx.fake import FakeRun
from tedfx.moe.experts import ExpertInit
from tedfx.pipeline import build_moe_graph
from tedfx.predict import predict_rank
from tedfx.runtime.mesh import Layout

from models import tiny_gpt, tiny_gpt_neox, tiny_gqa

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)

CASES = {
    "T2X2 dtd+cac, block checkpoints": (tiny_gpt, tedfx.ParallelConfig(tensor=2, expert=2,
                                                                       activation_checkpointing="block")),
    "T2X1 bf16": (tiny_gpt, tedfx.ParallelConfig(tensor=2, expert=1, precision="bf16")),
    "GPT-NeoX fused QKV T2X2": (tiny_gpt_neox, tedfx.ParallelConfig(tensor=2, expert=2)),
    "GQA T2X1D2": (tiny_gqa, tedfx.ParallelConfig(tensor=2, expert=1)),
}


def _predictions(factory, parallel, world, *, fake):
    model, inputs = factory()
    if parallel.precision != "fp32":
        model = model.to(torch.bfloat16)
    moe_gm, ctx = build_moe_graph(model, inputs, moe=MOE, lazy=True)
    layout = Layout.build(world, parallel)
    return {rank: predict_rank(moe_gm, ctx, parallel=parallel, layout=layout, rank=rank, example_inputs=inputs,
                               fake=fake) for rank in range(world)}


@pytest.mark.parametrize("case", list(CASES))
def test_fake_prediction_equals_real(case):
    factory, parallel = CASES[case]
    world = 4
    fake = _predictions(factory, parallel, world, fake=True)
    real = _predictions(factory, parallel, world, fake=False)
    for rank in range(world):
        f, r = fake[rank], real[rank]
        assert f.fake is not None and r.fake is None
        assert all(isinstance(t, FakeTensor) for t in f.graph.state_dict().values())
        assert f.comm.trace == r.comm.trace and f.comm.trace
        assert f.local_shapes == r.local_shapes
        assert f.param_bytes == r.param_bytes
        assert f.shards == r.shards


def test_explain_and_order_check_never_materialise_an_expert(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an expert was materialised")

    monkeypatch.setattr(ExpertInit, "materialize", refuse)
    model, inputs = tiny_gpt()
    parallel = tedfx.ParallelConfig(tensor=2, expert=2)
    report = tedfx.explain(model, inputs, moe=MOE, parallel=parallel, world_size=8)
    assert report.collectives and report.training_memory["rows"]
    traces = tedfx.check_collective_order(model, inputs, moe=MOE, parallel=parallel, world_size=8)
    assert set(traces) == set(range(8))


def test_a_model_on_the_meta_device_is_explained():
    model, inputs = tiny_gpt()
    with torch.device("meta"):
        meta_model, _ = tiny_gpt()
    parallel = tedfx.ParallelConfig(tensor=2, expert=2)
    real = tedfx.explain(model, inputs, moe=MOE, parallel=parallel, world_size=4)
    meta = tedfx.explain(meta_model, inputs, moe=MOE, parallel=parallel, world_size=4)
    assert meta.collectives == real.collectives
    assert meta.param_bytes_per_rank == real.param_bytes_per_rank
    assert meta.training_memory == real.training_memory


def test_dropless_routing_is_simulated_on_real_shards():
    # Dropless capacities follow the routing's values, which fake tensors do not have.
    moe = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False)
    model, inputs = tiny_gpt()
    moe_gm, ctx = build_moe_graph(model, inputs, moe=moe, lazy=True)
    parallel = tedfx.ParallelConfig(tensor=2, expert=2)
    layout = Layout.build(4, parallel)
    pred = predict_rank(moe_gm, ctx, parallel=parallel, layout=layout, rank=0, example_inputs=inputs)
    assert pred.fake is None
    assert not any(isinstance(t, FakeTensor) for t in pred.graph.state_dict().values())
    assert set(check_layout(moe_gm, ctx, parallel=parallel, layout=layout, example_inputs=inputs)) == set(range(4))


def test_a_graph_that_fails_on_fake_tensors_is_simulated_on_real_shards_with_a_warning(monkeypatch, caplog):
    model, inputs = tiny_gpt()
    moe_gm, ctx = build_moe_graph(model, inputs, moe=MOE, lazy=True)
    parallel = tedfx.ParallelConfig(tensor=2, expert=2)
    layout = Layout.build(4, parallel)
    real = predict_rank(moe_gm, ctx, parallel=parallel, layout=layout, rank=1, example_inputs=inputs, fake=False)

    def no_fake_kernel(self, tree):  # stands for an op torch's fake tensors do not cover
        raise NotImplementedError("no fake kernel for this op")

    monkeypatch.setattr(FakeRun, "inputs", no_fake_kernel)
    with caplog.at_level("WARNING", logger="tedfx.predict"):
        pred = predict_rank(moe_gm, ctx, parallel=parallel, layout=layout, rank=1, example_inputs=inputs)
    assert pred.fake is None and pred.comm.trace == real.comm.trace
    assert "rank 1's graph failed on fake tensors (NotImplementedError: no fake kernel for this op)" in caplog.text
