"""Export an upcycled model for other tools: a Hugging Face Mixtral checkpoint, or a plain state dict.

`export_hf` writes what `transformers` loads with `from_pretrained`: an MoE
model converted from a Llama- or Mistral-family model (SwiGLU FFNs, an MoE
block in every layer) becomes a `MixtralForCausalLM` checkpoint whose logits
equal tedfx's under dropless routing. Any other model is written as its
unsharded state dict (safetensors) plus `tedfx_moe.json`, a note of where
the MoE blocks are and how they route (docs/moe.md, "Export").

The weights are renamed, never recomputed: the router weight is Mixtral's
`gate.weight`, and each expert's (w1, w3, w2) of `act(x @ w1) * (x @ w3) @ w2`
are its gate, up and down projections, laid out as the installed
`transformers` lays out `MixtralForCausalLM`'s experts (fused `gate_up_proj`
and `down_proj`, or one module per expert in older releases).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .moe.routing import Router
from .passes.graph import Role, moe_blocks
from .runtime.executor import ParallelModule

__all__ = ["ExportError", "MOE_NOTE", "export_hf", "moe_layout"]

MOE_NOTE = "tedfx_moe.json"
"""The file that describes the MoE blocks of an exported state dict."""

_MIXTRAL_SOURCES = ("llama", "mistral")
"""Dense architectures whose MoE form is exactly Mixtral's (same attention, norms and rotary embeddings)."""

