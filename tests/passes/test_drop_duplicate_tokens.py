"""drop_duplicate_tokens on a (T=2, X=2) rank graph, run in this process (docs/parallelism.md, "DTD").

The DTD graph is compared with the baseline TED graph of the same rank: its
roles and their wiring, the padded dispatch, and the all-to-all bytes of one
step counted by CommStats on both (exactly 1/T of the baseline's).
"""

from __future__ import annotations

import pytest
import torch.fx as fx

import tedfx
from tedfx import collectives
from tedfx.passes.drop_duplicate_tokens import drop_duplicate_tokens_pass
from tedfx.passes.graph import MOE_META, Role, moe_blocks
from tedfx.passes.runner import PassError, pass_name
from tedfx.passes.shard_experts import shard_experts_pass
from tedfx.pipeline import parallel_passes

T, X, E, H = 2, 2, 4, 32
MOE = tedfx.MoEConfig(num_experts=E, top_k=2, expert_noise=0.1)
"""C = 10 for the 16 tokens of a step: already a multiple of T."""
ODD = tedfx.MoEConfig(num_experts=E, top_k=1, expert_noise=0.1)
"""C = 5: DTD pads it to 6."""
DTD = [shard_experts_pass, drop_duplicate_tokens_pass]
PHASES = ("forward", "backward")


def rank(rank_graph, name: str, passes, t: int = 0, x: int = 0, moe: tedfx.MoEConfig = MOE, **parallel):
    return rank_graph(name, tensor=parallel.pop("tensor", T), expert=parallel.pop("expert", X), tp=t, ep=x,
                      passes=passes, moe=moe, **parallel)


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_dtd_roles_replace_megatron_f_and_the_tp_all_reduce(rank_graph, name) -> None:
    gm = rank(rank_graph, name, DTD, t=1, x=1).gm
    blocks = moe_blocks(gm.graph)
    assert len(blocks) == 2
    assert not [n for n in gm.graph.nodes if MOE_META in n.meta and n.meta[MOE_META].role in (Role.TP_F,
                                                                                              Role.TP_REDUCE)]
    for roles in blocks.values():
        assert Role.TP_F not in roles and Role.TP_REDUCE not in roles
        bias = [Role.EXPERT_BIAS] if Role.EXPERT_BIAS in roles else []
        chain = [Role.DISPATCH, Role.DTD_SLICE, Role.A2A_DISPATCH, Role.DTD_GATHER, Role.EXPERTS_IN,
                 Role.EXPERT_FC1, Role.EXPERT_FC2, Role.EXPERTS_OUT, Role.DTD_REDUCE_SCATTER, *bias,
                 Role.A2A_COMBINE, Role.DTD_GATHER_OUT, Role.COMBINE]
        for before, after in zip(chain, chain[1:]):
            assert roles[after].args[0] is roles[before], f"{after} does not read {before}"
        assert [(roles[r].target, roles[r].args[1:]) for r in (Role.DTD_SLICE, Role.DTD_GATHER,
                                                               Role.DTD_REDUCE_SCATTER, Role.DTD_GATHER_OUT)] == [
            (collectives.slice_for_rank, ("tp", 1)), (collectives.all_gather, ("tp", 1)),
            (collectives.reduce_scatter, ("tp", 1)), (collectives.gather_replicated, ("tp", 1))]
        # Each of them has exactly one reader: nothing still reads the unsliced or ungathered buffer.
        for role in (Role.DISPATCH, Role.A2A_DISPATCH, Role.EXPERTS_OUT, Role.A2A_COMBINE):
            assert len(roles[role].users) == 1, role
        if bias:  # FC2's bias sees one capacity slice per tensor rank: its gradient is summed over "tp"
            grad = roles[Role.DTD_BIAS_GRAD]
            assert grad.target is collectives.identity_fwd_all_reduce_bwd and grad.args == (roles["b2"], "tp")
            assert roles[Role.EXPERT_BIAS].args[1] is grad
        else:
            assert Role.DTD_BIAS_GRAD not in roles


def test_dispatch_is_padded_to_a_multiple_of_t(rank_graph) -> None:
    gm = rank(rank_graph, "gpt", DTD).gm
    for roles in moe_blocks(gm.graph).values():
        assert roles[Role.DISPATCH].kwargs == {"num_experts": E, "pad_multiple": T}
    baseline = rank(rank_graph, "gpt", [shard_experts_pass]).gm
    assert all("pad_multiple" not in r[Role.DISPATCH].kwargs for r in moe_blocks(baseline.graph).values())


