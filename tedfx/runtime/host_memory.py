"""CPU ranks keep the heap memory they free, so a training step does not fault in its temporaries afresh each time.

glibc's malloc hands the free top of its heap back to the kernel once it is larger than M_TRIM_THRESHOLD,
and serves allocations of M_MMAP_THRESHOLD bytes or more from fresh mappings that are unmapped on free.
Both start at 128 KiB and grow with what the process frees. A training step allocates and frees the same
temporaries every step (expert activations and their gradients of 1-2 MiB, received buffers), so under
these defaults part of them comes back from the kernel every step, as zero-filled pages, one minor page
fault per 4 KiB: about 2,000 per step on a rank of `benchmarks/bench_step_vs_deepspeed.py`. With the
thresholds below it takes a few hundred (docs/parallelism.md, "CPU ranks").

`keep_freed_memory` raises both thresholds (a fixed M_MMAP_THRESHOLD also stops glibc adapting them): up to
M_TRIM_THRESHOLD of freed memory stays in the process, as a GPU caching allocator keeps device memory. It
is a setting of the whole process; `tedfx.init_distributed` makes it for gloo ranks (which
`tedfx.launch` starts) unless the process already chose its allocator or its thresholds (`user_choice`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["MMAP_THRESHOLD", "OPT_OUT", "TRIM_THRESHOLD", "keep_freed_memory", "user_choice"]

log = logging.getLogger(__name__)

TRIM_THRESHOLD = 256 * 2**20
"""Free memory at the top of the heap that stays in the process."""
MMAP_THRESHOLD = 32 * 2**20
"""Allocations of this size or more still get their own mapping (glibc's largest adaptive threshold)."""
OPT_OUT = "TEDFX_KEEP_FREED_MEMORY"
"""Set to 0 to leave glibc's thresholds as they are."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_ALLOCATOR_LIBRARIES = ("jemalloc", "tcmalloc", "mimalloc")
_GLIBC_MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                           "MALLOC_MMAP_MAX_")


def user_choice(environ: dict[str, str] | None = None) -> str | None:
    """Why the thresholds are left alone, or None: an opt-out, another allocator preloaded, or glibc's own
    malloc variables or tunables set for this process."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT}={env[OPT_OUT]}"
    preload = env.get("LD_PRELOAD", "")
    for library in _ALLOCATOR_LIBRARIES:
        if library in preload:
            return f"LD_PRELOAD loads {library}"
    for name in _GLIBC_MALLOC_VARIABLES:
        if name in env:
            return f"{name} is set"
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    return None


def _glibc() -> ctypes.CDLL | None:
    """The C library this process runs on, when it is glibc (mallopt is glibc's); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has: its C library's among them
        libc.gnu_get_libc_version  # only glibc has it (musl's mallopt does nothing)
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True when they were set.

    Leaves them alone (False) off glibc, or when `user_choice` names a reason.
    """
    reason = user_choice()
    if reason is not None:
        log.debug("glibc malloc thresholds left alone: %s", reason)
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success. The mmap threshold first: setting either one fixes both.
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("glibc malloc thresholds %s: trim %d, mmap %d", "set" if done else "not set", TRIM_THRESHOLD,
              MMAP_THRESHOLD)
    return done
