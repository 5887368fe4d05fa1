"""The demo's run folder and its dense baseline: `tedfx demo` end to end, outputs included.

`run_with_outputs` runs the demo (`tedfx.demo.run_demo`), then, in order:
  1. gets the dense model's run at the same steps, batches and learning rate:
     the curve shipped with tedfx for this config when there is one
     (`tedfx/data/dense_baselines.json`, keyed by `baseline_key`), otherwise
     the dense GPT trained in this process (one rank, no MoE);
  2. compares the final train and validation losses of the two;
  3. writes the run folder: `loss.png` (both models' loss curves),
     `graph.svg` and `report.html` (rank 0's rewritten graph, `tedfx.explain`),
     `report.json`, `metrics.json` (per-step losses, tokens/s, bytes sent,
     both models' final losses, config, wall times) and `sample.txt`.

The dense run the cache holds was made by `tedfx demo --dense-baseline refresh`
with the config it is keyed by; any change to a field the dense run depends on
(steps, batch, model size, learning rate, data, seed, ...) or to the code of the
model, the data or the training loop changes the key, so a stale curve is never
shown: the dense model is trained instead (docs/demo.md, "The dense baseline").
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

import tedfx
from tedfx import data, demo
from tedfx.demo import DemoConfig, build_model, run_demo
from tedfx.models import nanogpt

__all__ = ["BaselineMode", "BASELINE_MODES", "baseline_key", "cached_dense_run", "dense_baseline", "compare",
           "plot_loss_curves", "write_run_folder", "run_with_outputs", "default_run_dir"]

BaselineMode = Literal["auto", "run", "cached", "refresh", "off"]
BASELINE_MODES: tuple[str, ...] = ("auto", "run", "cached", "refresh", "off")
"""auto: the cached dense run of this config if there is one, else train the dense model; run: always train it;
cached: only the cached run (an error if there is none); refresh: train it and store it in the cache; off: none."""

# Fields the dense run does not depend on: the MoE's and the layout's, the sample's, the thread count.
_NOT_IN_DENSE_RUN = frozenset({"num_experts", "top_k", "layers", "expert_noise", "dense", "tensor", "expert",
                               "ranks", "threads", "sample_bytes", "prompt"})
_CACHE_FILE = "dense_baselines.json"
MOE_COLOR, DENSE_COLOR = "#7c3aed", "#4b5563"


def baseline_key(cfg: DemoConfig) -> str:
    """A hash of everything the dense run of `cfg` depends on: the config fields that matter, the corpus, and
    the code of the model, the data and the training loop (a change to any of them makes the cached run stale)."""
    fields = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_DENSE_RUN}
    corpus = resources.files("tedfx.data").joinpath("corpus.txt").read_bytes()
    code = "".join(inspect.getsource(obj) for obj in (
        nanogpt, data, demo.build_model, demo.lm_loss, demo.evaluate, demo._lr_lambda, demo.train_step, demo.train))
    text = json.dumps({"config": fields, "corpus": hashlib.sha256(corpus).hexdigest(),
                       "code": hashlib.sha256(code.encode()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_path() -> Path:
    return Path(str(resources.files("tedfx.data").joinpath(_CACHE_FILE)))


def _read_cache() -> dict[str, Any]:
    path = _cache_path()
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def cached_dense_run(cfg: DemoConfig) -> dict[str, Any] | None:
    """The dense run shipped for `cfg`'s key, or None."""
    entry = _read_cache().get(baseline_key(cfg))
    return None if entry is None else {**entry, "source": "cached"}


