"""No rank ever holds the unsharded MoE model: parallelize's memory, measured on 4 ranks (T=2 x X=2).

Tier (c) of the tests (docs/architecture.md, "Tests"). Each rank builds a SwiGLU decoder whose
experts, built whole, would take far more than the rank's own shards; around `parallelize` alone it
measures the peak RSS growth (Linux VmHWM, reset first) and, afterwards, every tensor still alive in
the process that is neither the dense model's nor the ParallelModule's own.
"""

from __future__ import annotations

import ctypes
import gc
import sys

import pytest
import torch

import tedfx
from tedfx.models.nanogpt import GPT, GPTConfig

MIB = 2**20
HIDDEN, LAYERS, EXPERTS = 256, 2, 128
"""Whole experts: 2 layers x 3 matrices x 128 experts x 256 x 1024 x 4 bytes = 768 MiB per rank if built;
each rank's own share (E/X experts, F/T each) is 1/4 of that."""


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _measure() -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=LAYERS, n_embd=HIDDEN, n_head=4, block_size=32, activation="swiglu", bias=False))
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    moe = tedfx.MoEConfig(num_experts=EXPERTS, top_k=2)
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    parallel = tedfx.ParallelConfig(tensor=2, expert=2, activation_checkpointing="block")
    pm = tedfx.parallelize(model, (tokens,), moe=moe, parallel=parallel)
    peak = _status("VmHWM") - before
    gc.collect()
    # The rank's own: its parameters and buffers, and the flat gradient buckets its .grads will be views of.
    own = [*model.parameters(), *model.buffers(), *pm.parameters(), *pm.buffers(), *pm.grad_buffers()]
    kept = {id(t) for t in own}
    kept_storages = {t.untyped_storage().data_ptr() for t in own}
    other = {}
    for obj in gc.get_objects():
        # Plain tensors only: the capture's node metadata keeps FakeTensors, which hold no memory.
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and id(obj) not in kept and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in kept_storages:
                other[storage.data_ptr()] = storage.nbytes()
    full_experts = LAYERS * 3 * EXPERTS * HIDDEN * 4 * HIDDEN * 4
    # The rank graph shares nothing with the dense model: training it (checkpointed regions included)
    # leaves the model as it was.
    dense_before = {k: v.clone() for k, v in model.state_dict().items()}
    pm(tokens).float().square().mean().backward()
    torch.optim.SGD(pm.parameters(), lr=0.1).step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, dense_before[k])]
    return {"dense_changed": changed,"own": sum(p.numel() * p.element_size() for p in pm.parameters()), "peak": peak,
            "other_tensors": sum(other.values()), "largest_other": max(other.values(), default=0),
            "full_experts": full_experts}


def _from_meta_model() -> dict:
    """A dense model built on the meta device plus its state dict (as if read from a checkpoint) gives
    the same rank graph as the real model."""
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, activation="swiglu")
    torch.manual_seed(0)
    real = GPT(cfg)
    with torch.device("meta"):
        meta = GPT(cfg)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    moe = tedfx.MoEConfig(num_experts=4, top_k=2, expert_noise=0.1)
    parallel = tedfx.ParallelConfig(tensor=2, expert=2)
    reads = []
    state = real.state_dict()

    def read(key: str) -> torch.Tensor:
        reads.append(key)
        return state[key]

    a = tedfx.parallelize(real, (tokens,), moe=moe, parallel=parallel).full_state_dict()
    b = tedfx.parallelize(meta, (tokens,), moe=moe, parallel=parallel, dense_state=read).full_state_dict()
    try:
        tedfx.parallelize(meta, (tokens,), moe=moe, parallel=parallel)
        error = None
    except ValueError as e:
        error = str(e)
    return {"same": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
            "read_keys": sorted(set(reads)), "dense_keys": sorted(state), "error": error}


def _rank() -> dict:
    return {**_measure(), "meta": _from_meta_model()}


@pytest.fixture(scope="module")
def ranks():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status and resets VmHWM: Linux only")
    return tedfx.launch(_rank, 4, backend="gloo", timeout=300)


def test_peak_memory_of_parallelize_is_twice_the_own_shards_plus_a_constant(ranks):
    for r in ranks:
        bound = 2 * r["own"] + 384 * MIB
        assert r["full_experts"] + r["own"] > bound  # meaningful: building the experts whole once would not fit
        assert r["peak"] <= bound, r


def test_training_the_rank_graph_leaves_the_dense_model_alone(ranks):
    assert [r["dense_changed"] for r in ranks] == [[]] * 4


def test_nothing_of_the_unsharded_model_is_kept(ranks):
    """Every live tensor is the dense model's or the rank's own, but for small ones (the capture's constants)."""
    for r in ranks:
        assert r["other_tensors"] <= 4 * MIB, r


def test_a_dense_model_on_the_meta_device_is_filled_from_its_state_dict(ranks):
    for r in ranks:
        meta = r["meta"]
        assert meta["same"]
        assert set(meta["read_keys"]) <= set(meta["dense_keys"]) and meta["read_keys"]
        assert "on the meta device: pass dense_state=" in meta["error"]
