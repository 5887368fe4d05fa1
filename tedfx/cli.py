"""The `tedfx` command: `tedfx demo`, `tedfx inspect`, `tedfx plan` and `tedfx export`.

    tedfx demo                      # MoE GPT learns English on the CPU; loss curves vs dense in runs/
    tedfx demo --quick --out runs/quick --json m.json
    tedfx inspect tedfx.models.nanogpt:demo_model --experts 8 --top-k 2
    tedfx inspect tedfx.models.nanogpt:demo_model --tensor 2 --expert 2 --world-size 4 -o report.html
    tedfx inspect tedfx.models.nanogpt:demo_model --tensor 2 --expert 2 --world-size 8 --check
    tedfx plan --preset ted-6.7b --world-size 128 --gpus-per-node 8 --memory 32 --precision fp16
    tedfx export ckpt --to hf mixtral-out
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import replace
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tedfx",
        description="Dense PyTorch model in, Mixture-of-Experts model out (DeepSpeed-TED parallelism).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="convert a byte-level GPT to MoE and train it on the CPU",
                          description="Convert a small byte-level GPT to MoE and train it with T=2 x X=2 "
                                      "parallelism on 4 local CPU ranks (tedfx.parallelize), on the "
                                      "public-domain corpus shipped with tedfx (a few minutes on two CPU "
                                      "cores).")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default 150; 4 with --quick)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the sample")
    demo.add_argument("--quick", action="store_true", help="a few small steps: checks the pipeline in seconds")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="the run folder: loss.png, graph.svg, report.html, report.json, metrics.json, "
                           "sample.txt (default runs/demo-<UTC time>)")
    demo.add_argument("--json", metavar="PATH", default=None, help="write the metrics to PATH as JSON too")
    demo.add_argument("--dense-baseline", choices=("auto", "run", "cached", "refresh", "off"), default="auto",
                      help="the dense run the MoE is compared with: auto (default) takes the run tedfx ships for "
                           "this config, or trains the dense model when there is none; run always trains it; "
                           "cached only takes the shipped one; refresh trains it and stores it as the shipped one")
    demo.add_argument("--dense", action="store_true", help="train the dense model instead, as a baseline")
    demo.add_argument("--no-report", action="store_true",
                      help="skip the report (graph.svg, report.html, report.json): saves tedfx.explain's seconds")
    demo.add_argument("--ranks", type=int, default=4,
                      help="local CPU ranks (default 4, with --tensor 2 --expert 2); 1 runs in one process")
    demo.add_argument("--tensor", type=int, default=2, help="tensor-parallel degree T (default 2)")
    demo.add_argument("--expert", type=int, default=2, help="expert-parallel degree X (default 2)")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch threads (default 1, the fastest on a busy machine; try 2 on an idle one)")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser(
        "inspect", help="show what tedfx does to a model",
        description="Import MODULE, call FACTORY() -> (model, example_inputs) and print tedfx.explain: the "
                    "FFNs found and converted, and the parameter counts. Example: "
                    "tedfx inspect tedfx.models.nanogpt:demo_model")
    inspect.add_argument("target", metavar="MODULE:FACTORY",
                         help="a function returning (model, example_inputs), e.g. tedfx.models.nanogpt:demo_model")
    inspect.add_argument("--experts", type=int, default=8, help="experts per MoE block (default 8)")
    inspect.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    inspect.add_argument("--layers", default="all",
                         help='FFNs to convert: "all", "every_other" or indices like 1,3 (default all)')
    inspect.add_argument("--capacity-factor", type=float, default=1.25, help="capacity factor (default 1.25)")
    inspect.add_argument("--tensor", type=int, default=None, help="tensor-parallel degree T of the layout")
    inspect.add_argument("--expert", type=int, default=None, help="expert-parallel degree X of the layout")
    inspect.add_argument("--world-size", type=int, default=1, help="ranks to predict for (default 1)")
    inspect.add_argument("--format", choices=("table", "json", "dot", "svg", "html"), default="table",
                         help="output format: tables, JSON, or the rewritten graph as DOT, SVG or an HTML page")
    inspect.add_argument("--output", "-o", default=None, metavar="PATH",
                         help="write the report to PATH instead (format from its suffix: .json .dot .svg .html)")
    inspect.add_argument("--graph", choices=("rank0", "dense"), default="rank0",
                         help="which graph --format dot|svg draws (default: rank 0's rewritten graph)")
    inspect.add_argument("--check", action="store_true",
                         help="build every rank's graph of the layout and check that each process group's "
                              "members issue the same collectives in the same order (no processes started)")
    inspect.set_defaults(func=_cmd_inspect)

    plan = sub.add_parser(
        "plan", help="rank layouts (T, X, D) and options of a model on a cluster by predicted memory and time",
        description="Enumerate layouts (T, X, D) and options (DTD, checkpointing, ZeRO, tiled step, precision) "
                    "for a model on a cluster, predict each rank's memory and collectives by simulating a step "
                    "without processes (as tedfx inspect does), and rank the ones that fit by predicted step "
                    "time. Example: tedfx plan --preset ted-6.7b --world-size 128 --gpus-per-node 8 --memory 32")
    what = plan.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", default=None, help="a named model shape: " + ", ".join(_preset_names()))
    what.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                      help="a function returning (model, example_inputs), simulated at its own depth")
    what.add_argument("--shape", default=None, metavar="L,H,HEADS,KV,F,KIND,VOCAB",
                      help="a decoder: layers, hidden, heads, kv heads, FFN width, gelu|swiglu, vocab "
                           "(e.g. 32,4096,32,8,14336,swiglu,32000); give --seq and --micro-batch")
    plan.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's; 2048 for --shape)")
    plan.add_argument("--micro-batch", type=int, default=None, help="sequences per token group (default 1)")
    plan.add_argument("--experts", type=int, default=None, help="experts per MoE block (default: the preset's, or 8)")
    plan.add_argument("--top-k", type=int, default=None, help="experts per token (default: the preset's, or 2)")
    plan.add_argument("--layers", default=None, help='FFNs to convert: "all", "every_other" or indices')
    plan.add_argument("--capacity-factor", type=float, default=None, help="capacity factor (default 1.25)")
    plan.add_argument("--world-size", type=int, required=True, help="ranks (devices) in all")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8)")
    plan.add_argument("--memory", type=float, default=80.0, help="device memory in GiB (default 80)")
    plan.add_argument("--reserve", type=float, default=2.0, help="GiB per device not usable by tensors (default 2)")
    plan.add_argument("--intra-gbps", type=float, default=150.0, help="in-node bandwidth per rank, GB/s (default 150)")
    plan.add_argument("--inter-gbps", type=float, default=12.5,
                      help="cross-node bandwidth per rank, GB/s (default 12.5)")
    plan.add_argument("--tflops", type=float, default=100.0, help="sustained TFLOP/s per device (default 100)")
    plan.add_argument("--precision", default="bf16", help="precisions to try, comma-separated (default bf16)")
    plan.add_argument("--checkpointing", default="none,block",
                      help="activation checkpointing modes to try, comma-separated (default none,block)")
    plan.add_argument("--layouts", default=None, metavar="TxX,...",
                      help="only these layouts, e.g. 2x8,4x8 (default: every T of a node and X of the experts)")
    plan.add_argument("--limit", type=int, default=20, help="rows of the table (default 20)")
    plan.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    plan.set_defaults(func=_cmd_plan)

    export = sub.add_parser(
        "export", help="write a checkpoint's model for other tools (Hugging Face Mixtral, or a state dict)",
        description="Read the model of a tedfx.save checkpoint (any layout) and write it to OUT: a Hugging Face "
                    "MixtralForCausalLM checkpoint for an upcycled Llama- or Mistral-family model, otherwise its "
                    "state dict (model.safetensors) and tedfx_moe.json. Example: tedfx export ckpt --to hf out")
    export.add_argument("checkpoint", metavar="DIR", help="a checkpoint written by tedfx.save")
    export.add_argument("--to", choices=("hf",), required=True, help="the format to write (hf: Hugging Face)")
    export.add_argument("output", metavar="OUT", help="the folder to write")
    export.add_argument("--config", default=None, metavar="PATH",
                        help="the dense model's Hugging Face config.json (default: the one the checkpoint keeps)")
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tedfx` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UsageError as e:
        print(f"tedfx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class UsageError(Exception):
    """A command-line input the command cannot use; printed without a traceback."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from tedfx.demo import DemoConfig, quick_config
    from tedfx.demo_outputs import baseline_key, cached_dense_run, default_run_dir, run_with_outputs

    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected at least 1")
    if args.ranks < 1:
        raise UsageError(f"--ranks {args.ranks}: expected at least 1")
    if args.ranks > 1 and args.ranks % (args.tensor * args.expert):
        raise UsageError(f"--ranks {args.ranks} is not a multiple of --tensor {args.tensor} x --expert "
                         f"{args.expert} = {args.tensor * args.expert}")
    cfg = DemoConfig(seed=args.seed, dense=args.dense, threads=args.threads, ranks=args.ranks,
                     tensor=args.tensor, expert=args.expert)
    if args.quick:
        cfg = quick_config(cfg)
    if args.steps is not None:
        if args.steps < 1:
            raise UsageError(f"--steps {args.steps}: expected at least 1 step")
        cfg = replace(cfg, steps=args.steps, warmup=min(cfg.warmup, args.steps))
    if args.dense_baseline == "cached" and not cfg.dense and cached_dense_run(cfg) is None:
        raise UsageError(f"--dense-baseline cached: tedfx ships no dense run for this config (key "
                         f"{baseline_key(cfg)}); use --dense-baseline run (or auto) to train the dense model too")
    run_with_outputs(cfg, args.out or default_run_dir(), baseline=args.dense_baseline, json_path=args.json,
                     report=not args.no_report)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import tedfx
    from tedfx.passes.find_ffns import NoFFNFoundError
    from tedfx.runtime.mesh import Layout

    layout_given = args.tensor is not None or args.expert is not None
    if layout_given and args.world_size == 1 and (args.tensor or 1) * (args.expert or 1) > 1:
        raise UsageError(f"--tensor {args.tensor or 1} --expert {args.expert or 1} describe a layout of several "
                         f"ranks: give --world-size N too (a multiple of T x X = "
                         f"{(args.tensor or 1) * (args.expert or 1)})")
    try:
        moe = tedfx.MoEConfig(num_experts=args.experts, top_k=args.top_k, layers=_parse_layers(args.layers),
                              capacity_factor=args.capacity_factor)
        parallel = None
        if layout_given or args.world_size != 1:
            parallel = tedfx.ParallelConfig(tensor=args.tensor or 1, expert=args.expert or 1)
            Layout.build(args.world_size, parallel)
    except ValueError as e:
        raise UsageError(str(e)) from e
    model, example_inputs = _call_factory(args.target)
    if args.check:
        return _check_order(model, example_inputs, moe, parallel, args.world_size)
    try:
        report = tedfx.explain(model, example_inputs, moe=moe, parallel=parallel, world_size=args.world_size)
    except (tedfx.CaptureError, NoFFNFoundError) as e:
        raise UsageError(f"tedfx cannot convert the model of {args.target}: {e}") from e
    except ValueError as e:  # the options do not fit this model (e.g. --layers naming a missing FFN)
        raise UsageError(str(e)) from e
    if args.output:
        try:
            report.save(args.output)
        except ValueError as e:
            raise UsageError(str(e)) from e
        print(f"report written to {args.output}")
    elif args.format == "json":
        print(report.to_json())
    elif args.format == "dot":
        print(report.to_dot(args.graph))
    elif args.format == "svg":
        print(report.to_svg(args.graph))
    elif args.format == "html":
        print(report.to_html())
    else:
        print(report)
    return 0


