"""Export an upcycled model for other tools: a Hugging Face MoE checkpoint, or a plain state dict.

`export_hf` writes what `transformers` loads with `from_pretrained`: an MoE
model converted from a Llama- or Mistral-family model (SwiGLU FFNs, an MoE
block in every layer) becomes a `MixtralForCausalLM` checkpoint, one converted
from a Qwen2 model (any layers) a `Qwen2MoeForCausalLM` checkpoint, whose
logits equal tedfx's under dropless routing. Any other model is written as
its unsharded state dict (safetensors) plus `tedfx_moe.json`, a note of where
the MoE blocks are and how they route (docs/moe.md, "Export").

The weights are renamed, never recomputed: the router weight is the block's
`gate.weight`, and each expert's (w1, w3, w2) of `act(x @ w1) * (x @ w3) @ w2`
are its gate, up and down projections, laid out as the installed
`transformers` lays out the target's experts (fused `gate_up_proj` and
`down_proj`, or one module per expert in older releases).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from .capture import DENSE_CONFIG_META
from .moe.routing import Router
from .passes.graph import Role, moe_blocks
from .runtime.executor import ParallelModule

__all__ = ["ExportError", "MOE_NOTE", "dense_config_of", "export_hf", "moe_layout", "write_export"]

MOE_NOTE = "tedfx_moe.json"
"""The file that describes the MoE blocks of an exported state dict."""

_HF_MOE_SOURCES = ("llama", "mistral", "qwen2")
"""Dense architectures with an MoE form in transformers that computes exactly what tedfx does: Llama and
Mistral as Mixtral, Qwen2 as Qwen2-MoE (same attention, norms and rotary embeddings)."""

_DENSE_ONLY_CONFIG = ("mlp_bias", "attention_bias", "pretraining_tp", "intermediate_size", "architectures",
                      "model_type", "transformers_version", "num_local_experts", "num_experts_per_tok",
                      "router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "head_dim",
                      "layer_types")


class ExportError(ValueError):
    """The model cannot be written in the format asked for (the message says why and what to do)."""


def moe_layout(module: nn.Module) -> dict[str, Any]:
    """Where the MoE blocks of a converted model are and how they route: {"blocks": {path: {...}}, "moe": {...}}."""
    graph_module = module.graph if isinstance(module, ParallelModule) else module
    blocks = moe_blocks(graph_module.graph) if isinstance(graph_module, fx.GraphModule) else {}
    routers = [m for m in graph_module.modules() if isinstance(m, Router)]
    if not blocks or not routers:
        raise ExportError(f"{type(module).__name__} holds no MoE block: export takes what tedfx.to_moe or "
                          f"tedfx.parallelize returned.")
    out = {}
    for path, roles in blocks.items():
        fc1 = roles[Role.EXPERT_FC1]
        out[path] = {"activation": fc1.kwargs.get("activation"), "glu": "w3" in roles,
                     "bias": any(b in roles for b in ("b1", "b2", "b3"))}
    moe = routers[0].moe
    config = {f: getattr(moe, f) for f in moe.__dataclass_fields__ if not callable(getattr(moe, f))}
    return {"blocks": out, "moe": config}


def dense_config_of(module: nn.Module) -> dict[str, Any] | None:
    """The dense model's Hugging Face config (as a dict) that tedfx kept when it converted `module`, if any."""
    graph_module = module.graph if isinstance(module, ParallelModule) else module
    return getattr(graph_module, "meta", {}).get(DENSE_CONFIG_META)


def export_hf(module: nn.Module, out_dir: str | Path, *, dense_config: Any = None) -> Path | None:
    """Write an upcycled model where other tools read it.

    Args:
        module: what `tedfx.to_moe` returned, or a ParallelModule (then call this on every rank:
            the unsharded weights are gathered, rank 0 writes).
        out_dir: the folder to write (created).
        dense_config: the `transformers` config of the dense model (or its dict); None: the one tedfx
            kept when it converted a Hugging Face model. A Llama- or Mistral-family config gives a
            MixtralForCausalLM checkpoint, a Qwen2 config a Qwen2MoeForCausalLM one; no config or
            another family, the state dict as `model.safetensors` and `tedfx_moe.json`.

    Returns:
        out_dir on the rank that wrote it, None on the others.

    Raises:
        ExportError: a model the target cannot express (experts that are not SwiGLU without biases;
            for Mixtral also a dense FFN left between MoE blocks, gates that are not renormalised),
            naming it.
        CollectiveCallError: a ParallelModule exported on some ranks only (e.g. rank 0 alone), after
            ParallelConfig.timeout.

    Example:
        >>> moe_model = tedfx.to_moe(llama, (tokens,), moe=tedfx.MoEConfig(num_experts=8, top_k=2))
        >>> tedfx.export_hf(moe_model, "mixtral-8x")
        >>> transformers.MixtralForCausalLM.from_pretrained("mixtral-8x")
    """
    layout = moe_layout(module)
    parallel = isinstance(module, ParallelModule)
    if parallel:
        module.enter_collective("tedfx.export_hf")  # every rank, not rank 0 alone (docs/checkpoints.md)
    state = module._gather_full_state() if parallel else {k: v.detach() for k, v in module.state_dict().items()}
    if parallel and dist.get_rank() != 0:
        return None
    return write_export(state, layout, dense_config if dense_config is not None else dense_config_of(module),
                        Path(out_dir))


