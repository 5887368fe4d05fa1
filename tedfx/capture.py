"""Capture: any model -> a GraphModule in the ATen training IR (docs/architecture.md, "One IR").

Every front end of tedfx ends here. The IR is what
`torch.export.export(..., strict=False)` produces: `aten.linear`/`aten.addmm`
nodes, parameters read through `get_attr`, `nn_module_stack` and `val` in
`node.meta`. Batch and sequence dims are captured dynamic when export allows
it; a dim that export had to fix is checked on every call, so a wrong shape is
an error, never a silently wrong result.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ._compat import export_dim_auto, is_symbolic, pytree
from .rng import ATTENTION_OPS, DROPOUT_OPS
from .signature import CALL_META, CallSignature, bind_call

__all__ = ["CaptureError", "DENSE_CONFIG_META", "DROPOUT_P_META", "TedGraphModule", "capture", "notice_once",
           "own_tensors", "record_dense_config"]

log = logging.getLogger(__name__)

DROPOUT_P_META = "tedfx_dropout_p"
"""node.meta key on attention nodes: the dropout probability captured in train mode (eval sets it to 0)."""

DENSE_CONFIG_META = "tedfx_dense_config"
"""GraphModule.meta key: the dense model's `config.to_dict()` (Hugging Face models), for export and checkpoints."""


def record_dense_config(gm: fx.GraphModule, model: nn.Module) -> None:
    """Keep the dense model's configuration, when it has a Hugging Face-style one, on its converted graph."""
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        gm.meta[DENSE_CONFIG_META] = config.to_dict()


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


class TedGraphModule(fx.GraphModule):
    """A captured (and possibly rewritten) model.

    Behaves like the model it came from: same outputs (including HF `ModelOutput`s),
    `train()`/`eval()` switch dropout, and the state dict keeps the model's keys (MoE
    blocks replace their FFN's keys). It takes the inputs of the call that captured it,
    by position or by name; a call with other keyword inputs is a TypeError that says
    how to capture them (tedfx.signature).
    """

    def train(self, mode: bool = True) -> "TedGraphModule":
        super().train(mode)
        if "_graph" in self.__dict__ and _set_dropout_mode(self.graph, mode):
            self.recompile()
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "TedGraphModule":
        copied = super().__deepcopy__(memo)
        # GraphModule keeps only its state-dict hooks; a copy must bind and check its inputs as well.
        for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_pre_hooks_always_called"):
            if attr in self.__dict__:
                setattr(copied, attr, copy.copy(self.__dict__[attr]))
        return copied


