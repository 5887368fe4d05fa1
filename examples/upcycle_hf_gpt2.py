"""Upcycle a Hugging Face GPT-2 into an MoE model and train it for a few steps, in one process.

    python examples/upcycle_hf_gpt2.py

The model is built from a small config (no download). tedfx captures it with
torch.export, finds its FFNs (Conv1D -> GELU(tanh) -> Conv1D), and replaces each
with an MoE block whose 4 experts start as copies of the dense FFN: at step 0
the MoE model computes exactly what the dense one does.
"""

import torch
import torch.nn.functional as F
import transformers

import tedfx
from tedfx.data import get_batch

torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=128,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
dense = transformers.GPT2LMHeadModel(config)  # byte-level: the corpus shipped with tedfx
tokens = torch.randint(0, 256, (8, 64))

moe = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0, layers="every_other")
print(tedfx.explain(dense, (tokens,), moe=moe))
model = tedfx.to_moe(dense, (tokens,), moe=moe)

model.eval()
with torch.no_grad():  # upcycled experts + renormalised top-2 gates + no drops: the dense model's logits
    print("step 0, max |MoE - dense| logit:", (model(tokens).logits - dense.eval()(tokens).logits).abs().max().item())
model.train()

opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
data = torch.Generator().manual_seed(0)
for step in range(40):
    x, y = get_batch("train", 8, 64, data)
    loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    loss.backward()  # the MoE aux loss is part of this backward
    opt.step()
    opt.zero_grad()
    if step % 10 == 0 or step == 39:
        print(f"step {step}: loss {loss.item():.3f}, MoE losses {tedfx.moe_losses(model)}")
print(sorted(k for k in model.state_dict() if ".mlp." in k)[:7])
