"""ffn_to_moe alone, on a captured graph after find_ffns (docs/moe.md, "The MoE block").

The block's nodes by role, the state dict (dense FFN keys out, MoE keys in with
the documented shapes and upcycled values), the records it leaves, and the
numerics: with an exact config (normalised gates, dropless, no noise) the MoE
graph equals the dense graph at step 0, forward and gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx

import tedfx
from tedfx.moe import ops
from tedfx.moe.routing import Router
from tedfx.passes.context import MoEBlockRecord
from tedfx.passes.ffn_to_moe import ffn_to_moe_pass
from tedfx.passes.find_ffns import FFNMatch, find_ffns_pass
from tedfx.passes.graph import MOE_META, MoETag, Role, moe_blocks
from tedfx.passes.runner import PassContext, PassError, run_passes

E, K = 4, 2
EXACT = tedfx.MoEConfig(num_experts=E, top_k=K, normalize_gates=True, drop_tokens=False, noisy_gate=None,
                        expert_noise=0.0, aux_loss_coef=0.0)
"""The MoE equals the dense model at step 0 under this config (no aux loss: gradients compare too)."""

# Per model: the FFN paths, the dense parameters of each FFN -> the expert tensor it becomes, F.
GPT_FFN = {"c_fc.weight": "w1", "c_fc.bias": "b1", "c_proj.weight": "w2", "c_proj.bias": "b2"}
LLAMA_FFN = {"gate_proj.weight": "w1", "up_proj.weight": "w3", "down_proj.weight": "w2"}
LAYOUT = {
    "gpt": (["h.0.mlp", "h.1.mlp"], GPT_FFN, 128),
    "llama": (["model.layers.0.mlp", "model.layers.1.mlp"], LLAMA_FFN, 64),
}
H = 32
MOE_ROLES = [Role.FLATTEN_TOKENS, Role.ROUTER, Role.EXPERT, Role.SLOT, Role.GATE, Role.CAPACITY, Role.LOSS,
             Role.DISPATCH, Role.EXPERT_FC1, Role.EXPERT_FC2, Role.COMBINE, Role.ATTACH_AUX_LOSS,
             Role.UNFLATTEN_TOKENS]


def convert(dense_graph, name: str, moe: tedfx.MoEConfig = EXACT):
    """(MoE graph, its context, the dense graph it came from, inputs)."""
    gm, inputs = dense_graph(name)
    dense, _ = dense_graph(name)
    ctx = PassContext(moe=moe)
    run_passes(gm, [find_ffns_pass], ctx=ctx)
    assert ctx.records.ffn_matches and all(isinstance(m, FFNMatch) for m in ctx.records.ffn_matches)
    run_passes(gm, [ffn_to_moe_pass], ctx=ctx)
    return gm, ctx, dense, inputs


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


# --- the graph ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_every_block_has_its_roles_in_order(dense_graph, name) -> None:
    gm, ctx, _, _ = convert(dense_graph, name)
    paths, params, _ = LAYOUT[name]
    blocks = moe_blocks(gm.graph)
    assert list(blocks) == paths
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    weights = [w for w in ("w1", "b1", "w3", "b3", "w2", "b2") if w in params.values()]
    bias = [Role.EXPERT_BIAS] if "b2" in weights else []
    for index, (path, roles) in enumerate(blocks.items()):
        # EXACT is dropless: the packed layout adds the loads node before the dispatch.
        expected = MOE_ROLES[:7] + [Role.LOADS] + MOE_ROLES[7:8] + weights + MOE_ROLES[8:10] + bias + MOE_ROLES[10:]
        assert sorted(roles, key=lambda r: order[roles[r]]) == expected
        for role, node in roles.items():
            assert node.meta[MOE_META] == MoETag(path, Role.WEIGHT if role in weights else role, index)
        assert roles[Role.ROUTER].op == "call_module" and roles[Role.ROUTER].target == f"{path}.router"
        assert {w: roles[w].target for w in weights} == {w: f"{path}.experts.{w}" for w in weights}
        # The data path: dispatch -> fc1 -> fc2 [-> bias] -> combine, on the router's plan.
        fc1, fc2, combine = roles[Role.EXPERT_FC1], roles[Role.EXPERT_FC2], roles[Role.COMBINE]
        assert (fc1.target, fc2.target, combine.target) == (ops.expert_fc1, ops.expert_fc2, ops.combine)
        assert fc1.args[0] is roles[Role.DISPATCH] and fc2.args[0] is fc1
        assert combine.args[0] is (roles[Role.EXPERT_BIAS] if bias else fc2)
        assert combine.args[1:] == (roles[Role.EXPERT], roles[Role.SLOT], roles[Role.GATE])
        assert roles[Role.DISPATCH].args[3] is roles[Role.CAPACITY]
        loads = roles[Role.LOADS]
        assert loads.target is ops.expert_loads and loads.args == (roles[Role.EXPERT],)
        assert roles[Role.DISPATCH].kwargs == {"num_experts": E, "loads": loads}
        assert all(roles[r].kwargs["loads"] is loads for r in (Role.EXPERT_FC1, Role.EXPERT_FC2, Role.COMBINE))
        # What consumed the dense FFN's exit now reads the block's output.
        assert roles[Role.UNFLATTEN_TOKENS].users
        assert all(MOE_META not in u.meta for u in roles[Role.UNFLATTEN_TOKENS].users)
    # No node of the dense FFNs is left.
    dense_targets = {f"{p}.{k}" for p in paths for k in params}
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in dense_targets]


def test_dropout_between_activation_and_fc2_becomes_expert_dropout(dense_graph) -> None:
    gm, ctx, _, _ = convert(dense_graph, "mlp-dropout")
    (roles,) = moe_blocks(gm.graph).values()
    drop = roles[Role.EXPERT_DROPOUT]
    assert drop.target is torch.ops.aten.dropout.default and drop.args[:2] == (roles[Role.EXPERT_FC1], 0.25)
    assert roles[Role.EXPERT_FC2].args[0] is drop
    assert ctx.records.moe_blocks[0].path == ""


# --- the state dict -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_dense_keys_deleted_and_moe_keys_added_with_documented_shapes(dense_graph, name) -> None:
    gm, _, dense, _ = convert(dense_graph, name)
    paths, params, F = LAYOUT[name]
    before, after = dense.state_dict(), gm.state_dict()
    removed = {f"{p}.{k}" for p in paths for k in params}
    shapes = {"w1": (E, H, F), "b1": (E, F), "w3": (E, H, F), "b3": (E, F), "w2": (E, F, H), "b2": (E, H)}
    added = {f"{p}.experts.{w}": shapes[w] for p in paths for w in params.values()}
    added |= {f"{p}.router.weight": (E, H) for p in paths}
    assert set(before) - set(after) == removed
    assert {k: tuple(after[k].shape) for k in set(after) - set(before)} == added
    for key in set(before) - removed:  # everything else untouched
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    # The dense modules are gone, the MoE modules sit at the FFN's path.
    modules = dict(gm.named_modules())
    assert not [m for m in modules for p in paths for k in params if m == f"{p}.{k.rsplit('.', 1)[0]}"]
    assert all(isinstance(modules[f"{p}.router"], Router) for p in paths)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_experts_are_upcycled_copies_laid_out_in_out(dense_graph, name) -> None:
    gm, _, dense, _ = convert(dense_graph, name)
    paths, params, _ = LAYOUT[name]
    full, moe = dense.state_dict(), gm.state_dict()
    for p in paths:
        for key, w in params.items():
            expected = full[f"{p}.{key}"]
            expected = expected.t() if key.endswith("weight") else expected  # nn.Linear's [out, in] -> [in, out]
            for e in range(E):
                torch.testing.assert_close(moe[f"{p}.experts.{w}"][e], expected, rtol=0, atol=0)


def test_tied_embedding_and_lm_head_stay_one_parameter(dense_graph) -> None:
    gm, _, _, _ = convert(dense_graph, "gpt")
    assert gm.wte.weight is gm.lm_head.weight and "wte.weight" in gm.state_dict()


def test_router_is_seeded_by_the_ffn_index_not_by_the_selection(dense_graph) -> None:
    every, _, _, _ = convert(dense_graph, "gpt")
    second, ctx, _, _ = convert(dense_graph, "gpt", tedfx.MoEConfig(num_experts=E, top_k=K, layers=[1]))

    def router(gm: fx.GraphModule, i: int) -> torch.Tensor:
        return gm.get_submodule(f"h.{i}.mlp.router").weight

    torch.testing.assert_close(router(second, 1), router(every, 1), rtol=0, atol=0)
    assert not torch.equal(router(every, 0), router(every, 1))
    # Only FFN 1 converted: FFN 0 keeps its dense weights, and the records say so.
    assert list(moe_blocks(second.graph)) == ["h.1.mlp"]
    assert "h.0.mlp.c_fc.weight" in second.state_dict() and "h.0.mlp.experts.w1" not in second.state_dict()
    assert [(r.index, r.path) for r in ctx.records.moe_blocks] == [(1, "h.1.mlp")]
    assert [f.path for f in ctx.records.ffns] == ["h.0.mlp", "h.1.mlp"]


# --- records ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kind,activation", [("gpt", "mlp", "gelu"), ("llama", "glu", "silu")])
def test_records_moe_blocks_and_clears_the_matches(dense_graph, name, kind, activation) -> None:
    gm, ctx, _, _ = convert(dense_graph, name)
    paths, params, F = LAYOUT[name]
    assert ctx.records.ffn_matches is None
    assert ctx.done == ["find_ffns", "ffn_to_moe"]
    dense = sum(gm.state_dict()[f"{paths[0]}.experts.{w}"][0].numel() for w in params.values())
    router = E * H
    assert ctx.records.moe_blocks == [
        MoEBlockRecord(index=i, path=p, kind=kind, activation=activation, hidden_dim=H, ffn_dim=F, num_experts=E,
                       top_k=K, dense_params=dense, moe_params=router + E * dense,
                       active_params=router + K * dense)
        for i, p in enumerate(paths)]


def test_selecting_no_ffn_is_a_value_error(dense_graph) -> None:
    gm, _ = dense_graph("gpt")
    ctx = PassContext(moe=tedfx.MoEConfig(num_experts=E, layers=lambda path: False))
    with pytest.raises(ValueError, match=r"selects none of the model's 2 FFNs \(h.0.mlp, h.1.mlp\)") as info:
        run_passes(gm, [find_ffns_pass, ffn_to_moe_pass], ctx=ctx)
    assert info.value.__notes__ == ["(found by the tedfx pass ffn_to_moe)"]


class _SharedFFNLayers(torch.nn.Module):
    """ALBERT-style: every layer calls the same FFN module (one set of weights, run twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, H)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(H) for _ in range(2))
        self.shared = torch.nn.Sequential(torch.nn.Linear(H, 64), torch.nn.GELU(), torch.nn.Linear(64, H))
        self.head = torch.nn.Linear(H, 100)

    def forward(self, idx):
        x = self.embed(idx)
        for norm in self.norms:
            x = x + self.shared(norm(x))
        return self.head(x)


