"""Start ranks on one host, or join the ranks torchrun started.

The same script works both ways:

    def main():
        pm = tedfx.parallelize(...)
        ...

    if __name__ == "__main__":
        tedfx.launch(main, nprocs=4)     # python script.py  -> spawns 4 local ranks
                                         # torchrun --nproc-per-node 4 script.py -> runs main in each rank

Under torchrun (or any launcher that sets RANK and WORLD_SIZE) `launch` does not spawn:
it initialises torch.distributed from the environment, calls `fn` in-process and returns
`[result]`. Multi-node runs go through torchrun; `launch` is for one host only.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import host_memory

__all__ = ["LaunchError", "RankError", "default_backend", "init_distributed", "launch", "launched_externally",
           "local_world_size"]

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective may block before it fails (and a finished launch waits for stragglers)."""
_TERMINATE_GRACE_S = 5.0
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed._functional_collectives", "tedfx", "tedfx.collectives"]


class LaunchError(RuntimeError):
    """A launched rank died, hung past the timeout, or could not send back its result."""


class RankError(LaunchError):
    """`fn` raised on a rank. The message names the rank and carries its traceback.

    Attributes:
        rank: the rank whose exception was the first to arrive.
        remote_traceback: that rank's formatted traceback.
    The original exception is chained as `__cause__` when it could be unpickled.
    """

    def __init__(self, message: str, rank: int, remote_traceback: str):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


@dataclass(frozen=True)
class _WorkerSpec:
    fn: bytes
    """The function to run, pickled: each rank unpickles it where its failure is reported (_load_fn)."""
    args: tuple
    nprocs: int
    backend: str
    timeout_s: float
    master_port: int
    result_dir: str
    env: dict[str, str]


def _timeout_seconds(timeout: float | datetime.timedelta | None) -> float:
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    if not seconds > 0:
        raise ValueError(f"timeout={timeout!r} is invalid: expected a number of seconds > 0 or a timedelta.")
    return seconds


