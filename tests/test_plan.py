"""The layout planner (docs/planner.md) and dtd="auto" (docs/parallelism.md, "DTD"), without processes.

The planner's communication is the explain simulation's (tedfx.predict.predict_rank), which the
multi-process parity tests compare with `pm.comm_stats()` on every rank of every layout they run
(tests/parallel_cases.py, `predicted_comm`): here the planner is compared with predict_rank on
those layouts, and its memory with what a real step of the rank's graph allocates.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

import tedfx
from tedfx import pipeline
from tedfx.layout_cost import ModelSource, layout_cost, measure_rank_step
from tedfx.models.decoder import Decoder, DecoderConfig
from tedfx.plan import PRESETS, Cluster, Options, collective_seconds, layouts_for, plan
from tedfx.predict import predict_rank
from tedfx.runtime.mesh import Layout

from models import tiny_gpt

SMALL = DecoderConfig(layers=3, hidden=32, heads=4, ffn=128, vocab=64, seq=16)
MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)


def _decoder_source(cfg: DecoderConfig = SMALL, batch: int = 2, meta: bool = True) -> ModelSource:
    def build(depth):
        torch.manual_seed(0)
        shape = dataclasses.replace(cfg, layers=depth or cfg.layers)
        tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq))
        if meta:
            with torch.device("meta"):
                return Decoder(shape), (tokens,)
        return Decoder(shape), (tokens,)

    return ModelSource(build=build, moe=MOE, layers=cfg.layers)


SOURCE = _decoder_source()
"""Shared by the tests below: a source captures each depth once."""


# The layouts of the parity matrix (tests/parallel_cases.py) whose comm_stats() the launches compare with predict_rank.
PARITY_LAYOUTS = {
    "gpt": [(2, dict(tensor=2, expert=1)), (2, dict(tensor=1, expert=2)),
            (4, dict(tensor=2, expert=2)), (4, dict(tensor=1, expert=4)), (4, dict(tensor=2, expert=2, dtd=False)),
            (4, dict(tensor=2, expert=2, activation_checkpointing="block", cac=True)),
            (4, dict(tensor=2, expert=2, activation_checkpointing="moe", cac=False, dtd=False)),
            (8, dict(tensor=2, expert=2)), (8, dict(tensor=2, expert=4)), (8, dict(tensor=1, expert=2)),
            (8, dict(tensor=2, expert=2, activation_checkpointing="block", cac=False))],
}


@pytest.mark.parametrize("model", ["gpt"])
def test_the_planner_predicts_the_collectives_explain_predicts_on_the_parity_layouts(model):
    dense, inputs = tiny_gpt()
    moe = tedfx.MoEConfig(num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=1)
    source = ModelSource(build=lambda depth: (dense, inputs), moe=moe)
    moe_gm, ctx = pipeline.build_moe_graph(dense, inputs, moe=moe, lazy=True)
    for world, fields in PARITY_LAYOUTS[model]:
        parallel = tedfx.ParallelConfig(**fields)
        cost = layout_cost(source, parallel, world, tile_numel=None)
        explained = predict_rank(moe_gm, ctx, parallel=parallel, layout=Layout.build(world, parallel), rank=0,
                                 example_inputs=inputs).comm.table()
        assert [(*key, *value) for key, value in sorted(cost.comm.items())] == sorted(explained), fields


@pytest.mark.parametrize("fields", [dict(activation_checkpointing="block", zero=1)])
def test_layer_scaling_equals_the_full_simulation(fields):
    """Three identical layers simulated at depths 1 and 2 and extrapolated: the numbers of simulating all three."""
    parallel = tedfx.ParallelConfig(tensor=2, expert=2, **fields)
    scaled = layout_cost(SOURCE, parallel, 8, tile_numel=4096)
    full = layout_cost(SOURCE, parallel, 8, tile_numel=4096, scale_layers=False)
    assert (scaled.comm, scaled.memory, scaled.flops) == (full.comm, full.memory, full.flops)
    assert scaled.flops > 0 and scaled.memory["activations"] > 0
    zero_gathers = {k: v for k, v in scaled.comm.items() if k[2] == "optimizer"}
    if parallel.zero:  # tedfx.optimizer's in-place all-gather of each sharded (axis, dtype) group after the step
        assert sorted(zero_gathers) == [("all_gather", "dp", "optimizer"), ("all_gather", "edp", "optimizer")]
        (dp_calls, dp_bytes), (edp_calls, edp_bytes) = zero_gathers[("all_gather", "dp", "optimizer")], \
            zero_gathers[("all_gather", "edp", "optimizer")]
        # Each rank sends its chunk; a group's chunks make up its padded flat buffer: the weights the rank holds.
        assert (dp_calls, edp_calls) == (1, 1) and dp_bytes * 4 + edp_bytes * 2 == scaled.memory["weights"]
    else:
        assert zero_gathers == {}


@functools.cache
def _real_moe_graph():
    """SMALL with real weights, converted once for the memory tests (each shards its own copy)."""
    dense, inputs = _decoder_source(meta=False).build(None)
    moe_gm, ctx = pipeline.build_moe_graph(dense, inputs, moe=MOE, lazy=True)
    return moe_gm, ctx, inputs


@pytest.mark.parametrize("checkpointing", ["none", "block"])
def test_predicted_memory_is_within_10_percent_of_a_measured_step(checkpointing):
    """Rank 0's real shards train one step (forward, backward, AdamW) against simulated groups: the tensor
    bytes it then holds and the peak of its allocations match the planner's prediction within 10 %."""
    parallel = tedfx.ParallelConfig(tensor=2, expert=2, activation_checkpointing=checkpointing)
    predicted = layout_cost(SOURCE, parallel, 4, tile_numel=None, scale_layers=False)
    moe_gm, ctx, inputs = _real_moe_graph()
    measured_bytes, measured_peak = measure_rank_step(moe_gm, ctx, inputs, parallel, 4, lr=1e-3)
    m = predicted.memory
    assert m["weights"] + m["grads"] + m["master"] + m["optimizer_states"] == pytest.approx(measured_bytes, rel=0.10)
    assert predicted.total_memory == pytest.approx(measured_peak, rel=0.10)


