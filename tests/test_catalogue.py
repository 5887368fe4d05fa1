"""A test for every row of the validation catalogue (docs/validation.md) that no other test covers.

Each test meets the row's condition through the public API or the smallest real entry point of the
row's "detected in" column, and asserts the exception type and the message's leading words as the
catalogue quotes them. This file holds the sections from "Configs" to "Ranks disagree" and "Internal
errors"; test_catalogue_runtime.py those from "Training state" to "Warnings", and the two internal
errors that need a process group. The rows another test asserts are listed in TESTED_ELSEWHERE with
that test; where it costs nothing they are asserted here too (every config row is).
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from torch import nn

import tedfx
from tedfx import cli
from tedfx.check import check_layout
from tedfx.config import LossScaleConfig, MoEConfig, ParallelConfig
from tedfx.passes.checkpoint import NoCheckpointRegionError, activation_checkpoint_pass
from tedfx.passes.graph import MOE_META, Role, insert, set_by_target
from tedfx.pipeline import build_moe_graph, shard_for_rank
from tedfx.released import ReleasedParameterError, mark_replaced
from tedfx.runtime.launch import LaunchError, _read_result, _WorkerSpec
from tedfx.runtime.mesh import Layout, TedMesh
from tedfx.runtime.precision import compute_dtype

from models import tiny_gpt, tiny_mlp_with_dropout, untraceable

TESTED_ELSEWHERE = {
    # Configs: all tested here; test_moe_gating.py and test_optimizer.py check several fields too.
    # Layout
    "world size not divisible by T * X": "test_runtime.py::test_layout_errors_state_the_numbers",
    "mesh coordinate, rank out of range; unknown axis": "test_runtime.py::test_layout_errors_state_the_numbers",
    # Model shape constraints
    "MoEConfig.layers names a missing FFN": "passes/test_runner.py::test_a_real_config_error_surfaces_as_value_...",
    "MoEConfig.layers selects none": "passes/test_ffn_to_moe.py::test_selecting_no_ffn_is_a_value_error",
    "two runs of one FFN module": "passes/test_ffn_to_moe.py::test_an_ffn_module_run_by_two_layers_is_refused_...",
    "E not divisible by X": "passes/test_shard_experts.py::test_experts_not_divisible_by_x_is_a_value_error",
    "F not divisible by T": "passes/test_shard_experts.py::test_ffn_width_not_divisible_by_t_is_a_value_error",
    "projection(s) left whole": "passes/test_shard_tensor_parallel.py, passes/test_tp_rules*.py",
    "replicate pattern matches nothing": "passes/test_tp_rules_attention.py::test_replicate_pattern_matching_...",
    # Activation checkpointing
    "'block' cannot split the graph": "passes/test_checkpoint_regions.py::test_a_lost_ffn_exit_mark_raises_...",
    # Capture and call
    "an input of another shape": "test_keyword_inputs.py::test_a_copy_of_the_module_keeps_its_call_signature_...",
    "no FFN block": "passes/test_find_ffns.py::test_attention_only_model_raises_with_patterns_and_candidates",
    "too many inputs; an input left out; a keyword": "test_keyword_inputs.py (the tests of clear errors)",
    # Passes
    "skip names": "passes/test_runner.py::test_unknown_skip_name_is_a_value_error_before_any_pass_runs",
    "@requires": "passes/test_runner.py::test_requires_fails_before_running_the_pass",
    # Ranks disagree (several processes)
    "different weights, input shapes, dtypes, RNG states": "test_parallel.py::test_bad_input_raises_on_every_rank",
    "different micro-batches": "test_parallel_semantics.py::test_data_seeded_by_global_rank_is_verified_on_...",
    "different losses": "test_parallel_semantics.py::test_targets_seeded_by_global_rank_fail_in_the_first_backward",
    "replicas no longer agree": "test_optimizer.py::test_what_would_go_wrong_silently_raises_on_every_rank",
    # Training state
    "tedfx.optimizer given no ParallelModule": "test_optimizer.py::test_optimizer_wants_the_parallel_module",
    "fp16 step without scale_loss": "test_optimizer.py::test_what_would_go_wrong_silently_raises_on_every_rank",
    "optimizer state of another layout": "test_optimizer.py::test_state_dict_resumes_bit_for_bit_and_...",
    "set_moe_loss_scale rows": "test_moe_losses.py::test_set_moe_loss_scale_refuses_what_it_cannot_scale",
    "a parameter frozen at parallelize trained later": "test_optimizer.py::test_a_parameter_frozen_after_...",
    "a forward with gradients after pm.to(dtype)":
        "test_to_moe.py::test_a_parallel_module_cast_after_parallelize_evaluates_but_refuses_to_train_...",
    # Launch and runtime
    "TedMesh.build without a process group": "test_runtime.py::test_mesh_needs_a_process_group",
    "a rank raised": "test_runtime.py::test_launch_reraises_with_rank_and_traceback",
    "a rank died": "test_runtime.py::test_launch_reports_a_dead_rank, test_failures.py",
    "ranks still running": "test_runtime.py::test_launch_ends_a_hang_after_the_timeout",
    "no mesh axes bound; axis not bound": "test_runtime.py::test_unbound_axis_raises_clearly",
    "all_to_all dim 0 does not split": "test_runtime.py::test_collectives_numerics_and_mesh",
    "unknown communication phase": "test_runtime.py::test_comm_stats_rows_and_phases",
    # Checkpoints
    "optimizer groups holding other parameters than the saved ones":
        "test_checkpoint_errors.py::test_optimizer_groups_holding_other_parameters_than_the_saved_ones",
    "a collective call (save, load, full_state_dict, export_hf) on rank 0 alone":
        "test_parallel.py::test_save_on_rank_0_alone_says_it_is_a_collective",
    # Compile backend
    "options without a MoEConfig": "test_compile.py::test_backend_needs_a_moe_config",
    "a compiled function reads parameters": "test_compile.py::test_backend_converts_a_module_not_a_function",
    "a graph break inside an FFN": "test_compile.py::test_graph_break_inside_an_ffn_is_a_clear_error",
    "an optimizer over replaced parameters": "test_compile.py::test_an_optimizer_on_the_dense_parameters_is_an_error",
    # Report and CLI
    "inspect: not MODULE:FACTORY; cannot import; model only": "test_demo.py::test_inspect_requires_a_model_and_...",
    "inspect: several ranks, a layout or --layers that do not fit": "test_demo.py::test_inspect_usage_errors_are_...",
    # Hugging Face export (the transformers-layout row is tested in test_catalogue_runtime.py)
    "no MoE block": "test_export.py::test_a_module_without_moe_blocks_is_refused",
    "cannot be written as MixtralForCausalLM": "test_export.py::test_what_mixtral_cannot_express_is_an_error_...",
    # Warnings
    "FFN-shaped regions left dense": "passes/test_find_ffns.py::test_an_ffn_left_dense_beside_converted_ones_is_a_...",
    "a named block writes in place": "passes/test_checkpoint_regions.py::test_an_in_place_write_after_a_read_in_...",
    "matmuls in no checkpointed block": "passes/test_checkpoint_regions.py::test_a_matmul_between_blocks_in_none_...",
    "MoELossScaleWarning": "test_moe_losses.py::test_without_the_scale_loss_over_n_warns_and_weighs_the_moe_...",
    "use_cache": "test_to_moe.py::test_the_use_cache_notice_is_printed_once_per_run",
    "export of a capacity-routed model": "test_export.py::test_what_mixtral_cannot_express_is_an_error_naming_it",
    # Internal errors
    "a pass raised something else": "passes/test_runner.py::test_graph_that_does_not_lint_is_a_pass_error",
    "ffn_to_moe without find_ffns": "passes/test_ffn_to_moe.py::test_without_find_ffns_matches_on_this_graph_...",
    "drop_duplicate_tokens with T = 1 or X = 1": "passes/test_drop_duplicate_tokens.py::test_without_both_axes_...",
}
"""Catalogue rows (shortened) -> the tests that assert their message."""

MOE = MoEConfig(num_experts=2, top_k=1)


def test_the_error_classes_are_as_documented():
    # docs/validation.md, "How errors surface".
    from tedfx.passes.find_ffns import NoFFNFoundError
    from tedfx.passes.runner import PassError

    for cls in (NoFFNFoundError, NoCheckpointRegionError, tedfx.ExportError):
        assert issubclass(cls, ValueError), cls
    for cls in (tedfx.CaptureError, tedfx.CollectiveOrderError, PassError, LaunchError, ReleasedParameterError,
                tedfx.ReplicaDivergenceError, tedfx.CollectiveCallError):
        assert issubclass(cls, RuntimeError), cls
    assert issubclass(tedfx.RankError, LaunchError) and issubclass(tedfx.MoELossScaleWarning, UserWarning)


# --- Configs ---------------------------------------------------------------------------------------------

CONFIG_ROWS = [
    (MoEConfig, {"num_experts": 0}, "MoEConfig.num_experts=0 is invalid: expected an int >= 1."),
    (MoEConfig, {"num_experts": 4, "top_k": 5}, "MoEConfig.top_k=5 is invalid: expected an int in [1, num_experts=4]."),
    (MoEConfig, {"capacity_factor": 0}, "MoEConfig.capacity_factor=0 is invalid: expected a number > 0."),
    (MoEConfig, {"eval_capacity_factor": -1.0},
     "MoEConfig.eval_capacity_factor=-1.0 is invalid: expected a number > 0."),
    (MoEConfig, {"min_capacity": -1}, "MoEConfig.min_capacity=-1 is invalid: expected an int >= 0."),
    (MoEConfig, {"drop_policy": "random"},
     "MoEConfig.drop_policy='random' is invalid: expected \"probs\" or \"position\"."),
    (MoEConfig, {"noisy_gate": "gumbel"},
     "MoEConfig.noisy_gate='gumbel' is invalid: expected None, \"jitter\" or \"rsample\"."),
    (MoEConfig, {"jitter_eps": 1.0}, "MoEConfig.jitter_eps=1.0 is invalid: expected a number in [0, 1)."),
    (MoEConfig, {"aux_loss_coef": -0.1}, "MoEConfig.aux_loss_coef=-0.1 is invalid: expected a number >= 0."),
    (MoEConfig, {"z_loss_coef": -0.1}, "MoEConfig.z_loss_coef=-0.1 is invalid: expected a number >= 0."),
    (MoEConfig, {"expert_noise": -0.1}, "MoEConfig.expert_noise=-0.1 is invalid: expected a number >= 0."),
    (MoEConfig, {"layers": "odd"}, "MoEConfig.layers='odd' is invalid: expected \"all\", \"every_other\", a list "
                                   "of FFN indices or a predicate."),
    (MoEConfig, {"layers": [0, -1]},
     "MoEConfig.layers=[0, -1] is invalid: expected FFN indices as non-negative ints."),
    (ParallelConfig, {"tensor": 0}, "ParallelConfig.tensor=0 is invalid: expected an int >= 1."),
    (ParallelConfig, {"expert": 1.5}, "ParallelConfig.expert=1.5 is invalid: expected an int >= 1."),
    (ParallelConfig, {"data": 0}, "ParallelConfig.data=0 is invalid: expected None or an int >= 1."),
    (ParallelConfig, {"activation_checkpointing": "full"},
     "ParallelConfig.activation_checkpointing='full' is invalid: expected \"none\", \"block\" or \"moe\"."),
    (ParallelConfig, {"precision": "fp8"},
     "ParallelConfig.precision='fp8' is invalid: expected \"fp32\", \"bf16\" or \"fp16\"."),
    (ParallelConfig, {"timeout": 0}, "ParallelConfig.timeout=0 is invalid: expected a number of seconds > 0."),
    (ParallelConfig, {"bucket_mb": -1},
     "ParallelConfig.bucket_mb=-1 is invalid: expected None (automatic) or a number of MiB > 0."),
    (ParallelConfig, {"activation_checkpointing": "block", "checkpoint_blocks": "h.*"},
     "ParallelConfig.checkpoint_blocks='h.*' is invalid: expected a tuple of module-path patterns, e.g. (\"h.*\",)."),
    (ParallelConfig, {"checkpoint_blocks": ("h.*",)},
     "ParallelConfig.checkpoint_blocks=('h.*',) is invalid: expected () unless activation_checkpointing=\"block\" "
     "(it is "),
    (ParallelConfig, {"zero": 2}, "ParallelConfig.zero=2 is invalid: expected 0 (no sharding) or 1 (optimizer "
                                  "states and master weights sharded); False/True mean 0/1."),
    (ParallelConfig, {"replicate": ("h.*", "")}, "ParallelConfig.replicate=('h.*', '') is invalid: expected a tuple "
                                                 "of module paths or globs, e.g. (\"layers.*.attn.*\",)."),
    (ParallelConfig, {"token_group_inputs": "scatter"},
     "ParallelConfig.token_group_inputs='scatter' is invalid: expected \"broadcast\" or \"verify\"."),
    (LossScaleConfig, {"init_scale": 0.0}, "LossScaleConfig.init_scale=0.0 is invalid: expected a number > 0."),
    (LossScaleConfig, {"growth_factor": 1.0}, "LossScaleConfig.growth_factor=1.0 is invalid: expected a number > 1."),
    (LossScaleConfig, {"backoff_factor": 1.0},
     "LossScaleConfig.backoff_factor=1.0 is invalid: expected a number in (0, 1)."),
    (LossScaleConfig, {"growth_interval": 0}, "LossScaleConfig.growth_interval=0 is invalid: expected an int >= 1."),
    (LossScaleConfig, {"init_scale": 8.0, "min_scale": 16.0},
     "LossScaleConfig.min_scale=16.0 is invalid: expected a number in (0, init_scale=8.0]."),
]


@pytest.mark.parametrize("cls, kwargs, message", CONFIG_ROWS,
                         ids=[f"{cls.__name__}-{'-'.join(kwargs)}" for cls, kwargs, _ in CONFIG_ROWS])
def test_config_rows(cls, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        cls(**kwargs)


# --- Layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: Layout.build(8, ParallelConfig(tensor=2, data=3)), "ParallelConfig.data=3 but world size 8 / (tensor "),
    (lambda: Layout.build(0, ParallelConfig()), "world size 0 is invalid: expected an int >= 1."),
    (lambda: Layout(data=1, expert=0, tensor=1), "Layout.expert=0 is invalid: expected an int >= 1."),
    (lambda: Layout(data=1, expert=1, tensor=2).rank(0, 0, 2), "mesh coordinate tp=2 is out of range"),
    (lambda: Layout(data=1, expert=1, tensor=2).coords(2), "rank 2 is out of range for a world of 2 ranks"),
    (lambda: Layout(data=1, expert=1, tensor=2).size("pp"),
     "unknown mesh axis 'pp': expected one of ['tp', 'ep', 'edp', "),
    (lambda: TedMesh(Layout(data=1, expert=1, tensor=1), {"tp": None}, 0),
     "TedMesh needs a process group for every axis ['tp', 'ep', 'edp', 'dp']; missing ['ep', 'edp', 'dp']."),
], ids=["data", "world-size", "degree", "coordinate", "rank", "axis", "mesh-groups"])
def test_layout_rows(build, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        build()


# --- Model shape constraints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_moe():
    """The MoE graph of a one-block tiny GPT (a shared base: each test shards or copies it)."""
    model, inputs = tiny_gpt(n_layer=1)
    gm, ctx = build_moe_graph(model, inputs, moe=MOE)
    return gm, ctx, inputs


def _shard(gm, ctx, **parallel):
    par = ParallelConfig(**parallel)
    return shard_for_rank(gm, ctx, parallel=par, coords=Layout.build(par.tensor * par.expert, par).coords(0))


def test_an_ffn_module_that_already_has_experts():
    model, inputs = tiny_gpt(n_layer=1)
    model.h[0].mlp.experts = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape("cannot place the MoE block's 'experts' at 'h.0.mlp.experts': "
                                                   "the model already has it")):
        tedfx.to_moe(model, inputs, moe=MOE)


def test_a_planned_split_that_t_does_not_divide(gpt_moe):
    # The planner keeps a linear whole when T does not divide it, so the guard is reached only by a graph
    # whose weight no longer has the shape the plan saw: the weight is swapped for one 33 wide.
    gm, ctx, _ = gpt_moe
    corrupted = copy.deepcopy(gm)
    set_by_target(corrupted, "h.0.attn.c_proj.weight", nn.Parameter(torch.zeros(32, 33)))
    with pytest.raises(ValueError, match=re.escape("tensor parallelism with ParallelConfig.tensor=2 cannot split "
                                                   "h.0.attn.c_proj.weight of shape (32, 33)")):
        _shard(corrupted, ctx, tensor=2)


def test_alpha_dropout_on_a_split_activation():
    # tedfx writes expert dropout as aten.dropout and the tensor-parallel planner has no rule for the other
    # dropouts, so only a graph rewritten by hand reaches this check: the expert dropout becomes alpha_dropout.
    model, inputs = tiny_mlp_with_dropout()
    gm, ctx = build_moe_graph(model, inputs, moe=MOE)
    dropout = next(n for n in gm.graph.nodes if getattr(n.meta.get(MOE_META), "role", None) == Role.EXPERT_DROPOUT)
    dropout.target = torch.ops.aten.alpha_dropout.default
    with pytest.raises(ValueError, match=r"^[\w.]+: aten\.alpha_dropout\.default on an activation split over "
                                         r"\('ep',\) has no per-shard "):
        _shard(gm, ctx, expert=2)


# --- Activation checkpointing ----------------------------------------------------------------------------


class _SharedNorm(nn.Module):
    """Two residual MLPs behind one LayerNorm module, called before each: its calls span the first MLP."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 64), nn.GELU(), nn.Linear(64, hidden))
                                  for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for ffn in self.ffns:
            x = x + ffn(self.norm(x))
        return x


