"""to_moe and explain end to end, in one process.

Tier (c) of the tests (docs/architecture.md, "Tests"): the upcycled MoE equals the dense model at step 0 (for
every E, k with normalised gates, no dropping, no noise), on the test GPT and
on HF GPT-2, Llama and Phi-3 (a fused gate_up projection); plus the state-dict contract, training, seeding, the
layer selection, errors and the report.

Capturing a model is the slow step (seconds per HF model) and does not depend
on the MoEConfig, so every dense model is captured once per session and each
to_moe call rewrites a fresh deep copy of that capture; only the pass pipeline
under test runs per case.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tedfx
from tedfx import MoEConfig
from tedfx.moe.routing import Router
from tedfx.passes.graph import moe_blocks

from models import VOCAB, patch_capture, tiny_falcon, tiny_gpt, tiny_gpt2, tiny_llama, tiny_phi3

BUILDERS = {
    "gpt-gelu": lambda: tiny_gpt("gelu", n_layer=4),  # 4 FFNs, so "every_other" has two to pick
    "gpt-swiglu": lambda: tiny_gpt("swiglu"),
    "hf-gpt2": tiny_gpt2,
    "hf-llama": tiny_llama,
    "hf-phi3": tiny_phi3,  # fused gate_up_proj, chunked into gate and up
}
# Per model: its FFN count, the FFNs' module path, the dense parameters under it, the expert tensors
# replacing them, and F.
MLP_PARAMS = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")
GLU_PARAMS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
LAYOUT = {
    "gpt-gelu": (4, "h.{}.mlp", MLP_PARAMS, ("w1", "b1", "w2", "b2"), 128),
    "gpt-swiglu": (2, "h.{}.mlp", GLU_PARAMS, ("w1", "w3", "w2"), 128),
    "hf-gpt2": (2, "transformer.h.{}.mlp", MLP_PARAMS, ("w1", "b1", "w2", "b2"), 128),
    "hf-llama": (2, "model.layers.{}.mlp", GLU_PARAMS, ("w1", "w3", "w2"), 64),
}
HIDDEN = 32
EK = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 3)]


@functools.cache
def dense(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The dense model, in eval mode (HF models carry dropout), built once per session."""
    model, inputs = BUILDERS[name]()
    return model.eval(), inputs


@pytest.fixture(autouse=True)
def capture_once(monkeypatch):
    """Every pipeline that captures gets a deep copy of a cached capture of the same model and input shapes."""
    patch_capture(monkeypatch.setattr)


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def exact_moe(E: int, k: int, **kwargs) -> MoEConfig:
    """The configuration under which the upcycled MoE must equal the dense model."""
    return MoEConfig(num_experts=E, top_k=k, normalize_gates=True, drop_tokens=False, noisy_gate=None,
                     expert_noise=0.0, **kwargs)


def ffn_paths(gm: nn.Module) -> list[str]:
    """The converted FFNs of an MoE graph, in graph order, read from the graph itself."""
    return list(moe_blocks(gm.graph))


# --- upcycled MoE == dense ----------------------------------------------------------------------------------


