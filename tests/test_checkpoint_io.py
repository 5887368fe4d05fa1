"""tedfx.save and tedfx.load: exact resume, resharding across layouts, the atomic commit (docs/checkpoints.md).

Tier (a), no processes: the geometry that describes a rank's shard, ZeRO-1 slice or tile to DCP as
boxes of the full tensor, against tedfx.sharding.shard_tensor.
Tier (b): one launch of 4 ranks runs tests/checkpoint_cases.py (resume bit for bit in fp32 and in
bf16 with ZeRO-1; (2, 2, 1) -> (1, 4, 1) ZeRO-1 -> (2, 1, 2)); then this process loads its
checkpoints into the single-process tedfx.to_moe model, and sees what a mismatch raises.
A killed save runs in a subprocess of its own.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import tedfx
from tedfx.checkpoint_io import CheckpointError
from tedfx.runtime import launch
from tedfx.runtime.checkpoint_state import Placement, range_boxes, row_major_boxes
from tedfx.sharding import ParamShard, shard_tensor

from checkpoint_cases import GLOBAL_BATCH, MOE, SEQ, batches, run_checkpoints, train
from models import patch_capture, tiny_gpt
from parallel_cases import ADAM_EPS, LR

LAUNCH_TIMEOUT_S = 120
RESHARD_TOL = 1e-5
"""Weights after 5 more steps on another layout against the straight run (measured: 8e-9 to 3e-8)."""

# --- tier (a): boxes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3, 2)])
def test_a_range_of_entries_is_cut_into_contiguous_boxes_that_tile_it(shape):
    numel = torch.Size(shape).numel()
    full = torch.arange(numel).view(shape)
    for start in range(numel):
        for stop in range(start, numel + 1):
            covered = []
            for first, offsets, sizes in row_major_boxes(start, stop, shape):
                region = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                expected = torch.arange(first, first + region.numel()).view(sizes)
                assert torch.equal(region, expected), (start, stop, offsets, sizes)  # contiguous, in order
                covered += region.flatten().tolist()
            assert covered == list(range(start, stop))


SPECS = [
    ParamShard("w1", (("ep", 0), ("tp", 2)), None, (4, 6, 8)),  # an expert weight [E, H, F]
    ParamShard("c_attn", (("tp", 1),), (12, 12, 12), (5, 36)),  # fused q | k | v, split per chunk
    ParamShard("ln", (), None, (6,)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_boxes_of_a_shard_and_of_its_slices_are_where_the_full_tensor_holds_them(spec):
    sizes = {"tp": 2, "ep": 2, "edp": 1}
    full = torch.randn(spec.full_shape)
    for t in range(2):
        for x in range(2):
            coords = {"tp": t, "ep": x, "edp": 0}
            local = shard_tensor(full, spec, coords, sizes)
            placement = Placement({spec.name: spec}, coords, sizes)
            runs = placement.runs(spec)
            n = local.numel()
            # The whole shard, and a few ranges of its entries as ZeRO-1 slices or tiles hold them.
            for start, stop in [(0, n), (1, n - 3), (n // 3, n // 2), (5, 6)]:
                values = local.reshape(-1)[start:stop].clone()
                boxes = range_boxes(values, start, stop, tuple(local.shape), runs)
                assert sum(v.numel() for _, v in boxes) == stop - start
                for offsets, view in boxes:
                    region = full[tuple(slice(o, o + s) for o, s in zip(offsets, view.shape))]
                    assert torch.equal(view, region), (spec.name, coords, start, stop, offsets)


# --- tier (b): one launch of 4 ranks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_4(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("checkpoints")
    start = time.perf_counter()
    per_rank = launch(run_checkpoints, 4, str(root), backend="gloo", timeout=LAUNCH_TIMEOUT_S)
    print(f"world 4: checkpoint cases in one launch, {time.perf_counter() - start:.1f} s")
    return root, per_rank


@pytest.mark.parametrize("case", ["resume_fp32", "resume_bf16"])
def test_resume_after_save_and_load_is_bit_identical_to_training_straight(world_4, case):
    for r in world_4[1]:
        result = r[case]
        assert result["trained"] > 0, "steps 6-10 must move the weights, or the comparison proves nothing"
        assert result["identical"], f"rank {r['rank']}: weights after 5 + 5 steps differ from 10 straight"
        assert result["losses_identical"]
        assert result["masters_identical"] and result["masters"] == (2 if case == "resume_bf16" else 0)
        assert result["generator_restored"], "the CPU generator did not come back"
        assert result["extra"] == {"step": 5, "note": {"layout": "2x2x1"}}


def test_a_checkpoint_reshards_into_other_layouts_and_zero1_slices(world_4):
    for r in world_4[1]:
        reshard = r["reshard"]
        assert reshard["diff_141"] < RESHARD_TOL, reshard  # (2, 2, 1) torch AdamW -> (1, 4, 1) ZeRO-1 tiled
        assert reshard["diff_212"] < RESHARD_TOL, reshard  # (2, 2, 1) torch AdamW -> (2, 1, 2) ZeRO-1
        assert reshard["steps_212"] == [10.0]  # the step counter came through: 5 + 5


def test_the_checkpoint_holds_to_moe_keys_and_each_replicated_tensor_once(world_4):
    root, _ = world_4
    md = dcp.FileSystemReader(root / "fp32").read_metadata()
    reference = _single_process_models()["moe"]
    params = dict(reference.named_parameters())
    assert {k.removeprefix("model.") for k in md.state_dict_metadata if k.startswith("model.")} \
        == set(reference.state_dict())
    for name, p in params.items():  # AdamW's state by parameter name, with the full parameter's shape
        for state in ("exp_avg", "exp_avg_sq"):
            assert tuple(md.state_dict_metadata[f"optim.state.{name}.{state}"].size) == tuple(p.shape)
        assert tuple(md.state_dict_metadata[f"optim.state.{name}.step"].size) == ()
    written: dict[str, int] = {}
    for index in md.storage_data:
        written[index.fqn] = written.get(index.fqn, 0) + 1
    assert written["model.ln_f.weight"] == 1  # replicated on 4 ranks, written by one
    assert written["model.h.0.attn.c_attn.weight"] == 6  # q, k and v, each in 2 tensor slices
    bf16 = dcp.FileSystemReader(root / "bf16").read_metadata()
    assert "optim.state.h.0.attn.c_attn.weight.master" in bf16.state_dict_metadata


_models: dict[str, nn.Module] = {}


def _single_process_models() -> dict[str, nn.Module]:
    """The dense test GPT converted with the launch's MoEConfig, with 8 experts and with top_k=1 (one capture)."""
    if not _models:
        dense, _ = tiny_gpt()
        example = (torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long),)
        with pytest.MonkeyPatch.context() as mp:
            patch_capture(mp.setattr)
            for name, moe in [("moe", MOE), ("8_experts", tedfx.MoEConfig(num_experts=8, top_k=2)),
                              ("top1", tedfx.MoEConfig(num_experts=4, top_k=1, drop_tokens=False))]:
                _models[name] = tedfx.to_moe(dense, example, moe=moe)
    return _models