def test_moe_checkpointing_of_a_graph_without_moe_blocks(gpt_moe):
    _, ctx, inputs = gpt_moe
    dense = tedfx.capture(tiny_gpt(n_layer=1)[0], inputs)
    with pytest.raises(NoCheckpointRegionError, match=re.escape("activation_checkpointing='moe' found no MoE block "
                                                                "in the graph of ")):
        activation_checkpoint_pass(dense, ctx=ctx, mode="moe")


def test_checkpoint_blocks_matching_no_module(gpt_moe):
    gm, ctx, _ = gpt_moe
    with pytest.raises(NoCheckpointRegionError, match=re.escape("ParallelConfig.checkpoint_blocks=('layers.*',): "
                                                                "['layers.*'] matches no module run by ")):
        _shard(gm, ctx, activation_checkpointing="block", checkpoint_blocks=("layers.*",))


def test_checkpoint_blocks_that_interleave():
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    gm, ctx = build_moe_graph(_SharedNorm(), (x,), moe=MOE)
    with pytest.raises(NoCheckpointRegionError, match=re.escape("ParallelConfig.checkpoint_blocks=('norm', 'ffns.0'): "
                                                                "the blocks 'norm' and 'ffns.0' of ")):
        _shard(gm, ctx, activation_checkpointing="block", checkpoint_blocks=("norm", "ffns.0"))


