"""The pass runner: one place that owns the invariants between passes (STYLE §1-2).

A pass is a plain typed function `xxx_pass(gm, *, ctx) -> GraphModule`. The
runner applies an explicit ordered list; after every pass it lints and
recompiles the graph, times it, and in debug mode keeps the code before and
after. A failing pass is reported as "pass X failed after [A, B]".
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch.fx as fx

__all__ = ["Pass", "PassContext", "PassError", "PassRecord", "pass_name", "run_passes"]

log = logging.getLogger(__name__)


class Pass(Protocol):
    def __call__(self, gm: fx.GraphModule, *, ctx: "PassContext") -> fx.GraphModule: ...


@dataclass
class PassContext:
    """What passes read and record. Holds configs and mesh coordinates, never process groups.

    Attributes:
        moe: the MoEConfig of the run (None when no MoE rewrite is asked for).
        parallel: the ParallelConfig (None for single-process rewrites).
        coords: this rank's mesh coordinates {"edp": d, "ep": x, "tp": t}.
        records: what passes found and did, by pass name (e.g. "ffn_to_moe" -> list of blocks).
        debug: keep each pass's code before and after in `dumps`.
    """

    moe: Any = None
    parallel: Any = None
    coords: dict[str, int] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    debug: bool = False
    dumps: list[tuple[str, str, str]] = field(default_factory=list)
    timings: list["PassRecord"] = field(default_factory=list)


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


class PassError(RuntimeError):
    """A pass raised, or left a graph that does not lint."""


def pass_name(p: Callable) -> str:
    """`shard_experts_pass` and `partial(shard_experts_pass, ...)` are both named "shard_experts"."""
    fn = p.func if isinstance(p, functools.partial) else p
    name = getattr(fn, "__name__", type(fn).__name__)
    return name[: -len("_pass")] if name.endswith("_pass") else name


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[Pass],
    *,
    ctx: PassContext,
    skip: Sequence[str] = (),
) -> fx.GraphModule:
    """Apply `passes` in order, checking the graph after each.

    Args:
        gm: the graph to rewrite (rewritten in place where a pass does so).
        passes: pass functions, each `(gm, *, ctx) -> gm`.
        ctx: shared context; timings are appended to `ctx.timings`.
        skip: pass names (without "_pass") not to run.

    Returns:
        The rewritten GraphModule.

    Example:
        >>> gm = run_passes(gm, [ffn_to_moe_pass], ctx=PassContext(moe=MoEConfig()))
    """
    names = [pass_name(p) for p in passes]
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise ValueError(f"skip names {unknown} are not in the pass list {names}")
    done: list[str] = []
    for p, name in zip(passes, names):
        if name in skip:
            log.info("skipping pass %s", name)
            continue
        before = gm.code if ctx.debug else ""
        nodes_before = len(gm.graph.nodes)
        start = time.perf_counter()
        try:
            gm = p(gm, ctx=ctx)
            gm.graph.lint()
            gm.recompile()
        except ValueError as e:
            # A config that does not fit this model (e.g. MoEConfig.layers naming a missing FFN): the
            # user's error keeps its type and message; the note says where it surfaced.
            e.add_note(f"raised by pass {name} after {done}")
            raise
        except Exception as e:
            raise PassError(f"pass {name} failed after {done}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        ctx.timings.append(PassRecord(name, seconds, nodes_before, len(gm.graph.nodes)))
        if ctx.debug:
            ctx.dumps.append((name, before, gm.code))
        log.debug("pass %s: %.3fs, %d -> %d nodes", name, seconds, nodes_before, len(gm.graph.nodes))
        done.append(name)
    return gm
