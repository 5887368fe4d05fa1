"""An emulated two-node cluster on one host: two network namespaces joined by a rate-limited veth.

The communication optimizations of TED pay off when expert all-to-alls cross
a slow link between nodes while tensor-parallel traffic stays inside a node. This module
builds that on one machine, as root:

    namespace tedfx-node-a                      namespace tedfx-node-b
    +------------------------+   veth pair    +------------------------+
    | tedfx-a  10.200.0.1/30 |<-------------->| tedfx-b  10.200.0.2/30 |
    | lo                     |  tbf, e.g.     | lo                     |
    +------------------------+  200 mbit      +------------------------+
                                each way

Ranks of node A run in namespace A, ranks of node B in namespace B, with
GLOO_SOCKET_IFNAME set to the namespace's veth and MASTER_ADDR = 10.200.0.1. Traffic
between two ranks of one node goes to the node's own address and so through the
kernel's local route (fast); traffic between nodes goes through the shaped veth.

Only the two namespaces and the addresses inside them are created; the host's own
interfaces, routes and namespaces are never touched.

Usage as a script (idempotent):
    python benchmarks/netem.py up --rate 200mbit
    python benchmarks/netem.py status
    python benchmarks/netem.py down

Usage from Python:
    with emulated_cluster(rate="200mbit") as cluster:
        subprocess.run(cluster.nodes[0].command(["python", "worker.py"]), env=...)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cluster", "NetemUnavailable", "Node", "emulated_cluster", "run_ranks", "setup", "teardown",
           "unavailable_reason"]

SUBNET_PREFIX = "10.200.0"
"""Addresses live in 10.200.0.0/30, inside the namespaces only."""
DEFAULT_RATE = "200mbit"
DEFAULT_BURST = "256kb"
"""tbf bucket: large enough that the kernel timer granularity does not cap the rate."""
DEFAULT_LATENCY = "100ms"
"""tbf queueing limit, expressed as the longest a packet may wait in the bucket."""


class NetemUnavailable(RuntimeError):
    """The emulated cluster cannot be built here; the message says why and what to do."""


@dataclass(frozen=True)
class Node:
    """One emulated node: a network namespace with one end of the veth pair."""

    namespace: str
    ifname: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this node's namespace (the caller keeps its environment)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass(frozen=True)
class Cluster:
    """Two nodes and the shaping of the link between them."""

    nodes: tuple[Node, Node]
    rate: str
    """tbf rate of each direction of the inter-node link, e.g. "200mbit"."""

    @property
    def master_addr(self) -> str:
        """Where rank 0 (on node A) listens: node A's veth address."""
        return self.nodes[0].address

    def describe(self) -> str:
        a, b = self.nodes
        return (f"2 nodes: {a.namespace} ({a.ifname} {a.address}) <-> {b.namespace} ({b.ifname} {b.address}), "
                f"tbf {self.rate} each way")


NODES: tuple[Node, Node] = (
    Node(namespace="tedfx-node-a", ifname="tedfx-a", address=f"{SUBNET_PREFIX}.1"),
    Node(namespace="tedfx-node-b", ifname="tedfx-b", address=f"{SUBNET_PREFIX}.2"),
)


# --- Checks -----------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """None when the cluster can be built here, else why not (for people)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux; this is {sys.platform}."
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "creating network namespaces and shaping links needs root; rerun as root (e.g. with sudo)."
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not found on PATH; install iproute2 (apt-get install iproute2) "
                f"for `ip` and `tc`.")
    return None


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetemUnavailable(
            f"`{' '.join(argv)}` failed with exit code {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}. "
            f"Network namespaces and tc need root and a kernel with veth and sch_tbf (a container may need "
            f"CAP_NET_ADMIN)."
        )
    return proc


