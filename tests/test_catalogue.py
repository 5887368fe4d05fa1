"""One test per row of the validation catalogue (docs/validation.md) that no other test covers.

Each test meets the row's condition through the public API or the smallest real entry point of the
row's "detected in" column, and asserts the exception type and the message's leading words as the
catalogue quotes them. The sections follow the catalogue's; the rows tested elsewhere are listed in
TESTED_ELSEWHERE. The tests that need a process group share one world of one rank (gloo, in this
process) and come last, after every test that needs torch.distributed uninitialised.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import re
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import tedfx
from tedfx import cli, collectives
from tedfx.axes import GROUP_AXES
from tedfx.backend import _Options, built_module
from tedfx.check import check_layout
from tedfx.config import LossScaleConfig, MoEConfig, ParallelConfig
from tedfx.data import get_batch
from tedfx.passes.checkpoint import NoCheckpointRegionError, activation_checkpoint_pass
from tedfx.passes.find_ffns import NoFFNFoundError
from tedfx.passes.graph import MOE_META, Role, insert
from tedfx.passes.runner import PassError
from tedfx.pipeline import build_moe_graph, shard_for_rank
from tedfx.released import ReleasedParameterError, mark_replaced
from tedfx.report import Report
from tedfx.runtime.launch import LaunchError, _read_result, _WorkerSpec
from tedfx.runtime.mesh import Layout, TedMesh
from tedfx.runtime.precision import compute_dtype

from models import tiny_attention_only, tiny_gpt, tiny_mlp_with_dropout

TESTED_ELSEWHERE = {
    # Layout
    "world size not divisible by T * X": "test_runtime.py::test_layout_*, test_demo.py (inspect usage errors)",
    # Model shape constraints
    "MoEConfig.layers names a missing FFN index": "passes/test_runner.py, test_to_moe.py",
    "MoEConfig.layers selects none": "passes/test_ffn_to_moe.py",
    "E not divisible by X": "passes/test_shard_experts.py, test_parallel.py",
    "F not divisible by T": "passes/test_shard_experts.py",
    "projection(s) left whole": "passes/test_tp_rules.py, passes/test_tp_rules_attention.py",
    "replicate pattern matches nothing": "passes/test_tp_rules_attention.py",
    # Activation checkpointing
    "'block' cannot split the graph": "passes/test_checkpoint_regions.py",
    "checkpoint_blocks matches no module / blocks interleave": "passes/test_checkpoint_regions.py",
    # Capture and call
    "torch.export cannot trace the model": "test_to_moe.py",
    "no FFN block": "passes/test_find_ffns.py",
    "call signature mismatches": "test_keyword_inputs.py",
    "parameters released by the compile backend": "test_compile.py",
    # A dense model on the meta device
    "meta tensors without dense_state": "test_memory.py",
    # Passes
    "skip names / @requires": "passes/test_runner.py",
    # Ranks disagree (several processes)
    "different dense weights, input shapes, dtypes, RNG states": "test_parallel.py (EXPECTED_ERRORS)",
    "different micro-batches, different losses": "test_parallel_semantics.py",
    "replicas no longer agree": "test_optimizer.py (LOUD torch_clip)",
    # Training state
    "fp16 step without scale_loss": "test_optimizer.py (LOUD fp16_unscaled)",
    "optimizer state of another layout": "test_optimizer.py (ResumeCase wrong_layout)",
    # Launch and runtime
    "TedMesh.build without a process group": "test_runtime.py",
    "a rank raised / died / hung": "test_runtime.py, test_failures.py",
    "collectives without bind_axes, axis not bound": "test_runtime.py",
    "unknown communication phase": "test_runtime.py",
    # Compile backend
    "options without a MoEConfig": "test_compile.py::test_backend_needs_a_moe_config",
    "a compiled function reads parameters": "test_compile.py::test_backend_converts_a_module_not_a_function",
    "a graph break inside an FFN": "test_compile.py::test_graph_break_inside_an_ffn_is_a_clear_error",
    "using a released parameter (in a subprocess)": "test_compile.py::test_released_dense_parameter_raises_...",
    "an optimizer over replaced parameters": "test_compile.py::test_an_optimizer_on_the_dense_parameters_...",
    # Report and CLI
    "Report.save suffix": "test_report.py",
    "inspect: bad target, import, model only, --layers, layout": "test_demo.py",
    # Warnings
    "MoELossScaleWarning": "test_moe_losses.py",
    # Internal errors
    "a pass raised something else": "passes/test_runner.py",
    "ffn_to_moe without find_ffns": "passes/test_ffn_to_moe.py",
    "drop_duplicate_tokens with T = 1 or X = 1": "passes/test_drop_duplicate_tokens.py",
}
"""Catalogue rows (shortened) -> the tests that assert their message."""

MOE = MoEConfig(num_experts=2, top_k=1)


def _escaped(message: str) -> str:
    return re.escape(message)


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
    (ParallelConfig, {"bucket_mb": -1}, "ParallelConfig.bucket_mb=-1 is invalid: expected a number of MiB > 0."),
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
    with pytest.raises(ValueError, match=f"^{_escaped(message)}"):
        cls(**kwargs)


# --- Layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: Layout.build(8, ParallelConfig(tensor=2, data=3)), "ParallelConfig.data=3 but world size 8 / (tensor "),
    (lambda: Layout.build(0, ParallelConfig()), "world size 0 is invalid: expected an int >= 1."),
    (lambda: Layout(data=1, expert=0, tensor=1), "Layout.expert=0 is invalid: expected an int >= 1."),
    (lambda: Layout(data=1, expert=1, tensor=2).rank(0, 0, 2), "mesh coordinate tp=2 is out of range"),
    (lambda: Layout(data=1, expert=1, tensor=2).coords(2), "rank 2 is out of range for a world of 2 ranks"),
    (lambda: Layout(data=1, expert=1, tensor=2).size("pp"), "unknown mesh axis 'pp': expected one of ['tp', 'ep', 'edp', "),
    (lambda: TedMesh(Layout(data=1, expert=1, tensor=1), {"tp": None}, 0),
     "TedMesh needs a process group for every axis ['tp', 'ep', 'edp', 'dp']; missing ['ep', 'edp', 'dp']."),
], ids=["data", "world-size", "degree", "coordinate", "rank", "axis", "mesh-groups"])
def test_layout_rows(build, message):
    with pytest.raises(ValueError, match=f"^{_escaped(message)}"):
        build()