# --- Capture and call ------------------------------------------------------------------------------------


def test_capturing_a_model_whose_parameters_were_released():
    model, inputs = tiny_gpt(n_layer=1)
    mark_replaced({"h.0.mlp.c_fc.weight": model.h[0].mlp.c_fc.weight}, release=True)  # what the backend does
    with pytest.raises(ValueError, match=re.escape("the parameters of GPT (h.0.mlp.c_fc.weight, ...) were released: ")):
        tedfx.to_moe(model, inputs, moe=MOE)


def test_a_model_export_cannot_trace():
    model, inputs = untraceable()
    with pytest.raises(tedfx.CaptureError, match=re.escape("tedfx could not capture _BranchesOnValues with "
                                                           "torch.export(strict=False): ")):
        tedfx.to_moe(model, inputs, moe=MOE)


def test_a_call_passing_an_input_by_position_and_by_name():
    model, (idx,) = tiny_gpt(n_layer=1)
    moe_model = tedfx.to_moe(model, (idx,), moe=MOE)
    with pytest.raises(TypeError, match=re.escape("GPT: this call passes idx twice (by position and by name).")):
        moe_model(idx, idx=idx)


# --- A dense model on the meta device --------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_gpt():
    """A one-block tiny GPT built on the meta device, its lazy MoE graph, and the real model's state dict."""
    dense, inputs = tiny_gpt(n_layer=1)
    with torch.device("meta"):
        meta, _ = tiny_gpt(n_layer=1)
    state = dense.state_dict()
    return meta, inputs, state


