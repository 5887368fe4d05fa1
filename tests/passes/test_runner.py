"""run_passes: the invariants it owns between passes (docs/architecture.md, "The runner").

Most tests run toy passes on a traced five-node module, so that each one
fails only when the runner does; the `@requires` and ValueError cases also run
the real passes on the captured test GPT.
"""

from __future__ import annotations

import copy
import functools
import operator
import re
import time

import pytest
import torch
import torch.fx as fx
from torch import nn

import tedfx
from tedfx.passes.checkpoint import activation_checkpoint_pass, cache_all_to_all_pass
from tedfx.passes.drop_duplicate_tokens import drop_duplicate_tokens_pass
from tedfx.passes.ffn_to_moe import ffn_to_moe_pass
from tedfx.passes.find_ffns import find_ffns_pass
from tedfx.passes.graph import MOE_META
from tedfx.passes.runner import PassContext, PassError, pass_name, requires, run_passes
from tedfx.passes.shard_experts import shard_experts_pass


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) + x


@pytest.fixture
def toy() -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(_Toy())


@pytest.fixture
def ctx() -> PassContext:
    return PassContext(moe=tedfx.MoEConfig())


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def _node(gm: fx.GraphModule, target) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.target is target]
    return node


# Toy passes. None of them lints or recompiles: that is the runner's job.

def add_to_mul_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    _node(gm, operator.add).target = operator.mul
    return gm


