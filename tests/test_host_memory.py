"""CPU ranks keep the memory they free (tedfx.runtime.host_memory): no page faults for a step's recurring temporaries.

Each probe runs in a fresh interpreter (malloc's thresholds are a setting of the whole process) and calls malloc
and free itself, as torch's CPU allocator does, with nothing else allocated in between: after a 20 MiB block is
freed, glibc's adaptive thresholds hand the free top of the heap back to the kernel once it exceeds 40 MiB, so a
"step" that allocates and frees 48 x 1 MiB faults all of it in again every time.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tedfx.runtime import host_memory

PROBE = """
import ctypes, resource
from tedfx.runtime import host_memory
from tedfx.runtime.launch import _prepare_rank
_prepare_rank("gloo", 1)  # what init_distributed does before a gloo process group

libc = host_memory._glibc()
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def touched(n):
    block = libc.malloc(n)
    ctypes.memset(block, 1, n)
    return block

libc.free(touched(20 * 2**20))
counts = []
for step in range(4):
    before = faults()
    for block in [touched(2**20) for _ in range(48)]:
        libc.free(block)
    counts.append(faults() - before)
print(counts)
"""

STEP_PAGES = 48 * 2**20 // 4096


def _faults_per_step(**env: str) -> list[int]:
    environ = {k: v for k, v in os.environ.items() if k != host_memory.OPT_OUT} | env
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=environ,
                         check=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt's thresholds are glibc's: not "
                                 "running on glibc here")


@needs_glibc
def test_a_gloo_rank_keeps_a_steps_freed_temporaries_where_glibcs_defaults_fault_them_in_again():
    default = _faults_per_step(**{host_memory.OPT_OUT: "0"})
    kept = _faults_per_step()
    assert min(default[1:]) > STEP_PAGES // 2  # the probe does catch the re-faulting
    assert max(kept[1:]) < STEP_PAGES // 50


@pytest.mark.parametrize("env, reason", [
    ({}, None),
    ({host_memory.OPT_OUT: "1"}, None),
    ({host_memory.OPT_OUT: "0"}, "TEDFX_KEEP_FREED_MEMORY=0"),
    ({host_memory.OPT_OUT: "off"}, "TEDFX_KEEP_FREED_MEMORY=off"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD loads jemalloc"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "LD_PRELOAD loads tcmalloc"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES sets glibc.malloc"),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"}, None),
])
def test_the_process_own_choice_of_allocator_or_thresholds_is_left_alone(env, reason):
    assert host_memory.user_choice(env) == reason