def test_the_single_process_model_loads_a_parallel_checkpoint_and_trains_on(world_4):
    """The (2, 2, 1) checkpoint into the whole model; the one (1, 4, 1) saved from ZeRO-1 slices and tiles, into
    the whole model and a torch AdamW, which trains on."""
    root, per_rank = world_4
    at_5 = per_rank[0]["at_5_fp32"]
    model = _single_process_models()["moe"]
    assert tedfx.load(root / "fp32", model)["step"] == 5  # no process group here
    assert all(torch.equal(t, at_5[k]) for k, t in model.state_dict().items())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    assert tedfx.load(root / "fp32_141_zero1", model, opt) == {"step": 5}
    assert all(torch.equal(t, at_5[k]) for k, t in model.state_dict().items())
    assert len(opt.state) == len(list(model.parameters())) and {float(s["step"]) for s in opt.state.values()} == {5.0}
    train(model, opt, batches()[5:])
    straight = per_rank[0]["straight_fp32"]
    diff = max(float((t - straight[k]).abs().max()) for k, t in model.state_dict().items())
    print(f"single process, 5 steps after loading: max |weight - straight run| = {diff:.1e}")
    assert diff < RESHARD_TOL


def test_another_expert_count_or_moe_config_is_an_error_naming_the_difference(world_4):
    root, _ = world_4
    models = _single_process_models()
    with pytest.raises(CheckpointError, match=r"MoE blocks of 4 experts, this model's MoE blocks have 8"):
        tedfx.load(root / "fp32", models["8_experts"])
    with pytest.raises(CheckpointError, match=r"another MoEConfig \(.*top_k: checkpoint 2, this model 1"):
        tedfx.load(root / "fp32", models["top1"])


def _weights_and_the_rest(model: nn.Module, hyper: list[dict]) -> list[dict]:
    """Two AdamW groups: the matrices (weight decay) and the biases and norms (none), with `hyper` each."""
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() >= 2], **hyper[0]},
            {"params": [p for _, p in named if p.dim() < 2], **hyper[1]}]


