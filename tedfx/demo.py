"""`tedfx demo`: a byte-level GPT becomes an MoE model and learns English on the CPU.

The run, in order:
  1. build a dense nanoGPT-style model, seeded (the same on every rank);
  2. `tedfx.parallelize` rewrites every other FFN into an upcycled MoE block and
     shards the model over 4 local CPU ranks, T=2 x X=2 (`--ranks 1`: one
     process, `tedfx.to_moe`);
  3. measure the train and validation loss on fixed batches;
  4. train with AdamW (warmup, cosine decay), showing loss, MoE aux loss,
     tokens/s and the bytes rank 0 sent, and keeping them per step (with the
     validation loss every `eval_every` steps) for the loss curves;
  5. measure the losses again and generate a text sample.

`tedfx.demo_outputs` runs this, then compares with the dense model and writes
the run folder (docs/demo.md).

The training step is `lm_loss(model, batch) -> loss` and the data come from
`tedfx.data.get_batch`; a parallel run swaps the model for the rank's
ParallelModule and gives each data-parallel token group its own batches (the
tensor ranks of a group share them), without touching the loop.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

import tedfx
from tedfx.data import VOCAB_SIZE, Split, decode, encode, get_batch
from tedfx.models.nanogpt import GPT, GPTConfig

__all__ = [
    "DemoConfig", "QUICK", "build_model", "lm_loss", "train_step", "train", "aux_loss_per_block",
    "evaluate", "generate", "run_demo", "quick_config",
]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything one demo run depends on; the run is a function of this config."""

    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 32
    """Windows per step (B), over all data-parallel token groups."""
    block_size: int = 64
    """Bytes per window (S)."""
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    num_experts: int = 4
    """E of each MoE block."""
    top_k: int = 2
    layers: str = "every_other"
    """Which FFNs become MoE blocks (MoEConfig.layers)."""
    expert_noise: float = 0.01
    """Relative noise on the upcycled experts, so that they can diverge."""
    lr: float = 3e-3
    """Peak learning rate (after warmup; cosine decay to lr / 10)."""
    warmup: int = 20
    """Linear warmup steps."""
    eval_batches: int = 4
    """Fixed batches per split for each loss measured (4 x 32 windows of 64 bytes: about the validation split)."""
    eval_every: int = 30
    """Steps between two validation losses of the loss curve (0: only before and after training)."""
    sample_bytes: int = 200
    """Length of the generated sample."""
    prompt: str = "And God said, "
    seed: int = 0
    dense: bool = False
    """Train the dense model instead (a baseline to compare with)."""
    tensor: int = 2
    """T of the parallel run."""
    expert: int = 2
    """X of the parallel run."""
    ranks: int = 4
    """Local ranks (T * X * D); 1 runs in this process with tedfx.to_moe."""
    threads: int = 1
    """torch intra-op threads. One: on a 2-core machine shared with other work, two threads spin
    against each other and a step took 7x longer; one thread per process is also what each rank
    gets when several ranks share the cores."""

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=VOCAB_SIZE, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)

    def parallel(self) -> tedfx.ParallelConfig:
        return tedfx.ParallelConfig(tensor=self.tensor, expert=self.expert)

    def moe(self) -> tedfx.MoEConfig:
        return tedfx.MoEConfig(num_experts=self.num_experts, top_k=self.top_k, layers=self.layers,
                               expert_noise=self.expert_noise, seed=self.seed)


QUICK = DemoConfig(steps=4, batch_size=8, eval_batches=1, eval_every=2, sample_bytes=32, warmup=2)
"""A smoke run of the whole pipeline in seconds (`tedfx demo --quick`)."""


