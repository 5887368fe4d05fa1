"""Dense parameters that the torch.compile backend replaced: loud on any use, never a crash.

`torch.compile(model, backend="tedfx")` trains its own MoE module in place of
the dense model's FFN weights (and of the weights tensor parallelism shards).
Those dense parameters are *replaced*; with `release_dense` their storage is
freed and they become `ReleasedParameter`s:

- the class keeps shape, dtype, device and strides, and the storage is resized
  to zero bytes: no memory stays alive;
- every op on one (arithmetic, `.sum()`, `.detach()` for `state_dict()`,
  `copy_` for `load_state_dict()`, pickling) raises `ReleasedParameterError`
  naming the parameter and `tedfx.compiled_module(model)`, through
  `__torch_function__`, before any kernel reads the empty storage; metadata
  (shape, dtype, device, requires_grad, grad, hashing) still answers;
- the backend switches the class while dynamo compiles the graph that reads
  the parameter, before dynamo builds its guards, so the guards expect the new
  class and nothing recompiles; while dynamo traces (a recompile for new
  strides), ops pass through so tracing works (the backend never runs them).

An optimizer that holds a replaced parameter (e.g. built on `model.parameters()`
before compiling) would never step the MoE module: a global optimizer step
pre-hook raises at its first step.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._compat import no_torch_function_subclass

__all__ = ["ReleasedParameter", "ReleasedParameterError", "mark_replaced", "replaced_name"]

_REPLACED_ATTR = "_tedfx_replaced"
_FIX = ("Use tedfx.compiled_module(model): its .parameters() for the optimizer, its state_dict() to save; "
        "or compile with options={\"release_dense\": False} to keep the dense weights (which are not trained).")


class ReleasedParameterError(RuntimeError):
    """A dense parameter that torch.compile(backend="tedfx") released was used."""


# Queries that read no element of the tensor: answered as for any parameter.
_METADATA = frozenset({
    "shape", "size", "dim", "ndim", "ndimension", "dtype", "device", "layout", "stride", "numel", "nelement",
    "element_size", "is_contiguous", "is_sparse", "is_quantized", "is_meta", "is_cuda", "is_cpu", "is_mps",
    "is_xpu", "is_nested", "is_floating_point", "is_complex", "is_conj", "is_neg", "_is_view", "is_inference",
    "requires_grad", "requires_grad_", "is_leaf", "grad", "grad_fn", "_grad_fn", "retains_grad", "grad_dtype",
    "data_ptr", "untyped_storage", "names", "__hash__", "__len__", "_version", "output_nr",
})


def _op_name(func: Any) -> str:
    """"sum" for Tensor.sum, "requires_grad" for the getter/setter of that property."""
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__", "__delete__"):
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name or repr(func)


class ReleasedParameter(nn.Parameter):
    """A dense parameter replaced and freed by torch.compile(backend="tedfx"); any use but metadata raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = _op_name(func)
        if name in _METADATA or torch.compiler.is_compiling():
            with no_torch_function_subclass():
                return func(*args, **(kwargs or {}))
        released = next((a for a in _flat(args, kwargs) if isinstance(a, ReleasedParameter)), None)
        raise ReleasedParameterError(
            f"{replaced_name(released) or 'a parameter'} of the dense model was released by "
            f'torch.compile(backend="tedfx"), which trains its own MoE module in its place: it holds no '
            f"values and cannot be used (tried: {name}). {_FIX}")

    def __repr__(self) -> str:
        return f"ReleasedParameter({replaced_name(self)!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def __reduce_ex__(self, protocol):
        # Pickling (torch.save of the tensor, copy.deepcopy) would read the freed storage.
        raise ReleasedParameterError(f"{replaced_name(self)} of the dense model was released by "
                                     f'torch.compile(backend="tedfx") and cannot be saved or copied. {_FIX}')


def _flat(args: tuple, kwargs: dict | None) -> Iterable[Any]:
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def replaced_name(p: torch.Tensor | None) -> str | None:
    """The model's name of a dense parameter the backend replaced, None for any other tensor."""
    return getattr(p, _REPLACED_ATTR, None) if p is not None else None


def mark_replaced(params: dict[str, nn.Parameter], *, release: bool) -> None:
    """Mark the model's parameters that tedfx trains a replacement of; with `release`, free them.

    Call while dynamo compiles a graph that reads them (inside the backend): dynamo builds that
    graph's guards afterwards, from the new class, so the next calls do not recompile.
    """
    _install_optimizer_check()
    for name, p in params.items():
        setattr(p, _REPLACED_ATTR, name)
        if release and not isinstance(p, ReleasedParameter):
            p.untyped_storage().resize_(0)
            p.__class__ = ReleasedParameter


_optimizer_hook = None
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""optimizer -> the parameter counts of its groups when last checked (unchanged: nothing new to check)."""


def _install_optimizer_check() -> None:
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_pre_hook(_check_optimizer)


def _check_optimizer(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Before every optimizer step: it must not hold a dense parameter the backend replaced."""
    shape = tuple(len(g["params"]) for g in optimizer.param_groups)
    if _checked.get(optimizer) == shape:
        return
    stale = [replaced_name(p) for g in optimizer.param_groups for p in g["params"] if replaced_name(p)]
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ReleasedParameterError(
            f"{type(optimizer).__name__} steps parameters of the dense model ({shown}) that "
            f'torch.compile(backend="tedfx") replaced with its MoE module: they get no gradient, so the '
            f"model would not train. Build the optimizer on tedfx.compiled_module(model).parameters(), "
            f"after the compiled model's first call.")
    _checked[optimizer] = shape