def test_a_meta_model_without_dense_state(meta_gpt):
    from tedfx.api import _dense_reader

    meta, _, _ = meta_gpt
    with pytest.raises(ValueError, match=re.escape("the dense model holds ['wte.weight', 'wpe.weight', "
                                                   "'h.0.ln_1.weight'] ... on the meta ")):
        _dense_reader(meta, None)


def test_dense_state_neither_mapping_nor_callable(meta_gpt):
    from tedfx.api import _dense_reader

    meta, _, _ = meta_gpt
    with pytest.raises(ValueError, match=re.escape("dense_state must be a mapping or a callable key -> tensor, found "
                                                   "int.")):
        _dense_reader(meta, 42)


def test_dense_state_without_a_key_the_model_holds_on_meta(meta_gpt):
    meta, inputs, state = meta_gpt
    partial = {k: v for k, v in state.items() if k not in ("wte.weight", "lm_head.weight")}
    gm, ctx = build_moe_graph(meta, inputs, moe=MOE, lazy=True, fetch_dense=partial.__getitem__)
    with pytest.raises(ValueError, match=r"^the model holds \[.*wte\.weight.*\] on the meta device and "):
        _shard(gm, ctx)


def test_dense_state_of_the_wrong_shape(meta_gpt):
    meta, inputs, state = meta_gpt
    wrong = {**state, "wpe.weight": torch.zeros(16, 32)}
    gm, ctx = build_moe_graph(meta, inputs, moe=MOE, lazy=True, fetch_dense=wrong.__getitem__)
    with pytest.raises(ValueError, match=re.escape("dense_state['wpe.weight'] has shape (16, 32), which "
                                                   "gives a shard of shape ")):
        _shard(gm, ctx)


