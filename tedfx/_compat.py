"""Every private or version-dependent torch API tedfx touches, in one place.

A torch upgrade should change this file and nothing else. Supported: torch 2.11-2.14.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

__all__ = ["pytree", "export_dim_auto", "dropout_targets", "sdpa_target", "is_symbolic"]

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def export_dim_auto():
    """`torch.export.Dim.AUTO`: let export decide whether a dim is dynamic."""
    return torch.export.Dim.AUTO


# Dropout as the ATen training IR spells it: aten.dropout(x, p, train).
dropout_targets = (
    torch.ops.aten.dropout.default,
    torch.ops.aten.feature_dropout.default,
    torch.ops.aten.alpha_dropout.default,
)
# Attention keeps its own dropout_p argument (position 4).
sdpa_target = torch.ops.aten.scaled_dot_product_attention.default


def is_symbolic(value: object) -> bool:
    """True for a SymInt/SymFloat whose value export left symbolic."""
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


# --- Functional collectives (torch.distributed._functional_collectives) -------------------------
# Differentiable collectives in tedfx.collectives call these so graphs stay traceable by
# torch.compile. torch 2.13 renamed `all_gather_tensor` / `reduce_scatter_tensor` to
# `*_single` (the old names warn); older releases only have the old names.

import torch.distributed._functional_collectives as funcol  # noqa: E402

__all__ += ["funcol", "funcol_all_gather", "funcol_reduce_scatter", "wait_collective", "in_backward_pass"]

funcol_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
"""funcol all-gather: (tensor, gather_dim, group) -> tensor concatenated over `gather_dim`."""
funcol_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
"""funcol reduce-scatter: (tensor, op, scatter_dim, group) -> this rank's chunk of the reduction."""


