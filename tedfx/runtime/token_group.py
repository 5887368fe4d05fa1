"""Token groups: the tensor ranks of a data-parallel replica run one micro-batch (docs/parallelism.md, "Token groups").

Rank r = d*X*T + x*T + t belongs to token group d*X + x, which is also its
data-parallel rank: the T consecutive ranks of a tensor group hold the shards of
one replica and must run the same micro-batch, with the same dropout masks on
replicated activations and the same loss. `ParallelModule` makes that hold, as
`ParallelConfig.token_group_inputs` says:

- "broadcast" (default): before each forward the token group's first rank sends
  its tensor inputs, positional and keyword, to the others (one broadcast per
  dtype), as Megatron's data broadcast does; the others' inputs only give shapes.
- "verify": every rank checksums its inputs and the token group compares them;
  a difference raises on the first step, naming the ranks.

With `check_inputs` (both modes), in one all-gather over "tp" per forward: the
digests of the default generators (CPU, and CUDA once initialised) while dropout
is on, and the input checksums in "verify" mode (and of inputs that require grad,
which are never overwritten). In the backward, the gradient that reaches the
module's outputs is compared too: it differs when the tensor ranks compute the
loss from different targets, which no input broadcast can repair.

These comparisons guard against silent divergence, not against a hang (the
world-wide shape check ran before, tedfx.runtime.input_check), so they need not
block: each all-gather of a few bytes is issued asynchronously and waited for
at the end of the same forward (`finish_checks`) or backward (a callback of the
autograd engine), and its latency hides behind the model's compute
(docs/parallelism.md, "Cost of the checks"). Every rank of the token group
receives the same rows, so all of them raise the same error, in the same
forward or backward as before. Only a failing "verify" comparison gathers
Python objects, to name the inputs that differ.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import _compat
from .._compat import pytree
from ..collectives import wire

__all__ = ["TokenGroup", "TokenGroupFeed"]

GRAD_RTOL = 1e-6
"""Output gradients of one token group agree to this fraction of their fingerprint's scale (bit-equal in
practice); a different target moves a weighted sum by about 1/sqrt(tokens) of it (`_grad_fingerprint`)."""


@dataclass(frozen=True)
class TokenGroup:
    """The token group of a rank: which micro-batch it runs, and with which ranks.

    Attributes:
        index: this token group's number, d*X + x: the data-parallel rank to draw data by.
        count: how many token groups there are, X*D: the data-parallel size.
        ranks: the global ranks of the group (its tensor ranks), ascending; ranks[0] is the source
            whose micro-batch the others receive in "broadcast" mode.
    """

    index: int
    count: int
    ranks: tuple[int, ...]

    def __str__(self) -> str:
        return f"token group {self.index} of {self.count} (ranks {list(self.ranks)})"


class TokenGroupFeed:
    """What ParallelModule does to its inputs and outputs so that a token group runs one micro-batch.

    Args:
        group: this rank's TokenGroup.
        process_group: the "tp" process group (the token group's ranks).
        rank: this rank's global rank.
        mode: "broadcast" or "verify" (ParallelConfig.token_group_inputs).
    """

    def __init__(self, group: TokenGroup, process_group: dist.ProcessGroup, rank: int, mode: str) -> None:
        self.group, self.process_group, self.rank, self.mode = group, process_group, rank, mode
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
        self._pending: Callable[[], None] | None = None
        self._warned = False
        self._compared: set[bool] = set()
        """Grad modes (torch.is_grad_enabled()) whose first forward compared the inputs with the received ones."""

    def feed(self, args: tuple, kwargs: dict, *, check: bool, check_rng: bool) -> tuple[tuple, dict]:
        """The inputs this rank must run: the source's in "broadcast" mode; checked as `check`/`check_rng` ask.

        The comparison is issued here and judged by `finish_checks()`, which the caller runs after the forward.
        """
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        # Inputs that require grad are never overwritten (their gradient belongs to the caller): verified instead.
        verified = [i for i in tensors if self.mode == "verify" or leaves[i].requires_grad] if check else []
        if self.mode == "broadcast":
            sent = [i for i in tensors if not leaves[i].requires_grad]
            # Compared on the first forward with and without gradients (training, evaluation) until it warns:
            # torch.equal reads a device flag, a host sync the per-step path does not take.
            compare = check and not self._warned and torch.is_grad_enabled() not in self._compared
            self._compared.add(torch.is_grad_enabled())
            replaced = []
            for i, t in zip(sent, self.broadcast([leaves[i] for i in sent])):
                if compare and t is not leaves[i] and not torch.equal(t, leaves[i]):
                    replaced.append(i)
                leaves[i] = t
            if replaced:
                self._warn_replaced([_leaf_names(args, kwargs)[i] for i in replaced])
        if verified or check_rng:
            names = _leaf_names(args, kwargs)
            self._pending = self._compare([leaves[i] for i in verified], [names[i] for i in verified], check_rng)
        return pytree.tree_unflatten(leaves, spec)

    def _warn_replaced(self, names: list[str]) -> None:
        """Once: this rank's inputs differed from the source's and were replaced (compared on the first forward
        with gradients and the first without). Training raises at the first
        backward if targets outside the model were drawn the same way; without a backward (evaluation) only this
        warning tells the metric is computed on another rank's inputs."""
        self._warned = True
        warnings.warn(
            f"rank {self.rank} of {self.group} was called with other inputs ({', '.join(names)}) than the group's "
            f"first rank {self.group.ranks[0]}, and runs that rank's (ParallelConfig.token_group_inputs="
            f"\"broadcast\"): targets or labels drawn the same way outside the model do not match its outputs, in "
            f"evaluation too. Draw data by pm.data_parallel_rank, or send the targets with pm.broadcast_batch(x, y) "
            f"(docs/parallelism.md, \"Token groups\"). Warned once.", UserWarning, stacklevel=4)

    def finish_checks(self) -> None:
        """Wait for the comparison the last `feed` issued, if any, and raise its error on every rank alike."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def broadcast(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The source rank's `tensors` on every rank of the token group (same shapes needed); one call per dtype."""
        out = list(tensors)
        by_kind: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_kind.setdefault((t.dtype, t.device), []).append(i)
        for (dtype, device), idx in by_kind.items():
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])  # a buffer of our own, sent in place
            payload = flat.view(torch.uint8) if dtype == torch.bool else flat
            got = wire.broadcast_(payload.to(self.device), self.process_group).to(device)
            got = got.view(torch.bool) if dtype == torch.bool else got
            if self.rank == self.group.ranks[0]:
                continue  # the source keeps its own tensors
            for i, piece in zip(idx, got.split([tensors[i].numel() for i in idx])):
                out[i] = piece.view(tensors[i].shape)
        return out

    def watch_outputs(self, out: Any) -> Any:
        """`out`, each tensor with a hook that checks in the backward that every rank of the token group receives
        the same gradient. A hook, not an autograd function: a function's output is a view that the user may not
        write in place (`logits.div_(temperature)`); the hook still sees the gradient of the value returned."""
        for x in pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(self._check_grad)
        return out

    # --- checks ---------------------------------------------------------------------------------------

    def _gather(self, row: torch.Tensor) -> Callable[[], list[list]]:
        """Start gathering every rank's `row` (a small 1-d tensor); the returned function waits and gives the rows,
        in token-group order. A plain c10d all-gather: the checks never run under tracing, and eager funcol adds
        its own overhead to a collective of a few bytes."""
        row = row.to(self.device)
        out = torch.empty(len(self.group.ranks) * row.numel(), dtype=row.dtype, device=self.device)
        work = _compat.all_gather_into(out, row, self.process_group, async_op=True)

        def rows() -> list[list]:
            work.wait()
            return out.view(len(self.group.ranks), -1).tolist()
        return rows

    def _compare(self, tensors: list[torch.Tensor], names: list[str], check_rng: bool) -> Callable[[], None]:
        """Issue the comparison of RNG digests and input checksums; the returned function judges it."""
        sums = [_checksum(t) for t in tensors]
        row = torch.tensor([*(_rng_digests() if check_rng else (0, 0)), _digest(repr(sums).encode())])
        rows = self._gather(row)
        return lambda: self._judge_inputs(rows, sums, names)

    def _judge_inputs(self, pending: Callable[[], list[list]], sums: list, names: list[str]) -> None:
        """Wait for the rows `_compare` gathers and raise if the token group's ranks differ."""
        rows, ranks = pending(), self.group.ranks
        bad_rng = [(ranks[j], which) for j, r in enumerate(rows) for k, which in enumerate(("CPU", "CUDA"))
                   if r[k] != rows[0][k]]
        if bad_rng:
            rank, which = bad_rng[0]
            raise ValueError(
                f"the tensor-parallel ranks {list(ranks)} hold different torch RNG states while dropout is on "
                f"(the {which} default generator of rank {rank} differs from rank {ranks[0]}'s), so their dropout "
                f"masks on replicated activations would differ. Seed torch identically on the ranks of a token "
                f"group, e.g. torch.manual_seed(seed + pm.data_parallel_rank).")
        differ = [ranks[j] for j, r in enumerate(rows) if r[2] != rows[0][2]]
        if differ:
            everyone: list[Any] = [None] * len(ranks)
            dist.all_gather_object(everyone, sums, group=self.process_group)  # only on the way to the error
            j = ranks.index(differ[0])
            which = [n for n, a, b in zip(names, everyone[0], everyone[j]) if a != b] or ["their number or shapes"]
            raise ValueError(
                f"ranks {ranks[0]} and {differ[0]} of {self.group} were called with different micro-batches "
                f"(these differ: {', '.join(which)}). The tensor ranks of a token group run one micro-batch together: "
                f"draw data by pm.data_parallel_rank (of pm.data_parallel_size), not by the global rank, or "
                f"let ParallelConfig(token_group_inputs='broadcast') send the first rank's.")

    def _check_grad(self, grad: torch.Tensor) -> None:
        """Issue the comparison of the gradient at an output; the end of this backward judges it."""
        rows = self._gather(_grad_fingerprint(grad))
        _compat.queue_backward_callback(lambda: self._judge_grad(rows))

    def _judge_grad(self, pending: Callable[[], list[list]]) -> None:
        """Wait for the fingerprints `_check_grad` gathers and raise if the token group's ranks differ."""
        rows = pending()
        scale = max(r[2] for r in rows)
        for j, r in enumerate(rows):
            if any(abs(r[k] - rows[0][k]) > GRAD_RTOL * scale for k in (0, 1)):
                raise ValueError(
                    f"ranks {self.group.ranks[0]} and {self.group.ranks[j]} of {self.group} received different "
                    f"gradients at the ParallelModule's output, so they computed different losses: the targets "
                    f"(or the loss) differ between the tensor ranks, and their replicated weights would drift "
                    f"apart. Draw targets by pm.data_parallel_rank as well, send them from the token group's "
                    f"first rank with pm.broadcast_batch(...), or pass them to the model (e.g. labels=...), whose "
                    f"inputs are broadcast.")