def test_the_time_model_prices_each_collective_by_the_link_its_group_crosses():
    cluster = Cluster(world_size=8, gpus_per_node=4, intra_node_gbps=100, inter_node_gbps=10)
    assert collective_seconds("all_to_all", 10**9, [0, 1], cluster) == ("intra", pytest.approx(0.5 / 100))
    assert collective_seconds("all_to_all", 10**9, [0, 4], cluster) == ("inter", pytest.approx(0.5 / 10))
    assert collective_seconds("all_reduce", 10**9, [0, 1, 2, 3], cluster) == ("intra", pytest.approx(1.5 / 100))
    assert collective_seconds("all_gather", 10**9, [0, 1], cluster) == ("intra", pytest.approx(1 / 100))
    assert collective_seconds("all_reduce", 10**9, [0], cluster) == ("intra", 0.0)


def test_the_plan_resolves_a2a_chunks_auto_as_a_run_on_its_cluster_would():
    """Expert groups across two nodes: 2 chunks, each all-to-all issued twice with half the bytes; one node: 1."""
    options = Options(dtd=(True,), activation_checkpointing=("none",), zero=(0,), tile_numel=(None,),
                      precision=("fp32",))

    def all_to_all(per_node: int) -> tuple[int | str, dict]:
        row, = plan(SMALL, cluster=Cluster(world_size=4, gpus_per_node=per_node), moe=MOE, micro_batch=2,
                    options=options, layouts=[(2, 2)]).rows
        return row.parallel.a2a_chunks, {key: value for key, value in row.cost.comm.items() if key[0] == "all_to_all"}

    (two_chunks, across), (one_chunk, inside) = all_to_all(2), all_to_all(4)
    assert (two_chunks, one_chunk) == (2, 1)
    assert across.keys() == inside.keys() and across
    assert all(list(across[key]) == [2 * calls, nbytes] for key, (calls, nbytes) in inside.items())


