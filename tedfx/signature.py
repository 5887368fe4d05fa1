"""The call signature of a captured graph, and what a later call may differ in (docs/architecture.md, "One IR").

torch.export captures one call, so the graph takes exactly the positional and
keyword inputs of that call (`example_inputs`, `example_kwargs`). `CallSignature`
keeps them with the model's own parameter names, so that a later call:

- may pass a captured input by name or by position, as the model's forward allows;
- may pass None for a keyword the capture left out, where the model's default is
  None (that is what leaving it out means), and may leave out a keyword captured as None;
- fails with a TypeError naming the keyword, and the capture call that would have
  taken it, when it leaves out a captured keyword or passes one the capture never saw
  (HF models: attention_mask, labels, position_ids).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["CALL_META", "CallSignature", "bind_call"]

CALL_META = "tedfx_call"
"""GraphModule.meta key of a captured graph: its CallSignature."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class CallSignature:
    """The inputs a captured graph takes, named as the model's forward names them."""

    model: str
    """The model's class name (for messages)."""
    positional: tuple[str | None, ...]
    """The name of each input the capture passed by position (None where the forward gives none, as *args)."""
    keywords: tuple[str, ...]
    """The inputs the capture passed by keyword, in order."""
    params: tuple[str, ...] = ()
    """Every positional-or-keyword parameter of the forward after `positional`, in order: extra positional
    inputs of a call are these keywords."""
    none_defaults: frozenset[str] = frozenset()
    """Parameters whose default is None: passing None equals leaving them out."""
    none_keywords: frozenset[str] = frozenset()
    """Captured keywords whose example value was None: a call may leave them out."""

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> CallSignature:
        """The signature of capturing `model` with (args, kwargs)."""
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        named = [p.name for p in params if p.kind in _POSITIONAL]
        positional = tuple(named[i] if i < len(named) else None for i in range(len(args)))
        return cls(model=type(model).__name__, positional=positional, keywords=tuple(kwargs),
                   params=tuple(named[len(args):]),
                   none_defaults=frozenset(p.name for p in params if p.default is None),
                   none_keywords=frozenset(k for k, v in kwargs.items() if v is None))

    def bind(self, args: tuple, kwargs: dict[str, Any], door: str) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) laid out as the capture passed them; a TypeError naming what differs.

        Args:
            args, kwargs: the call.
            door: the call that captures, for the message ("tedfx.to_moe", "tedfx.parallelize").
        """
        n = len(self.positional)
        if len(args) == n and not kwargs and not self.keywords:
            return args, kwargs
        given = dict(kwargs)
        for i, value in enumerate(args[n:]):
            if i >= len(self.params):
                raise TypeError(f"{self.model} was captured with {self._describe()}; this call passes "
                                f"{len(args)} positional inputs. {self._advice(door)}")
            if self.params[i] in given:
                raise TypeError(f"{self.model}: this call passes {self.params[i]} twice (by position and by name).")
            given[self.params[i]] = value
        positional = list(args[:n])
        for name in self.positional[len(positional):]:
            if name is None or name not in given:
                raise TypeError(f"{self.model} was captured with {self._describe()}; this call leaves out "
                                f"{name or f'input {len(positional)}'}. {self._advice(door)}")
            positional.append(given.pop(name))
        twice = [name for name in self.positional[:len(args)] if name in given]
        if twice:
            raise TypeError(f"{self.model}: this call passes {twice[0]} twice (by position and by name).")
        for name in [k for k, v in given.items() if v is None and k not in self.keywords and k in self.none_defaults]:
            del given[name]  # None is the default: the same as leaving it out, which the capture did
        for name in self.none_keywords:
            given.setdefault(name, None)
        extra = [k for k in given if k not in self.keywords]
        missing = [k for k in self.keywords if given.get(k) is None and k not in self.none_keywords]
        if extra or missing:
            raise TypeError(self._mismatch(extra, missing, door))
        return tuple(positional), {k: given[k] for k in self.keywords}

    def _describe(self) -> str:
        inputs = ", ".join(name or f"input {i}" for i, name in enumerate(self.positional)) or "no positional inputs"
        keywords = ", ".join(f"{k}=" for k in self.keywords)
        return f"inputs ({inputs}) and " + (f"keyword inputs {keywords}" if keywords else "no keyword inputs")

    def _advice(self, door: str) -> str:
        return (f"A captured graph takes exactly the inputs of the call that captured it: call it the same way, "
                f"or capture the call you make with {door}(model, example_inputs, ..., example_kwargs={{...}}).")

    def _mismatch(self, extra: list[str], missing: list[str], door: str) -> str:
        parts = []
        if extra:
            parts.append(f"passes {', '.join(f'{k}=' for k in extra)}, which the capture did not see")
        if missing:
            parts.append(f"leaves out {', '.join(f'{k}=' for k in missing)}")
        wanted = [k for k in self.keywords if k not in missing] + extra
        capture = f"example_kwargs={{{', '.join(f'{k!r}: ...' for k in wanted)}}}" if wanted else "no example_kwargs"
        return (f"{self.model} was captured with {self._describe()}, but this call {' and '.join(parts)}. A captured "
                f"graph takes exactly the inputs of the call that captured it: capture this call's inputs with "
                f"{door}(model, example_inputs, ..., {capture})"
                + (f", or pass {', '.join(f'{k}=' for k in missing)} on every call." if missing else "."))


def bind_call(module: nn.Module, args: tuple, kwargs: dict[str, Any], door: str) -> tuple[tuple, dict[str, Any]]:
    """`module`'s CallSignature applied to a call (unchanged when the module has none)."""
    signature = getattr(module, "meta", {}).get(CALL_META)
    return (args, kwargs) if signature is None else signature.bind(args, kwargs, door)
