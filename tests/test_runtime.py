"""Runtime foundations: the TED layout, the launcher, and the counted collectives.

Tier (a), no processes: Layout arithmetic against hand-written groups, error
messages, axis binding and CommStats, the input check's digests and messages (and
its one collective, in a world of one). Tier (b): one 4-rank gloo launch that checks
the mesh and every collective's forward and backward numerics and counts, plus small
launches that fail on purpose (a raising rank, a dying rank, a hanging rank).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import tedfx
from tedfx import collectives as C
from tedfx.collectives import wire
from tedfx.config import ParallelConfig
from tedfx.models.nanogpt import GPT, GPTConfig
from tedfx.pipeline import build_moe_graph, grad_sync_params, param_shards, shard_for_rank
from tedfx.predict import simulate_step
from tedfx.runtime import LaunchError, Layout, RankError, TedMesh, launch
from tedfx.runtime.grad_sync import bucket_limit, plan_buckets
from tedfx.runtime.input_check import check_same_inputs, different_inputs_message, input_signature, signature_digest
from tedfx.runtime.mesh import GROUP_AXES
from tedfx.sharding import tensor_whole

# --- Gradient buckets (no processes) ---------------------------------------------------------


def test_automatic_buckets_give_about_eight_per_axis_within_a_quarter_to_25_mib():
    MiB = 2**20

    def params(axis_bytes: dict[str, int]) -> list:
        return [(f"{axis}.{i}", torch.nn.Parameter(torch.empty(n // 4 // 8, device="meta")), axis)
                for axis, n in axis_bytes.items() for i in range(8)]

    mid = params({"dp": 40 * MiB, "edp": 4 * MiB})
    assert bucket_limit(mid, "dp", None) == 5 * MiB  # 1/8
    assert bucket_limit(mid, "edp", None) == MiB // 2  # 1/8
    assert bucket_limit(params({"edp": MiB}), "edp", None) == MiB // 4  # at least 0.25 MiB
    assert bucket_limit(params({"dp": 800 * MiB}), "dp", None) == 25 * MiB  # at most DDP's 25 MiB
    assert bucket_limit(mid, "dp", 2.0) == 2 * MiB  # an explicit size wins
    plans = plan_buckets(mid, {"dp": 2, "edp": 2}, None)
    assert [p.axis for p in plans].count("dp") == 8 and [p.axis for p in plans].count("edp") == 8


def test_the_first_automatic_bucket_is_a_quarter_of_the_others_so_the_last_layer_goes_out_first():
    """Reverse registration order: the last layer's gradients, ready first, close the first bucket at 1/4 of the
    limit; an explicit bucket_mb closes every bucket at its size."""
    MiB = 2**20
    sizes = [2 * MiB] * 3 + [MiB // 2] * 4  # first layers last: registration order
    params = [(f"p{i}", torch.nn.Parameter(torch.empty(n // 4, device="meta")), "dp") for i, n in enumerate(sizes)]
    plans = plan_buckets(params, {"dp": 2, "edp": 1}, None)  # 8 MiB: automatic limit 1 MiB, the first 1/4 MiB
    assert [p.names for p in plans] == [("p6",), ("p5", "p4"), ("p3", "p2"), ("p1",), ("p0",)]
    explicit = plan_buckets(params, {"dp": 2, "edp": 1}, 1.0)
    assert [p.names for p in explicit] == [("p6", "p5"), ("p4", "p3"), ("p2",), ("p1",), ("p0",)]


def test_parameters_tensor_parallelism_leaves_whole_get_split_buckets():
    """Gradients equal on the T tensor ranks are reduced a T-th per rank: their own buckets, split T ways."""
    params = [(name, torch.nn.Parameter(torch.empty(n, device="meta")), axis)
              for name, n, axis in (("ln.weight", 5, "dp"), ("attn.weight", 64, "dp"), ("wte.weight", 99, "dp"),
                                    ("experts.b2", 6, "edp"), ("experts.w1", 48, "edp"))]
    whole = frozenset({"ln.weight", "wte.weight", "experts.b2"})
    plans = plan_buckets(params, {"dp": 2, "edp": 2, "tp": 4}, None, whole)
    by_names = {p.names: p for p in plans}
    assert set(by_names) == {("wte.weight", "ln.weight"), ("attn.weight",), ("experts.w1",), ("experts.b2",)}
    assert by_names[("wte.weight", "ln.weight")].split == 4 and by_names[("experts.b2",)].split == 4
    assert by_names[("attn.weight",)].split == 1 and by_names[("experts.w1",)].split == 1
    assert by_names[("wte.weight", "ln.weight")].slice_numel == 26  # 104 / 4
    assert by_names[("experts.b2",)].slice_numel == 2  # 6 / 4, rounded up
    # Without tensor parallelism nothing is split.
    assert all(p.split == 1 for p in plan_buckets(params, {"dp": 2, "edp": 2, "tp": 1}, None, whole))


def test_a_simulated_step_counts_a_tth_of_the_whole_parameters_gradients_over_dp():
    """T=2, X=2 on 8 ranks: "dp" carries the sharded gradients and a half of each whole one, "tp" gathers the
    halves; against the same step without splits, exactly those bytes move from "dp" to "tp"."""
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4))
    inputs = (torch.zeros(2, 16, dtype=torch.long),)
    moe = tedfx.MoEConfig(num_experts=4, top_k=2)
    parallel = ParallelConfig(tensor=2, expert=2)
    layout = Layout.build(8, parallel)
    gm, ctx = shard_for_rank(*build_moe_graph(model, inputs, moe=moe), parallel=parallel, coords=layout.coords(0))
    whole = tensor_whole(param_shards(gm, ctx))
    assert "lm_head.weight" in whole and "h.0.ln_1.weight" in whole and "h.0.mlp.c_fc.weight" not in whole

    def table(names: frozenset[str]) -> dict[tuple, tuple[int, int]]:
        stats = simulate_step(gm, layout=layout, rank=0, bucket_mb=None, tensor_whole=names, example_inputs=inputs,
                              restore=True)
        return {tuple(row[:3]): tuple(row[3:]) for row in stats.table()}

    split, unsplit = table(whole), table(frozenset())
    plans = plan_buckets(grad_sync_params(gm), {"dp": 4, "edp": 2, "tp": 2}, None, whole)
    halved = [p for p in plans if p.split == 2]
    assert halved and all(p.axis in ("dp", "edp") for p in halved)
    half_bytes = sum(4 * p.slice_numel for p in halved)
    whole_bytes = sum(p.nbytes for p in halved)
    key_ag = ("all_gather", "tp", "backward")
    assert split[key_ag] == (unsplit[key_ag][0] + len(halved), unsplit[key_ag][1] + half_bytes)
    saved = sum(unsplit[("all_reduce", a, "backward")][1] - split[("all_reduce", a, "backward")][1]
                for a in ("dp", "edp"))
    assert saved == whole_bytes - half_bytes > 0


# --- Layout (no processes) -------------------------------------------------------------------


def test_layout_groups_t2_x2_d2():
    layout = Layout.build(8, ParallelConfig(tensor=2, expert=2))
    assert layout.shape == (2, 2, 2) and layout.axes == ("edp", "ep", "tp")
    assert layout.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.group_ranks("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.group_ranks("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.group_ranks("dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.coords(5) == {"edp": 1, "ep": 0, "tp": 1}
    assert layout.coords(6) == {"edp": 1, "ep": 1, "tp": 0}
    assert layout.group_of(6, "ep") == [4, 6]
    assert layout.group_of(6, "dp") == [0, 2, 4, 6]
    assert [layout.size(a) for a in ("tp", "ep", "edp", "dp")] == [2, 2, 2, 4]
    # Token groups: the tensor ranks of a group share one; its index is the rank's place in its "dp" group.
    assert [layout.data_parallel_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(layout.group_of(r, "dp").index(r) == layout.data_parallel_rank(r) for r in range(8))


def test_layout_matches_deepspeed_docstring_example():
    # DeepSpeed's _get_expert_parallel_ranks example: world 16, model (tensor) 2, expert 4.
    layout = Layout.build(16, ParallelConfig(tensor=2, expert=4))
    assert layout.shape == (2, 4, 2)
    assert layout.group_ranks("dp") == [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
    assert layout.group_ranks("ep") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert layout.group_ranks("edp") == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]


@pytest.mark.parametrize(
    "tensor, expert, world, expected",
    [
        (1, 2, 4, {"tp": [[0], [1], [2], [3]], "ep": [[0, 1], [2, 3]], "edp": [[0, 2], [1, 3]], "dp": [[0, 1, 2, 3]]}),
        (2, 1, 4, {"tp": [[0, 1], [2, 3]], "ep": [[0], [1], [2], [3]], "edp": [[0, 2], [1, 3]],
                   "dp": [[0, 2], [1, 3]]}),
        (2, 2, 4, {"tp": [[0, 1], [2, 3]], "ep": [[0, 2], [1, 3]], "edp": [[0], [1], [2], [3]],
                   "dp": [[0, 2], [1, 3]]}),
        (4, 1, 4, {"tp": [[0, 1, 2, 3]], "ep": [[0], [1], [2], [3]], "edp": [[0], [1], [2], [3]],
                   "dp": [[0], [1], [2], [3]]}),
        (1, 1, 2, {"tp": [[0], [1]], "ep": [[0], [1]], "edp": [[0, 1]], "dp": [[0, 1]]}),
    ],
)
def test_layout_groups_small_shapes(tensor, expert, world, expected):
    layout = Layout.build(world, ParallelConfig(tensor=tensor, expert=expert))
    for axis, groups in expected.items():
        assert layout.group_ranks(axis) == groups, axis


@pytest.mark.parametrize("tensor, expert, world", [(2, 2, 8), (2, 4, 16), (1, 3, 6), (3, 1, 12), (2, 3, 12)])
def test_layout_is_consistent(tensor, expert, world):
    layout = Layout.build(world, ParallelConfig(tensor=tensor, expert=expert))
    for rank in range(world):
        c = layout.coords(rank)
        assert layout.rank(c["edp"], c["ep"], c["tp"]) == rank
        assert rank == c["edp"] * expert * tensor + c["ep"] * tensor + c["tp"]
    for axis in GROUP_AXES:
        groups = layout.group_ranks(axis)
        assert sorted(r for g in groups for r in g) == list(range(world)), f"{axis} groups must partition the world"
        assert all(len(g) == layout.size(axis) for g in groups)
        for g in groups:
            assert all(layout.group_of(r, axis) == g for r in g)


def test_layout_errors_state_the_numbers():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor \* expert = 2 \* 2 = 4"):
        Layout.build(6, ParallelConfig(tensor=2, expert=2))
    with pytest.raises(ValueError, match=r"data=3 but world size 8 / \(tensor 2 \* expert 2\) = 2"):
        Layout.build(8, ParallelConfig(tensor=2, expert=2, data=3))
    layout = Layout.build(4, ParallelConfig(tensor=2))
    with pytest.raises(ValueError, match=r"rank 4 is out of range for a world of 4 ranks .*0\.\.3"):
        layout.coords(4)
    with pytest.raises(ValueError, match=r"unknown mesh axis 'pp'.*'tp', 'ep', 'edp', 'dp'"):
        layout.group_ranks("pp")
    with pytest.raises(ValueError, match=r"tp=2 is out of range: expected 0\.\.1"):
        layout.rank(0, 0, 2)


def test_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised process group"):
        TedMesh.build(ParallelConfig())


# --- Axis binding and CommStats (no processes) ------------------------------------------------


def test_unbound_axis_raises_clearly():
    x = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"all_to_all\(\.\.\., axis='ep'\) was called with no mesh axes bound"):
        C.all_to_all(x, "ep")
    with C.bind_axes({"tp": None}):
        with pytest.raises(RuntimeError, match=r"axis 'ep' is not bound; bound axes are \['tp'\]"):
            C.all_gather(x, "ep", 0)


def test_trivial_axes_run_in_one_process():
    stats = C.CommStats()
    x = torch.randn(4, 6, requires_grad=True)
    with C.bind_axes({"tp": None, "ep": None}, stats):
        assert C.bound_axes() == {"tp": 1, "ep": 1}
        outs = [
            C.all_reduce(x, "tp"),
            C.identity_fwd_all_reduce_bwd(x, "tp"),
            C.all_to_all(x, "ep"),
            C.all_gather(x, "tp", 1),
            C.reduce_scatter(x, "tp", 0),
            C.slice_for_rank(x, "tp", 1),
        ]
    assert all(y is x for y in outs)
    assert C.bound_axes() == {}
    assert stats.table() == []


def test_comm_stats_rows_and_phases():
    stats = C.CommStats()
    stats.record("all_to_all", "ep", "forward", 64)
    stats.record("all_to_all", "ep", "forward", 64)
    stats.record("all_to_all", "ep", "recompute", 64)
    stats.record("all_reduce", "tp", "backward", 8)
    assert stats.table() == [
        ("all_reduce", "tp", "backward", 1, 8),
        ("all_to_all", "ep", "forward", 2, 128),
        ("all_to_all", "ep", "recompute", 1, 64),
    ]
    assert stats.as_dict()[("all_to_all", "ep", "forward")] == {"calls": 2, "bytes": 128}
    assert stats.calls("all_to_all") == 3 and stats.nbytes(axis="ep") == 192
    assert "all_to_all" in str(stats)
    stats.reset()
    assert stats.table() == []
    with pytest.raises(ValueError, match="unknown communication phase 'warmup'"):
        stats.record("all_reduce", "tp", "warmup", 8)
    with pytest.raises(ValueError, match="unknown communication phase 'warmup'"):
        with C.comm_phase("warmup"):
            pass


# --- The per-call input check (no processes, or a world of one) --------------------------------


def _call(seq: int, dtype: torch.dtype = torch.long) -> tuple[tuple, dict]:
    return (torch.zeros(2, seq, dtype=dtype),), {"mask": torch.ones(2, seq, dtype=torch.bool), "use_cache": False}


def test_the_input_digest_is_the_same_in_every_process():
    """Ranks compare digests, so one must not depend on the process (Python's hash() is salted per process)."""
    signature = input_signature(*_call(8))
    assert signature == (("torch.int64", (2, 8)), ("torch.bool", (2, 8)), None)
    assert signature_digest(signature) == 4465784427454677050  # blake2b of the repr, fixed across runs
    others = [_call(16), _call(8, torch.int32), ((torch.zeros(2, 8, dtype=torch.long),), {}),
              ((torch.zeros(2, 8, dtype=torch.long), torch.zeros(1)), {})]
    digests = {signature_digest(input_signature(*call)) for call in others}
    assert len(digests) == len(others) and signature_digest(signature) not in digests
    assert all(0 <= d < 2**62 for d in digests), "the negated digest must fit an int64"


def test_different_inputs_are_named_by_rank_groups():
    a, b = input_signature(*_call(8)), input_signature(*_call(16))
    message = different_inputs_message({0: a, 1: b, 2: a, 3: a})
    assert message.startswith("ranks called the ParallelModule with different input shapes (ranks 0, 2, 3: "
                              "[(2, 8), (2, 8), None]; rank 1: [(2, 16), (2, 16), None]). Every rank must pass a "
                              "micro-batch of the same shape")
    c = input_signature(*_call(8, torch.int32))
    message = different_inputs_message({r: c if r == 5 else a for r in range(8)})
    assert message.startswith("ranks called the ParallelModule with inputs of different dtypes (ranks 0-4, 6, 7: "
                              "[(2, 8) torch.int64, (2, 8) torch.bool, None]; rank 5: [(2, 8) torch.int32, "
                              "(2, 8) torch.bool, None]). Every rank must pass inputs of the same dtypes")
    many = different_inputs_message({r: input_signature(*_call(r + 1)) for r in range(12)})
    assert "rank 7: [(2, 8), (2, 8), None]; and 4 more)" in many


def test_the_input_check_of_a_call_is_one_small_all_reduce_and_no_pickle(monkeypatch):
    calls = []

    def spy(name: str):
        fn = getattr(dist, name)

        def call(first, *args, **kwargs):
            calls.append((name, first.numel() * first.element_size() if isinstance(first, torch.Tensor) else None))
            return fn(first, *args, **kwargs)
        return call

    for name in ("all_reduce", "all_gather_object", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, spy(name))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for seq in (8, 8, 16):
            check_same_inputs(*_call(seq), device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert calls == [("all_reduce", 16)] * 3


# --- Launch under torchrun: in-process (no spawn) ----------------------------------------------


def _world_and_rank():
    return dist.get_world_size(), dist.get_rank(), dist.get_backend()


def test_launch_under_torchrun_runs_in_process(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for key, value in {**env, "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        assert launch(_world_and_rank, 1, backend="gloo", timeout=30) == [(1, 0, "gloo")]
        assert not dist.is_initialized(), "launch must destroy the process group it created"
    finally:
        torch.set_num_threads(threads)


# --- One 4-rank launch: mesh and collectives ---------------------------------------------------
# Layout T=2, X=2, D=1 on 4 ranks: tp [0,1] [2,3]; ep = dp [0,2] [1,3]; edp [r] (size 1).


def _expect(actual: torch.Tensor, expected, what: str) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, msg=lambda m: f"rank {dist.get_rank()}, {what}: {m}")


def _check_mesh(mesh: TedMesh, r: int) -> None:
    assert mesh.layout == Layout(data=1, expert=2, tensor=2)
    assert mesh.coords == {"edp": 0, "ep": r // 2, "tp": r % 2}
    expected = {"tp": [r - r % 2, r - r % 2 + 1], "ep": [r % 2, r % 2 + 2], "edp": [r], "dp": [r % 2, r % 2 + 2]}
    for axis, ranks in expected.items():
        assert sorted(dist.get_process_group_ranks(mesh.group(axis))) == ranks, axis
        assert mesh.size(axis) == len(ranks) == dist.get_world_size(mesh.group(axis))


def _check_collectives(mesh: TedMesh, r: int, stats: C.CommStats) -> None:
    t, x = r % 2, r // 2
    tp = [r - t, r - t + 1]  # tp group members
    ep = [t, t + 2]  # ep group members
    with C.bind_axes(mesh.groups(), stats):
        # all_reduce (tp): sum forward, identity backward.
        a = torch.full((2, 3), r + 1.0, requires_grad=True)
        ya = C.all_reduce(a, "tp")
        # identity forward, all-reduce backward (tp).
        b = torch.full((2, 3), float(r), requires_grad=True)
        yb = C.identity_fwd_all_reduce_bwd(b, "tp")
        # all_to_all (ep): row i of rank m goes to the i-th member of m's group.
        c = (10.0 * r + torch.arange(2.0)).unsqueeze(1).repeat(1, 3).requires_grad_()
        yc = C.all_to_all(c, "ep")
        # all_gather (tp) along dim 1.
        d = torch.full((2, 1), float(r), requires_grad=True)
        yd = C.all_gather(d, "tp", 1)
        # reduce_scatter (tp) along dim 0: rows [2t, 2t + 2) of the sum.
        e = (10.0 * r + torch.arange(4.0)).unsqueeze(1).repeat(1, 2).requires_grad_()
        ye = C.reduce_scatter(e, "tp", 0)
        # slice_for_rank (tp) along dim 1.
        s = torch.arange(8.0).reshape(2, 4).requires_grad_()
        ys = C.slice_for_rank(s, "tp", 1)
        # size-1 axis: nothing issued, the input comes back.
        assert C.all_reduce(a, "edp") is a and C.all_to_all(c, "edp") is c
        with pytest.raises(ValueError, match=r"dim 0 .* 3 is not divisible by 2"):
            C.all_to_all(torch.ones(3, 2), "ep")

    with C.bind_axes(mesh.groups()):  # uncounted: reduce_scatter along dim 1, all_gather along dim 0
        yf = C.reduce_scatter((10.0 * r + torch.arange(4.0)).repeat(2, 1), "tp", 1)
        yg = C.all_gather(torch.full((1, 2), float(r)), "tp", 0)
    # A reduce-scatter over 4 ranks (on gloo: an all-to-all and a sum of the 4 received partials).
    yw = wire.reduce_scatter((10.0 * r + torch.arange(8.0)).unsqueeze(1), 0, dist.group.WORLD, 4)

    # Forward numerics.
    _expect(ya, torch.full((2, 3), float(sum(m + 1 for m in tp))), "all_reduce forward")
    _expect(yb, b.detach(), "identity_fwd_all_reduce_bwd forward")
    _expect(yc[:, 0], [10.0 * m + x for m in ep], "all_to_all forward")
    _expect(yd, [[float(tp[0]), float(tp[1])]] * 2, "all_gather forward")
    _expect(ye[:, 0], [sum(10.0 * m + i for m in tp) for i in (2 * t, 2 * t + 1)], "reduce_scatter forward")
    _expect(ys, s.detach()[:, 2 * t : 2 * t + 2], "slice_for_rank forward")
    _expect(yf, [[sum(10.0 * m + i for m in tp) for i in (2 * t, 2 * t + 1)]] * 2, "reduce_scatter along dim 1")
    _expect(yg, [[float(tp[0])] * 2, [float(tp[1])] * 2], "all_gather along dim 0")
    _expect(yw[:, 0], [sum(10.0 * m + i for m in range(4)) for i in (2 * r, 2 * r + 1)], "reduce_scatter over 4 ranks")

    # Backward numerics, after the binding has exited (ops keep their group).
    g_rows = (100.0 * r + torch.arange(2.0)).unsqueeze(1).repeat(1, 3)
    grads = torch.autograd.grad(
        [ya, yb, yc, yd, ye, ys],
        [a, b, c, d, e, s],
        grad_outputs=[
            torch.arange(6.0).reshape(2, 3),  # ya
            torch.full((2, 3), r + 1.0),  # yb
            g_rows,  # yc
            torch.tensor([[1.0, 2.0], [1.0, 2.0]]) * (r + 1),  # yd: column j scaled by (j + 1)
            torch.full((2, 2), r + 1.0),  # ye
            torch.full((2, 2), r + 1.0),  # ys
        ],
    )
    ga, gb, gc, gd, ge, gs = grads
    _expect(ga, torch.arange(6.0).reshape(2, 3), "all_reduce backward (identity)")
    _expect(gb, torch.full((2, 3), float(sum(m + 1 for m in tp))), "identity_fwd_all_reduce_bwd backward")
    _expect(gc[:, 0], [100.0 * m + x for m in ep], "all_to_all backward")
    _expect(gd, torch.full((2, 1), float(sum((m + 1) * (t + 1) for m in tp))), "all_gather backward")
    _expect(ge[:, 0], [tp[0] + 1.0] * 2 + [tp[1] + 1.0] * 2, "reduce_scatter backward")
    _expect(gs, [[tp[0] + 1.0] * 2 + [tp[1] + 1.0] * 2] * 2, "slice_for_rank backward")
    assert all(gr.dtype == torch.float32 for gr in grads)


def _check_phases(mesh: TedMesh, r: int, stats: C.CommStats) -> None:
    """A checkpointed all-to-all is issued again during backward: counted as "recompute"."""
    w = torch.ones(4, 2, requires_grad=True)
    block = lambda v: C.all_to_all(v * 2.0, "ep").sin()  # noqa: E731
    with C.bind_axes(mesh.groups(), stats):
        y = checkpoint(block, w, use_reentrant=False, context_fn=C.checkpoint_contexts)
        unbound = checkpoint(block, w, use_reentrant=False)
        z = C.all_reduce(torch.ones(2, requires_grad=True), "dp")
        with C.comm_phase("recompute"):
            C.all_reduce(torch.ones(1), "tp")
    y.sum().backward()
    z.sum().backward()
    with pytest.raises(RuntimeError, match="recomputation: pass context_fn=tedfx.collectives.checkpoint_contexts"):
        unbound.sum().backward()


def _mesh_and_collectives() -> list:
    r = dist.get_rank()
    assert torch.get_num_threads() == 1
    mesh = TedMesh.build(ParallelConfig(tensor=2, expert=2))
    _check_mesh(mesh, r)
    stats = C.CommStats()
    _check_collectives(mesh, r, stats)
    phases = C.CommStats()
    _check_phases(mesh, r, phases)
    return [stats.table(), phases.table(), torch.tensor([r])]


@pytest.fixture(scope="module")
def four_ranks() -> list:
    return launch(_mesh_and_collectives, 4, backend="gloo", timeout=60)


def test_launch_returns_results_in_rank_order(four_ranks):
    assert [int(res[2]) for res in four_ranks] == [0, 1, 2, 3]


def test_collectives_numerics_and_mesh(four_ranks):
    # Numerics and the mesh are asserted inside the ranks; a failure there raises RankError.
    assert len(four_ranks) == 4


def test_comm_stats_counts_calls_and_bytes(four_ranks):
    f4 = 4  # bytes per float32
    expected = [
        # kind, axis, phase, calls, bytes sent by one rank (its input)
        ("all_gather", "tp", "forward", 1, 2 * 1 * f4),  # local chunk [2, 1]
        ("all_gather", "tp", "backward", 2, 2 * (2 * 2 * f4)),  # partners of reduce_scatter and slice_for_rank
        ("all_reduce", "tp", "forward", 1, 2 * 3 * f4),
        ("all_reduce", "tp", "backward", 1, 2 * 3 * f4),  # identity_fwd_all_reduce_bwd
        ("all_to_all", "ep", "forward", 1, 2 * 3 * f4),
        ("all_to_all", "ep", "backward", 1, 2 * 3 * f4),
        ("reduce_scatter", "tp", "forward", 1, 4 * 2 * f4),
        ("reduce_scatter", "tp", "backward", 1, 2 * 2 * f4),  # all_gather's partner
    ]
    for rank, (table, _, _) in enumerate(four_ranks):
        assert table == expected, f"rank {rank}"


def test_comm_stats_recompute_phase(four_ranks):
    expected = [
        ("all_reduce", "dp", "forward", 1, 8),
        ("all_reduce", "tp", "recompute", 1, 4),  # comm_phase override
        ("all_to_all", "ep", "forward", 2, 64),  # two checkpointed forwards, one not re-bound
        ("all_to_all", "ep", "backward", 1, 32),
        ("all_to_all", "ep", "recompute", 1, 32),  # checkpoint re-runs the forward in backward
    ]
    for rank, (_, table, _) in enumerate(four_ranks):
        assert table == expected, f"rank {rank}"


# --- Launches that fail on purpose -----------------------------------------------------------


def _rank1_raises() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # the others wait for rank 1, which never comes


def _rank1_dies() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def _rank1_hangs() -> int:
    if dist.get_rank() == 1:
        time.sleep(120)
    return dist.get_rank()


def test_launch_reraises_with_rank_and_traceback():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 of 4 failed: ValueError: rank one refuses") as info:
        launch(_rank1_raises, 4, backend="gloo", timeout=60)
    assert info.value.rank == 1
    assert "in _rank1_raises" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, ValueError)
    assert time.monotonic() - start < 30, "the waiting ranks must be stopped, not left to time out"


def _rank0_raises_a_multi_line_error() -> None:
    if dist.get_rank() == 0:
        error = ValueError("the reason, in one line\nthen the details\nand more details")
        error.add_note("(found by the tedfx pass shard_experts)")
        raise error
    dist.barrier()


def test_the_headline_of_a_rank_error_is_the_reason_not_its_last_line():
    with pytest.raises(RankError) as info:
        launch(_rank0_raises_a_multi_line_error, 2, backend="gloo", timeout=60)
    headline = str(info.value).splitlines()[0]
    assert headline == "rank 0 of 2 failed: ValueError: the reason, in one line"
    assert "found by the tedfx pass shard_experts" in info.value.remote_traceback


def test_launch_reports_a_dead_rank():
    with pytest.raises(LaunchError, match=r"rank 1 of 2 died with exit code 3"):
        launch(_rank1_dies, 2, backend="gloo", timeout=60)


def test_a_function_the_ranks_cannot_import_is_named_with_the_fix(tmp_path):
    """A script that defines its function under `if __name__ == "__main__":`: the started ranks import the script
    without running that block, so they cannot unpickle the function. Each says so, not "died without raising"."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text('import tedfx\n\nif __name__ == "__main__":\n    def work():\n        return 1\n\n'
                      '    tedfx.launch(work, 2, backend="gloo", timeout=60)\n')
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "RuntimeError: this rank cannot find the function to run (Can't get attribute 'work' on <module " \
           "'__mp_main__'" in run.stderr, run.stderr[-2000:]
    assert 'not under `if __name__ == "__main__":`' in run.stderr


def test_launch_ends_a_hang_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"ranks \[1\] of 2 were still running 5 s after another rank finished"):
        launch(_rank1_hangs, 2, backend="gloo", timeout=5)
    assert time.monotonic() - start < 60