def capture(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
    copy_params: bool = True,
) -> TedGraphModule:
    """Capture `model` as a `TedGraphModule` in the ATen training IR.

    The model itself is not modified: tedfx captures a deep copy, on which it
    sets what export needs (HF models: `config.use_cache = False`).

    Args:
        model: any `nn.Module` that `torch.export(strict=False)` can trace.
        example_inputs: positional inputs of one call.
        example_kwargs: keyword inputs of one call.
        dynamic: capture dims 0 and 1 of every input tensor (batch, sequence) as
            dynamic where export allows; dims it fixes are checked at call time.
        copy_params: False captures the model itself (its settings are changed for the
            capture and restored) and the result shares the model's tensors: for a
            pipeline that replaces most of them and then calls `own_tensors`.

    Returns:
        A `TedGraphModule` that owns its own copy of the parameters (with copy_params).

    Example:
        >>> gm = capture(model, (tokens,))
        >>> torch.testing.assert_close(gm(tokens), model(tokens))
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_inputs, example_kwargs = _unalias((example_inputs, dict(example_kwargs or {})))
    released = [n for n, p in model.named_parameters() if p.numel() and p.untyped_storage().nbytes() == 0]
    if released:
        raise ValueError(
            f"the parameters of {type(model).__name__} ({released[0]}, ...) were released: "
            f'torch.compile(backend="tedfx") frees the dense model once it has built its MoE copy. Use '
            f"tedfx.compiled_module(model), or compile with options={{'release_dense': False}}.")
    was_training = model.training
    original = model
    if copy_params:
        model = copy.deepcopy(model)
    restore_cache = _prepare_hf_model(model)
    model.train()  # capture dropout as train=True; TedGraphModule.train/eval flips it
    try:
        gm = _export(model, example_inputs, example_kwargs, dynamic)
    finally:
        if not copy_params:
            restore_cache()
            original.train(was_training)
    gm.train(was_training)
    return gm


def _export(model: nn.Module, example_inputs: tuple, example_kwargs: dict, dynamic: bool) -> TedGraphModule:
    """torch.export (dynamic batch and sequence dims first, static on failure) -> TedGraphModule."""
    ep, dynamic_used = None, False
    if dynamic:
        try:
            shapes = _auto_dynamic_shapes(model, example_inputs, example_kwargs)
            ep = torch.export.export(model, example_inputs, example_kwargs, dynamic_shapes=shapes, strict=False)
            dynamic_used = True
        except Exception as e:  # noqa: BLE001 - retried statically below, with the reason logged
            log.info("dynamic capture of %s failed (%s); capturing with static shapes", type(model).__name__, e)
    if ep is None:
        try:
            ep = torch.export.export(model, example_inputs, example_kwargs, strict=False)
        except Exception as e:
            raise CaptureError(_explain_export_failure(model, e)) from e

    exported = ep.module()
    gm = TedGraphModule(exported, exported.graph, class_name=type(model).__name__)
    for name in ("_in_spec", "_out_spec"):
        if hasattr(exported, name):
            setattr(gm, name, getattr(exported, name))
    _restore_non_persistent_buffers(gm, model)
    gm.meta["tedfx_model"] = type(model).__name__  # for messages: a deep copy renames the class GraphModule
    gm.meta["tedfx_input_dims"] = _input_dims(gm.graph)
    gm.meta["tedfx_dynamic"] = dynamic_used
    gm.meta[CALL_META] = CallSignature.of(model, example_inputs, example_kwargs)
    gm.register_forward_pre_hook(_bind_call, with_kwargs=True)
    gm.register_forward_pre_hook(_check_input_shapes, with_kwargs=True)
    return gm


def _unalias(example: Any) -> Any:
    """`example` with every tensor that shares memory with an earlier one replaced by a copy.

    HF users pass `labels=input_ids` (one tensor object, two inputs). Export traces aliased inputs as
    one tensor, so the graph would read `labels` where the model reads `input_ids` and every later call
    with different labels would compute on them (docs/architecture.md, "One IR").
    """
    seen: set[tuple[str, int]] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            return t.clone()  # no memory to share; a clone costs nothing
        if is_fake(t):
            return t  # no data pointer to compare
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:
            return t.clone()
        seen.add(key)
        return t

    return pytree.tree_map_only(torch.Tensor, own, example)


def own_tensors(gm: nn.Module, model: nn.Module) -> None:
    """Give `gm` its own copy of every tensor it still shares with `model` (ties kept: one copy per tensor)."""
    shared = {id(t) for t in [*model.parameters(), *model.buffers()]}
    copies: dict[int, torch.Tensor] = {}
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None or id(t) not in shared:
                    continue
                if id(t) not in copies:
                    clone = t.detach().clone()
                    copies[id(t)] = nn.Parameter(clone, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else clone
                store[name] = copies[id(t)]


def _prepare_hf_model(model: nn.Module) -> Callable[[], None]:
    """Set what export needs from HF transformers models; returns what undoes it."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
        notice_once(f"tedfx: set config.use_cache=False for the capture of {type(model).__name__} (a KV cache "
                    f"cannot be exported); the model's setting is restored afterwards")
        return lambda: setattr(config, "use_cache", True)
    return lambda: None


_noticed: set[str] = set()


def notice_once(message: str) -> None:
    """Log `message` once per process, and only on rank 0 when torch.distributed runs: once per run."""
    if message in _noticed:
        return
    _noticed.add(message)
    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(message)