def test_layouts_keep_tensor_groups_inside_a_node_and_divide_the_heads_and_experts():
    cluster = Cluster(world_size=16, gpus_per_node=4)
    assert layouts_for(cluster, heads=4, experts=4) == [
        (1, 1, 16), (1, 2, 8), (1, 4, 4), (2, 1, 8), (2, 2, 4), (2, 4, 2), (4, 1, 4), (4, 2, 2), (4, 4, 1)]
    assert [t for t, _, _ in layouts_for(cluster, heads=6, experts=1)] == [1, 2]


def test_plan_refuses_what_it_cannot_plan():
    cluster = Cluster(world_size=4, gpus_per_node=2)
    with pytest.raises(ValueError, match="unknown preset"):
        plan("no-such-model", cluster=cluster)
    with pytest.raises(ValueError, match="needs moe="):
        plan(SMALL, cluster=cluster)
    with pytest.raises(ValueError, match="Cluster.memory_gib"):
        Cluster(world_size=4, memory_gib=0)


def test_presets_have_the_advertised_sizes():
    sizes = {}
    for name in ("ted-6.7b", "mixtral-8x7b"):
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in Decoder(PRESETS[name].model).parameters())
    assert sizes["ted-6.7b"] == pytest.approx(6.7e9, rel=0.02)
    assert sizes["mixtral-8x7b"] == pytest.approx(7.24e9, rel=0.02)  # Mistral-7B's base shape


# --- dtd="auto" -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, per_node, expected", [
    (4, 2, True),      # T=2 inside a node, the expert group across the two nodes: the emulated 2-node cluster
    (8, 2, True),
    (4, 4, False),     # one node (loopback): everything in-node
    (4, None, False),  # nothing said about nodes: one node assumed
    (4, 1, False),     # the tensor group crosses nodes too
])
def test_dtd_auto_is_on_exactly_where_the_all_to_all_crosses_nodes(world, per_node, expected):
    parallel = tedfx.ParallelConfig(tensor=2, expert=2, dtd="auto")
    resolved, reason = parallel.resolve_dtd(world, per_node)
    assert resolved.dtd is expected and reason.startswith(f"dtd=auto -> {'on' if expected else 'off'}")
    names = [getattr(p, "func", p).__name__ for p in pipeline.parallel_passes(resolved)]
    assert ("drop_duplicate_tokens_pass" in names) is expected


def test_dtd_auto_follows_ranks_per_node_and_leaves_explicit_choices_alone():
    assert tedfx.ParallelConfig(tensor=2, expert=2, dtd="auto", ranks_per_node=2).resolve_dtd(4, 4)[0].dtd is True
    assert tedfx.ParallelConfig(tensor=2, expert=2, dtd=True).resolve_dtd(4, 4)[0].dtd is True
    assert tedfx.ParallelConfig(tensor=1, expert=4, dtd="auto").resolve_dtd(4, 1)[0].dtd is False
    with pytest.raises(ValueError, match="unresolved"):
        pipeline.parallel_passes(tedfx.ParallelConfig(tensor=2, expert=2, dtd="auto"))
    with pytest.raises(ValueError, match="ParallelConfig.dtd"):
        tedfx.ParallelConfig(dtd="sometimes")
    with pytest.raises(ValueError, match="ParallelConfig.ranks_per_node"):
        tedfx.ParallelConfig(ranks_per_node=0)


def test_explain_shows_what_dtd_auto_chose_and_why():
    model, inputs = tiny_gpt()
    moe = tedfx.MoEConfig(num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=1)
    report = tedfx.explain(model, inputs, moe=moe, world_size=4,
                           parallel=tedfx.ParallelConfig(tensor=2, expert=2, dtd="auto", ranks_per_node=2))
    assert report.parallel["dtd"] is True and "dtd=auto -> on" in report.dtd_choice
    assert any(row[0] == "all_gather" and row[1] == "tp" for row in report.comm_table)
    assert "dtd=auto -> on" in str(report)


# --- the paper's claim (docs/planner.md, "The paper's claim") ---------------------------------------------------

V100 = Cluster(world_size=128, gpus_per_node=8, memory_gib=32, reserve_gib=2, intra_node_gbps=150,
               inter_node_gbps=12.5, tflops=60)