def test_optimizer_groups_built_in_another_order_take_their_own_hyperparameters_and_state(tmp_path):
    """Groups are matched by parameter name, not position (docs/checkpoints.md, "Loading elsewhere"): a
    checkpoint of [weights wd=0.1, biases wd=0] loads into the groups built the other way round."""
    model = copy.deepcopy(_single_process_models()["moe"])
    saved = [{"weight_decay": 0.1, "lr": 1e-2, "betas": (0.9, 0.99)},
             {"weight_decay": 0.0, "lr": 2e-2, "betas": (0.8, 0.95)}]
    opt = torch.optim.AdamW(_weights_and_the_rest(model, saved))
    train(model, opt, batches()[:2])
    tedfx.save(tmp_path / "ckpt", model, opt)
    loaded = copy.deepcopy(_single_process_models()["moe"])
    reversed_groups = _weights_and_the_rest(loaded, [{"weight_decay": 0.5, "lr": 1.0}] * 2)[::-1]
    opt2 = torch.optim.AdamW(reversed_groups)
    tedfx.load(tmp_path / "ckpt", loaded, opt2)
    names = {id(p): n for n, p in loaded.named_parameters()}
    for group in opt2.param_groups:
        want = saved[0] if group["params"][0].dim() >= 2 else saved[1]
        assert {k: group[k] for k in want} == want, [names[id(p)] for p in group["params"]]
    state = {n: opt.state[p] for n, p in model.named_parameters()}
    for n, p in loaded.named_parameters():  # each parameter's state is its own name's
        assert opt2.state[p].keys() == state[n].keys()
        assert all(torch.equal(v, state[n][k]) for k, v in opt2.state[p].items()), n
    train(model, opt, batches()[2:3])
    train(loaded, opt2, batches()[2:3])
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())


def test_a_parallel_module_of_another_precision_is_refused(world_4):
    _, ranks = world_4
    for rank in ranks:
        assert "was saved with ParallelConfig.precision='fp32', this module has precision='bf16'" in \
            rank["precision_error"], rank["precision_error"]


# --- a save killed half-way -------------------------------------------------------------------------------

KILLED_SAVE = """
import os, sys
import torch
import tedfx
import tedfx.checkpoint_io
from torch.distributed.checkpoint import FileSystemWriter

path, kill_at = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(4, 4)
with torch.no_grad():
    model.weight.fill_(1.0)
tedfx.save(path, model, step=1)  # the previous checkpoint
with torch.no_grad():
    model.weight.fill_(2.0)
if kill_at == "data":  # die once this rank's shard file is written, before DCP's metadata
    write_data = FileSystemWriter.write_data
    def write_and_die(self, plan, planner):
        write_data(self, plan, planner).wait()
        os._exit(17)
    FileSystemWriter.write_data = write_and_die
else:  # die with every file written and COMPLETE in place, before the link moves
    tedfx.checkpoint_io.os.symlink = lambda *args: os._exit(17)
tedfx.save(path, model, step=2)
"""


@pytest.mark.parametrize("kill_at", ["data", "link"])
def test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path, kill_at):
    path = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path), kill_at], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 17, result.stderr
    model = nn.Linear(4, 4)
    assert tedfx.load(path, model) == {"step": 1}
    assert torch.equal(model.weight, torch.ones(4, 4))
    leftovers = sorted(p.name.partition("-")[0] for p in tmp_path.iterdir() if p.name != "ckpt")
    assert leftovers == (["ckpt.data", "ckpt.tmp"] if kill_at == "data" else ["ckpt.data", "ckpt.data"])
    if kill_at == "data":
        partial = next(tmp_path.glob("ckpt.tmp-*"))
        with pytest.raises(CheckpointError, match=r"is an incomplete checkpoint: it has no COMPLETE marker"):
            tedfx.load(partial, model)
    tedfx.save(path, model, step=3)  # the next save cleans up what the killed one left
    assert [p.name.partition("-")[0] for p in tmp_path.iterdir() if p.name != "ckpt"] == ["ckpt.data"]
    assert tedfx.load(path, model) == {"step": 3}


def test_save_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a checkpoint written by tedfx.save"):
        tedfx.save(tmp_path / "mine", nn.Linear(2, 2))
    tedfx.save(tmp_path / "empty", nn.Linear(2, 2))  # an empty directory is fine
    (tmp_path / "fresh").mkdir()
    tedfx.save(tmp_path / "fresh", nn.Linear(2, 2))
    assert (tmp_path / "fresh").is_symlink() and (tmp_path / "fresh" / "COMPLETE").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note that it runs in one process
def test_plain_dcp_reads_the_weights_of_a_checkpoint(tmp_path):
    model, other = nn.Linear(3, 5), nn.Linear(3, 5)
    tedfx.save(tmp_path / "ckpt", model, step=1)
    state = {"model": other.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    other.load_state_dict(state["model"])
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
