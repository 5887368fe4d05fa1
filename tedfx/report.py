"""Report: what tedfx did (or would do) to a model, readable by people and programs."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

__all__ = ["Report"]


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@dataclass
class Report:
    """Returned by `tedfx.explain`; prints as tables.

    Attributes:
        model: the model's class name.
        moe: the MoEConfig as a dict.
        blocks: one MoEBlockRecord per converted FFN.
        ffns_found: every FFN found (index, path, kind, activation, H, F), converted or not.
        params_dense: parameters of the dense model.
        params_moe: parameters of the MoE model.
        params_active: parameters one token uses in the MoE model (router + top_k experts per block).
        pass_timings: (pass name, seconds) of the rewrite.
        world_size: ranks the prediction is for.
        parallel: the ParallelConfig as a dict, None for a single process.
        layout: the mesh, e.g. "Layout(D=2 x X=2 x T=2 = 8 ranks)".
    """

    model: str
    moe: dict[str, Any]
    blocks: list[Any]
    ffns_found: list[dict[str, Any]]
    params_dense: int
    params_moe: int
    params_active: int
    pass_timings: list[tuple[str, float]] = field(default_factory=list)
    world_size: int = 1
    parallel: dict[str, Any] | None = None
    layout: str | None = None
    parameters: list[dict[str, Any]] = field(default_factory=list)
    """Every state-dict tensor of rank 0: name, full and local shape, splits ("tp:0", "ep:0"), fused chunks."""
    param_bytes_per_rank: dict[int, int] = field(default_factory=dict)
    collectives: list[dict[str, Any]] = field(default_factory=list)
    """Every collective rank 0 issues in one training step, in order: kind, axis, phase, shape, dtype, bytes."""
    comm_table: list[list[Any]] = field(default_factory=list)
    """Rank 0's step totals: [kind, axis, phase, calls, bytes] (what pm.comm_stats().table() measures)."""
    comm_variants: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Rank 0's step totals with and without each optimization: {"baseline"|"dtd"|"cac"|"dtd+cac":
    {"kind/axis/phase": [calls, bytes]}}."""

    def to_dict(self) -> dict[str, Any]:
        def plain(x: Any) -> Any:
            if is_dataclass(x) and not isinstance(x, type):
                return {k: plain(v) for k, v in asdict(x).items()}
            if isinstance(x, dict):
                return {str(k): plain(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            if isinstance(x, (int, float, str, bool)) or x is None:
                return x
            return repr(x)

        return plain({f: getattr(self, f) for f in self.__dataclass_fields__})

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        buf = io.StringIO()
        console = Console(file=buf, width=120, force_terminal=False, color_system=None)
        moe = self.moe
        console.print(f"tedfx: {self.model} -> MoE (E={moe['num_experts']}, k={moe['top_k']}, "
                      f"capacity_factor={moe['capacity_factor']}, layers={moe['layers']!r})")
        converted = {b.index for b in self.blocks}
        t = Table(title="FFNs", title_justify="left")
        for col in ("#", "module path", "kind", "activation", "H", "F", "MoE"):
            t.add_column(col)
        for f in self.ffns_found:
            t.add_row(str(f["index"]), f["path"], f["kind"], f["activation"], str(f["hidden_dim"]),
                      str(f["ffn_dim"]), "yes" if f["index"] in converted else "-")
        console.print(t)
        p = Table(title="Parameters", title_justify="left")
        for col in ("", "total", "active per token"):
            p.add_column(col, justify="right")
        p.add_row("dense", _fmt_count(self.params_dense), _fmt_count(self.params_dense))
        p.add_row("MoE", _fmt_count(self.params_moe), _fmt_count(self.params_active))
        console.print(p)
        if self.parallel is not None:
            self._print_parallel(console, Table)
        if self.pass_timings:
            console.print("passes: " + ", ".join(f"{name} {sec * 1e3:.0f} ms" for name, sec in self.pass_timings))
        return buf.getvalue()

    def _print_parallel(self, console: Any, Table: Any) -> None:
        console.print(f"layout: {self.layout}")
        sharded = [p for p in self.parameters if p["splits"]]
        t = Table(title=f"Sharded parameters (rank 0; {len(self.parameters) - len(sharded)} others replicated)",
                  title_justify="left")
        for col in ("parameter", "full shape", "split", "rank-0 shape"):
            t.add_column(col)
        for p in sharded:
            split = ", ".join(p["splits"]) + (f" per chunk {p['chunks']}" if p["chunks"] else "")
            t.add_row(p["name"], str(tuple(p["full_shape"])), split, str(tuple(p["local_shape"])))
        console.print(t)
        sizes = sorted(set(self.param_bytes_per_rank.values()))
        console.print("parameter bytes per rank: " + ", ".join(_fmt_count(b) + "B" for b in sizes))
        c = Table(title="Collectives per training step (rank 0)", title_justify="left")
        for col in ("kind", "axis", "phase", "calls", "bytes"):
            c.add_column(col, justify="right" if col in ("calls", "bytes") else "left")
        for kind, axis, phase, calls, nbytes in self.comm_table:
            c.add_row(kind, axis, phase, str(calls), _fmt_count(nbytes) + "B")
        console.print(c)
        if self.comm_variants:
            v = Table(title="With and without the communication optimizations (rank 0, per step)",
                      title_justify="left")
            v.add_column("variant")
            for col in ("all-to-all calls", "all-to-all bytes", "all bytes"):
                v.add_column(col, justify="right")
            for name, rows in self.comm_variants.items():
                a2a = [cb for key, cb in rows.items() if key.startswith("all_to_all/")]
                v.add_row(name, str(sum(c for c, _ in a2a)), _fmt_count(sum(b for _, b in a2a)) + "B",
                          _fmt_count(sum(b for _, b in rows.values())) + "B")
            console.print(v)