def write_export(state: dict[str, torch.Tensor], layout: dict[str, Any], dense_config: Any, out: Path) -> Path:
    """`export_hf`'s writing step, from an unsharded state dict and the `moe_layout` (e.g. read from a checkpoint)."""
    config = dense_config.to_dict() if callable(getattr(dense_config, "to_dict", None)) else dense_config
    out.mkdir(parents=True, exist_ok=True)
    if config is not None and config.get("model_type") in _HF_MOE_SOURCES:
        _write_hf_moe(state, layout, config, out)
    else:
        _write_state_dict(state, layout, config, out)
    return out


def _write_state_dict(state: dict[str, torch.Tensor], layout: dict[str, Any], config: dict | None,
                      out: Path) -> None:
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
            "dense_config": config}
    (out / MOE_NOTE).write_text(json.dumps(note, indent=2, default=str))


def _write_hf_moe(state: dict[str, torch.Tensor], layout: dict[str, Any], dense: dict[str, Any], out: Path) -> None:
    """Mixtral for a Llama/Mistral model, Qwen2-MoE for a Qwen2 model: the same attention, norms and embeddings."""
    import transformers

    qwen = dense["model_type"] == "qwen2"
    name = "Qwen2MoeForCausalLM" if qwen else "MixtralForCausalLM"
    moe, blocks = layout["moe"], layout["blocks"]
    paths = [f"model.layers.{i}.mlp" for i in range(dense["num_hidden_layers"])]
    problems = []
    kept = [p for p in paths if p not in blocks]
    if kept and not qwen:
        problems.append(f"the FFNs {kept[:4]}{' ...' if len(kept) > 4 else ''} stayed dense, and Mixtral has an "
                        f"MoE block in every layer: convert with MoEConfig(layers='all')")
    for path, block in sorted(blocks.items()):
        if block["activation"] != "silu" or not block["glu"] or block["bias"]:
            problems.append(f"{path} computes act={block['activation']}, glu={block['glu']}, bias={block['bias']}; "
                            f"{name}'s experts are SwiGLU without biases")
    normalize = moe["normalize_gates"] if moe["normalize_gates"] is not None else moe["top_k"] >= 2
    if not normalize and not qwen:
        problems.append("the gates are not renormalised over the top-k, and Mixtral always renormalises them: "
                        "convert with MoEConfig(normalize_gates=True)")
    if problems:
        raise ExportError(f"this model cannot be written as {name}: " + "; ".join(problems) +
                          ". Or export it as a state dict: tedfx.export_hf(module, out, dense_config={}).")
    if moe["drop_tokens"]:
        warnings.warn(f"tedfx: the model routes with a capacity (MoEConfig.drop_tokens=True) and {name} routes "
                      "every token (dropless): the exported model's outputs equal tedfx's with drop_tokens=False, "
                      "not with the capacity it trained with.", stacklevel=4)
    config = {k: v for k, v in dense.items() if k not in _DENSE_ONLY_CONFIG}
    width = state[f"{min(blocks)}.experts.w1"].shape[-1]
    config.update(num_experts_per_tok=moe["top_k"], router_aux_loss_coef=moe["aux_loss_coef"],
                  architectures=[name], **({"head_dim": dense["head_dim"]} if dense.get("head_dim") else {}))
    if qwen:
        # Qwen2-MoE always adds a gated shared expert: one of width 1 with zero weights adds exactly 0.
        config.update(num_experts=moe["num_experts"], moe_intermediate_size=width,
                      intermediate_size=dense["intermediate_size"], shared_expert_intermediate_size=1,
                      decoder_sparse_step=1, mlp_only_layers=[i for i, p in enumerate(paths) if p in kept],
                      norm_topk_prob=bool(normalize))
        config_cls, model_cls = transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM
    else:
        config.update(num_local_experts=moe["num_experts"], intermediate_size=width, router_jitter_noise=0.0)
        config_cls, model_cls = transformers.MixtralConfig, transformers.MixtralForCausalLM
    with torch.device("meta"):
        target = model_cls(config_cls(**config))
    wanted = target.state_dict()
    mapped = {}
    for key, t in state.items():
        path, _, leaf = key.rpartition(".")
        block = path.removesuffix(".router").removesuffix(".experts")
        if block not in blocks:
            mapped[key] = t
        elif path.endswith(".router"):
            mapped[f"{block}.gate.weight"] = t
        elif leaf == "w1":
            mapped.update(_experts(wanted, block, state))
            if qwen:
                mapped.update({k: torch.zeros(v.shape, dtype=t.dtype) for k, v in wanted.items()
                               if k.startswith((f"{block}.shared_expert.", f"{block}.shared_expert_gate."))})
    missing, extra = sorted(set(wanted) - set(mapped)), sorted(set(mapped) - set(wanted))
    if missing or extra:
        raise ExportError(f"the installed transformers {transformers.__version__} lays out {name} "
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