# --- Ranks disagree --------------------------------------------------------------------------------------


def _skip_a_tp_collective_on_rank_1(monkeypatch) -> None:
    from tedfx import check

    real = check.predict_rank

    def rank1_skips_a_collective(*args, rank: int, **kwargs):
        prediction = real(*args, rank=rank, **kwargs)
        if rank == 1:
            trace = prediction.comm.trace
            trace.remove(next(c for c in trace if c.axis == "tp"))
        return prediction

    monkeypatch.setattr(check, "predict_rank", rank1_skips_a_collective)


def test_ranks_that_would_issue_different_collectives(gpt_moe, monkeypatch):
    # Every rank of a correct pipeline issues the same collectives; the predicted trace of rank 1 loses its
    # first tensor-parallel call, as a pass that treated rank 1 differently would leave it.
    gm, ctx, inputs = gpt_moe
    _skip_a_tp_collective_on_rank_1(monkeypatch)
    parallel = ParallelConfig(tensor=2)
    with pytest.raises(tedfx.CollectiveOrderError, match=r"^1 process group\(s\) would issue different collectives "
                                                         r"on different ranks, .*\n  group tp \[0, 1\]: call #0 is "):
        check_layout(gm, ctx, parallel=parallel, layout=Layout.build(2, parallel), example_inputs=inputs)


