"""The pass runner: one place that owns the invariants between passes (docs/architecture.md, "Passes").

A pass is a plain typed function `xxx_pass(gm, *, ctx) -> GraphModule`; settings
are bound with `functools.partial`, and `@requires("other")` states which passes
must have run before it. The runner applies an explicit ordered list; before a
pass it checks those requirements, after it lints and recompiles the graph,
times it, and in debug mode keeps the code before and after. A failing pass is
reported as "pass X failed after [A, B]".
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Protocol, Sequence

import torch.fx as fx

from .context import PassContext, PassTiming

__all__ = ["Pass", "PassContext", "PassError", "pass_name", "requires", "run_passes"]

log = logging.getLogger(__name__)


class Pass(Protocol):
    def __call__(self, gm: fx.GraphModule, *, ctx: PassContext) -> fx.GraphModule: ...


class PassError(RuntimeError):
    """A pass raised, left a graph that does not lint, or ran before a pass it requires."""


def requires(*names: str) -> Callable[[Callable], Callable]:
    """Declare the passes that must have run before the decorated one (names without "_pass").

    Example:
        >>> @requires("shard_experts")
        ... def drop_duplicate_tokens_pass(gm, *, ctx): ...
    """

    def mark(fn: Callable) -> Callable:
        fn.requires = tuple(names)
        return fn

    return mark


def pass_name(p: Callable) -> str:
    """`shard_experts_pass` and `partial(shard_experts_pass, ...)` are both named "shard_experts"."""
    fn = p.func if isinstance(p, functools.partial) else p
    name = getattr(fn, "__name__", type(fn).__name__)
    return name[: -len("_pass")] if name.endswith("_pass") else name


def _requirements(p: Callable) -> tuple[str, ...]:
    fn = p.func if isinstance(p, functools.partial) else p
    return getattr(fn, "requires", ())


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
        ctx: shared context; each pass run is appended to `ctx.done`, its timing to `ctx.timings`.
        skip: pass names (without "_pass") not to run; a later pass that requires one fails.

    Returns:
        The rewritten GraphModule.

    Raises:
        PassError: a pass raised (chained), broke the graph, or its requirements did not run.
        ValueError: a pass found that the configuration does not fit the model; the note says which.

    Example:
        >>> ctx = PassContext(moe=MoEConfig())
        >>> gm = run_passes(gm, [find_ffns_pass, ffn_to_moe_pass], ctx=ctx)
    """
    names = [pass_name(p) for p in passes]
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise ValueError(f"skip names {unknown} are not in the pass list {names}")
    for p, name in zip(passes, names):
        if name in skip:
            log.info("skipping pass %s", name)
            continue
        missing = [r for r in _requirements(p) if r not in ctx.done]
        if missing:
            raise PassError(f"pass {name} requires {missing} to run before it, but only {ctx.done} ran; "
                            f"put them before {name} in the pass list (tedfx.pipeline).")
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
            e.add_note(f"(found by the tedfx pass {name})")
            raise
        except Exception as e:
            raise PassError(f"pass {name} failed after {ctx.done}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        ctx.timings.append(PassTiming(name, seconds, nodes_before, len(gm.graph.nodes)))
        if ctx.debug:
            ctx.dumps.append((name, before, gm.code))
        log.debug("pass %s: %.3fs, %d -> %d nodes", name, seconds, nodes_before, len(gm.graph.nodes))
        ctx.done.append(name)
    return gm