def test_an_ffn_module_run_by_two_layers_is_refused_naming_its_runs_and_one_run_converts() -> None:
    torch.manual_seed(0)
    model = _SharedFFNLayers()
    tokens = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"the FFN 'shared' runs 2 times in one forward \(FFN indices \[0, 1\]\).*"
                                         r"shares its weights.*layers=\[0\]"):
        tedfx.to_moe(model, (tokens,), moe=EXACT)
    moe = tedfx.to_moe(model, (tokens,), moe=dataclasses.replace(EXACT, layers=[1]))
    torch.testing.assert_close(logits(moe(tokens)), model(tokens))
    assert list(moe_blocks(moe.graph)) == ["shared"]
    assert "shared.0.weight" in dict(moe.named_parameters())  # the dense FFN the other run keeps


# --- numerics -----------------------------------------------------------------------------------------


def _grads(gm: fx.GraphModule, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gm.zero_grad(set_to_none=True)
    out = logits(gm(*inputs))
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in gm.named_parameters()}


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_moe_equals_dense_at_step_0(dense_graph, name, mode) -> None:
    gm, _, dense, inputs = convert(dense_graph, name)
    gm.train(mode == "train")
    dense.train(mode == "train")
    out, grads = _grads(gm, inputs)
    dense_out, dense_grads = _grads(dense, inputs)
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-6)
    paths, params, _ = LAYOUT[name]
    shared = set(grads) & set(dense_grads)
    assert len(shared) > 2 * len(paths)  # attention, norms, embeddings
    for n in shared:
        torch.testing.assert_close(grads[n], dense_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # Identical experts under gates that sum to 1: the experts' gradients sum to the dense FFN's.
    for p in paths:
        for key, w in params.items():
            expected = dense_grads[f"{p}.{key}"]
            expected = expected.t() if key.endswith("weight") else expected
            torch.testing.assert_close(grads[f"{p}.experts.{w}"].sum(0), expected, rtol=1e-4, atol=1e-6)


def test_without_find_ffns_matches_on_this_graph_it_is_a_pass_error(moe_graph, dense_graph) -> None:
    """A rank context carries "find_ffns" in `done` but never the matches (they hold another graph's nodes)."""
    _, moe_ctx, _ = moe_graph("gpt")
    ctx = moe_ctx.for_rank(tedfx.ParallelConfig(), {"edp": 0, "ep": 0, "tp": 0})
    assert "find_ffns" in ctx.done and ctx.records.ffn_matches is None
    gm, _ = dense_graph("gpt")
    with pytest.raises(PassError, match=r"pass ffn_to_moe failed after .*RuntimeError: ffn_to_moe needs find_ffns's "
                                        r"matches on this graph") as info:
        run_passes(gm, [ffn_to_moe_pass], ctx=ctx)
    assert type(info.value.__cause__) is RuntimeError


def test_expert_noise_is_seeded_per_expert_and_leaves_biases_exact(dense_graph) -> None:
    noisy = tedfx.MoEConfig(num_experts=E, top_k=K, expert_noise=0.1, seed=3)
    first, _, dense, _ = convert(dense_graph, "gpt", noisy)
    again, _, _, _ = convert(dense_graph, "gpt", noisy)
    other, _, _, _ = convert(dense_graph, "gpt", tedfx.MoEConfig(num_experts=E, top_k=K, expert_noise=0.1, seed=4))
    w1, c_fc = first.state_dict()["h.0.mlp.experts.w1"], dense.state_dict()["h.0.mlp.c_fc.weight"].t()
    assert all(not torch.allclose(w1[e], c_fc, atol=1e-4) for e in range(E))
    assert all(not torch.allclose(w1[0], w1[e], atol=1e-4) for e in range(1, E))
    torch.testing.assert_close((w1 - c_fc).std(), 0.1 * c_fc.std(), rtol=0.1, atol=0)
    torch.testing.assert_close(again.state_dict(), first.state_dict(), rtol=0, atol=0)
    assert not torch.equal(other.state_dict()["h.0.mlp.experts.w1"], w1)
    for b, key in (("b1", "c_fc.bias"), ("b2", "c_proj.bias")):
        bias = first.state_dict()[f"h.0.mlp.experts.{b}"]
        assert all(torch.equal(bias[e], dense.state_dict()[f"h.0.mlp.{key}"]) for e in range(E))


class _WritesItsFFNOutput(torch.nn.Module):
    """A model that writes its FFN's output in place: `y += x` (Falcon's `mlp_output += attention_output`), or
    through a view (`y[..., 0] += 1`); "none" adds out of place."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, H)
        self.fc1, self.fc2 = torch.nn.Linear(H, 4 * H), torch.nn.Linear(4 * H, H)
        self.head = torch.nn.Linear(H, 32)
        self.write = write

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        y = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        if self.write == "in_place":
            y += x
        elif self.write == "through_a_view":
            y[..., 0] += 1.0
            y = y + x
        else:
            y = y + x
        return self.head(y)


@pytest.mark.parametrize("write", ["in_place", "through_a_view", "none"])
def test_a_model_that_writes_the_moe_output_in_place_trains_on_a_copy(write) -> None:
    """The block's output leaves a custom autograd Function as a view, which autograd forbids writing in place
    ("created inside a custom Function"): a model that writes it gets a copy, one that does not gets none; the
    MoE still equals the dense model, and a backward with the aux loss runs."""
    torch.manual_seed(0)
    model, tokens = _WritesItsFFNOutput(write), torch.randint(0, 32, (2, 8))
    expected = model(tokens)
    gm, _ = tedfx.pipeline.build_moe_graph(model, (tokens,), moe=dataclasses.replace(EXACT, aux_loss_coef=0.01))
    (exit_,) = [n for n in gm.graph.nodes if n.meta.get(MOE_META) and n.meta[MOE_META].role is Role.UNFLATTEN_TOKENS]
    copies = [n for n in exit_.users if n.target is torch.ops.aten.clone.default]
    assert len(copies) == (write != "none") and len(exit_.users) == 1
    out = gm.train()(tokens)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert gm.get_parameter("router.weight").grad is not None