def test_inspect_check_that_finds_a_mismatch(monkeypatch, capsys):
    # "Report and CLI": tedfx inspect --check prints the error and exits with status 1.
    _skip_a_tp_collective_on_rank_1(monkeypatch)
    model, inputs = tiny_gpt(n_layer=1)
    assert cli._check_order(model, inputs, MOE, ParallelConfig(tensor=2), 2) == 1
    assert capsys.readouterr().out.startswith("collective order: FAILED\n1 process group(s) would issue ")


# --- Internal errors -------------------------------------------------------------------------------------


def test_a_shape_size_that_is_neither_an_int_nor_a_node():
    # A pass bug: a size that export never writes (here a string) on the tensor-parallel dim.
    from tedfx.passes.shard_tensor_parallel import _edit_shape

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    view = graph.call_function(torch.ops.aten.view.default, (x, [8, "s"]))
    with pytest.raises(RuntimeError, match=re.escape("view_default: cannot divide size s by T=2")):
        _edit_shape(view, 1, 1, 2)


def test_a_placement_failure_with_no_linear_to_blame(gpt_moe, monkeypatch):
    # Every rule names the column-parallel linears a failure traces back to; a rule that names none is a
    # planner bug, made here by a propagation that fails with no seeds.
    from tedfx.passes import tp_plan
    from tedfx.passes.tp_rules import Fail

    gm, _, _ = gpt_moe

    def fails_without_seeds(gm, seeds, T):
        raise Fail(frozenset(), next(n for n in gm.graph.nodes if n.op == "placeholder"), "a rule without seeds")

    monkeypatch.setattr(tp_plan, "propagate", fails_without_seeds)
    with pytest.raises(RuntimeError, match=re.escape("tensor parallelism cannot place idx: a rule without seeds")):
        tp_plan.plan_tensor_parallel(gm, 2)


