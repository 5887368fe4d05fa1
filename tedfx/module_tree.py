"""Every module a graph runs, including those held outside `named_modules()`.

A checkpointed region is a GraphModule kept as a plain attribute of its
CheckpointRegion (so that the region's parameters are not registered twice):
`nn.Module.modules()` does not reach it, yet it reads the rank graph's tensors.
Code that replaces tensors (the torch.compile door binding a piece to the
model's tensors, fake-tensor simulation) walks this tree instead.
"""

from __future__ import annotations

from torch import nn

__all__ = ["module_tree"]


def module_tree(root: nn.Module) -> list[nn.Module]:
    """`root` and every module reachable from it through submodules or module-valued attributes, once each."""
    seen: set[int] = set()
    found, todo = [], [root]
    while todo:
        module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        todo += [m for m in module._modules.values() if m is not None]
        todo += [m for m in vars(module).values() if isinstance(m, nn.Module)]
    return found