"""The assumptions of benchmarks/bench_plan.py --part paper, which prints the whole table."""
GPT3 = {"2.7B": DecoderConfig(layers=32, hidden=2560, heads=32, ffn=10240, vocab=51200, seq=2048),
        "6.7B": DecoderConfig(layers=32, hidden=4096, heads=32, ffn=16384, vocab=51200, seq=2048),
        "18B": DecoderConfig(layers=40, hidden=6144, heads=48, ffn=24576, vocab=51200, seq=2048),
        "30B": DecoderConfig(layers=48, hidden=7168, heads=56, ffn=28672, vocab=51200, seq=2048)}


def test_ted_fits_a_4_to_8x_larger_base_model_than_expert_and_data_parallelism_on_128_v100s():
    """At the boundary of the table: with T = 1 (expert x data parallelism) 2.7B fits and 6.7B does not; with
    T = 8 (TED, the least memory per rank) 18B fits and 30B does not. The options are those with the least
    memory in the benchmark's table (which tries them all): ZeRO-1, fp16, the tiled step, block checkpointing
    at T = 1 and none at T = 8."""
    def fits(name: str, tensor: int) -> tuple[bool, int]:
        options = Options(dtd=(True,), activation_checkpointing=("block" if tensor == 1 else "none",), zero=(1,),
                          tile_numel=(2**24,), precision=("fp16",))
        result = plan(GPT3[name], cluster=V100, moe=PRESETS["ted-6.7b"].moe, micro_batch=1, options=options,
                      layouts=[(tensor, 16)])
        return bool(result.feasible), result.base_params

    (xd_fits, xd_base), (xd_next, _) = fits("2.7B", 1), fits("6.7B", 1)
    (ted_fits, ted_base), (ted_next, _) = fits("18B", 8), fits("30B", 8)
    assert (xd_fits, xd_next, ted_fits, ted_next) == (True, False, True, False)
    assert 4 <= ted_base / xd_base <= 8


def test_the_plan_command_ranks_fitting_layouts_by_throughput_and_prices_links(capsys):
    from tedfx import cli

    # Capacity 8 (cf 1.0, top-2, 16 tokens, 4 experts): DTD's T = 2 slices of each of the 2 chunks stay whole.
    args = ["plan", "--shape", "1,32,4,4,128,gelu,64", "--seq", "16", "--experts", "4", "--capacity-factor", "1.0",
            "--world-size", "4", "--gpus-per-node", "2", "--checkpointing", "none", "--precision", "fp32",
            "--inter-gbps", "1",
            "--tflops", "1", "--layouts", "2x2,1x4"]
    assert cli.main([*args, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["tensor"], r["expert"], r["data"], r["dtd"]) for r in rows} == {
        (1, 4, 1, False), (2, 2, 1, False), (2, 2, 1, True)}
    speeds = [r["tokens_per_s"] for r in rows if r["fits"]]
    assert len(speeds) == len(rows) and speeds == sorted(speeds, reverse=True)
    # X=2 at T=2: the expert group {0, 2} crosses the nodes {0, 1}, {2, 3}: DTD sends 1/T of its bytes there.
    dtd = {r["dtd"]: r for r in rows if (r["tensor"], r["expert"]) == (2, 2) and r["zero"] == 0 and not r["tile_numel"]}
    a2a = {on: sum(c["bytes"] for c in r["comm"] if c["kind"] == "all_to_all") for on, r in dtd.items()}
    assert a2a[True] * 2 == a2a[False]
    assert {c["link"] for r in dtd.values() for c in r["comm"] if c["axis"] == "ep"} == {"inter"}
    assert {c["link"] for r in dtd.values() for c in r["comm"] if c["axis"] == "tp"} == {"intra"}
    assert cli.main([*args[:-1], "2x2", "--memory", "0.0001", "--reserve", "0"]) == 1
    out = capsys.readouterr().out
    assert "Layouts of decoder" in out and "no layout fits: no layout of" in out
    assert cli.main(["plan", "--shape", "1,32", "--world-size", "2"]) == 2
    assert "expected 7 comma-separated values" in capsys.readouterr().err