def test_inserting_a_node_with_a_role_next_to_a_dense_node(gpt_moe):
    gm, _, _ = gpt_moe
    graph = copy.deepcopy(gm).graph
    tokens = next(n for n in graph.nodes if n.op == "placeholder")
    with pytest.raises(RuntimeError, match=re.escape("insert(role=tp_reduce): idx belongs to no MoE block; pass "
                                                     "tag=MoETag(...).")):
        insert(tokens, torch.relu, (tokens,), role=Role.TP_REDUCE)


def test_shard_dropout_told_that_a_node_drops_out(gpt_moe):
    # The tensor-parallel plan names the dropouts to give a per-shard mask; here it names a multiplication.
    from tedfx.passes.shard_dropout import shard_dropout_pass

    _, ctx, _ = gpt_moe
    gm = torch.fx.symbolic_trace(lambda x: torch.mul(x, 0.5))
    rank_ctx = ctx.for_rank(ParallelConfig(tensor=2), {"tp": 0, "ep": 0, "edp": 0})
    rank_ctx.records.tp_sharded_dropouts = ["mul"]
    with pytest.raises(RuntimeError, match=re.escape("mul: shard_dropout was told it drops out, but it calls ")):
        shard_dropout_pass(gm, ctx=rank_ctx)


def test_a_precision_parallel_config_refuses():
    with pytest.raises(ValueError, match=re.escape("precision 'fp8' is unknown: expected one of ")):
        compute_dtype("fp8")


def test_a_rank_that_left_no_result(tmp_path):
    spec = _WorkerSpec(pickle.dumps(print), (), 2, "gloo", 30.0, 0, str(tmp_path), {})
    with pytest.raises(LaunchError, match=re.escape("rank 1 of 2 exited cleanly but left no result; this is a bug in "
                                                    "tedfx.launch.")):
        _read_result(spec, 1)