def _auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Dims 0 and 1 of every tensor input marked AUTO: batch and sequence."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return {d: export_dim_auto() for d in range(min(x.dim(), 2))}
        return None

    if not kwargs:
        return tuple(pytree.tree_map(spec, a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _explain_export_failure(model: nn.Module, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = str(error)
    if "data-dependent" in text or "GuardOnDataDependentSymNode" in text:
        hint = ("the model branches on tensor values; make control flow depend on shapes only, "
                "or use torch.cond")
    elif "Cache" in text and "in output, which is not a known type" in text:
        hint = ("the model returns its KV cache although config.use_cache is False (some HF models decide "
                "per call); capture with example_kwargs={'use_cache': False, ...} and pass use_cache=False in "
                "the calls too")
    elif "not supported" in text.lower() or "Unsupported" in text:
        hint = "rewrite the unsupported construct in plain torch ops"
    else:
        hint = ("check that the model runs on example_inputs, and that it avoids Python side effects "
                "that depend on tensor values")
    return (f"tedfx could not capture {type(model).__name__} with torch.export(strict=False): "
            f"{type(error).__name__}: {reason}\nHint: {hint}.")


def _set_dropout_mode(graph: fx.Graph, training: bool) -> bool:
    """Switch every dropout in `graph` on or off; True when anything changed.

    Capture runs in train mode, so dropout nodes carry train=True and attention
    carries its dropout_p; eval mode sets train=False and dropout_p=0 (the
    captured p is kept in node.meta to switch back).
    """
    changed = False
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in DROPOUT_OPS and len(node.args) >= 3 and node.args[2] != training:
            node.args = (*node.args[:2], training, *node.args[3:])
            changed = True
        elif node.target in ATTENTION_OPS:
            p = node.meta.setdefault(DROPOUT_P_META, _sdpa_dropout_p(node))
            want = p if training else 0.0
            if _sdpa_dropout_p(node) != want:
                if len(node.args) > 4:
                    node.args = (*node.args[:4], want, *node.args[5:])
                else:
                    node.kwargs = {**node.kwargs, "dropout_p": want}
                changed = True
    return changed


def _sdpa_dropout_p(node: fx.Node) -> float:
    return node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)


def _restore_non_persistent_buffers(gm: nn.Module, model: nn.Module) -> None:
    """GraphModule registers every copied buffer as persistent; keep the model's choice."""
    for mod_name, mod in model.named_modules():
        for buf_name in getattr(mod, "_non_persistent_buffers_set", ()):
            owner_path = mod_name
            try:
                owner = gm.get_submodule(owner_path) if owner_path else gm
            except AttributeError:
                continue
            if buf_name in owner._buffers:
                owner._non_persistent_buffers_set.add(buf_name)


def _input_dims(graph: fx.Graph) -> list[tuple[str, tuple[int | None, ...] | None]]:
    """Per flattened input: its name and each dim's fixed size (None where dynamic)."""
    dims = []
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims.append((node.name, tuple(None if is_symbolic(s) else int(s) for s in val.shape)))
        else:
            dims.append((node.name, None))
    return dims


def _bind_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return bind_call(module, args, kwargs, door="tedfx.to_moe")


def _check_input_shapes(module: nn.Module, args: tuple, kwargs: dict) -> None:
    expected = module.meta.get("tedfx_input_dims")
    if not expected:
        return
    flat = pytree.tree_leaves((args, kwargs))
    if len(flat) != len(expected):
        return  # the pytree spec check in forward gives the precise error
    for i, (value, (name, dims)) in enumerate(zip(flat, expected)):
        if dims is None or not isinstance(value, torch.Tensor):
            continue
        if value.dim() != len(dims) or any(d is not None and d != s for d, s in zip(dims, value.shape)):
            shown = tuple("*" if d is None else d for d in dims)
            raise ValueError(
                f"input {i} ({name}) has shape {tuple(value.shape)}, but the captured graph expects {shown} "
                f"('*' = any size). Export fixed the other dims while capturing; capture again with an "
                f"example of this shape, or pad the input."
            )
