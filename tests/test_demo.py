"""The demo, its data and the `tedfx` command, end to end on the CPU."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from rich.console import Console

from tedfx import cli
from tedfx.data import decode, encode, get_batch, load_corpus, split_tokens
from tedfx.demo import DemoConfig, run_demo

# A demo small enough for the tests, in this process: 2 layers, hidden 64, E=4, k=2 on layer 1.
SMALL = DemoConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, batch_size=16, lr=1e-2, warmup=10,
                   eval_batches=4, sample_bytes=16, ranks=1)


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=100)


# --- data -------------------------------------------------------------------------------------------


def test_corpus_is_shipped_credited_and_of_the_promised_size() -> None:
    from importlib import resources

    raw = resources.files("tedfx.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    credits = raw.splitlines()[0]
    assert "public domain" in credits.lower() and "Shakespeare" in credits
    text = load_corpus()
    assert not text.startswith(credits)  # the credits line is not training data
    assert 40_000 <= len(text.encode("utf-8")) <= 100_000
    assert "In the beginning God created the heaven and the earth." in text


def test_batches_are_next_byte_pairs_and_repeat_for_a_seed() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, y = get_batch("train", 4, 32, g1)
    x2, y2 = get_batch("train", 4, 32, g2)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert int(x.max()) < 256 and int(x.min()) >= 0


def test_train_and_val_splits_partition_the_corpus() -> None:
    tokens = encode(load_corpus())
    train, val = split_tokens(tokens)
    assert train.numel() + val.numel() == tokens.numel()
    assert 0.05 < val.numel() / tokens.numel() < 0.15
    assert decode(tokens) == load_corpus()
    with pytest.raises(ValueError, match="split"):
        get_batch("test", 1, 8, torch.Generator())  # type: ignore[arg-type]


# --- demo -------------------------------------------------------------------------------------------


def test_demo_quick_runs_end_to_end_and_writes_the_run_folder(tmp_path) -> None:
    out, path = tmp_path / "run", tmp_path / "metrics.json"
    # --no-report: tedfx.explain is tested by test_inspect_draws_the_rewritten_graph, its files in the run folder
    # by test_the_run_folder_holds_the_report_and_the_graph_picture.
    proc = subprocess.run([sys.executable, "-m", "tedfx.cli", "demo", "--quick", "--out", str(out), "--json",
                           str(path), "--dense-baseline", "run", "--no-report"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sample" in proc.stdout and "MoE GPT" in proc.stdout
    # By default the demo runs T=2 x X=2 on 4 local ranks and shows the last step's collectives.
    assert "Layout(D=1 x X=2 x T=2 = 4 ranks)" in proc.stdout
    assert "all_to_all" in proc.stdout and "reduce_scatter" in proc.stdout
    # The bar shows tokens/s and the bytes rank 0 sent; the dense model trains in the same command.
    assert "tok/s" in proc.stdout and "MB/step sent" in proc.stdout
    assert "training the dense model now" in proc.stdout and "MoE vs dense (run now) after 4 equal steps" in proc.stdout
    assert f"run folder: {out}" in proc.stdout
    metrics = json.loads(path.read_text())
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 4
    for key in ("initial_train_loss", "initial_val_loss", "final_train_loss", "final_val_loss",
                "seconds", "tokens_per_second"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    # An untrained byte-level model starts near ln(256).
    assert abs(metrics["initial_train_loss"] - math.log(256)) < 0.5
    assert metrics["last_step_aux_loss"] > 0  # the model routes through MoE blocks
    assert metrics["ranks"] == 4 and metrics["final_train_loss"] < metrics["initial_train_loss"]
    kinds = {(kind, axis) for kind, axis, *_ in metrics["last_step_collectives"]}
    assert {("all_to_all", "ep"), ("all_gather", "tp"), ("all_reduce", "dp")} <= kinds
    assert metrics["sample"].startswith(metrics["config"]["prompt"])
    assert (out / "sample.txt").read_text() == metrics["sample"] + "\n"

    # Per step: losses, tokens/s and bytes sent; the last step's bytes are the collectives' table.
    moe, dense = metrics, metrics["dense"]
    assert {len(v) for v in moe["history"].values()} == {4}
    assert moe["history"]["comm_bytes"][-1] == sum(row[4] for row in moe["last_step_collectives"]) > 0
    assert moe["comm_bytes_total"] == sum(moe["history"]["comm_bytes"])
    # Both models' curves, at equal steps, and their comparison.
    assert dense["model"] == "dense" and dense["source"] == "run" and dense["steps"] == 4
    assert len(dense["history"]["train_loss"]) == len(moe["history"]["train_loss"]) == 4
    assert dense["val_curve"]["step"] == moe["val_curve"]["step"] == [0, 2, 4]
    assert len(moe["val_curve"]["val_loss"]) == len(dense["val_curve"]["val_loss"]) == 3
    assert moe["val_curve"]["val_loss"][-1] == moe["final_val_loss"]
    for split in ("train", "val"):
        row = metrics["comparison"][split]
        assert row["moe"] == moe[f"final_{split}_loss"] and row["dense"] == dense[f"final_{split}_loss"]
        assert row["moe_below_dense"] == (row["moe"] < row["dense"])
    assert set(metrics["wall_seconds"]) >= {"demo", "dense_baseline", "report_and_outputs", "total"}

    # The picture holds both curves: pixels of the MoE's and of the dense model's colour.
    from matplotlib.image import imread

    from tedfx.demo_outputs import DENSE_COLOR, MOE_COLOR

    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    pixels = imread(out / "loss.png")[..., :3]
    for color in (MOE_COLOR, DENSE_COLOR):
        rgb = torch.tensor([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        near = (torch.from_numpy(pixels.copy()) - rgb).abs().amax(dim=-1) < 0.03
        assert int(near.sum()) > 200, color
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "metrics.json", "sample.txt"]


def test_the_run_folder_holds_the_report_and_the_graph_picture(tmp_path) -> None:
    import tedfx
    from tedfx.demo_outputs import write_run_folder

    from models import tiny_gpt

    model, inputs = tiny_gpt(n_layer=2)
    report = tedfx.explain(model, inputs, moe=tedfx.MoEConfig(num_experts=4, layers=[1]))
    run = {"model": "moe", "steps": 2, "config": asdict(SMALL), "history": {"train_loss": [5.5, 5.0, 4.0]},
           "val_curve": {"step": [0, 2], "val_loss": [5.5, 4.5]}, "final_train_loss": 4.0, "final_val_loss": 4.5,
           "sample": "And God said, "}
    files = write_run_folder(tmp_path, {**run, "dense": {**run, "model": "dense"}}, report)
    assert [p.name for p in files] == ["loss.png", "graph.svg", "report.html", "report.json", "sample.txt"]
    svg = (tmp_path / "graph.svg").read_text()
    assert svg.lstrip().startswith("<svg") and "h.1.mlp" in svg
    assert "<svg" in (tmp_path / "report.html").read_text()
    assert [b["path"] for b in json.loads((tmp_path / "report.json").read_text())["blocks"]] == ["h.1.mlp"]


def test_the_dense_baseline_shipped_is_the_default_configs_and_keyed_by_what_it_depends_on() -> None:
    from tedfx.demo_outputs import baseline_key, cached_dense_run

    cfg = DemoConfig()
    cached = cached_dense_run(cfg)
    assert cached is not None, "no dense run shipped for DemoConfig(): run tedfx demo --dense-baseline refresh"
    assert cached["source"] == "cached" and cached["steps"] == cfg.steps and cached["model"] == "dense"
    assert len(cached["history"]["train_loss"]) == cfg.steps
    assert cached["val_curve"]["step"] == [0, *range(cfg.eval_every, cfg.steps, cfg.eval_every), cfg.steps]
    assert cached["val_curve"]["val_loss"][-1] == cached["final_val_loss"]
    # The MoE's, the layout's and the sample's fields do not change the dense run; the rest does.
    assert baseline_key(replace(cfg, num_experts=8, top_k=1, ranks=1, tensor=1, threads=2, sample_bytes=5)) == \
        baseline_key(cfg)
    for change in ({"lr": 1e-3}, {"steps": 299}, {"seed": 1}, {"n_embd": 64}, {"eval_batches": 8}):
        assert baseline_key(replace(cfg, **change)) != baseline_key(cfg), change


def test_demo_is_deterministic_for_a_seed() -> None:
    cfg = replace(SMALL, steps=3, eval_batches=1)
    a = run_demo(cfg, console=_quiet())
    b = run_demo(cfg, console=_quiet())
    for key in ("initial_val_loss", "final_train_loss", "final_val_loss", "last_step_aux_loss", "sample"):
        assert a[key] == b[key], key
    c = run_demo(replace(cfg, seed=1), console=_quiet())
    assert c["final_train_loss"] != a["final_train_loss"]


def test_moe_model_learns_the_corpus() -> None:
    metrics = run_demo(replace(SMALL, steps=100), console=_quiet())
    assert metrics["final_train_loss"] < 0.8 * metrics["initial_train_loss"], metrics
    assert metrics["final_val_loss"] < 0.8 * metrics["initial_val_loss"], metrics
    assert metrics["last_step_aux_loss"] > 0


# --- inspect ----------------------------------------------------------------------------------------


def test_inspect_demo_model_prints_the_converted_ffns(capsys) -> None:
    code = cli.main(["inspect", "tedfx.models.nanogpt:demo_model", "--experts", "4", "--layers", "every_other"])
    out = capsys.readouterr().out
    assert code == 0
    for path in ("h.0.mlp", "h.1.mlp", "h.2.mlp", "h.3.mlp"):
        assert path in out
    assert "E=4" in out and out.count("yes") == 2


def test_inspect_json_names_the_converted_blocks(capsys) -> None:
    code = cli.main(["inspect", "tedfx.models.nanogpt:demo_model", "--experts", "4", "--top-k", "1",
                     "--layers", "1,3", "--format", "json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [b["path"] for b in report["blocks"]] == ["h.1.mlp", "h.3.mlp"]
    assert report["moe"]["num_experts"] == 4 and report["moe"]["top_k"] == 1


def test_inspect_requires_a_model_and_example_inputs(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "user_models.py").write_text(
        "from tedfx.models.nanogpt import GPT, GPTConfig\n"
        "def model_only():\n"
        "    return GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["inspect", "user_models:model_only"]) == 2
    err = capsys.readouterr().err
    assert "(model, example_inputs)" in err
    assert cli.main(["inspect", "user_models"]) == 2
    assert "MODULE:FACTORY" in capsys.readouterr().err
    assert cli.main(["inspect", "no_such_module_xyz:f"]) == 2
    assert "cannot import" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--tensor", "2", "--expert", "2", "--world-size", "6"], "world size 6 is not divisible by tensor * expert"),
    (["--tensor", "2"], "--tensor 2 --expert 1 describe a layout of several ranks: give --world-size N too"),
    (["--layers", "7"], "MoEConfig.layers=[7] names FFN indices [7], but the model has 4 FFNs"),
])
def test_inspect_usage_errors_are_one_line_messages(capsys, args, message) -> None:
    assert cli.main(["inspect", "tedfx.models.nanogpt:demo_model", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tedfx inspect: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_without_a_command_prints_help(capsys) -> None:
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_inspect_check_passes_on_a_layout(capsys) -> None:
    code = cli.main(["inspect", "tedfx.models.nanogpt:demo_model", "--experts", "4", "--tensor", "2",
                     "--expert", "2", "--world-size", "4", "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "collective order: OK" in out and "T=2 x X=2 x D=1" in out
    assert cli.main(["inspect", "tedfx.models.nanogpt:demo_model", "--check"]) == 2
    assert "--check needs a layout" in capsys.readouterr().err


def test_inspect_draws_the_rewritten_graph(tmp_path, capsys) -> None:
    args = ["inspect", "tedfx.models.nanogpt:demo_model", "--experts", "4", "--layers", "1", "--tensor", "2",
            "--expert", "2", "--world-size", "4"]
    assert cli.main([*args, "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.lstrip().startswith("digraph") and "all_to_all" in dot
    page = tmp_path / "report.html"
    assert cli.main([*args, "-o", str(page)]) == 0
    html = page.read_text()
    assert "<svg" in html and "h.1.mlp" in html
    assert cli.main([*args, "-o", str(tmp_path / "report.txt")]) == 2