def _check_order(model: Any, example_inputs: tuple, moe: Any, parallel: Any, world_size: int) -> int:
    """`tedfx inspect --check`: exit 0 when every group agrees, 1 (with the first mismatches) when not."""
    from tedfx.api import check_collective_order
    from tedfx.capture import CaptureError
    from tedfx.check import CollectiveOrderError

    if parallel is None:
        raise UsageError("--check needs a layout: give --tensor, --expert and --world-size")
    try:
        traces = check_collective_order(model, example_inputs, moe=moe, parallel=parallel, world_size=world_size)
    except CollectiveOrderError as e:
        print(f"collective order: FAILED\n{e}")
        return 1
    except CaptureError as e:
        raise UsageError(f"tedfx cannot capture the model: {e}") from e
    except ValueError as e:
        raise UsageError(str(e)) from e
    calls = {len(t) for t in traces.values()}
    print(f"collective order: OK: the {world_size} ranks of T={parallel.tensor} x X={parallel.expert} x "
          f"D={world_size // (parallel.tensor * parallel.expert)} issue matching collectives in every group "
          f"({'/'.join(map(str, sorted(calls)))} calls per rank per step)")
    return 0


def _call_factory(target: str) -> tuple[Any, tuple[Any, ...]]:
    """Import `module:function`, call it, and check that it returned (model, example_inputs)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{target!r} is not MODULE:FACTORY; expected e.g. tedfx.models.nanogpt:demo_model")
    sys.path.insert(0, "")  # like `python -m`: modules in the current directory are importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import {module_name!r}: {e}") from e
    finally:
        sys.path.remove("")
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no function {attr!r}")
    result = factory()

    from torch import nn

    if isinstance(result, nn.Module):
        raise UsageError(f"{target}() returned a model only; it must return (model, example_inputs), "
                         f"e.g. `return model, (tokens,)`, so that tedfx can trace the model on real inputs")
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise UsageError(f"{target}() returned {type(result).__name__}; it must return (model, example_inputs)")
    model, example_inputs = result
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return model, example_inputs


def _parse_layers(text: str) -> Any:
    if text in ("all", "every_other"):
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f'--layers {text!r}: expected "all", "every_other" or FFN indices like 1,3') from None




def _preset_names() -> list[str]:
    from tedfx.plan import PRESETS

    return sorted(PRESETS)


def _cmd_plan(args: argparse.Namespace) -> int:
    import tedfx
    from tedfx.plan import PRESETS, Cluster, Options

    try:
        cluster = Cluster(world_size=args.world_size, gpus_per_node=args.gpus_per_node, memory_gib=args.memory,
                          reserve_gib=args.reserve, intra_node_gbps=args.intra_gbps, inter_node_gbps=args.inter_gbps,
                          tflops=args.tflops)
        options = Options(precision=tuple(args.precision.split(",")),
                          activation_checkpointing=tuple(args.checkpointing.split(",")))
        base = PRESETS[args.preset].moe if args.preset in PRESETS else tedfx.MoEConfig()
        changes = {k: v for k, v in (("num_experts", args.experts), ("top_k", args.top_k),
                                     ("capacity_factor", args.capacity_factor)) if v is not None}
        if args.layers is not None:
            changes["layers"] = _parse_layers(args.layers)
        moe = replace(base, **changes) if changes or not args.preset else None
        if args.shape:
            model: Any = _parse_shape(args.shape, args.seq or 2048)
        elif args.model:
            model = _call_factory(args.model)
        else:
            model = args.preset
        result = tedfx.plan(model, cluster=cluster, moe=moe, micro_batch=args.micro_batch,
                            seq=args.seq if args.preset else None, options=options,
                            layouts=_parse_layouts(args.layouts) if args.layouts else None)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.format == "json":
        print(result.to_json())
    else:
        from rich.console import Console

        console = Console(width=160, color_system=None)
        table = result.table(limit=args.limit)
        for note in table.notes:
            console.print(note)
        console.print(table.to_rich())
        if result.feasible:
            best = result.best()
            console.print(f"best: T={best.tensor} X={best.expert} D={best.data} {best.options()}: "
                          f"{best.step_s:.3f} s per step, {best.cost.total_memory / 2**30:.2f} GiB per rank")
        else:
            console.print("no layout fits: " + _no_fit(result))
            return 1
    return 0


def _no_fit(result: Any) -> str:
    try:
        result.best()
    except ValueError as e:
        return str(e)
    return ""


def _parse_layouts(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(t), int(x)) for t, x in (part.lower().split("x") for part in text.split(",") if part.strip())]
    except ValueError:
        raise UsageError(f"--layouts {text!r}: expected TxX pairs like 2x8,4x8") from None


def _parse_shape(text: str, seq: int) -> Any:
    from tedfx.models.decoder import DecoderConfig

    parts = text.split(",")
    if len(parts) != 7:
        raise UsageError(f"--shape {text!r}: expected 7 comma-separated values L,H,HEADS,KV,F,KIND,VOCAB, e.g. "
                         f"32,4096,32,8,14336,swiglu,32000")
    try:
        layers, hidden, heads, kv, ffn = (int(p) for p in parts[:5])
        vocab = int(parts[6])
    except ValueError:
        raise UsageError(f"--shape {text!r}: L, H, HEADS, KV, F and VOCAB must be integers") from None
    return DecoderConfig(layers=layers, hidden=hidden, heads=heads, kv_heads=kv, ffn=ffn, ffn_kind=parts[5],
                         vocab=vocab, seq=seq)


def _cmd_export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tedfx.checkpoint_io import CheckpointError, read_model_state
    from tedfx.export import ExportError, write_export

    try:
        state, info = read_model_state(args.checkpoint)
    except (FileNotFoundError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    if info.get("moe_layout") is None:
        raise UsageError(f"{args.checkpoint} holds no MoE model (or was saved by a tedfx that did not record its "
                         f"MoE layout): export the model with tedfx.export_hf instead.")
    config = info.get("dense_config")
    if args.config is not None:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--config {args.config}: {e}") from None
    try:
        out = write_export(state, info["moe_layout"], config, Path(args.output))
    except ExportError as e:
        raise UsageError(str(e)) from None
    kind = "MixtralForCausalLM" if (out / "config.json").exists() else "state dict and tedfx_moe.json"
    print(f"wrote {out} ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