@pytest.mark.parametrize("E, k", EK)
@pytest.mark.parametrize("name", ["gpt-gelu", "gpt-swiglu", "hf-gpt2", "hf-llama"])
def test_upcycled_moe_equals_dense(name, E, k):
    model, inputs = dense(name)
    moe_model = tedfx.to_moe(model, inputs, moe=exact_moe(E, k))
    assert len(ffn_paths(moe_model)) == LAYOUT[name][0]
    with torch.no_grad():
        torch.testing.assert_close(logits(moe_model(*inputs)), logits(model(*inputs)), rtol=0, atol=1e-5)
        # Batch and sequence differ from the example: the dims stayed dynamic.
        tokens = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(E * 10 + k))
        torch.testing.assert_close(logits(moe_model(tokens)), logits(model(tokens)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("new_decoder_architecture, bias", [(False, True), (True, False)],
                         ids=["multi-query-bias", "grouped-kv-no-bias"])
def test_upcycled_falcon_equals_dense(new_decoder_architecture, bias):
    """HF Falcon projects by `x @ W.T` (+ bias), not F.linear: its GELU MLPs still convert (passes/graph.py:
    fold_transposed_linears), and the upcycled experts equal the dense FFN."""
    model, inputs = tiny_falcon(new_decoder_architecture, bias)
    model.eval()
    moe_model = tedfx.to_moe(model, inputs, moe=exact_moe(4, 2))
    assert ffn_paths(moe_model) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    with torch.no_grad():
        torch.testing.assert_close(logits(moe_model(*inputs)), logits(model(*inputs)), rtol=0, atol=1e-5)


def test_upcycled_moe_equals_dense_in_train_mode():
    # The test GPT has no dropout: train mode routes with the training capacity and must still match.
    model, inputs = dense("gpt-gelu")
    moe_model = tedfx.to_moe(model, inputs, moe=exact_moe(4, 2)).train()
    torch.testing.assert_close(moe_model(*inputs), model(*inputs), rtol=0, atol=1e-5)


def test_upcycled_moe_differs_from_dense_when_it_should():
    # Guards the invariant test against comparing the dense model with itself.
    model, inputs = dense("gpt-gelu")
    with torch.no_grad():
        reference = model(*inputs)
        unnormalised = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=4, top_k=1, drop_tokens=False))
        assert (unnormalised(*inputs) - reference).abs().max() > 1e-4  # k = 1 Switch gate p < 1 scales the FFN
        noisy = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=4, top_k=2, drop_tokens=False,
                                                          expert_noise=0.5))
        assert (noisy(*inputs) - reference).abs().max() > 1e-4


@pytest.mark.parametrize("E, k", [(2, 1), (4, 2), (4, 3)])
def test_upcycled_moe_equals_dense_with_a_fused_gate_up(E, k):
    """Phi-3's gate_up_proj: w1 and w3 of every expert are the gate and up halves of the fused weight."""
    model, inputs = dense("hf-phi3")
    moe_model = tedfx.to_moe(model, inputs, moe=exact_moe(E, k))
    assert ffn_paths(moe_model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    sd = moe_model.state_dict()
    for i in range(2):
        fused_FH = model.get_parameter(f"model.layers.{i}.mlp.gate_up_proj.weight").detach()
        assert f"model.layers.{i}.mlp.gate_up_proj.weight" not in sd
        for e in range(E):
            assert torch.equal(sd[f"model.layers.{i}.mlp.experts.w1"][e], fused_FH[:64].t())  # chunk 0: the gate
            assert torch.equal(sd[f"model.layers.{i}.mlp.experts.w3"][e], fused_FH[64:].t())
    with torch.no_grad():
        torch.testing.assert_close(logits(moe_model(*inputs)), logits(model(*inputs)), rtol=0, atol=1e-5)


class _FusedGLUBlock(nn.Module):
    """x + down(up * gelu(gate)) with `up, gate = proj(x).split(F, -1)` and biases: gate is the second half."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.proj = nn.Linear(HIDDEN, 128)
        self.down = nn.Linear(64, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        up, gate = self.proj(x).split(64, dim=-1)
        return self.head(x + self.down(up * F.gelu(gate)))


def test_fused_gate_up_bias_halves_go_to_b1_and_b3():
    torch.manual_seed(0)
    model, tokens = _FusedGLUBlock().eval(), torch.randint(0, VOCAB, (2, 8))
    moe_model = tedfx.to_moe(model, (tokens,), moe=exact_moe(4, 2))
    sd = moe_model.state_dict()
    w_FH, b_F = model.proj.weight.detach(), model.proj.bias.detach()
    for e in range(4):
        assert torch.equal(sd["experts.w1"][e], w_FH[64:].t()) and torch.equal(sd["experts.b1"][e], b_F[64:])
        assert torch.equal(sd["experts.w3"][e], w_FH[:64].t()) and torch.equal(sd["experts.b3"][e], b_F[:64])
    with torch.no_grad():
        torch.testing.assert_close(moe_model(tokens), model(tokens), rtol=0, atol=1e-5)


# --- state dict ---------------------------------------------------------------------------------------------


def _dense_ffn_weight(model: nn.Module, path: str, param: str) -> torch.Tensor:
    """A dense FFN weight laid out [in, out] (nn.Linear stores [out, in]; GPT-2's Conv1D [in, out])."""
    module = model.get_submodule(f"{path}.{param.rsplit('.', 1)[0]}")
    w = getattr(module, param.rsplit(".", 1)[1]).detach()
    return w if type(module).__name__ == "Conv1D" or w.dim() == 1 else w.t()


@pytest.mark.parametrize("name", list(LAYOUT))
def test_state_dict_keys_shapes_and_upcycled_values(name):
    model, inputs = dense(name)
    E = 4
    moe_model = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=E, top_k=2))
    num_ffns, path_fmt, dense_params, expert_names, F_dim = LAYOUT[name]
    paths = [path_fmt.format(i) for i in range(num_ffns)]
    assert ffn_paths(moe_model) == paths

    dense_keys = set(model.state_dict())
    removed = {f"{p}.{param}" for p in paths for param in dense_params}
    assert removed <= dense_keys
    added = {f"{p}.router.weight" for p in paths} | {f"{p}.experts.{n}" for p in paths for n in expert_names}
    moe_sd = moe_model.state_dict()
    assert set(moe_sd) == (dense_keys - removed) | added

    shapes = {"w1": (E, HIDDEN, F_dim), "w3": (E, HIDDEN, F_dim), "b1": (E, F_dim), "b3": (E, F_dim),
              "w2": (E, F_dim, HIDDEN), "b2": (E, HIDDEN)}
    source = dict(zip(("w1", "b1", "w2", "b2"), MLP_PARAMS)) if "b1" in expert_names else \
        dict(zip(("w1", "w3", "w2"), GLU_PARAMS))
    for p in paths:
        assert moe_sd[f"{p}.router.weight"].shape == (E, HIDDEN)
        for n in expert_names:
            stacked = moe_sd[f"{p}.experts.{n}"]
            assert stacked.shape == shapes[n], n
            # Upcycled without noise: every expert is an exact copy of the dense FFN.
            for e in range(E):
                assert torch.equal(stacked[e], _dense_ffn_weight(model, p, source[n])), (p, n, e)
    for key in dense_keys - removed:
        assert torch.equal(moe_sd[key], model.state_dict()[key]), key


