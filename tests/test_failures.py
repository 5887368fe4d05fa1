"""A rank that fails mid-step ends the run on every rank within the timeout, with a message naming it.

Under `tedfx.launch` the parent sees the rank end, names it (with its traceback when it raised)
and stops the others; under torchrun its agent does the same. No rank is left waiting in a
collective (docs/validation.md, "A rank fails").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tedfx import LaunchError, RankError, launch

from failure_cases import FAILING_RANK, fail_mid_step

TESTS = Path(__file__).resolve().parent
DEADLINE_S = 20.0
"""ParallelConfig.timeout of the failing run: every rank must be gone within it of the failure."""


def test_a_rank_that_raises_mid_step_is_named_and_the_others_stop():
    start = time.monotonic()
    with pytest.raises(RankError, match=rf"rank {FAILING_RANK} of 4 failed: ValueError: rank 1 fails in the "
                                        r"middle of step 1") as info:
        launch(fail_mid_step, 4, "raise", timeout=DEADLINE_S)
    assert info.value.rank == FAILING_RANK
    assert time.monotonic() - start < 60  # start-up and one step included; the stop itself takes seconds


def test_a_rank_killed_mid_step_is_named_and_the_others_stop():
    with pytest.raises(LaunchError, match=rf"rank {FAILING_RANK} of 4 died with signal SIGKILL"):
        launch(fail_mid_step, 4, "kill", timeout=DEADLINE_S)


def test_under_torchrun_a_failing_rank_is_named_and_every_rank_ends():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(TESTS / "failure_cases.py"), "raise"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rank 1 fails in the middle of step 1" in out and f"rank      : {FAILING_RANK}" in out, out[-3000:]