def default_backend(nprocs: int) -> str:
    """"nccl" when CUDA is available with at least `nprocs` devices, else "gloo"."""
    if torch.cuda.is_available() and nprocs <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def launched_externally() -> bool:
    """True inside a process that torchrun (or another launcher) started as one rank of a world."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_rank(backend: str, local_world: int) -> None:
    """Per-rank setup before the process group: the device (nccl); on CPU (gloo) one thread per rank and
    malloc thresholds that keep freed memory (`host_memory.keep_freed_memory`)."""
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return
    if local_world > 1:
        # Several ranks share the host's cores; more threads per rank only oversubscribe them.
        torch.set_num_threads(1)
    host_memory.keep_freed_memory()


def init_distributed(timeout: float | datetime.timedelta | None = None, backend: str | None = None) -> bool:
    """Initialise torch.distributed for this process, if it is not already.

    Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) it
    joins that world; otherwise it starts a world of one rank on a free local port.

    A gloo rank is prepared first: one intra-op thread when several ranks share the host, and glibc's
    malloc thresholds raised so that the temporaries a step frees stay in the process
    (`host_memory.keep_freed_memory`; TEDFX_KEEP_FREED_MEMORY=0 leaves them; docs/parallelism.md, "CPU ranks").

    Args:
        timeout: seconds (or a timedelta) a collective may block before failing; None: 300 s.
        backend: "gloo" or "nccl"; None picks nccl when every local rank has a GPU, else gloo.

    Returns:
        True when this call initialised the process group, False when it already was.
    """
    if dist.is_initialized():
        return False
    seconds = _timeout_seconds(timeout)
    if not launched_externally():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    backend = backend or default_backend(local_world)
    _prepare_rank(backend, local_world)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=seconds),
    )
    return True


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str | None = None,
    timeout: float | datetime.timedelta | None = None,
    start_method: str | None = None,
) -> list[Any]:
    """Run `fn(*args)` on `nprocs` local ranks and return every rank's result in rank order.

    Each rank gets MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and an initialised
    default process group (gloo on CPU, one thread per rank, freed memory kept: see `init_distributed`;
    nccl when CUDA has `nprocs` devices). `fn` and `args` are pickled into spawned processes: `fn` must be importable
    (defined at module level). Results come back through files, tensors on the CPU.

    Under torchrun, `fn` runs in this process only and the result is `[fn(*args)]`.

    Args:
        fn: the per-rank function.
        nprocs: local ranks to start (ignored under torchrun, which decides).
        *args: passed to `fn` on every rank.
        backend: "gloo" or "nccl"; None chooses as above.
        timeout: seconds (or a timedelta) a collective may block before the run fails; also
            how long the launch waits for the last ranks once one rank has finished. None: 300 s.
        start_method: "forkserver" or "spawn". None: "forkserver" where the platform has it,
            with torch imported once in the server, so each launch after the first starts its
            ranks in well under a second instead of importing torch once per rank.

    Returns:
        [result of rank 0, result of rank 1, ...].

    Raises:
        RankError: `fn` raised on some rank (the first one to fail is named, with its traceback).
        LaunchError: a rank died without a Python exception, or hung past the timeout.
        ValueError: `nprocs`, `timeout` or `start_method` is invalid.

    Example:
        >>> def hello():
        ...     return torch.distributed.get_rank()
        >>> tedfx.launch(hello, nprocs=2)
        [0, 1]
    """
    seconds = _timeout_seconds(timeout)
    if launched_externally():
        return [_run_in_process(fn, args, nprocs, backend, seconds)]
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs={nprocs!r} is invalid: expected an int >= 1.")
    backend = backend or default_backend(nprocs)
    with tempfile.TemporaryDirectory(prefix="tedfx-launch-") as result_dir:
        spec = _WorkerSpec(pickle.dumps(fn), args, nprocs, backend, seconds, _free_port(), result_dir,
                           dict(os.environ))
        method = _start_method(start_method)
        context = mp.start_processes(_worker, args=(spec,), nprocs=nprocs, join=False, start_method=method)
        try:
            _supervise(context.processes, spec)
        finally:
            _terminate(context.processes)
        return [_read_result(spec, rank) for rank in range(nprocs)]


def _start_method(requested: str | None) -> str:
    """The multiprocessing start method: both choices start fresh processes and pickle `fn`."""
    available = multiprocessing.get_all_start_methods()
    if requested is not None:
        if requested not in ("forkserver", "spawn") or requested not in available:
            raise ValueError(
                f"start_method={requested!r} is not supported here: expected one of "
                f"{[m for m in ('forkserver', 'spawn') if m in available]}."
            )
        method = requested
    else:
        method = "forkserver" if "forkserver" in available else "spawn"
    if method == "forkserver":
        # Read when the server starts (once per parent process): it imports these, then forks
        # ranks. torch._dynamo is imported by the first functional collective (seconds).
        multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    return method


def _run_in_process(fn: Callable[..., Any], args: tuple, nprocs: int, backend: str | None, seconds: float) -> Any:
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world is not None and int(local_world) != nprocs:
        warnings.warn(
            f"tedfx.launch(nprocs={nprocs}) runs under a launcher that started {local_world} local ranks; "
            f"the launcher's count wins.",
            stacklevel=3,
        )
    created = init_distributed(seconds, backend)
    try:
        return fn(*args)
    finally:
        if created:
            dist.destroy_process_group()


# --- Inside a spawned rank -------------------------------------------------------------------


def _worker(rank: int, spec: _WorkerSpec) -> None:
    # A forkserver child inherits the server's environment; give it the caller's, as spawn would.
    os.environ.clear()
    os.environ.update(spec.env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(spec.master_port),
        RANK=str(rank),
        WORLD_SIZE=str(spec.nprocs),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(spec.nprocs),
    )
    path = os.path.join(spec.result_dir, f"rank{rank}.pkl")
    try:
        init_distributed(spec.timeout_s, spec.backend)
        payload = {"ok": True, "result": _to_cpu(_load_fn(spec.fn)(*spec.args))}
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        # Report before exiting: once this rank is gone its peers fail too, and the parent
        # names the earliest report. No teardown: a failed process group may not shut down.
        _write_report(path, _failure_report(exc))
        raise SystemExit(1) from None
    try:
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001
        payload = _failure_report(exc)
    _write_report(path, payload)
    if not payload["ok"]:
        raise SystemExit(1)


def _load_fn(pickled: bytes) -> Callable[..., Any]:
    """The function to run, found by its module and name as pickle recorded them."""
    try:
        return pickle.loads(pickled)
    except (AttributeError, ImportError) as e:
        raise RuntimeError(
            f"this rank cannot find the function to run ({e}): a launched rank imports it by name, so define it "
            f"at the top level of a module or of the script, not under `if __name__ == \"__main__\":` or inside "
            f"another function (the rank imports the script without running that block)") from e


def _failure_report(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "time": time.time(), "traceback": traceback.format_exc(), "error": _picklable(exc),
            "headline": _headline(exc)}


def _headline(exc: BaseException) -> str:
    """"ValueError: <the message's first line>": the reason, not a note or the traceback's last line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _write_report(path: str, payload: dict[str, Any]) -> None:
    with open(path + ".tmp", "wb") as fh:
        try:
            torch.save(payload, fh, pickle_protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # the result could not be pickled: report that instead
            fh.seek(0)
            fh.truncate()
            payload.clear()
            payload.update(_failure_report(exc))
            torch.save(payload, fh)
    os.replace(path + ".tmp", path)  # the parent only ever reads complete files


def _to_cpu(obj: Any) -> Any:
    from tedfx._compat import pytree

    return pytree.tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, obj)


