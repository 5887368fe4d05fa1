"""Per-rank side of tests/test_failures.py: one rank fails in the middle of a training step.

`fail_mid_step(how)` trains a T = 2, X = 2 ParallelModule on 4 ranks; on the second step rank 1
fails between its forward and its backward (the others are then inside the step's collectives):
how="raise" raises a ValueError, how="kill" sends itself SIGKILL. Run as a script, it does the
same under torchrun: `torchrun --nproc-per-node 4 tests/failure_cases.py raise`.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tedfx

from models import tiny_gpt

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)
PARALLEL = tedfx.ParallelConfig(tensor=2, expert=2, timeout=20.0)
FAILING_RANK = 1


def fail_mid_step(how: str) -> int:
    model, (x,) = tiny_gpt()
    pm = tedfx.parallelize(model, (x,), moe=MOE, parallel=PARALLEL)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    for step in range(3):
        loss = F.cross_entropy(pm(x).flatten(0, 1), x.flatten())
        if step == 1 and dist.get_rank() == FAILING_RANK:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"rank {FAILING_RANK} fails in the middle of step {step}")
        loss.backward()
        opt.step()
        opt.zero_grad()
    return dist.get_rank()


if __name__ == "__main__":
    tedfx.launch(fail_mid_step, 4, sys.argv[1])