def double_output_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Inserts two nodes: y * 2, then + 0."""
    out = _node(gm, "output")
    y = out.args[0]
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(operator.mul, (y, 2))
        same = gm.graph.call_function(operator.add, (doubled, 0))
    out.args = (same,)
    return gm


def use_before_define_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    """Moves relu after its user: a graph that does not lint."""
    _node(gm, "output").prepend(_node(gm, torch.relu))
    return gm


def raising_pass(gm: fx.GraphModule, *, ctx: PassContext, error: Exception) -> fx.GraphModule:
    raise error


def noop_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
    return gm


# --- lint and recompile -------------------------------------------------------------------------------


def test_graph_is_recompiled_after_each_pass(toy, ctx) -> None:
    expected = torch.relu(toy.lin(X)) * X
    out = run_passes(toy, [add_to_mul_pass], ctx=ctx)
    assert out is toy
    assert "operator.mul" in out.code or " * " in out.code
    torch.testing.assert_close(out(X), expected)  # the generated forward is the rewritten one
    assert ctx.done == ["add_to_mul"]


def test_graph_that_does_not_lint_is_a_pass_error(toy, ctx) -> None:
    with pytest.raises(PassError, match=r"^pass use_before_define failed after \['noop'\]: RuntimeError: ") as info:
        run_passes(toy, [noop_pass, use_before_define_pass, add_to_mul_pass], ctx=ctx)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "relu" in str(info.value.__cause__)
    assert ctx.done == ["noop"] and [t.name for t in ctx.timings] == ["noop"]


# --- errors -------------------------------------------------------------------------------------------


def test_exception_is_a_chained_pass_error_naming_the_pass_and_what_ran_before(toy, ctx) -> None:
    error = KeyError("h.0.mlp")
    boom = functools.partial(raising_pass, error=error)
    with pytest.raises(PassError) as info:
        run_passes(toy, [noop_pass, add_to_mul_pass, boom, double_output_pass], ctx=ctx)
    assert str(info.value) == "pass raising failed after ['noop', 'add_to_mul']: KeyError: 'h.0.mlp'"
    assert info.value.__cause__ is error
    assert ctx.done == ["noop", "add_to_mul"]


def test_value_error_keeps_its_type_and_message_with_a_note_naming_the_pass(toy, ctx) -> None:
    error = ValueError("MoEConfig.num_experts=3 does not fit")
    with pytest.raises(ValueError) as info:
        run_passes(toy, [noop_pass, functools.partial(raising_pass, error=error)], ctx=ctx)
    assert info.value is error and type(info.value) is ValueError and not isinstance(info.value, PassError)
    assert str(info.value) == "MoEConfig.num_experts=3 does not fit"
    assert info.value.__notes__ == ["(found by the tedfx pass raising)"]
    assert ctx.done == ["noop"]


def test_a_real_config_error_surfaces_as_value_error_from_ffn_to_moe(dense_graph) -> None:
    gm, _ = dense_graph("gpt")
    ctx = PassContext(moe=tedfx.MoEConfig(num_experts=4, layers=[0, 7]))
    with pytest.raises(ValueError, match=r"names FFN indices \[7\], but the model has 2 FFNs") as info:
        run_passes(gm, [find_ffns_pass, ffn_to_moe_pass], ctx=ctx)
    assert not isinstance(info.value, PassError)
    assert info.value.__notes__ == ["(found by the tedfx pass ffn_to_moe)"]
    assert ctx.done == ["find_ffns"]


# --- skip ---------------------------------------------------------------------------------------------


def test_skip_by_name_leaves_the_pass_out(toy, ctx) -> None:
    expected = (torch.relu(toy.lin(X)) + X) * 2
    out = run_passes(toy, [add_to_mul_pass, double_output_pass], ctx=ctx, skip=["add_to_mul"])
    torch.testing.assert_close(out(X), expected)
    assert ctx.done == ["double_output"] and [t.name for t in ctx.timings] == ["double_output"]


def test_skip_names_a_partial_by_its_function(toy, ctx) -> None:
    boom = functools.partial(raising_pass, error=KeyError("never raised"))
    assert pass_name(boom) == "raising" and pass_name(noop_pass) == "noop"
    assert pass_name(functools.partial(activation_checkpoint_pass, mode="moe")) == "activation_checkpoint"
    run_passes(toy, [boom, noop_pass], ctx=ctx, skip=("raising",))
    assert ctx.done == ["noop"]


def test_unknown_skip_name_is_a_value_error_before_any_pass_runs(toy, ctx) -> None:
    code = toy.code
    with pytest.raises(ValueError, match=r"skip names \['add_to_mull'\] are not in the pass list"):
        run_passes(toy, [add_to_mul_pass, double_output_pass], ctx=ctx, skip=["add_to_mull"])
    assert toy.code == code and ctx.done == [] and ctx.timings == []


# --- @requires ----------------------------------------------------------------------------------------


def test_requires_fails_before_running_the_pass(toy, ctx) -> None:
    ran = []

    @requires("add_to_mul", "double_output")
    def needy_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
        ran.append(gm)
        return gm

    with pytest.raises(PassError, match=r"pass needy requires \['double_output'\] to run before it, "
                                        r"but only \['add_to_mul'\] ran"):
        run_passes(toy, [add_to_mul_pass, double_output_pass, needy_pass], ctx=ctx, skip=["double_output"])
    assert ran == [] and ctx.done == ["add_to_mul"]
    # With its requirements met (also by passes of an earlier run on this context) it runs.
    run_passes(toy, [double_output_pass, needy_pass], ctx=ctx)
    assert ran == [toy] and ctx.done == ["add_to_mul", "double_output", "needy"]


def test_shard_experts_on_a_graph_whose_ffn_to_moe_was_skipped(dense_graph) -> None:
    gm, _ = dense_graph("gpt")
    code = gm.code
    ctx = PassContext(moe=tedfx.MoEConfig(num_experts=4), parallel=tedfx.ParallelConfig(expert=2),
                      coords={"edp": 0, "ep": 0, "tp": 0})
    with pytest.raises(PassError, match=r"pass shard_experts requires \['ffn_to_moe'\] to run before it, "
                                        r"but only \['find_ffns'\] ran"):
        run_passes(gm, [find_ffns_pass, ffn_to_moe_pass, shard_experts_pass], ctx=ctx, skip=["ffn_to_moe"])
    assert gm.code == code and not any(MOE_META in n.meta for n in gm.graph.nodes)
    assert "h.0.mlp.c_fc.weight" in gm.state_dict()


@pytest.mark.parametrize("passes,missing", [
    ([drop_duplicate_tokens_pass], "['shard_experts']"),
    ([cache_all_to_all_pass], "['activation_checkpoint', 'shard_experts']"),
    ([shard_experts_pass, cache_all_to_all_pass], "['activation_checkpoint']"),
])
def test_requirements_of_the_parallel_passes(moe_graph, passes, missing) -> None:
    moe_gm, moe_ctx, _ = moe_graph("gpt")
    ctx = moe_ctx.for_rank(tedfx.ParallelConfig(tensor=2, expert=2), {"edp": 0, "ep": 0, "tp": 0})
    assert ctx.done == ["find_ffns", "ffn_to_moe"]  # carried over from the MoE graph's context
    gm = copy.deepcopy(moe_gm)
    with pytest.raises(PassError, match=re.escape(f"requires {missing} to run before it")):
        run_passes(gm, passes, ctx=ctx)


# --- debug dumps and timings --------------------------------------------------------------------------


def test_debug_keeps_the_code_before_and_after_each_pass(toy) -> None:
    ctx = PassContext(moe=tedfx.MoEConfig(), debug=True)
    original = toy.code
    run_passes(toy, [add_to_mul_pass, double_output_pass], ctx=ctx)
    assert [d[0] for d in ctx.dumps] == ["add_to_mul", "double_output"]
    (_, before_1, after_1), (_, before_2, after_2) = ctx.dumps
    assert before_1 == original and after_1 == before_2 and after_2 == toy.code
    assert " + x" in before_1 and " * x" in after_1 and " * 2" in after_2 and " * 2" not in before_2


def test_no_dumps_without_debug(toy, ctx) -> None:
    run_passes(toy, [add_to_mul_pass], ctx=ctx)
    assert ctx.dumps == []


def test_timings_per_pass_with_node_counts(toy, ctx) -> None:
    def slow_pass(gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule:
        time.sleep(0.02)
        return gm

    nodes = len(toy.graph.nodes)
    run_passes(toy, [slow_pass, double_output_pass, noop_pass], ctx=ctx, skip=["noop"])
    assert [(t.name, t.nodes_before, t.nodes_after) for t in ctx.timings] == [
        ("slow", nodes, nodes), ("double_output", nodes, nodes + 2)]
    assert ctx.timings[0].seconds >= 0.02 and ctx.timings[1].seconds >= 0