def build_model(cfg: DemoConfig) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The dense GPT, seeded by `cfg.seed`, and example tokens of one training batch."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt())
    example = torch.zeros(cfg.batch_size, cfg.block_size, dtype=torch.long)
    return model, (example,)


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-byte cross-entropy of `model` on `batch` = (x, y); the demo's training step."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, cfg: DemoConfig, loss_fn: LossFn = lm_loss) -> float:
    """Mean loss over `cfg.eval_batches` fixed batches of `split` (the same batches on every call)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    losses = [loss_fn(model, get_batch(split, cfg.batch_size, cfg.block_size, g)).item()
              for _ in range(cfg.eval_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def generate(model: nn.Module, prompt: str, num_bytes: int, *, block_size: int, generator: torch.Generator,
             temperature: float = 0.8, top_k: int = 40) -> str:
    """Sample `num_bytes` bytes after `prompt`, one at a time, from the last `block_size` bytes of context."""
    was_training = model.training
    model.eval()
    idx = encode(prompt)[None, :]
    for _ in range(num_bytes):
        logits = model(idx[:, -block_size:])[0, -1] / temperature
        kth = torch.topk(logits, top_k).values[-1]
        probs = F.softmax(logits.masked_fill(logits < kth, -math.inf), dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)[None, :]], dim=1)
    model.train(was_training)
    return decode(idx[0])


def _lr_lambda(cfg: DemoConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, loss_fn: LossFn = lm_loss
               ) -> float:
    """One optimizer step on `batch`; returns the loss. The MoE aux losses enter the backward by themselves."""
    loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train(model: nn.Module, cfg: DemoConfig, console: Console, loss_fn: LossFn = lm_loss, *,
          token_group: int = 0, token_groups: int = 1) -> dict[str, Any]:
    """`cfg.steps` AdamW steps on train batches, with a progress bar; returns the losses, curves and seconds.

    Each of the `token_groups` data-parallel token groups trains on its own stream of
    batch_size / token_groups windows (this rank's is `token_group`). Every
    `cfg.eval_every` steps the validation loss is measured (not counted in the
    training seconds). Returns the last step's loss and aux loss, `history`
    (one entry per step: train_loss, aux_loss, seconds, tokens_per_second,
    comm_bytes = bytes this rank sent into collectives), `val_curve` (the
    validation losses measured during training) and train_seconds.
    """
    batch_size = cfg.batch_size // token_groups
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + token_group)
    stats = model.comm_stats() if hasattr(model, "comm_stats") else None
    history: dict[str, list[float]] = {key: [] for key in ("train_loss", "aux_loss", "seconds",
                                                           "tokens_per_second", "comm_bytes")}
    val_curve: dict[str, list[float]] = {"step": [], "val_loss": []}
    loss, aux, train_seconds, eval_seconds = math.nan, math.nan, 0.0, 0.0
    with Progress(*_progress_columns(), console=console) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=math.nan, aux=math.nan, speed="", comm="")
        for step in range(cfg.steps):
            if step == cfg.steps - 1 and stats is not None:
                stats.reset()  # the table printed at the end counts the collectives of one (the last) step
            sent_before = stats.nbytes() if stats is not None else 0
            t0 = time.perf_counter()
            batch = get_batch("train", batch_size, cfg.block_size, data_gen)
            loss = train_step(model, optimizer, batch, loss_fn)
            schedule.step()
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            aux = aux_loss_per_block(model)
            sent = stats.nbytes() - sent_before if stats is not None else 0
            for key, value in (("train_loss", loss), ("aux_loss", aux), ("seconds", seconds),
                               ("tokens_per_second", cfg.batch_size * cfg.block_size / seconds),
                               ("comm_bytes", sent)):
                history[key].append(value)
            progress.update(task, advance=1, loss=loss, aux=aux,
                            speed=f"{history['tokens_per_second'][-1]:,.0f} tok/s",
                            comm=f"{_megabytes(sent)}/step sent" if stats is not None else "")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                t_eval = time.perf_counter()
                val_curve["step"].append(step + 1)
                val_curve["val_loss"].append(evaluate(model, "val", cfg, loss_fn))
                eval_seconds += time.perf_counter() - t_eval
    out: dict[str, Any] = {"last_step_loss": loss, "last_step_aux_loss": aux, "train_seconds": train_seconds,
                           "eval_seconds_during_training": eval_seconds, "history": history,
                           "val_curve": val_curve}
    if stats is not None:
        out["comm_bytes_total"] = sum(history["comm_bytes"])
        out["last_step_collectives"] = [list(row) for row in stats.table()]
        out["last_step_collectives_table"] = str(stats)
    return out


def _progress_columns() -> tuple[Any, ...]:
    """The training bar: steps, loss, aux loss, tokens/s and the bytes this rank sent in the last step."""
    return (TextColumn("[bold]train"), BarColumn(bar_width=12), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f} aux {task.fields[aux]:.2f} {task.fields[speed]} "
                       "{task.fields[comm]}"),
            TimeElapsedColumn(), TimeRemainingColumn())


def _megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def aux_loss_per_block(model: nn.Module) -> float:
    """The last step's load-balancing loss, mean over the MoE blocks: 1.0 when the experts are evenly loaded.

    0.0 for a dense model.
    """
    losses = tedfx.moe_losses(model)
    blocks = losses.get("blocks", 0)
    return float(losses["aux_loss"]) / blocks if blocks else 0.0


def run_demo(cfg: DemoConfig, *, console: Console | None = None, json_path: str | Path | None = None
             ) -> dict[str, Any]:
    """Run the demo described by `cfg`; print progress to `console`, return (and optionally write) metrics.

    Returns:
        A dict with the initial and final train/val losses, steps, seconds
        (whole run), train_seconds, tokens_per_second, the last step's loss and
        aux loss (mean per MoE block), the sample and the config.
    """
    if cfg.ranks > 1 and not cfg.dense:
        results = tedfx.launch(_rank_demo, cfg.ranks, cfg, None if json_path is None else str(json_path))
        return results[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg, console or Console(), json_path)
    finally:
        torch.set_num_threads(threads)


def _rank_demo(cfg: DemoConfig, json_path: str | None) -> dict[str, Any]:
    """One rank of the parallel demo: rank 0 prints and writes the metrics."""
    rank = dist.get_rank()
    console = Console() if rank == 0 else Console(file=open(os.devnull, "w"), quiet=True)
    return _run_demo(cfg, console, json_path if rank == 0 else None)


def _run_demo(cfg: DemoConfig, console: Console, json_path: str | Path | None) -> dict[str, Any]:
    t_start = time.perf_counter()

    # 1-2. Dense model, then the MoE rewrite (the dense model is left untouched).
    dense, example_inputs = build_model(cfg)
    token_group, token_groups = 0, 1
    if dist.is_initialized():
        model = tedfx.parallelize(dense, example_inputs, moe=cfg.moe(), parallel=cfg.parallel())
        token_group, token_groups = model.data_parallel_rank, model.data_parallel_size
        console.print(f"MoE GPT on {model.mesh.layout}: {cfg.n_layer} layers, hidden {cfg.n_embd}, "
                      f"{cfg.num_experts} experts, top-{cfg.top_k}, layers={cfg.layers!r}; each rank holds "
                      f"{_count(model)} parameters (the dense model: {_count(dense)}); "
                      f"parallelized in {time.perf_counter() - t_start:.1f} s")
    elif cfg.dense:
        model = dense
        console.print(f"dense GPT: {cfg.n_layer} layers, hidden {cfg.n_embd}, {_count(model)} parameters")
    else:
        model = tedfx.to_moe(dense, example_inputs, moe=cfg.moe())
        console.print(f"MoE GPT: {cfg.n_layer} layers, hidden {cfg.n_embd}, {cfg.num_experts} experts, "
                      f"top-{cfg.top_k}, layers={cfg.layers!r}: {_count(dense)} -> {_count(model)} parameters "
                      f"(converted in {time.perf_counter() - t_start:.1f} s)")
    model.train()

    # 3. Losses before training.
    metrics: dict[str, Any] = {"initial_train_loss": evaluate(model, "train", cfg),
                               "initial_val_loss": evaluate(model, "val", cfg)}
    console.print(f"step 0: train loss {metrics['initial_train_loss']:.4f}, "
                  f"val loss {metrics['initial_val_loss']:.4f}")

    # 4. Training.
    metrics.update(train(model, cfg, console, token_group=token_group, token_groups=token_groups))

    # 5. Losses after training, and a sample.
    metrics["final_train_loss"] = evaluate(model, "train", cfg)
    metrics["final_val_loss"] = evaluate(model, "val", cfg)
    curve = metrics["val_curve"]
    curve["step"] = [0, *curve["step"], cfg.steps]
    curve["val_loss"] = [metrics["initial_val_loss"], *curve["val_loss"], metrics["final_val_loss"]]
    console.print(f"step {cfg.steps}: train loss {metrics['final_train_loss']:.4f}, "
                  f"val loss {metrics['final_val_loss']:.4f}")
    t_sample = time.perf_counter()
    sample = generate(model, cfg.prompt, cfg.sample_bytes, block_size=cfg.block_size,
                      generator=torch.Generator().manual_seed(cfg.seed))
    metrics["sample_seconds"] = time.perf_counter() - t_sample
    if cfg.sample_bytes:
        console.rule("sample")
        console.print(sample, markup=False, highlight=False)
        console.rule()

    train_seconds = metrics["train_seconds"]
    metrics.update(
        model="dense" if cfg.dense else "moe",
        steps=cfg.steps,
        seconds=time.perf_counter() - t_start,
        tokens_per_second=cfg.steps * cfg.batch_size * cfg.block_size / train_seconds if train_seconds else 0.0,
        threads=torch.get_num_threads(),
        ranks=dist.get_world_size() if dist.is_initialized() else 1,
        sample=sample,
        config=asdict(cfg),
    )
    if "last_step_collectives_table" in metrics:
        console.print("collectives of the last training step on rank 0:")
        console.print(metrics.pop("last_step_collectives_table"), markup=False, highlight=False)
    console.print(f"{cfg.steps} steps in {train_seconds:.1f} s ({metrics['tokens_per_second']:.0f} tokens/s), "
                  f"{metrics['seconds']:.1f} s in all")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        console.print(f"metrics written to {json_path}")
    return metrics


def _count(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def quick_config(cfg: DemoConfig) -> DemoConfig:
    """`cfg` cut down to QUICK's sizes, keeping its seed and model."""
    return replace(cfg, steps=QUICK.steps, batch_size=QUICK.batch_size, eval_batches=QUICK.eval_batches,
                   eval_every=QUICK.eval_every, sample_bytes=QUICK.sample_bytes, warmup=QUICK.warmup)
