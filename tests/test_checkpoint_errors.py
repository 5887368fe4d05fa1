"""Every checkpoint and export misconfiguration of docs/validation.md ("Checkpoints and export") fails with its message.

One process, plain modules: tedfx.save and tedfx.load take any nn.Module without a process group.
The rows that need a ParallelModule or several processes are tested in tests/test_checkpoint_io.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tedfx
from tedfx import CheckpointError, cli


def _saved(tmp_path, model: nn.Module | None = None, optimizer=None, name: str = "ckpt"):
    model = model or nn.Linear(4, 4)
    tedfx.save(tmp_path / name, model, optimizer)
    return tmp_path / name


def test_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        tedfx.load(tmp_path / "nowhere", nn.Linear(4, 4))


def test_a_checkpoint_of_another_format(tmp_path):
    path = _saved(tmp_path)
    info_file = path / "tedfx.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "format": 999}))
    with pytest.raises(CheckpointError, match="has checkpoint format 999, this tedfx reads 1"):
        tedfx.load(path, nn.Linear(4, 4))


def test_a_checkpoint_of_another_model(tmp_path):
    path = _saved(tmp_path, nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(CheckpointError, match=r"holds other tensors than this model: missing \['1.bias', "
                                              r"'1.weight'\], unexpected \[\]"):
        tedfx.load(path, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(CheckpointError, match=r"holds tensors of other shapes: 0.weight: checkpoint \(4, 4\), "
                                              r"this model \(8, 4\); 0.bias"):
        tedfx.load(path, nn.Sequential(nn.Linear(4, 8)))


def test_an_optimizer_the_checkpoint_does_not_hold(tmp_path):
    model = nn.Linear(4, 4)
    path = _saved(tmp_path, model)
    with pytest.raises(CheckpointError, match="was saved without an optimizer: call tedfx.load"):
        tedfx.load(path, model, torch.optim.AdamW(model.parameters()))
    with_opt = _saved(tmp_path, model, torch.optim.AdamW(model.parameters()), name="with_opt")
    groups = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}])
    with pytest.raises(CheckpointError, match="the checkpoint's optimizer has 1 parameter groups, this one 2"):
        tedfx.load(with_opt, model, groups)


def test_optimizer_groups_holding_other_parameters_than_the_saved_ones(tmp_path):
    """Groups are matched by parameter name (in any order); one that matches no single saved group is an error."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    w0, b0, ln_w, ln_b, w2, b2 = model.parameters()
    saved = torch.optim.AdamW([{"params": [w0, w2], "weight_decay": 0.1},
                               {"params": [b0, ln_w, ln_b, b2], "weight_decay": 0.0}])
    path = _saved(tmp_path, model, saved)
    moved = torch.optim.AdamW([{"params": [w0]}, {"params": [b0, ln_w, ln_b, b2, w2]}])
    with pytest.raises(CheckpointError, match=r"parameter group 1 of this optimizer holds parameters of several of "
                                              r"the checkpoint's groups: \[2.weight\] of its group 0; \[0.bias, "
                                              r"1.weight, 1.bias, 2.bias\] of its group 1"):
        tedfx.load(path, model, moved)
    split = torch.optim.AdamW([{"params": [w0]}, {"params": [w2]}])  # as many groups, other parameters
    with pytest.raises(CheckpointError, match=r"parameter groups 0 and 1 of this optimizer both hold parameters of "
                                              r"the checkpoint's group 0: \[0.weight\] and \[2.weight\]"):
        tedfx.load(path, model, split)
    outside = torch.optim.AdamW([{"params": [w0]}, {"params": [ln_w]}])  # 1.weight: no saved group's
    saved_one = _saved(tmp_path, model, torch.optim.AdamW([{"params": [w0]}, {"params": [b0]}]), name="two_groups")
    with pytest.raises(CheckpointError, match=r"parameter group 1 of this optimizer holds none of the parameters "
                                              r"of the checkpoint's groups \(it holds \[1.weight\]\)"):
        tedfx.load(saved_one, model, outside)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with torch.no_grad():
        w0.add_(1.0)
    with pytest.raises(CheckpointError):  # raised before any tensor is read
        tedfx.load(path, model, moved)
    assert torch.equal(w0, before["0.weight"] + 1.0) and not moved.state


def test_an_optimizer_of_parameters_outside_the_module(tmp_path):
    model, other = nn.Linear(4, 4), nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"the optimizer steps a parameter of shape \(3, 3\) that is not in the "
                                         r"module"):
        tedfx.save(tmp_path / "ckpt", model, torch.optim.SGD([*model.parameters(), other.weight], lr=0.1))


def test_something_that_is_not_a_module(tmp_path):
    with pytest.raises(TypeError, match="expects the ParallelModule of tedfx.parallelize or an nn.Module"):
        tedfx.save(tmp_path / "ckpt", {"weight": torch.ones(2)})


def test_export_of_a_checkpoint_without_moe_blocks_or_with_an_unreadable_config(tmp_path, capsys):
    path = _saved(tmp_path)
    assert cli.main(["export", str(path), "--to", "hf", str(tmp_path / "out")]) == 2
    assert "holds no MoE model" in capsys.readouterr().err
    path.resolve().joinpath("tedfx.json").write_text(json.dumps(
        {**json.loads((path / "tedfx.json").read_text()), "moe_layout": {"blocks": {}, "moe": {}}}))
    assert cli.main(["export", str(path), "--to", "hf", str(tmp_path / "out"), "--config", "missing.json"]) == 2
    assert capsys.readouterr().err.startswith("tedfx export: error: --config missing.json:")
