"""The torch.compile door: `torch.compile(model, backend="tedfx", options={"moe": ..., "parallel": ...})`.

Dynamo hands the backend a torch-level FX graph whose parameters and buffers
are graph inputs. The backend, in order:
1. lifts those inputs back into a module that owns them under the model's own
   names (so the state dict keys are the model's), and whose forward calls the
   dynamo graph with the user inputs;
2. runs `tedfx.parallelize` on it (capture into the ATen training IR, FFNs to
   MoE, sharding for this rank), or `tedfx.to_moe` when no `parallel` is given;
3. releases the storage of the model's dense parameters (tedfx trains its own
   MoE copy; shapes stay, so dynamo's guards hold and nothing recompiles);
4. returns a function that calls the rank's module on the user inputs.

Training needs the MoE parameters: `tedfx.compiled_module(model)` returns the
module tedfx built for `model` (after the first call), e.g. for the optimizer.
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from .config import MoEConfig, ParallelConfig
from .passes.find_ffns import NoFFNFoundError

log = logging.getLogger(__name__)

__all__ = ["built_module", "tedfx_backend"]

# id of a model parameter -> (a weak reference to it, the module tedfx built from the graph that read it,
# what runs it: the module or its inductor-compiled form). Keyed by id, checked by identity: tensors
# compare elementwise, and a released one must not be read.
_BUILT: dict[int, tuple[weakref.ref, nn.Module, Callable[..., Any]]] = {}


def _remember(t: torch.Tensor, built: nn.Module, runner: Callable[..., Any]) -> None:
    key = id(t)
    _BUILT[key] = (weakref.ref(t, lambda _: _BUILT.pop(key, None)), built, runner)


def _entry(t: torch.Tensor) -> tuple | None:
    entry = _BUILT.get(id(t))
    return entry if entry is not None and entry[0]() is t else None
_SOURCE = re.compile(r"(?:^|_)(modules|parameters|buffers)_")
_ROOT = re.compile(r"[lL]_(?:self|args_0|kwargs_self)_")


def tedfx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None
                  ) -> Callable[..., Any]:
    """A torch.compile backend: `torch.compile(model, backend="tedfx", options={"moe": MoEConfig(...),
    "parallel": ParallelConfig(...)})`.

    Options:
        moe: the MoEConfig (required).
        parallel: the ParallelConfig; with torch.distributed initialised the model is parallelized.
        inductor: run the rewritten graph through inductor instead of eagerly (default False).
        release_dense: free the storage of the model's dense parameters (default True): tedfx trains
            its own MoE copy, and the dense model can no longer be called or saved after compiling.
    """
    options = dict(options or {})
    moe = options.get("moe")
    if not isinstance(moe, MoEConfig):
        raise ValueError('torch.compile(backend="tedfx") needs options={"moe": tedfx.MoEConfig(...)}, '
                         f'found {moe!r}.')
    parallel: ParallelConfig | None = options.get("parallel")
    user_positions, state_positions = _positions(gm, example_inputs)

    def run_with(built: nn.Module) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            return built(*(args[i] for i in user_positions))

        return run

    # A recompile (new strides, a dim turned dynamic) reads the same model: reuse what was built
    # (its dense storage may already be released).
    previous = _entry(example_inputs[state_positions[0]]) if state_positions else None
    if previous is not None:
        return run_with(previous[2])
    if parallel is not None and not dist.is_initialized():
        raise ValueError('torch.compile(backend="tedfx") was given options["parallel"] but torch.distributed is '
                         "not initialised: run the script under tedfx.launch(...) or torchrun (after "
                         "tedfx.init_distributed()), or leave out \"parallel\" for one process.")
    lifted = _Lifted(gm, {i: (_fqn(_placeholders(gm)[i].name), example_inputs[i]) for i in state_positions},
                     user_positions, {i: v for i, v in enumerate(example_inputs) if not isinstance(v, torch.Tensor)})
    user_inputs = tuple(example_inputs[i] for i in user_positions)
    from . import api  # the doors import this module for compiled_module: import them when compiling

    try:
        if parallel is not None:
            built: nn.Module = api.parallelize(lifted, user_inputs, moe=moe, parallel=parallel)
        else:
            built = api.to_moe(lifted, user_inputs, moe=moe)
    except NoFFNFoundError:
        # A graph break left this piece of the model without FFNs (every rank alike): it runs as captured.
        log.warning("tedfx backend: a graph of %d nodes holds no FFN and runs unchanged; graph breaks split "
                    "the model (HF models: set config.use_cache=False)", len(gm.graph.nodes))
        return gm.forward
    # Eagerly, or the rewritten graph itself through inductor (its MoE ops and collectives trace).
    runner = torch.compile(built, backend="inductor") if options.get("inductor", False) else built
    for i in state_positions:
        _remember(example_inputs[i], built, runner)
    if options.get("release_dense", True):
        _release([example_inputs[i] for i in state_positions if isinstance(example_inputs[i], nn.Parameter)])
    del lifted
    return run_with(runner)


def built_module(model: nn.Module) -> nn.Module:
    """The module tedfx built for `model` under torch.compile (a ParallelModule, or the to_moe module).

    Exists after the compiled model's first call (`tedfx.compiled_module` is the public door).
    """
    for p in model.parameters():
        entry = _entry(p)
        if entry is not None:
            return entry[1]
    raise LookupError("tedfx has not compiled this model yet: call the torch.compile'd model once first.")


def _fqn(placeholder: str) -> str | None:
    """Dynamo's placeholder name of a module tensor -> its state-dict key, e.g.
    "l_self_modules_h_modules_0_modules_mlp_modules_c_fc_parameters_weight_" -> "h.0.mlp.c_fc.weight"."""
    # The root is `self`, or `args[0]` when a decorator wraps the model's forward (HF models).
    root = _ROOT.match(placeholder)
    if root is None:
        return None
    name = placeholder[root.end():].rstrip("_")
    if not _SOURCE.match(name):
        return None
    parts = _SOURCE.split(name)
    # parts: ["", "modules", "h", "modules", "0", ..., "parameters", "weight"]
    return ".".join(parts[2::2])


class _Lifted(nn.Module):
    """The dynamo graph as a module that owns its parameters and buffers under their model names.

    forward(*tensors) takes the user's tensor inputs in order. Sizes that dynamo made symbolic
    graph inputs are passed as the example's values: capture then decides afresh which dims
    are dynamic.
    """

    def __init__(self, gm: fx.GraphModule, tensors: dict[int, tuple[str, torch.Tensor]],
                 user_positions: list[int], constants: dict[int, Any]) -> None:
        super().__init__()
        self.graph_fn = gm
        self._names = {i: name for i, (name, _) in tensors.items()}
        self._others = user_positions
        self._constants = constants
        for name, t in tensors.values():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            if isinstance(t, nn.Parameter):
                owner.register_parameter(leaf, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
            else:
                owner.register_buffer(leaf, t.detach().clone())

    def forward(self, *inputs: Any) -> Any:
        args: list[Any] = [None] * (len(self._names) + len(self._others) + len(self._constants))
        for i, value in self._constants.items():
            args[i] = value
        for i, value in zip(self._others, inputs):
            args[i] = value
        for i, name in self._names.items():
            owner, _, leaf = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            args[i] = getattr(module, leaf)
        return self.graph_fn(*args)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _positions(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[list[int], list[int]]:
    """(positions of the user's tensor inputs, positions of the model's parameters and buffers)."""
    user, state = [], []
    for i, (node, value) in enumerate(zip(_placeholders(gm), example_inputs)):
        if isinstance(value, torch.Tensor):
            (state if _fqn(node.name) is not None else user).append(i)
    return user, state


def _release(params: list[nn.Parameter]) -> None:
    """Free the storage of the model's dense parameters; shapes and strides stay (dynamo guards on them)."""
    for p in params:
        p.untyped_storage().resize_(0)
