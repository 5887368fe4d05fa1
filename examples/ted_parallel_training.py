"""Train an MoE GPT with tensor x expert x data parallelism on 8 local CPU ranks.

    python examples/ted_parallel_training.py            # T=2, X=2, D=2 on 8 gloo ranks
    torchrun --nproc-per-node 8 examples/ted_parallel_training.py   # the same script, unchanged

Every rank builds the same dense model, `tedfx.parallelize` rewrites and shards it
for the rank's mesh coordinates, and each data-parallel token group trains on its
own batches. At the end rank 0 prints what each rank sent and holds.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tedfx
from tedfx.data import get_batch
from tedfx.models.nanogpt import GPT, GPTConfig

T, X, RANKS = 2, 2, 8


def main() -> dict:
    torch.manual_seed(0)  # the same dense weights on every rank (parallelize checks)
    model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, vocab_size=256, block_size=64))
    example = torch.zeros(4, 64, dtype=torch.long)
    moe = tedfx.MoEConfig(num_experts=8, top_k=2, layers="every_other")
    parallel = tedfx.ParallelConfig(tensor=T, expert=X, activation_checkpointing="block")
    pm = tedfx.parallelize(model, (example,), moe=moe, parallel=parallel)

    coords = pm.mesh.coords
    data = torch.Generator().manual_seed(100 + pm.data_parallel_rank)  # the T tensor ranks of a token group share it
    opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
    for step in range(30):
        x, y = get_batch("train", 4, 64, data)  # the public-domain corpus shipped with tedfx, byte-level
        if step == 29:
            pm.comm_stats().reset()
        loss = F.cross_entropy(pm(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    if dist.get_rank() == 0:
        print(f"{pm.mesh.layout}, rank 0 at {coords}: last loss {loss.item():.3f}")
        print("collectives of one step on rank 0:")
        print(pm.comm_stats())
        print("parameter bytes on rank 0:", sum(p.numel() * p.element_size() for p in pm.parameters()))
    full = pm.full_state_dict()  # a collective: every rank calls it
    return {"loss": loss.item(), "keys": len(full)}


if __name__ == "__main__":
    print(tedfx.launch(main, nprocs=RANKS))