@pytest.mark.parametrize("name, wte", [("gpt-gelu", "wte.weight"), ("hf-gpt2", "transformer.wte.weight")])
def test_tied_embedding_and_lm_head_stay_one_parameter(name, wte):
    model, inputs = dense(name)
    moe_model = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=2, top_k=1))
    sd = moe_model.state_dict()
    assert wte in sd and "lm_head.weight" in sd
    assert moe_model.get_parameter(wte) is moe_model.get_parameter("lm_head.weight")


def test_every_other_converts_odd_ffns():
    model, inputs = dense("gpt-gelu")
    moe_model = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=2, top_k=1, layers="every_other"))
    assert ffn_paths(moe_model) == ["h.1.mlp", "h.3.mlp"]
    sd = moe_model.state_dict()
    for i in (1, 3):
        assert f"h.{i}.mlp.router.weight" in sd and f"h.{i}.mlp.c_fc.weight" not in sd
    for i in (0, 2):
        assert f"h.{i}.mlp.c_fc.weight" in sd and not any(k.startswith(f"h.{i}.mlp.router") for k in sd)


def test_layer_predicate_and_index_list():
    model, inputs = dense("gpt-gelu")
    by_path = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=2, top_k=1,
                                                        layers=lambda path: path in ("h.0.mlp", "h.2.mlp")))
    assert ffn_paths(by_path) == ["h.0.mlp", "h.2.mlp"]
    by_index = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=2, top_k=1, layers=[3]))
    assert ffn_paths(by_index) == ["h.3.mlp"]
    assert set(by_index.state_dict()) >= {"h.0.mlp.c_fc.weight", "h.3.mlp.router.weight"}


# --- seeds --------------------------------------------------------------------------------------------------