_DENSE_ONLY_CONFIG = ("mlp_bias", "attention_bias", "pretraining_tp", "intermediate_size", "architectures",
                      "model_type", "transformers_version", "num_local_experts", "num_experts_per_tok",
                      "router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "head_dim")


class ExportError(ValueError):
    """The model cannot be written in the format asked for (the message says why and what to do)."""


def moe_layout(module: nn.Module) -> dict[str, Any]:
    """Where the MoE blocks of a converted model are and how they route: {path: {...}} plus the MoEConfig."""
    graph_module = module.graph if isinstance(module, ParallelModule) else module
    blocks = moe_blocks(graph_module.graph)
    routers = {name.removesuffix(".router"): m for name, m in graph_module.named_modules() if isinstance(m, Router)}
    if not blocks or not routers:
        raise ExportError(f"{type(module).__name__} holds no MoE block: export takes what tedfx.to_moe or "
                          f"tedfx.parallelize returned.")
    out = {}
    for path, roles in blocks.items():
        fc1 = roles[Role.EXPERT_FC1]
        out[path] = {"activation": fc1.kwargs.get("activation"), "glu": "w3" in roles,
                     "bias": any(b in roles for b in ("b1", "b2", "b3"))}
    moe = next(iter(routers.values())).moe
    config = {f: getattr(moe, f) for f in moe.__dataclass_fields__ if not callable(getattr(moe, f))}
    return {"blocks": out, "moe": config}


def export_hf(module: nn.Module, out_dir: str | Path, *, dense_config: Any = None) -> Path | None:
    """Write an upcycled model where other tools read it.

    Args:
        module: what `tedfx.to_moe` returned, or a ParallelModule (then call this on every rank:
            the unsharded weights are gathered, rank 0 writes).
        out_dir: the folder to write (created).
        dense_config: the `transformers` config of the dense model the MoE model was built from
            (`model.config`). With a Llama- or Mistral-family config: a MixtralForCausalLM checkpoint.
            None or another family: the state dict as `model.safetensors` and `tedfx_moe.json`.

    Returns:
        out_dir on the rank that wrote it, None on the others.

    Raises:
        ExportError: a Mixtral export of a model Mixtral cannot express (a dense FFN left between MoE
            blocks, an activation other than SiLU, biases, gates that are not renormalised), naming it.

    Example:
        >>> moe_model = tedfx.to_moe(llama, (tokens,), moe=tedfx.MoEConfig(num_experts=8, top_k=2))
        >>> tedfx.export_hf(moe_model, "mixtral-8x", dense_config=llama.config)
        >>> transformers.MixtralForCausalLM.from_pretrained("mixtral-8x")
    """
    layout = moe_layout(module)
    parallel = isinstance(module, ParallelModule)
    state = module.full_state_dict() if parallel else {k: v.detach() for k, v in module.state_dict().items()}
    if parallel and dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(dense_config, "model_type", None) in _MIXTRAL_SOURCES:
        _write_mixtral(state, layout, dense_config, out)
    else:
        _write_state_dict(state, layout, dense_config, out)
    return out


def _write_state_dict(state: dict[str, torch.Tensor], layout: dict[str, Any], dense_config: Any, out: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory (a tied embedding and head): write each once.
    seen: dict[tuple[int, int], str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = t.contiguous()
    save_file(unique, str(out / "model.safetensors"))
    note = {**layout, "aliases": aliases, "state_dict_keys": "those of tedfx.to_moe (docs/moe.md, 'State dict')",
            "dense_config": dense_config.to_dict() if hasattr(dense_config, "to_dict") else None}
    (out / MOE_NOTE).write_text(json.dumps(note, indent=2, default=str))


def _write_mixtral(state: dict[str, torch.Tensor], layout: dict[str, Any], dense_config: Any, out: Path) -> None:
    import transformers

    moe, blocks = layout["moe"], layout["blocks"]
    layers = dense_config.num_hidden_layers
    paths = {f"model.layers.{i}.mlp" for i in range(layers)}
    problems = []
    if set(blocks) != paths:
        dense = sorted(paths - set(blocks))
        problems.append(f"the FFNs {dense[:4]}{' ...' if len(dense) > 4 else ''} stayed dense, and Mixtral has an "
                        f"MoE block in every layer: convert with MoEConfig(layers='all')")
    for path, block in sorted(blocks.items()):
        if block["activation"] != "silu" or not block["glu"] or block["bias"]:
            problems.append(f"{path} computes act={block['activation']}, glu={block['glu']}, bias={block['bias']}; "
                            f"Mixtral's experts are SwiGLU without biases")
    normalize = moe["normalize_gates"] if moe["normalize_gates"] is not None else moe["top_k"] >= 2
    if not normalize:
        problems.append("the gates are not renormalised over the top-k, and Mixtral always renormalises them: "
                        "convert with MoEConfig(normalize_gates=True)")
    if problems:
        raise ExportError("this model cannot be written as MixtralForCausalLM: " + "; ".join(problems) +
                          ". Or export it as a state dict: tedfx.export_hf(module, out) without dense_config.")
    if moe["drop_tokens"]:
        warnings.warn("tedfx: the model routes with a capacity (MoEConfig.drop_tokens=True) and Mixtral routes "
                      "every token (dropless): the exported model's outputs equal tedfx's with drop_tokens=False, "
                      "not with the capacity it trained with.", stacklevel=3)
    config = {k: v for k, v in dense_config.to_dict().items() if k not in _DENSE_ONLY_CONFIG}
    head_dim = getattr(dense_config, "head_dim", None)
    first = next(iter(sorted(blocks)))
    config.update(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                  intermediate_size=state[f"{first}.experts.w1"].shape[-1], router_aux_loss_coef=moe["aux_loss_coef"],
                  router_jitter_noise=0.0, architectures=["MixtralForCausalLM"],
                  **({"head_dim": head_dim} if head_dim is not None else {}))
    mixtral_config = transformers.MixtralConfig(**config)
    with torch.device("meta"):
        target = transformers.MixtralForCausalLM(mixtral_config)
    wanted = target.state_dict()
    mapped = {}
    for name, t in state.items():
        path, _, leaf = name.rpartition(".")
        block = path.removesuffix(".router").removesuffix(".experts")
        if block not in blocks:
            mapped[name] = t
        elif path.endswith(".router"):
            mapped[f"{block}.gate.weight"] = t
        elif leaf == "w1":
            mapped.update(_experts(wanted, block, state))
    missing, extra = sorted(set(wanted) - set(mapped)), sorted(set(mapped) - set(wanted))
    if missing or extra:
        raise ExportError(f"the installed transformers {transformers.__version__} lays out MixtralForCausalLM "
                          f"differently: missing {missing[:4]}, unexpected {extra[:4]}.")
    target.load_state_dict({k: v.to(wanted[k].dtype) for k, v in mapped.items()}, assign=True, strict=True)
    target.save_pretrained(str(out))
    (out / MOE_NOTE).write_text(json.dumps(layout, indent=2, default=str))


def _experts(wanted: dict[str, torch.Tensor], block: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One block's experts under Mixtral's names: w1 [E, H, F] -> gate, w3 -> up, w2 [E, F, H] -> down."""
    w1, w3, w2 = (state[f"{block}.experts.{n}"] for n in ("w1", "w3", "w2"))
    if f"{block}.experts.gate_up_proj" in wanted:  # fused: gate_up [E, 2F, H], down [E, H, F]
        return {f"{block}.experts.gate_up_proj": torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous(),
                f"{block}.experts.down_proj": w2.transpose(1, 2).contiguous()}
    out = {}
    for e in range(w1.shape[0]):  # one module per expert: Linear weights [out, in]
        out[f"{block}.experts.{e}.w1.weight"] = w1[e].t().contiguous()
        out[f"{block}.experts.{e}.w3.weight"] = w3[e].t().contiguous()
        out[f"{block}.experts.{e}.w2.weight"] = w2[e].t().contiguous()
    return out