def test_odd_capacity_is_padded_before_the_slice(rank_graph) -> None:
    dtd = rank(rank_graph, "gpt", DTD, moe=ODD).step()
    baseline = rank(rank_graph, "gpt", [shard_experts_pass], moe=ODD).step()
    # C = 5 slots: the baseline sends [E, 5, H]; DTD pads to 6 and sends each tensor rank's 3.
    assert {c.shape for c in baseline.trace if c.kind == "all_to_all"} == {(E, 5, H)}
    assert {c.shape for c in dtd.trace if c.kind == "all_to_all"} == {(E, 3, H)}
    assert {c.shape for c in dtd.trace if c.kind == "reduce_scatter" and c.phase == "forward"} == {(E, 6, H)}


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("t,x", [(0, 0), (1, 1)])
def test_all_to_all_bytes_per_step_fall_by_exactly_t(rank_graph, name, t, x) -> None:
    """Through the pipeline: the same rank with ParallelConfig.dtd on and off."""
    dtd_rank = rank_graph(name, tensor=T, expert=X, tp=t, ep=x, dtd=True)
    assert "drop_duplicate_tokens" in dtd_rank.ctx.done
    dtd = dtd_rank.step()
    baseline = rank_graph(name, tensor=T, expert=X, tp=t, ep=x, dtd=False).step()
    for phase in PHASES:
        assert dtd.calls("all_to_all", "ep", phase) == baseline.calls("all_to_all", "ep", phase) == 4
        assert dtd.nbytes("all_to_all", "ep", phase) * T == baseline.nbytes("all_to_all", "ep", phase) > 0
    # The duplicate tokens' "tp" all-reduces of the expert buffers are gone: in the baseline, every one is
    # [E/X, X * C, H]; with DTD only the attention's (and FC2 bias gradients) remain, all smaller.
    buffer = (E // X) * X * 10 * H * 4
    assert baseline.nbytes("all_reduce", "tp") >= 4 * buffer
    assert all(c.nbytes < buffer for c in dtd.trace if c.kind == "all_reduce")


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_a_step_counts_the_collectives_the_dtd_roles_imply(rank_graph, name) -> None:
    r = rank(rank_graph, name, DTD, t=1, x=0)
    stats = r.step()
    blocks = list(moe_blocks(r.gm.graph).values())
    n = {role: sum(role in roles for roles in blocks) for role in Role}
    C, Ct = 10, 10 // T
    half, whole = E * Ct * H * 4, E * C * H * 4  # one tensor rank's capacity slice, the whole buffer
    # forward: gather after the dispatch all-to-all and before the combine; backward: the slice's gather and
    # the reduce-scatter's. reduce_scatter forward: FC2's; backward: the first gather's.
    expected = [
        ("all_gather", "tp", "forward", n[Role.DTD_GATHER] + n[Role.DTD_GATHER_OUT],
         (n[Role.DTD_GATHER] + n[Role.DTD_GATHER_OUT]) * half),
        ("all_gather", "tp", "backward", n[Role.DTD_SLICE] + n[Role.DTD_REDUCE_SCATTER],
         (n[Role.DTD_SLICE] + n[Role.DTD_REDUCE_SCATTER]) * half),
        ("all_to_all", "ep", "forward", n[Role.A2A_DISPATCH] + n[Role.A2A_COMBINE],
         (n[Role.A2A_DISPATCH] + n[Role.A2A_COMBINE]) * half),
        ("all_to_all", "ep", "backward", n[Role.A2A_DISPATCH] + n[Role.A2A_COMBINE],
         (n[Role.A2A_DISPATCH] + n[Role.A2A_COMBINE]) * half),
        ("reduce_scatter", "tp", "forward", n[Role.DTD_REDUCE_SCATTER], n[Role.DTD_REDUCE_SCATTER] * whole),
        ("reduce_scatter", "tp", "backward", n[Role.DTD_GATHER], n[Role.DTD_GATHER] * whole),
    ]
    if n[Role.DTD_BIAS_GRAD]:
        b2 = (E // X) * H * 4
        expected.append(("all_reduce", "tp", "backward", n[Role.DTD_BIAS_GRAD], n[Role.DTD_BIAS_GRAD] * b2))
    assert n[Role.DTD_GATHER] == n[Role.DTD_SLICE] == n[Role.DTD_REDUCE_SCATTER] == n[Role.DTD_GATHER_OUT] == 2
    assert stats.table() == sorted(expected, key=lambda row: (row[0], row[1], PHASES.index(row[2])))
    assert all(p.grad is not None for p in r.gm.parameters())


@pytest.mark.parametrize("tensor,expert", [(1, 2), (2, 1), (1, 1)])
def test_without_both_axes_it_refuses_to_run(rank_graph, tensor, expert) -> None:
    """A pass list the pipeline never builds: a programming error, so a PassError (docs/validation.md)."""
    with pytest.raises(PassError, match=r"^pass drop_duplicate_tokens failed after \['find_ffns', 'ffn_to_moe', "
                                        r"'shard_experts'\]: RuntimeError: duplicate token dropping needs T > 1 and "
                                        f"X > 1, got T={tensor}, X={expert}") as info:
        rank(rank_graph, "gpt", DTD, tensor=tensor, expert=expert)
    assert type(info.value.__cause__) is RuntimeError


@pytest.mark.parametrize("tensor,expert,dtd,runs", [
    (2, 2, True, True), (2, 2, False, False), (1, 2, True, False), (2, 1, True, False)])
def test_the_pipeline_runs_it_only_with_both_axes_and_dtd_on(tensor, expert, dtd, runs) -> None:
    names = [pass_name(p) for p in parallel_passes(tedfx.ParallelConfig(tensor=tensor, expert=expert, dtd=dtd))]
    assert ("drop_duplicate_tokens" in names) == runs
    if runs:
        assert names.index("drop_duplicate_tokens") == names.index("shard_experts") + 1