def _picklable(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return None


# --- In the parent ----------------------------------------------------------------------------


def _supervise(processes: list, spec: _WorkerSpec) -> None:
    """Wait for every rank; raise on the first failure, a death, or stragglers past the timeout."""
    alive = dict(enumerate(processes))
    first_done: float | None = None
    while alive:
        ready = wait_for_sentinels([p.sentinel for p in alive.values()], timeout=1.0)
        for rank, proc in list(alive.items()):
            if proc.sentinel not in ready:
                continue
            proc.join()
            del alive[rank]
            if proc.exitcode != 0:
                _raise_failure(rank, proc.exitcode, spec)
            first_done = first_done or time.monotonic()
        if alive and first_done is not None and time.monotonic() - first_done > spec.timeout_s:
            raise LaunchError(
                f"ranks {sorted(alive)} of {spec.nprocs} were still running {spec.timeout_s:.0f} s after "
                f"another rank finished: a hang (e.g. a collective only some ranks issued). Every rank "
                f"must issue the same collectives in the same order; raise `timeout` if the work is "
                f"legitimately uneven."
            )


def _raise_failure(rank: int, exitcode: int, spec: _WorkerSpec) -> None:
    """Raise for the first rank that failed: `rank` is the first whose exit was seen.

    A rank that raised wrote its report before exiting, so its peers (which only fail once
    it is gone) report later; the earliest report names the cause. A rank that died left
    no report: it is the cause, and the peers' reports are only its echo.
    """
    time.sleep(0.2)  # let near-simultaneous failures land
    reports = []
    for r in range(spec.nprocs):
        path = os.path.join(spec.result_dir, f"rank{r}.pkl")
        if os.path.exists(path):
            payload = torch.load(path, weights_only=False)
            if not payload["ok"]:
                reports.append((payload["time"], r, payload))
    reports.sort(key=lambda t: t[0])
    if any(r == rank for _, r, _ in reports):
        _, r, payload = reports[0]
        tb = payload["traceback"].rstrip()
        summary = payload.get("headline") or (tb.splitlines()[-1] if tb else "unknown error")
        raise RankError(
            f"rank {r} of {spec.nprocs} failed: {summary}\n\n--- remote traceback (rank {r}) ---\n{tb}",
            rank=r,
            remote_traceback=tb,
        ) from payload["error"]
    how = f"signal {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exit code {exitcode}"
    echoes = "".join(f"\n  then rank {r}: {p.get('headline', '')}" for _, r, p in reports)
    raise LaunchError(
        f"rank {rank} of {spec.nprocs} died with {how} without raising a Python exception "
        f"(killed for memory, a crash in native code, or os._exit); the other ranks were stopped.{echoes}"
    )


def _terminate(processes: list) -> None:
    """Stop ranks that are still running (after a failure elsewhere): SIGTERM, then SIGKILL."""
    running = [p for p in processes if p.is_alive()]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for proc in running:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _read_result(spec: _WorkerSpec, rank: int) -> Any:
    path = os.path.join(spec.result_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        raise LaunchError(f"rank {rank} of {spec.nprocs} exited cleanly but left no result; "
                          f"this is a bug in tedfx.launch.")
    return torch.load(path, weights_only=False)["result"]


def local_world_size() -> int | None:
    """Ranks on this node as the launcher says (LOCAL_WORLD_SIZE, set by torchrun and tedfx.launch), else None."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else None