def _existing_namespaces() -> set[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# --- Setup and teardown ------------------------------------------------------------------------


def teardown() -> list[str]:
    """Delete the emulated nodes (their veth ends go with them). Idempotent.

    Returns:
        The namespaces that were deleted.
    """
    reason = unavailable_reason()
    if reason is not None:
        return []
    present = _existing_namespaces()
    deleted = []
    for node in NODES:
        if node.namespace in present:
            _run(["ip", "netns", "delete", node.namespace])
            deleted.append(node.namespace)
    return deleted


def setup(rate: str = DEFAULT_RATE, *, burst: str = DEFAULT_BURST, latency: str = DEFAULT_LATENCY) -> Cluster:
    """Build the two-node cluster, replacing any left over from an earlier run. Idempotent.

    Steps, in order:
    1. Delete stale namespaces of the same names (a crashed run may have left them).
    2. Create both namespaces and bring their loopback up (gloo also talks to itself).
    3. Create the veth pair in the host namespace and move one end into each node.
    4. Address both ends (10.200.0.1/30 and .2/30) and bring them up.
    5. Shape each end's egress with tbf, so both directions are limited to `rate`.

    Args:
        rate: tbf rate of each direction, in tc syntax ("200mbit", "1gbit").
        burst: tbf bucket size.
        latency: tbf's longest queueing delay.

    Returns:
        The Cluster.

    Raises:
        NetemUnavailable: not root, `ip`/`tc` missing, or the kernel refused; nothing is left behind.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise NetemUnavailable(reason)
    if not re.fullmatch(r"\d+(\.\d+)?(bit|kbit|mbit|gbit)", rate):
        raise ValueError(f"rate={rate!r} is invalid: expected a tc rate such as '200mbit' or '1gbit'.")
    teardown()
    a, b = NODES
    try:
        for node in NODES:
            _run(["ip", "netns", "add", node.namespace])
            _run(["ip", "-n", node.namespace, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname])
        for node in NODES:
            _run(["ip", "link", "set", node.ifname, "netns", node.namespace])
            _run(["ip", "-n", node.namespace, "addr", "add", f"{node.address}/30", "dev", node.ifname])
            _run(["ip", "-n", node.namespace, "link", "set", node.ifname, "up"])
            _run(["ip", "netns", "exec", node.namespace, "tc", "qdisc", "replace", "dev", node.ifname, "root",
                  "tbf", "rate", rate, "burst", burst, "latency", latency])
    except BaseException:
        teardown()
        # A veth end still in the host namespace (step 3 done, step 4 not) is not deleted with the namespaces.
        _run(["ip", "link", "delete", a.ifname], check=False)
        raise
    return Cluster(nodes=NODES, rate=rate)


def status() -> str:
    """What exists now: each namespace, its addresses and its qdisc."""
    reason = unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    present = _existing_namespaces()
    lines = []
    for node in NODES:
        if node.namespace not in present:
            lines.append(f"{node.namespace}: absent")
            continue
        addr = _run(["ip", "-n", node.namespace, "-brief", "addr", "show", "dev", node.ifname], check=False)
        qdisc = _run(["ip", "netns", "exec", node.namespace, "tc", "qdisc", "show", "dev", node.ifname], check=False)
        lines.append(f"{node.namespace}: {addr.stdout.strip() or addr.stderr.strip()} | {qdisc.stdout.strip()}")
    return "\n".join(lines)


@contextlib.contextmanager
def emulated_cluster(rate: str = DEFAULT_RATE) -> Iterator[Cluster]:
    """The cluster for the duration of the block; torn down afterwards, also on errors and Ctrl-C."""
    cluster = setup(rate)
    try:
        yield cluster
    finally:
        teardown()


def run_ranks(cluster: Cluster, argv: Sequence[str], nodes: Sequence[int], *, master_port: int,
              timeout_s: float, log_dir: str) -> None:
    """Run `argv` as ranks 0..len(nodes)-1, rank r in namespace `cluster.nodes[nodes[r]]`; wait for all.

    Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR = node A's address, MASTER_PORT) plus GLOO_SOCKET_IFNAME = its node's veth,
    so `tedfx.init_distributed()` joins the world over the emulated network. Output goes to
    `log_dir/rank{r}.log`.

    Raises:
        RuntimeError: a rank failed or the ranks ran past `timeout_s`; the message carries the
            end of that rank's log. The other ranks are killed.
    """
    nodes = list(nodes)
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as logs:
        try:
            for rank, n in enumerate(nodes):
                node = cluster.nodes[n]
                env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
                env.update(RANK=str(rank), WORLD_SIZE=str(len(nodes)), LOCAL_RANK=str(nodes[:rank].count(n)),
                           LOCAL_WORLD_SIZE=str(nodes.count(n)), MASTER_ADDR=cluster.master_addr,
                           MASTER_PORT=str(master_port), GLOO_SOCKET_IFNAME=node.ifname, OMP_NUM_THREADS="1")
                log = logs.enter_context(open(Path(log_dir, f"rank{rank}.log"), "w"))
                procs.append(subprocess.Popen(node.command(argv), env=env, stdout=log, stderr=subprocess.STDOUT))
            _wait_all(procs, log_dir, timeout_s)
        finally:
            for p in procs:  # after a failure: stop the ranks still waiting on the one that died
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _wait_all(procs: list[subprocess.Popen], log_dir: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if not failed and all(c == 0 for c in codes):
            return
        if failed or time.monotonic() > deadline:
            time.sleep(1.0)  # let the other ranks' errors reach their logs
            r = failed[0] if failed else codes.index(None)
            why = f"exited with code {codes[r]}" if failed else f"was still running after {timeout_s:.0f} s"
            tail = Path(log_dir, f"rank{r}.log").read_text()[-3000:]
            raise RuntimeError(f"rank {r} of {len(procs)} {why}; its log ends with:\n{tail}")
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Emulated two-node cluster: network namespaces + shaped veth.")
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--rate", default=DEFAULT_RATE, help="tbf rate each way (tc syntax), default %(default)s")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            print(setup(args.rate).describe())
        elif args.action == "down":
            deleted = teardown()
            print(f"deleted {deleted}" if deleted else "nothing to delete")
        else:
            print(status())
    except NetemUnavailable as e:
        print(f"emulated cluster unavailable: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
