"""The torch.compile door: `torch.compile(model, backend="tedfx", options={"moe": ..., "parallel": ...})`.

Dynamo hands the backend one FX graph per piece of the model: graph breaks
(a `print`, `torch._dynamo.graph_break()`, unsupported code) split the model,
and the code between graphs runs eagerly. One compiled graph may also serve
several modules (every transformer block runs the graph compiled for the
first, with its own parameters as inputs). So the backend converts the model
once, as a whole, and runs every graph as the matching part of that one module:

1. On the first graph that reads the model's tensors, find the model being
   compiled (the module torch.compile wraps, on the call stack, with the
   arguments of its call) and convert all of it: `tedfx.to_moe`, or
   `tedfx.parallelize` when `parallel` is given. FFN indices are the whole
   model's, so `MoEConfig.layers` picks the same FFNs as `tedfx.to_moe(model)`.
   `tedfx.compiled_module(model)` returns that module.
2. The converted module shares every tensor it keeps unchanged with the dense
   model (embeddings, norms, attention without tensor parallelism): the code
   dynamo runs eagerly between graphs uses them and trains the same weights.
   The dense parameters it replaced (FFN weights, weights sharded by tensor
   parallelism) are released: their storage is freed and any use raises
   (tedfx.released); an optimizer that holds one raises at its first step.
3. Each graph's compiled function, called with a set of the model's tensors
   it has not seen, converts the graph for them (lifted into a module that
   holds them under the model's names, the FFNs of step 1 to MoE blocks, the
   same sharding), binds every parameter and router of the result to the one
   module's, and from then on runs that. Outputs, gradients and the optimizer
   all see the one module.

What cannot be bound is an error naming the fix: a graph break inside an FFN,
or one that cuts through a tensor-parallel region.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from . import _compat, pipeline
from .config import MoEConfig, ParallelConfig
from .moe.routing import Router
from .released import mark_replaced
from .runtime.executor import ParallelModule
from .runtime.launch import local_world_size

log = logging.getLogger(__name__)

__all__ = ["built_module", "tedfx_backend"]


@dataclass(frozen=True)
class _Options:
    moe: MoEConfig
    parallel: ParallelConfig | None
    inductor: bool
    release_dense: bool

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> _Options:
        options = dict(options or {})
        unknown = sorted(set(options) - {"moe", "parallel", "inductor", "release_dense"})
        if unknown:
            raise ValueError(f'torch.compile(backend="tedfx") options {unknown} are unknown; expected "moe", '
                             f'"parallel", "inductor", "release_dense".')
        moe = options.get("moe")
        if not isinstance(moe, MoEConfig):
            raise ValueError('torch.compile(backend="tedfx") needs options={"moe": tedfx.MoEConfig(...)}, '
                             f"found {moe!r}.")
        parallel = options.get("parallel")
        if parallel is not None and not dist.is_initialized():
            raise ValueError('torch.compile(backend="tedfx") was given options["parallel"] but torch.distributed '
                             "is not initialised: run the script under tedfx.launch(...) or torchrun (after "
                             "tedfx.init_distributed()), or leave out \"parallel\" for one process.")
        if parallel is not None:  # every graph of the model is sharded with the same choice
            parallel, _, _ = parallel.resolve_auto(dist.get_world_size(), local_world_size(),
                                                   drop_tokens=moe.drop_tokens)
        return cls(moe, parallel, bool(options.get("inductor", False)), bool(options.get("release_dense", True)))


def tedfx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None
                  ) -> Callable[..., Any]:
    """A torch.compile backend: `torch.compile(model, backend="tedfx", options={"moe": MoEConfig(...),
    "parallel": ParallelConfig(...)})`.

    Options:
        moe: the MoEConfig (required).
        parallel: the ParallelConfig; with torch.distributed initialised the model is parallelized.
        inductor: run the rewritten graphs through inductor instead of eagerly (default False).
        release_dense: free the storage of the dense parameters tedfx replaced (default True): any use
            of them raises afterwards, so the dense model can no longer be called or saved.
    """
    opts = _Options.parse(options)
    converted = _converted_model(gm, [v for v in example_inputs if isinstance(v, torch.Tensor)], opts)
    if converted is None:
        return gm.forward  # code between the model's graphs that reads none of its tensors
    return _Graph(gm, example_inputs, converted)


def built_module(model: nn.Module) -> nn.Module:
    """The module tedfx built for `model` under torch.compile (a ParallelModule, or the to_moe module).

    Exists after the compiled model's first call (`tedfx.compiled_module` is the public door).
    """
    converted = _CONVERTED.get(_compat.uncompiled(model))
    if converted is None:
        raise LookupError("tedfx has not compiled this model yet: call the torch.compile'd model once first "
                          "(tedfx.compiled_module takes the model given to torch.compile).")
    return converted.module


# The model given to torch.compile -> what tedfx built for it. Weak: the model owns its compiled form.
_CONVERTED: weakref.WeakKeyDictionary[nn.Module, _Converted] = weakref.WeakKeyDictionary()


def _converted_model(gm: fx.GraphModule, tensors: list[torch.Tensor], opts: _Options) -> _Converted | None:
    """The converted form of the model whose tensors `gm` reads, built on the first of its graphs."""
    ids = {id(t) for t in tensors}
    stack = _compat.compiled_modules_on_stack()
    for model, _, _ in stack:
        converted = _CONVERTED.get(model)
        if converted is not None and ids & converted.names.keys():
            if converted.opts != opts:
                raise ValueError(f'torch.compile(backend="tedfx") already converted this {type(model).__name__} '
                                 f"with other options ({converted.opts} vs {opts}); its dense weights are "
                                 "released: compile a fresh model.")
            return converted
    for model, args, kwargs in stack:
        names = _tensor_names(model)
        if ids & names.keys():
            # Detached: capture must not mark the call's own tensors (dynamo guards on them).
            args, kwargs = _compat.pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (tuple(args), dict(kwargs)))
            converted = _Converted.build(model, args, kwargs, opts, names)
            _CONVERTED[model] = converted
            return converted
    if any(isinstance(t, nn.Parameter) for t in tensors):
        raise ValueError(
            f'torch.compile(backend="tedfx") converts a whole nn.Module, but this graph ({len(gm.graph.nodes)} '
            "nodes) reads parameters outside any module being compiled (a compiled function?). Compile the "
            'model itself: torch.compile(model, backend="tedfx", options=...) or model.compile(backend="tedfx", '
            "options=...).")
    return None


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """id of each parameter and buffer of `model` -> its first name."""
    names: dict[int, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    return names


class _Converted:
    """The one module tedfx built for a compiled model, and the binding of the model's graphs to it."""

    def __init__(self, model: nn.Module, module: nn.Module, names: dict[int, str], opts: _Options) -> None:
        self._model = weakref.ref(model)
        self.module = module
        self.names = names
        self.opts = opts
        self.graph: nn.Module = module.module if isinstance(module, ParallelModule) else module
        self.tensors = pipeline.named_tensors(self.graph)
        self.routers = {name: m for name, m in self.graph.named_modules() if isinstance(m, Router)}
        self.ffn_paths = frozenset(name.rpartition(".")[0] for name in self.routers)

    @classmethod
    def build(cls, model: nn.Module, args: tuple, kwargs: dict, opts: _Options,
              names: dict[int, str]) -> _Converted:
        """Convert all of `model` (called with `args`, `kwargs`); release the dense parameters it replaced."""
        from . import api  # the doors import this module for compiled_module: import them when compiling

        log.info("tedfx backend: converting %s as a whole", type(model).__name__)
        with _compat.outside_dynamo_compile(), torch.enable_grad():
            if opts.parallel is not None:
                module: nn.Module = api.build_parallel_module(model, args, moe=opts.moe, parallel=opts.parallel,
                                                              example_kwargs=kwargs, share_model_tensors=True)
            else:
                module, _ = pipeline.build_moe_graph(model, args, moe=opts.moe, example_kwargs=kwargs)
                pipeline.adopt_model_tensors(module, model)
        converted = cls(model, module, names, opts)
        kept = {id(t) for t in converted.tensors.values()}
        mark_replaced({n: p for n, p in model.named_parameters() if id(p) not in kept}, release=opts.release_dense)
        return converted

    def follow_mode(self) -> None:
        """train()/eval() of the compiled model reaches the routers (capacity factor, gate noise). The graphs
        follow it themselves: dynamo recompiles them when the mode changes."""
        model = self._model()
        if model is not None and model.training != self.module.training:
            self.module.train(model.training)

    def bind(self, gm: fx.GraphModule, args: tuple, state: list[int], user: list[int]) -> Callable[..., Any]:
        """`gm` converted for the model tensors at `state` in `args`, running on this module's tensors."""
        lifted = _Lifted(gm, {i: self._lift(args[i]) for i in state}, user,
                         {i: v for i, v in enumerate(args) if not isinstance(v, torch.Tensor)})
        # Dynamo traced the graph in the model's current mode (it guards on it), with dropout's `training`
        # baked into every call: capture must keep, not flip, those flags.
        model = self._model()
        lifted.train(model.training if model is not None else True)
        examples = tuple(args[i].detach() for i in user)
        coords = self.module.mesh.coords if isinstance(self.module, ParallelModule) else None
        with torch.enable_grad():
            piece = pipeline.convert_piece(lifted, examples, moe=self.opts.moe, ffn_paths=self.ffn_paths,
                                           parallel=self.opts.parallel, coords=coords)
        self._bind_tensors(piece)
        runner = torch.compile(piece, backend="inductor") if self.opts.inductor else piece
        if not isinstance(self.module, ParallelModule):
            return runner
        pm = self.module

        def run(*inputs: Any) -> Any:
            with pm.bind_groups():
                return runner(*inputs)

        return run

    def _lift(self, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(model name, tensor to capture with): the model's own tensor where this module shares it, else a
        stand-in of its shape (the dense values may be released; binding replaces it anyway)."""
        name = self.names[id(t)]
        if self.tensors.get(name) is t or not isinstance(t, nn.Parameter):
            return name, t
        return name, nn.Parameter(torch.zeros(t.shape, dtype=t.dtype, device=t.device), t.requires_grad)

    def _bind_tensors(self, piece: nn.Module) -> None:
        """Replace every parameter and router of `piece` by this module's of the same name."""
        new: dict[int, Any] = {}
        for name, t in pipeline.named_tensors(piece).items():
            mine = self.tensors.get(name)
            if mine is None and not isinstance(t, nn.Parameter):
                continue  # a buffer this module does not keep (e.g. one export folded): the graph's own copy
            if mine is None:
                raise ValueError(self._unbound_message(name))
            if (mine.shape, mine.dtype) != (t.shape, t.dtype):
                raise ValueError(
                    f'torch.compile(backend="tedfx"): a graph of the model holds {name} as {tuple(t.shape)} '
                    f"{t.dtype}, the converted model as {tuple(mine.shape)} {mine.dtype}: a graph break cuts "
                    f"through a tensor-parallel region (e.g. between a projection and the attention reading "
                    f"it), which shards it differently. Move the graph break to a block boundary, or remove it.")
            new[id(t)] = mine
        for name, router in piece.named_modules():
            if isinstance(router, Router):
                new[id(router)] = self.routers[name]
        pipeline.replace_in_tree(piece, new)

    def _unbound_message(self, name: str) -> str:
        ffn = next((p for p in self.ffn_paths if name.startswith(p + ".")), None)
        if ffn is not None:
            return (f'torch.compile(backend="tedfx"): a graph of the model reads {name}, a weight of the FFN {ffn} '
                    f"that tedfx converted to an MoE block, without the rest of that FFN: a graph break splits "
                    f"the FFN (or part of it runs outside the compiled graphs). Remove the graph break inside "
                    f"{ffn}, or leave this FFN dense with MoEConfig.layers.")
        return (f'torch.compile(backend="tedfx"): a graph of the model reads {name}, which the converted model does '
                f"not hold; convert the model with tedfx.to_moe / tedfx.parallelize to see why.")


class _Graph:
    """One graph dynamo compiled, run as the matching part of the converted model.

    Dynamo calls it with the tensors of whichever module runs it (one graph serves every block):
    each new set of tensors is converted and bound once, then reused.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], converted: _Converted) -> None:
        self.gm = gm
        self.converted = converted
        tensors = [i for i, v in enumerate(example_inputs) if isinstance(v, torch.Tensor)]
        self.state = [i for i in tensors if id(example_inputs[i]) in converted.names]
        self.user = [i for i in tensors if i not in self.state]
        self.bound: dict[tuple[int, ...], Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        self.converted.follow_mode()
        key = tuple(id(args[i]) for i in self.state)
        run = self.bound.get(key)
        if run is None:
            missing = [i for i in self.state if id(args[i]) not in self.converted.names]
            if missing:
                raise ValueError(f'torch.compile(backend="tedfx"): a graph of the model was called with a tensor '
                                 f"at input {missing[0]} that is not one of the model's.")
            run = self.bound[key] = self.converted.bind(self.gm, args, self.state, self.user)
        return run(*(args[i] for i in self.user))


class _Lifted(nn.Module):
    """A dynamo graph as a module that owns the model's tensors it reads, under the model's names.

    forward(*tensors) takes the graph's other tensor inputs in order. Sizes that dynamo made symbolic
    graph inputs are passed as the example's values: capture then decides afresh which dims are dynamic.
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
            if hasattr(owner, leaf):
                continue  # a tied tensor dynamo passes once per graph
            if isinstance(t, nn.Parameter):
                owner.register_parameter(leaf, t)
            else:
                owner.register_buffer(leaf, t)

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