def _slim(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the baseline keeps of a dense run: losses, curves and seconds, numbers rounded to 6 digits."""
    keep = ("model", "steps", "initial_train_loss", "initial_val_loss", "final_train_loss", "final_val_loss",
            "last_step_loss", "train_seconds", "tokens_per_second", "seconds", "threads", "ranks", "history",
            "val_curve")

    def rounded(x: Any) -> Any:
        if isinstance(x, float):
            return float(f"{x:.6g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x

    out = {k: rounded(metrics[k]) for k in keep if k in metrics}
    out["history"] = {k: v for k, v in out["history"].items() if k in ("train_loss", "seconds", "tokens_per_second")}
    return out


def dense_baseline(cfg: DemoConfig, mode: BaselineMode, console: Console) -> dict[str, Any] | None:
    """The dense model's run to compare `cfg`'s MoE run with, as `mode` asks; None for "off".

    Raises:
        LookupError: mode "cached" and no run is cached for `cfg`.
    """
    if mode == "off":
        return None
    if mode in ("auto", "cached"):
        cached = cached_dense_run(cfg)
        if cached is not None:
            console.print(f"dense baseline: the cached run of this config (key {baseline_key(cfg)}, "
                          f"torch {cached.get('torch', '?')})")
            return cached
        if mode == "cached":
            raise LookupError(f"no cached dense run for this config (key {baseline_key(cfg)}); tedfx ships dense "
                              f"runs for {len(_read_cache())} config(s), the default one among them: train the "
                              f"dense model instead (mode 'run' or 'auto')")
        console.print(f"dense baseline: no cached run for this config (key {baseline_key(cfg)}); "
                      f"training the dense model now, in this process")
    else:
        console.print(f"dense baseline: training the dense model now, in this process (mode {mode!r})")
    dense_cfg = replace(cfg, dense=True, ranks=1, sample_bytes=0)
    metrics = _slim(run_demo(dense_cfg, console=console))
    metrics.update(source="run", key=baseline_key(cfg), torch=torch.__version__.split("+")[0],
                   config={k: v for k, v in asdict(dense_cfg).items() if k not in _NOT_IN_DENSE_RUN})
    if mode == "refresh":
        cache = _read_cache()
        cache[baseline_key(cfg)] = {k: v for k, v in metrics.items() if k != "source"}
        _cache_path().write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        console.print(f"dense baseline stored in {_cache_path()} (key {baseline_key(cfg)})")
    return metrics


def compare(moe: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """Final losses of both runs at equal steps; `moe_below_dense` per split (a lower loss is better)."""
    if moe["steps"] != dense["steps"]:
        raise ValueError(f"the runs differ in steps: MoE {moe['steps']}, dense {dense['steps']}; compare runs of "
                         f"equal steps")
    out: dict[str, Any] = {"steps": moe["steps"], "dense_source": dense.get("source", "run")}
    for split in ("train", "val"):
        m, d = moe[f"final_{split}_loss"], dense[f"final_{split}_loss"]
        out[split] = {"moe": m, "dense": d, "moe_minus_dense": m - d, "moe_below_dense": m < d}
    return out


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with bias correction (the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _losses_from(metrics: dict[str, Any], start: int) -> list[float]:
    """The train and validation losses of `metrics` from step `start` on."""
    curve = metrics["val_curve"]
    return [*metrics["history"]["train_loss"][start:],
            *(loss for step, loss in zip(curve["step"], curve["val_loss"]) if step >= start)]


def plot_loss_curves(path: str | Path, runs: dict[str, dict[str, Any]], title: str) -> Path:
    """Draw each run's train loss per step (smoothed over the raw one) and validation loss into a PNG.

    Args:
        path: the PNG to write.
        runs: {"MoE" | "dense": metrics with `history["train_loss"]` and `val_curve`}.
        title: the figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    whole, tail = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    last = max(len(m["history"]["train_loss"]) for m in runs.values())
    lowest = math.inf
    for name, metrics in runs.items():
        color = MOE_COLOR if name == "MoE" else DENSE_COLOR
        train = metrics["history"]["train_loss"]
        steps = list(range(len(train)))  # step i's loss is measured before its update: after i updates
        curve = metrics["val_curve"]
        lowest = min(lowest, *train, *curve["val_loss"])
        for ax in (whole, tail):
            ax.plot(steps, train, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(steps, _smooth(train), color=color, linewidth=1.6,
                    label=f"{name} train (smoothed; final {metrics['final_train_loss']:.3f})")
            ax.plot(curve["step"], curve["val_loss"], color=color, linestyle="--", marker="o", markersize=4,
                    linewidth=1.4, label=f"{name} validation (final {metrics['final_val_loss']:.3f})")
    # A loss spike early in training would squash the curves: the whole run's axis stops just above ln 256.
    whole.set_ylim(max(0.0, lowest - 0.2), math.log(256) + 0.4)
    whole.axhline(math.log(256), color="#9ca3af", linewidth=0.8, linestyle=":")
    whole.text(1.0, math.log(256), "ln 256: uniform bytes ", transform=whole.get_yaxis_transform(), ha="right",
               va="bottom", fontsize=8, color="#6b7280")
    whole.set_title("the whole run", fontsize=9)
    whole.set_ylabel("loss (nats per byte)")
    whole.legend(fontsize=8)
    # The second half, zoomed: where the two models part.
    start = last // 2
    tail_values = [v for m in runs.values() for v in _losses_from(m, start)]
    tail.set_xlim(start, last)
    tail.set_ylim(min(tail_values) - 0.05, max(tail_values) + 0.05)
    tail.set_title(f"steps {start} to {last}, zoomed", fontsize=9)
    for ax in (whole, tail):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def default_run_dir() -> Path:
    """`runs/demo-<UTC timestamp>` under the current directory."""
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())


def _explain(cfg: DemoConfig) -> tedfx.Report:
    """`tedfx.explain` of the demo's conversion and layout (no processes)."""
    model, example_inputs = build_model(cfg)
    parallel = cfg.parallel() if cfg.ranks > 1 else None
    return tedfx.explain(model, example_inputs, moe=cfg.moe(), parallel=parallel, world_size=cfg.ranks)


def _title(metrics: dict[str, Any], compared: bool) -> str:
    cfg = metrics["config"]
    model = "dense GPT" if metrics["model"] == "dense" else f"MoE GPT (E={cfg['num_experts']}, top-{cfg['top_k']})"
    versus = " vs the dense GPT" if compared else ""
    return (f"{model}{versus}, {cfg['n_layer']} layers, hidden {cfg['n_embd']}: "
            f"{metrics['steps']} steps of {cfg['batch_size']} x {cfg['block_size']} bytes")


def write_run_folder(out_dir: str | Path, metrics: dict[str, Any], report: tedfx.Report | None) -> list[Path]:
    """Write the run folder's pictures, report and sample from the run's `metrics` (with "dense" when
    compared); returns the files. metrics.json is written last, by the caller, with the wall times."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"dense" if metrics["model"] == "dense" else "MoE": metrics}
    if metrics.get("dense") is not None:
        runs["dense"] = metrics["dense"]
    files = [plot_loss_curves(out / "loss.png", runs, _title(metrics, len(runs) == 2))]
    if report is not None:
        files += [_write(out / "graph.svg", report.to_svg()), report.save(out / "report.html"),
                  report.save(out / "report.json")]
    files.append(_write(out / "sample.txt", metrics["sample"] + "\n"))
    return files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_with_outputs(cfg: DemoConfig, out_dir: str | Path, *, baseline: BaselineMode = "auto",
                     console: Console | None = None, json_path: str | Path | None = None, report: bool = True
                     ) -> dict[str, Any]:
    """`tedfx demo`: run the demo, get the dense baseline, write the run folder; returns the metrics written.

    `report=False` skips `tedfx.explain` and its files (graph.svg, report.html, report.json).

    Example:
        >>> metrics = run_with_outputs(QUICK, "runs/quick", baseline="run")
        >>> metrics["comparison"]["val"]["moe_below_dense"]
    """
    console = console or Console()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # the report and the dense run in this process: see DemoConfig.threads
    try:
        return _run_with_outputs(cfg, Path(out_dir), baseline, console, json_path, report and not cfg.dense)
    finally:
        torch.set_num_threads(threads)


def _run_with_outputs(cfg: DemoConfig, out_dir: Path, baseline: BaselineMode, console: Console,
                      json_path: str | Path | None, want_report: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    # The report is made while the ranks train: this process only waits for them, and the rewrite takes
    # seconds. A run in this process (--ranks 1, --dense) makes it afterwards instead.
    with ThreadPoolExecutor(max_workers=1) as pool:
        report_job = pool.submit(_explain, cfg) if want_report and cfg.ranks > 1 else None
        metrics = run_demo(cfg, console=console)
        wall = {"demo": time.perf_counter() - t0}
        t1 = time.perf_counter()
        report = report_job.result() if report_job is not None else None
        wall["report_wait"] = time.perf_counter() - t1
    dense = None
    if not cfg.dense:
        t1 = time.perf_counter()
        dense = dense_baseline(cfg, baseline, console)
        wall["dense_baseline"] = time.perf_counter() - t1
    metrics["dense"] = dense
    metrics["comparison"] = compare(metrics, dense) if dense is not None else None
    t2 = time.perf_counter()
    if report is None and want_report:
        report = _explain(cfg)
    files = write_run_folder(out_dir, metrics, report)
    wall["report_and_outputs"] = time.perf_counter() - t2
    wall["total"] = time.perf_counter() - t0
    metrics["wall_seconds"] = wall
    text = json.dumps(metrics, indent=1) + "\n"
    files.append(_write(out_dir / "metrics.json", text))
    if json_path is not None:
        _write(Path(json_path), text)
    _print_summary(console, metrics, files, json_path)
    return metrics


def _print_summary(console: Console, metrics: dict[str, Any], files: list[Path], json_path: Any) -> None:
    comparison = metrics["comparison"]
    if comparison is not None:
        source = "cached run" if comparison["dense_source"] == "cached" else "run now"
        console.print(f"MoE vs dense ({source}) after {comparison['steps']} equal steps:")
        for split in ("train", "val"):
            row = comparison[split]
            verdict = "MoE lower" if row["moe_below_dense"] else "MoE NOT lower"
            console.print(f"  {split:5} loss  MoE {row['moe']:.4f}  dense {row['dense']:.4f}  "
                          f"({row['moe_minus_dense']:+.4f}: {verdict})")
    folder = files[0].parent
    console.print(f"run folder: {folder} ({', '.join(p.name for p in files)}); "
                  f"{metrics['wall_seconds']['total']:.1f} s in all", soft_wrap=True, highlight=False)
    if json_path is not None:
        console.print(f"metrics written to {json_path}", soft_wrap=True, highlight=False)