def _leaf_names(args: tuple, kwargs: dict) -> list[str]:
    """A readable name per flattened input: "input 0", "attention_mask", "input 1[2]"..."""
    names = []
    for i, a in enumerate(args):
        n = len(pytree.tree_leaves(a))
        names += [f"input {i}"] if n == 1 else [f"input {i}[{k}]" for k in range(n)]
    for key, v in kwargs.items():
        n = len(pytree.tree_leaves(v))
        names += [key] if n == 1 else [f"{key}[{k}]" for k in range(n)]
    return names


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _rng_digests() -> tuple[int, int]:
    """Digests of the default generators' states: CPU, and CUDA's current device once CUDA is initialised (else 0)."""
    cpu = _digest(torch.get_rng_state().numpy().tobytes())
    cuda = _digest(torch.cuda.get_rng_state().numpy().tobytes()) \
        if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    return cpu, cuda


def _checksum(t: torch.Tensor) -> tuple[tuple[int, ...], int, int]:
    """(shape, sum, position-weighted sum) of the tensor's bytes: equal for equal tensors, exactly."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8).long()
    w = torch.arange(b.numel(), device=b.device, dtype=torch.int64) * 0x5851F42D + 1  # int64 arithmetic wraps
    return tuple(t.shape), int(b.sum()), int((b * w).sum())


def _grad_fingerprint(g: torch.Tensor) -> torch.Tensor:
    """Two weighted sums of a gradient and their scale, in float64, from one pass over it.

    v = g @ w_col (cos weights on the columns) reads the gradient once; two cos weightings of v's rows give
    the two sums compared, the L2 norm of v their scale (rounding noise moves the sums by about that norm times
    the noise). A different target changes one row of g in two columns, so one entry of v, by about
    1/sqrt(rows) of v's L2 norm.
    """
    g2 = g.detach().reshape(1, 1) if g.dim() == 0 else g.detach().reshape(-1, g.shape[-1])
    w_col, w_rows = _fingerprint_weights(*g2.shape, g2.dtype, g2.device)
    v = (g2 @ w_col).double()
    return torch.cat([w_rows @ v, torch.linalg.vector_norm(v).unsqueeze(0)])


@functools.lru_cache(maxsize=16)
def _fingerprint_weights(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The column weights (in the gradient's dtype, [cols]) and the two row weightings (float64, [2, rows]) of
    `_grad_fingerprint`, made once per shape."""
    w_col = torch.cos(torch.arange(cols, device=device, dtype=torch.float64) * 0.7548776662 + 0.5)
    r = torch.arange(rows, device=device, dtype=torch.float64)
    w_rows = torch.stack([torch.cos(r * 0.5698402910 + 0.25), torch.cos(r * 0.8191725134 + 1.0)])
    return w_col.to(dtype), w_rows