def wait_collective(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind a functional collective's result, waiting for it in eager mode.

    Eager funcol returns an `AsyncCollectiveTensor` (the wait is deferred to first use); under
    tracing it returns a plain tensor already passed through `wait_tensor`.
    """
    if isinstance(tensor, funcol.AsyncCollectiveTensor):
        return tensor.wait()
    return tensor


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass on this thread (e.g. a recompute)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# --- DeviceMesh -----------------------------------------------------------------------------------


def flatten_mesh_dims(mesh, dim_names: tuple[str, ...], name: str):
    """`mesh[dim_names]` flattened into one dimension called `name` (private `DeviceMesh._flatten`).

    Returns None when this torch has no `_flatten`; callers then build the group themselves.
    """
    sub = mesh[dim_names]
    flatten = getattr(sub, "_flatten", None)
    if flatten is None:
        return None
    return flatten(name)


__all__ += ["flatten_mesh_dims"]


# --- autograd engine ------------------------------------------------------------------------------


def queue_backward_callback(fn) -> None:
    """Run `fn` once when the current backward pass finishes (what DDP uses to finalise grads)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


__all__ += ["queue_backward_callback"]


def set_group_timeouts(groups: list, seconds: float) -> None:
    """How long a collective on each group (None: the default group) may block before the run fails."""
    import datetime

    from torch.distributed import distributed_c10d as c10d

    setter = getattr(c10d, "_set_pg_timeout", None)
    if setter is None:
        return
    seen = set()
    for group in groups:
        if id(group) not in seen:
            seen.add(id(group))
            setter(datetime.timedelta(seconds=seconds), group)


__all__ += ["set_group_timeouts"]


# --- symbolic shapes --------------------------------------------------------------------------------


def known_equal(a, b) -> bool:
    """`a == b` for ints or SymInts, True only where it holds for every value of the symbols (adds no guard)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


__all__ += ["known_equal"]


# --- torch.compile: which module is being compiled ------------------------------------------------


def compiled_modules_on_stack() -> list[tuple]:
    """The modules torch.compile is running on this thread, innermost first: (module, args, kwargs) of each call.

    `torch.compile(model)` wraps `model` in an OptimizedModule (`_orig_mod`); `model.compile()` sets
    `model._compiled_call_impl`. Both calls pass through `nn.Module._wrapped_call_impl(self, *args, **kwargs)`,
    whose frame stays on the stack while dynamo compiles any graph of the call (the backend runs inside it).
    """
    import sys

    from torch import nn
    from torch._dynamo.eval_frame import OptimizedModule

    code = nn.Module._wrapped_call_impl.__code__
    found = []
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            local = frame.f_locals
            module = local.get("self")
            if isinstance(module, OptimizedModule):
                found.append((module._orig_mod, local.get("args", ()), local.get("kwargs", {})))
            elif getattr(module, "_compiled_call_impl", None) is not None:
                found.append((module, local.get("args", ()), local.get("kwargs", {})))
        frame = frame.f_back
    return found


def uncompiled(module):
    """The module torch.compile wrapped, for the OptimizedModule `torch.compile(module)` returns; else `module`."""
    from torch._dynamo.eval_frame import OptimizedModule

    return module._orig_mod if isinstance(module, OptimizedModule) else module


__all__ += ["compiled_modules_on_stack", "uncompiled"]


def outside_dynamo_compile():
    """A context in which torch.export runs as if no dynamo compile were under way.

    A backend runs inside dynamo's tracing and compile contexts; an export there would add its own
    shape guards to the graph dynamo is compiling (guards on the export's inputs, which the compiled
    frame does not have).
    """
    import contextlib

    import torch._guards

    stack = contextlib.ExitStack()
    stack.enter_context(torch._guards.tracing(None))
    stack.enter_context(torch._guards.compile_context(None))
    return stack


__all__ += ["outside_dynamo_compile"]


def no_torch_function_subclass():
    """Inside `__torch_function__`: call the op on the plain tensor (results are not wrapped in the subclass)."""
    return torch._C.DisableTorchFunctionSubclass()


__all__ += ["no_torch_function_subclass"]


# --- allocation tracking (tedfx.runtime.memory) ------------------------------------------------------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def storage_key(t: torch.Tensor) -> int:
    """An id of the storage behind `t`, unique while the storage lives (views share it)."""
    return t.untyped_storage()._cdata


__all__ += ["TorchDispatchMode", "storage_key"]


# --- c10d names that torch 2.13 renamed --------------------------------------------------------------

import torch.distributed as _dist  # noqa: E402

_all_gather_single = getattr(_dist, "all_gather_single", None) or _dist.all_gather_into_tensor


def all_gather_into(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """Gather every rank's `input` into `output` (concatenated along dim 0); `input` may be this rank's chunk of it.

    torch 2.13 renamed `all_gather_into_tensor` to `all_gather_single` (the old name warns).
    Returns the work to wait on when `async_op`, else None.
    """
    return _all_gather_single(output, input, group=group, async_op=async_op)


__all__ += ["all_gather_into"]


def initialized_cuda_devices() -> list[int]:
    """The CUDA devices whose generators torch.random.fork_rng must save and restore ([] on a CPU machine)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


__all__ += ["initialized_cuda_devices"]


# --- torch.distributed.checkpoint (DCP) planners for boxes -------------------------------------------
# tedfx.runtime.checkpoint_state hands DCP each rank's tensors as objects that implement DCP's
# checkpointable protocol (`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`:
# what DTensor implements, torch/distributed/_checkpointable.py). DCP plans with the protocol by
# itself; these planners look the objects up for the reads and writes it planned, on flat state dicts.

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner  # noqa: E402


class BoxSavePlanner(DefaultSavePlanner):
    """DCP's default save planner on a flat state dict (a list or dict value is one pickled entry)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        entry = self.state_dict[index.fqn]
        return entry.__get_tensor_shard__(index) if hasattr(entry, "__get_tensor_shard__") else \
            super().lookup_object(index)


class BoxLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner on a flat state dict, reading straight into the objects' views."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default first materialises meta tensors, and in doing so replaces any object it does not
        # know (ours) with None; every tensor here is real already.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index):
        entry = self.state_dict[index.fqn]
        return entry.__get_tensor_shard__(index) if hasattr(entry, "__get_tensor_shard__") else \
            super().lookup_tensor(index)


__all__ += ["BoxLoadPlanner", "BoxSavePlanner"]
