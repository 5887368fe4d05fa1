"""Peer implementations for the benchmarks: the same nanoGPT MoE model built on DeepSpeed-MoE.

`build_deepspeed_moe(model, moe=..., tensor=T, expert=X)` turns a dense
`tedfx.models.nanogpt.GPT` into DeepSpeed's version of what `tedfx.parallelize`
builds, on the same TED layout (rank = d*X*T + x*T + t):

- non-expert weights: Megatron tensor parallelism over consecutive-rank tensor groups
  (attention heads split, c_attn per q/k/v chunk, c_proj row-parallel + all-reduce),
  embeddings and LM head replicated, as tedfx shards them;
- MoE layers: `deepspeed.moe.layer.MoE` with E/X local experts per rank. With T > 1 it
  runs in DeepSpeed's TED mode: a Megatron-style `mpu` set as `deepspeed.utils.groups.mpu`,
  `enable_expert_tensor_parallelism=True` and a tensor-parallel expert MLP; DeepSpeed then
  always drops duplicate tokens around its all-to-alls (its DTD), and has no CAC;
- experts start as copies of the dense FFN (upcycled), like tedfx's `upcycle=True`.

With T = 1 the same builder gives DeepSpeed's expert-parallel-only MoE (no mpu).

DeepSpeed keeps its groups in module globals (`groups.mpu` and one expert group per
ep size), so one process holds one layout: building again with another tensor degree
is an error.

Gradient synchronisation is `sync_gradients(model)`: what DeepSpeed's engine does for
MoE models (non-expert grads averaged over the data-parallel group of ranks with the
same tensor index, expert grads over the expert-data-parallel group), one flat
all-reduce per group, without the engine's optimizer wrapping.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import tedfx
from tedfx.models.nanogpt import GPT

__all__ = ["DeepSpeedMoEGPT", "MegatronMPU", "all_to_all_counts", "build_deepspeed_moe", "sync_gradients"]

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU runs: skip DeepSpeed's accelerator probing and its warning


# --- Megatron-style model-parallel unit -------------------------------------------------------


class MegatronMPU:
    """Tensor groups of T consecutive ranks and data groups of the ranks sharing a tensor index.

    The interface DeepSpeed reads from `deepspeed.utils.groups.mpu` (Megatron's names).
    Every rank must construct it at the same point: it creates process groups.
    """

    def __init__(self, tensor: int) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tensor:
            raise ValueError(f"world size {world} is not divisible by the tensor degree {tensor}.")
        self.tensor = tensor
        self._tp_ranks = self._dp_ranks = None
        self._tp_group = self._dp_group = None
        # Every rank creates every group, in the same order (a torch.distributed requirement).
        for start in range(0, world, tensor):
            ranks = list(range(start, start + tensor))
            group = dist.new_group(ranks)
            if rank in ranks:
                self._tp_ranks, self._tp_group = ranks, group
        for t in range(tensor):
            ranks = list(range(t, world, tensor))
            group = dist.new_group(ranks)
            if rank in ranks:
                self._dp_ranks, self._dp_group = ranks, group

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tensor

    def get_tensor_model_parallel_rank(self) -> int:
        return self._tp_ranks.index(dist.get_rank())

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._tp_ranks[0]

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)

    def get_data_parallel_world_size(self) -> int:
        return len(self._dp_ranks)

    def get_data_parallel_rank(self) -> int:
        return self._dp_ranks.index(dist.get_rank())

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


# --- Tensor-parallel building blocks (Megatron's f and g) --------------------------------------


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward, all-reduce of the input gradient backward (Megatron's "f")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward, identity backward (Megatron's "g")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GroupRef:
    """A process group held by a module: deep copies (DeepSpeed copies the expert) share it."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> _GroupRef:
        return self


def _tensor_group(mpu: MegatronMPU | None) -> _GroupRef:
    """The tensor group, or None when there is no tensor parallelism."""
    return _GroupRef(mpu.get_tensor_model_parallel_group() if mpu and mpu.tensor > 1 else None)


def _rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[0] // size
    return t[rank * n:(rank + 1) * n].clone()


def _cols(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[1] // size
    return t[:, rank * n:(rank + 1) * n].clone()


class TensorParallelMLP(nn.Module):
    """nanoGPT's MLP with c_fc column-parallel and c_proj row-parallel over the tensor group.

    Used for dense FFNs and, with DeepSpeed's expert tensor parallelism, as the expert.
    Its input must be replicated over the tensor group; its output is.
    """

    def __init__(self, dense: nn.Module, mpu: MegatronMPU | None) -> None:
        super().__init__()
        size, rank = (mpu.tensor, mpu.get_tensor_model_parallel_rank()) if mpu else (1, 0)
        self.tp = _tensor_group(mpu)
        self.fc_w = nn.Parameter(_rows(dense.c_fc.weight.detach(), rank, size))
        self.fc_b = nn.Parameter(_rows(dense.c_fc.bias.detach(), rank, size))
        self.proj_w = nn.Parameter(_cols(dense.c_proj.weight.detach(), rank, size))
        self.proj_b = nn.Parameter(dense.c_proj.bias.detach().clone())  # added once, after the reduction
        self.act = dense.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp.group
        if group is not None:
            x = _CopyToTensorParallel.apply(x, group)
        y = F.linear(self.act(F.linear(x, self.fc_w, self.fc_b)), self.proj_w)
        if group is not None:
            y = _ReduceFromTensorParallel.apply(y, group)
        return y + self.proj_b


class TensorParallelAttention(nn.Module):
    """nanoGPT's causal self-attention with heads split over the tensor group (Megatron)."""

    def __init__(self, dense: nn.Module, mpu: MegatronMPU | None) -> None:
        super().__init__()
        size, rank = (mpu.tensor, mpu.get_tensor_model_parallel_rank()) if mpu else (1, 0)
        if dense.n_head % size:
            raise ValueError(f"n_head={dense.n_head} is not divisible by the tensor degree {size}.")
        self.tp = _tensor_group(mpu)
        self.local_heads = dense.n_head // size
        # c_attn is q, k and v fused: split each chunk by heads, not the fused weight in halves.
        w_qkv = dense.c_attn.weight.detach().chunk(3, dim=0)
        b_qkv = dense.c_attn.bias.detach().chunk(3, dim=0)
        self.qkv_w = nn.Parameter(torch.cat([_rows(w, rank, size) for w in w_qkv]))
        self.qkv_b = nn.Parameter(torch.cat([_rows(b, rank, size) for b in b_qkv]))
        self.proj_w = nn.Parameter(_cols(dense.c_proj.weight.detach(), rank, size))
        self.proj_b = nn.Parameter(dense.c_proj.bias.detach().clone())

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        group = self.tp.group
        if group is not None:
            x_BSH = _CopyToTensorParallel.apply(x_BSH, group)
        q, k, v = F.linear(x_BSH, self.qkv_w, self.qkv_b).chunk(3, dim=2)
        q, k, v = (t.view(B, S, self.local_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = F.linear(y.transpose(1, 2).reshape(B, S, -1), self.proj_w)
        if group is not None:
            y = _ReduceFromTensorParallel.apply(y, group)
        return y + self.proj_b


# --- The model --------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dense_block: nn.Module, mpu: MegatronMPU | None, moe_layer: nn.Module | None) -> None:
        super().__init__()
        self.ln_1 = copy.deepcopy(dense_block.ln_1)
        self.attn = TensorParallelAttention(dense_block.attn, mpu)
        self.ln_2 = copy.deepcopy(dense_block.ln_2)
        self.moe = moe_layer
        self.mlp = TensorParallelMLP(dense_block.mlp, mpu) if moe_layer is None else None
        self.l_aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        if self.moe is None:
            return x + self.mlp(h)
        out, l_aux, _ = self.moe(h)
        # Returned through the block (not stashed) so that checkpointed blocks keep its graph.
        return x + out, l_aux


class DeepSpeedMoEGPT(nn.Module):
    """nanoGPT with DeepSpeed-MoE layers; forward(idx) -> (logits, summed MoE aux loss)."""

    def __init__(self, dense: GPT, moe: tedfx.MoEConfig, mpu: MegatronMPU | None, expert: int,
                 checkpoint_blocks: bool) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.wte = copy.deepcopy(dense.wte)
        self.wpe = copy.deepcopy(dense.wpe)
        self.ln_f = copy.deepcopy(dense.ln_f)
        self.checkpoint_blocks = checkpoint_blocks
        tensor = mpu.tensor if mpu else 1
        n = len(dense.h)
        blocks = []
        for i, dense_block in enumerate(dense.h):
            layer = None
            if moe.selects(i, f"h.{i}.mlp", n):
                layer = MoE(
                    hidden_size=dense.config.n_embd,
                    expert=TensorParallelMLP(dense_block.mlp, mpu),  # deep-copied E/X times: upcycled
                    num_experts=moe.num_experts, ep_size=expert, k=moe.top_k,
                    capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
                    min_capacity=moe.min_capacity, drop_tokens=moe.drop_tokens,
                    # Deterministic routing: the tensor ranks of a group must route alike (docs/parallelism.md).
                    use_rts=False, top2_2nd_expert_sampling=False, noisy_gate_policy=None,
                    enable_expert_tensor_parallelism=tensor > 1,
                )
                layer.set_deepspeed_parallelism()
            blocks.append(_Block(dense_block, mpu, layer))
        self.h = nn.ModuleList(blocks)
        self.aux_loss_coef = moe.aux_loss_coef

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(S, device=idx.device))
        aux = x.new_zeros(())
        for block in self.h:
            out = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
            if isinstance(out, tuple):
                x, l_aux = out
                aux = aux + l_aux
            else:
                x = out
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head, as nanoGPT
        return logits, self.aux_loss_coef * aux


# --- Building and running ---------------------------------------------------------------------

_state: dict[str, Any] = {}


def _install_gloo_gather_fix() -> None:
    """DeepSpeed's token gather passes a flat output and a shaped input to all_gather_into_tensor.

    NCCL accepts that; gloo requires the input to have the output's shape per rank, so the
    input is flattened when the output is flat. Installed once, only on gloo.
    """
    import deepspeed.comm as ds_comm

    if getattr(ds_comm.all_gather_into_tensor, "_tedfx_flat_input", False):
        return
    original = ds_comm.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor, tensor, *args, **kwargs):
        if output_tensor.dim() == 1 and tensor.dim() != 1:
            tensor = tensor.contiguous().view(-1)
        return original(output_tensor, tensor, *args, **kwargs)

    all_gather_into_tensor._tedfx_flat_input = True
    ds_comm.all_gather_into_tensor = all_gather_into_tensor


class _AllToAllCounts:
    """Calls and bytes (sent by this rank) of DeepSpeed's MoE all-to-alls, forward and backward."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.nbytes = 0

    def add(self, t: torch.Tensor) -> None:
        with self.lock:
            self.calls += 1
            self.nbytes += t.numel() * t.element_size()

    def reset(self) -> None:
        with self.lock:
            self.calls = self.nbytes = 0


all_to_all_counts = _AllToAllCounts()
"""Counts of every DeepSpeed MoE all-to-all in this process since the last `reset()`."""


def _install_all_to_all_counter() -> None:
    """Route DeepSpeed's MoE all-to-all through a counting twin (same collective, same autograd)."""
    from deepspeed.moe import sharded_moe

    if getattr(sharded_moe._AllToAll, "_tedfx_counted", False):
        return

    class _CountedAllToAll(torch.autograd.Function):
        _tedfx_counted = True

        @staticmethod
        def forward(ctx, group, x):
            ctx.group = group
            x = x.contiguous()
            out = torch.empty_like(x)
            all_to_all_counts.add(x)
            dist.all_to_all_single(out, x, group=group)
            return out

        @staticmethod
        def backward(ctx, grad):
            return None, _CountedAllToAll.apply(ctx.group, grad)

    sharded_moe._AllToAll = _CountedAllToAll


def build_deepspeed_moe(model: GPT, *, moe: tedfx.MoEConfig, tensor: int, expert: int,
                        checkpoint_blocks: bool = True) -> DeepSpeedMoEGPT:
    """DeepSpeed-MoE's version of `tedfx.parallelize(model, ...)` on this rank. Call on every rank.

    Args:
        model: a dense nanoGPT with the same weights on every rank.
        moe: which FFNs become MoE layers and how they route (num_experts, top_k,
            capacity_factor, min_capacity, drop_tokens, aux_loss_coef are used).
        tensor: T; > 1 runs DeepSpeed in TED mode (mpu + expert tensor parallelism).
        expert: X, DeepSpeed's ep_size.
        checkpoint_blocks: recompute each transformer block in the backward (torch checkpoint),
            as tedfx's activation_checkpointing="block".

    Returns:
        The rank's module; `sync_gradients(module)` after each backward.
    """
    import deepspeed
    from deepspeed.utils import groups

    if not dist.is_initialized():
        raise RuntimeError("build_deepspeed_moe needs torch.distributed initialised "
                           "(tedfx.launch or init_distributed).")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    if dist.get_backend() == "gloo":
        _install_gloo_gather_fix()
    _install_all_to_all_counter()
    if _state.setdefault("tensor", tensor) != tensor:
        raise ValueError(f"this process already built DeepSpeed groups for tensor={_state['tensor']}; DeepSpeed "
                         f"keeps them in globals, so build tensor={tensor} in another process.")
    if tensor > 1 and groups.mpu is None:
        groups.mpu = MegatronMPU(tensor)
    mpu = groups.mpu if tensor > 1 else None
    torch.manual_seed(0)  # the gates are initialised by DeepSpeed: identically on every rank
    return DeepSpeedMoEGPT(model, moe, mpu, expert, checkpoint_blocks)


def sync_gradients(model: DeepSpeedMoEGPT) -> None:
    """Average gradients as DeepSpeed's engine does: non-expert over the data group, experts over edp.

    One flat all-reduce per group; groups of one rank send nothing.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    non_expert, by_group = [], {}
    for p in model.parameters():
        if p.grad is None:
            continue
        if is_moe_param(p):
            by_group.setdefault(p.group_name, []).append(p)
        else:
            non_expert.append(p)
    buckets = [(groups._get_data_parallel_group(), non_expert)]
    buckets += [(groups._get_expert_data_parallel_group(name), ps) for name, ps in sorted(by_group.items())]
    for group, params in buckets:
        size = dist.get_world_size(group)
        if size == 1 or not params:
            continue
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=group)
        flat /= size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
