"""Export to Hugging Face: an upcycled Llama reloads as Mixtral with tedfx's logits; what cannot be expressed fails."""

from __future__ import annotations

import json

import pytest
import torch

import tedfx
from tedfx import cli
from tedfx.export import MOE_NOTE, ExportError, export_hf

from models import tiny_gpt, tiny_llama, tiny_qwen2

DROPLESS = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False, expert_noise=0.05)


def _trained(module: torch.nn.Module) -> torch.nn.Module:
    """Experts and routers moved away from their upcycled start, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def test_an_upcycled_llama_reloads_as_mixtral_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense, (x,) = tiny_llama()
    moe_model = _trained(tedfx.to_moe(dense, (x,), moe=DROPLESS))
    expected = moe_model(x).logits.detach()
    # In Python: the dense config is the one to_moe kept.
    assert export_hf(moe_model, tmp_path / "py") == tmp_path / "py"
    # From a checkpoint, on the command line: `tedfx export DIR --to hf OUT`.
    tedfx.save(tmp_path / "ckpt", moe_model)
    assert cli.main(["export", str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "cli")]) == 0
    for out in ("py", "cli"):
        mixtral = transformers.MixtralForCausalLM.from_pretrained(tmp_path / out).eval()
        assert mixtral.config.num_local_experts == 4 and mixtral.config.num_experts_per_tok == 2
        with torch.no_grad():
            torch.testing.assert_close(mixtral(x).logits, expected, rtol=0, atol=1e-5)
        assert set(json.loads((tmp_path / out / MOE_NOTE).read_text())["blocks"]) == {"model.layers.0.mlp",
                                                                                     "model.layers.1.mlp"}


def test_an_upcycled_qwen2_with_dense_layers_reloads_as_qwen2_moe_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense, (x,) = tiny_qwen2()
    moe = tedfx.MoEConfig(num_experts=4, top_k=2, drop_tokens=False, expert_noise=0.05, layers="every_other",
                          normalize_gates=False)
    moe_model = _trained(tedfx.to_moe(dense, (x,), moe=moe))
    export_hf(moe_model, tmp_path)
    qwen = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path).eval()
    assert qwen.config.mlp_only_layers == [0] and not qwen.config.norm_topk_prob
    with torch.no_grad():
        torch.testing.assert_close(qwen(x).logits, moe_model(x).logits, rtol=0, atol=1e-5)


def test_what_mixtral_cannot_express_is_an_error_naming_it(tmp_path):
    dense, (x,) = tiny_llama()
    every_other = tedfx.to_moe(dense, (x,), moe=tedfx.MoEConfig(num_experts=4, top_k=2, layers="every_other"))
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp.*stayed dense.*layers='all'"):
        export_hf(every_other, tmp_path)
    switch = tedfx.to_moe(dense, (x,), moe=tedfx.MoEConfig(num_experts=4, top_k=1, drop_tokens=False))
    with pytest.raises(ExportError, match="normalize_gates=True"):
        export_hf(switch, tmp_path)
    capacity = tedfx.to_moe(dense, (x,), moe=tedfx.MoEConfig(num_experts=4, top_k=2))
    with pytest.warns(UserWarning, match="dropless"):
        export_hf(capacity, tmp_path)


def test_other_families_export_their_state_dict_and_a_note_of_the_moe_layout(tmp_path):
    from safetensors.torch import load_file

    dense, (x,) = tiny_gpt()
    moe_model = _trained(tedfx.to_moe(dense, (x,), moe=tedfx.MoEConfig(num_experts=4, top_k=2)))
    export_hf(moe_model, tmp_path)
    note = json.loads((tmp_path / MOE_NOTE).read_text())
    assert note["moe"]["num_experts"] == 4 and all(b["activation"] == "gelu" for b in note["blocks"].values())
    saved = load_file(str(tmp_path / "model.safetensors"))
    for alias, owner in note["aliases"].items():  # a tied weight is written once
        saved[alias] = saved[owner]
    fresh = tedfx.to_moe(dense, (x,), moe=tedfx.MoEConfig(num_experts=4, top_k=2)).eval()
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(x), moe_model(x), rtol=0, atol=0)


def test_a_module_without_moe_blocks_is_refused(tmp_path, capsys):
    dense, _ = tiny_gpt()
    with pytest.raises(ExportError, match="no MoE block"):
        export_hf(torch.fx.symbolic_trace(dense), tmp_path)
    assert cli.main(["export", str(tmp_path / "missing"), "--to", "hf", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("tedfx export: error: no checkpoint at")