def test_seed_determines_router_and_expert_noise():
    model, inputs = dense("gpt-gelu")

    def build(seed: int) -> dict[str, torch.Tensor]:
        moe = MoEConfig(num_experts=4, top_k=2, expert_noise=0.1, seed=seed)
        return tedfx.to_moe(model, inputs, moe=moe).state_dict()

    a, b, c = build(3), build(3), build(4)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("h.0.mlp.router.weight", "h.0.mlp.experts.w1", "h.1.mlp.experts.w2"):
        assert not torch.equal(a[key], c[key]), key
    assert torch.equal(a["h.0.mlp.experts.b1"], c["h.0.mlp.experts.b1"])  # biases are copied exactly
    # Each FFN draws its own numbers, and the noise breaks the symmetry between experts.
    assert not torch.equal(a["h.0.mlp.router.weight"], a["h.1.mlp.router.weight"])
    w1 = a["h.0.mlp.experts.w1"]
    assert not torch.equal(w1[0], w1[1])
    dense_w1 = model.h[0].mlp.c_fc.weight.detach().t()
    relative = ((w1 - dense_w1).std() / dense_w1.std()).item()
    assert relative == pytest.approx(0.1, rel=0.1)  # noise = expert_noise * std(weight) * N(0, 1)


# --- training -----------------------------------------------------------------------------------------------


def test_moe_model_trains_and_reports_losses():
    model, inputs = dense("gpt-gelu")
    moe_model = tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=4, top_k=2, z_loss_coef=1e-3)).train()
    routers = {name: m for name, m in moe_model.named_modules() if isinstance(m, Router)}
    assert sorted(routers) == [f"h.{i}.mlp.router" for i in range(4)]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, 16), generator=g)
    targets = torch.randint(0, VOCAB, (4, 16), generator=g)
    opt = torch.optim.AdamW(moe_model.parameters(), lr=1e-2)
    losses = []
    for step in range(6):
        loss = F.cross_entropy(moe_model(tokens).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, router in routers.items():
                assert router.weight.grad is not None and router.weight.grad.abs().max() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    reported = tedfx.moe_losses(moe_model)
    assert reported["blocks"] == 4
    assert math.isfinite(reported["aux_loss"]) and math.isfinite(reported["z_loss"])
    # Summed over 4 blocks: aux near 1 per block (near-uniform router), z > 0.
    assert 2.0 < reported["aux_loss"] < 8.0
    assert reported["z_loss"] > 0


# --- errors -------------------------------------------------------------------------------------------------


def test_layer_index_out_of_range_is_a_value_error():
    model, inputs = dense("gpt-gelu")
    with pytest.raises(ValueError) as info:
        tedfx.to_moe(model, inputs, moe=MoEConfig(num_experts=2, top_k=1, layers=[99]))
    message = str(info.value)
    assert "MoEConfig.layers" in message and "99" in message and "4 FFNs" in message


class _BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc2(F.gelu(self.fc1(x)))
        return x


def test_untraceable_model_raises_capture_error_with_reason_and_hint():
    with pytest.raises(tedfx.CaptureError) as info:
        tedfx.to_moe(_BranchesOnValues(), (torch.randn(2, 4, 8),), moe=MoEConfig(num_experts=2, top_k=1))
    message = str(info.value)
    assert "_BranchesOnValues" in message
    assert "data-dependent" in message or "DataDependent" in message  # export's reason
    assert "Hint:" in message and "torch.cond" in message
    assert info.value.__cause__ is not None


# --- explain ------------------------------------------------------------------------------------------------


def test_explain_reports_paths_and_parameter_counts():
    model, inputs = dense("gpt-gelu")
    report = tedfx.explain(model, inputs, moe=MoEConfig(num_experts=4, top_k=2))
    paths = [b.path for b in report.blocks]
    assert paths == [f"h.{i}.mlp" for i in range(4)]
    assert report.params_dense == sum(p.numel() for p in model.parameters())
    # Per block: the router (E * H) and E - 1 more copies of the FFN (H*F + F + F*H + H = 8352).
    ffn, router = 2 * HIDDEN * 128 + 128 + HIDDEN, 4 * HIDDEN
    assert report.params_moe == report.params_dense + 4 * (router + 3 * ffn)
    # Active per token: the router and k = 2 of the 4 experts.
    assert report.params_active == report.params_dense + 4 * (router + ffn)
    assert report.params_dense < report.params_active < report.params_moe
    text = str(report)
    assert all(p in text for p in paths)
    data = json.loads(report.to_json())
    assert [b["path"] for b in data["blocks"]] == paths
    assert data["params_moe"] == report.params_moe


def test_explain_all_experts_active_when_k_equals_e():
    model, inputs = dense("gpt-gelu")
    report = tedfx.explain(model, inputs, moe=MoEConfig(num_experts=2, top_k=2))
    assert report.params_active == report.params_moe


def test_the_dense_model_is_left_untouched(monkeypatch):
    """to_moe captures the model itself but copies what it keeps: training the MoE model changes nothing
    of the dense one, whose settings (train/eval, HF use_cache) come back as they were."""
    from tedfx.pipeline import build_moe_graph

    monkeypatch.undo()  # the real capture, not the test cache's copies

    model, inputs = tiny_gpt2()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe_gm, _ = build_moe_graph(model, inputs, moe=tedfx.MoEConfig(num_experts=2, top_k=1))
    assert model.config.use_cache is True and not model.training
    dense_ids = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not dense_ids & {id(t) for t in [*moe_gm.parameters(), *moe_gm.buffers()]}
    moe_gm.train()
    logits(moe_gm(*inputs)).sum().backward()
    torch.optim.SGD(moe_gm.parameters(), lr=1.0).step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_use_cache_notice_is_printed_once_per_run(caplog, monkeypatch):
    """Every capture of an HF model turns its KV cache off; the notice says so once, not once per capture."""
    import sys

    monkeypatch.undo()  # the real capture, not the test cache's copies
    capture_module = sys.modules["tedfx.capture"]
    monkeypatch.setattr(capture_module, "_noticed", set())
    model, inputs = tiny_gpt2()
    with caplog.at_level("WARNING", logger="tedfx.capture"):
        for _ in range(3):
            capture_module.capture(model, inputs)
    notices = [r for r in caplog.records if "use_cache=False" in r.getMessage()]
    assert len(notices) == 1 and model.config.use_cache is True


def test_a_model_in_eval_mode_converts_to_an_eval_mode_moe_model_in_every_door():
    """HF's from_pretrained returns a model in eval mode: its routers must route as in eval (the eval
    capacity factor, here 2.0 against 1.0 in training, so the two modes give different logits)."""
    import torch.distributed as dist

    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
    model, (x,) = tiny_gpt()
    expected = tedfx.to_moe(model, (x,), moe=moe).eval()(x)
    assert not torch.allclose(expected, tedfx.to_moe(model, (x,), moe=moe)(x)), "the modes must differ here"
    model.eval()
    converted = tedfx.to_moe(model, (x,), moe=moe)
    assert not converted.training and not any(m.training for m in converted.modules())
    torch.testing.assert_close(converted(x), expected)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pm = tedfx.parallelize(model, (x,), moe=moe, parallel=tedfx.ParallelConfig())
        assert not pm.training and not any(m.training for m in pm.modules())
        torch.testing.assert_close(pm(x), expected)
    finally:
        dist.destroy_process_group()


def test_a_parallel_module_cast_after_parallelize_evaluates_but_refuses_to_train_naming_precision():
    import torch.distributed as dist

    model, (x,) = tiny_gpt()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pm = tedfx.parallelize(model, (x,), moe=MoEConfig(num_experts=4, top_k=2), parallel=tedfx.ParallelConfig())
        expected = pm(x).detach()
        pm.to(torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(pm(x).float(), expected, atol=0.05, rtol=0.05)
        with pytest.raises(RuntimeError, match=r'cast after tedfx.parallelize .*float32 on cpu -> torch.bfloat16.*'
                                               r'precision="bf16"'):
            pm(x)
    finally:
        dist.destroy_process_group()
