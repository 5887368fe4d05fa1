"""Report: what tedfx did (or would do) to a model, readable by people and programs."""

from __future__ import annotations

import html
import io
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

__all__ = ["Chips", "Report", "Table"]


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
    training_memory: dict[str, Any] = field(default_factory=dict)
    """Rank 0's bytes to train with tedfx.optimizer(AdamW): {"precision", "zero", "rows": [{"zero", "tile_numel",
    "weights", "grads", "master", "optimizer_states", "step_transient", "peak"}]} for ZeRO 0/1, untiled/tiled."""
    comm_variants: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Rank 0's step totals with and without each optimization: {"baseline"|"dtd"|"cac"|"dtd+cac":
    {"kind/axis/phase": [calls, bytes]}}."""
    dtd_choice: str | None = None
    """With a layout: whether DTD runs and why (`ParallelConfig.resolve_dtd`; "auto" decides from the nodes)."""
    chunks_choice: str | None = None
    """With a layout: how many chunks the expert all-to-alls run in and why (`ParallelConfig.resolve_a2a_chunks`)."""
    graphs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Node lists (`tedfx.graph_summary.summarize_graph`) of the "dense" captured graph and of "rank0"'s
    rewritten graph (the MoE graph for a single process): what `to_dot`, `to_svg` and `to_html` draw."""

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """A Report from `to_dict()`'s output (blocks come back as MoEBlockRecords)."""
        from .passes.context import MoEBlockRecord

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"not a tedfx report: unknown fields {unknown}; expected some of {sorted(known)}.")
        data = dict(data)
        data["blocks"] = [MoEBlockRecord(**b) if isinstance(b, dict) else b for b in data.get("blocks", [])]
        data["pass_timings"] = [tuple(t) for t in data.get("pass_timings", [])]
        data["param_bytes_per_rank"] = {int(r): b for r, b in data.get("param_bytes_per_rank", {}).items()}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """A Report read back from `to_json()`, e.g. to draw a saved report again."""
        return cls.from_dict(json.loads(text))

    def _graph(self, which: str) -> list[dict[str, Any]]:
        if which not in self.graphs:
            raise ValueError(f"the report has no graph {which!r}; it has {sorted(self.graphs)} "
                             f"(tedfx.explain fills 'dense' and 'rank0').")
        return self.graphs[which]

    def to_dot(self, which: str = "rank0") -> str:
        """The graph `which` ("rank0" or "dense") as DOT, one cluster per transformer and MoE block."""
        from .viz import to_dot

        return to_dot(self._graph(which), f"{self.model}: {self._title(which)}")

    def to_svg(self, which: str = "rank0", **options: Any) -> str:
        """The graph `which` as a standalone SVG picture; `options` as in `tedfx.viz.to_svg`."""
        from .viz import to_svg

        return to_svg(self._graph(which), f"{self.model}: {self._title(which)}", **options)

    def to_html(self) -> str:
        """A self-contained HTML page: the tables, rank 0's graph and a before/after view of one block."""
        from .viz import to_html

        return to_html(self)

    def save(self, path: str | Path) -> Path:
        """Write the report as .json, .dot, .svg or .html, chosen by the suffix of `path`."""
        path = Path(path)
        writers = {".json": self.to_json, ".dot": self.to_dot, ".svg": self.to_svg, ".html": self.to_html}
        writer = writers.get(path.suffix.lower())
        if writer is None:
            raise ValueError(f"cannot save a report as {path.name!r}: use a suffix among {sorted(writers)}.")
        path.write_text(writer(), encoding="utf-8")
        return path

    def _title(self, which: str) -> str:
        if which == "rank0":
            return f"rank 0 of {self.layout}" if self.layout else "MoE graph"
        return f"{which} graph"

    def tables(self) -> list[Table]:
        """Every table of the report, built once; `str(report)` and `to_html()` render the same tables."""
        converted = {b.index if not isinstance(b, dict) else b["index"] for b in self.blocks}
        ffns = Table("FFNs", ["#", "module path", "kind", "activation", "H", "F", "MoE"], numeric=(0, 4, 5),
                     anchor="ffns")
        for f in self.ffns_found:
            ffns.rows.append([f["index"], f["path"], f["kind"], f["activation"], f["hidden_dim"], f["ffn_dim"],
                              "yes" if f["index"] in converted else "-"])
        params = Table("Parameters", ["", "total", "active per token"], numeric=(1, 2), anchor="parameters",
                       rows=[["dense", _fmt_count(self.params_dense), _fmt_count(self.params_dense)],
                             ["MoE", _fmt_count(self.params_moe), _fmt_count(self.params_active)]])
        tables = [ffns, params]
        if self.parallel is not None:
            tables += self._parallel_tables()
        return tables

    def _parallel_tables(self) -> list[Table]:
        """Sharding, collectives per step and the DTD/CAC comparison (rank 0)."""
        sharded = [p for p in self.parameters if p["splits"]]
        sizes = sorted(set(self.param_bytes_per_rank.values()))
        sharding = Table(f"Sharded parameters (rank 0; {len(self.parameters) - len(sharded)} others replicated)",
                         ["parameter", "full shape", "split (axis:dim)", "rank-0 shape"], anchor="sharding")
        for p in sharded:
            chunks = f" per chunk {p['chunks']}" if p["chunks"] else ""
            sharding.rows.append([p["name"], str(tuple(p["full_shape"])), Chips(p["splits"], chunks),
                                  str(tuple(p["local_shape"]))])
        sharding.notes = [
            f"layout: {self.layout}" + "".join(f"; {c}" for c in (self.dtd_choice, self.chunks_choice) if c),
            "parameter bytes per rank: " + ", ".join(_fmt_count(b) + "B" for b in sizes)]
        comm = Table("Collectives per training step (rank 0)", ["kind", "axis", "phase", "calls", "bytes"],
                     numeric=(3, 4), anchor="collectives")
        for kind, axis, phase, calls, nbytes in self.comm_table:
            comm.rows.append([kind, Chips([axis]), phase, calls, _fmt_count(nbytes) + "B"])
        chunks = self.parallel.get("a2a_chunks", 1)
        chunks = 1 if chunks == "auto" else chunks
        if chunks > 1 and self.parallel.get("expert", 1) > 1:
            comm.notes = [f"a2a_chunks={chunks}: each MoE block's all-to-alls run in {chunks} chunks of the capacity, "
                          f"overlapped with expert compute ({chunks}x the calls, the same bytes)"]
        variants = Table("With and without DTD and CAC (rank 0, per step)",
                         ["variant", "all-to-all calls", "all-to-all bytes", "all bytes"], numeric=(1, 2, 3),
                         anchor="variants")
        current = (bool(self.parallel.get("dtd")), bool(self.parallel.get("cac")))
        for name, totals in self.comm_variants.items():
            a2a = [cb for key, cb in totals.items() if key.startswith("all_to_all/")]
            mine = ("dtd" in name, "cac" in name) == current
            variants.rows.append([name + (" (this layout)" if mine else ""), sum(c for c, _ in a2a),
                                  _fmt_count(sum(b for _, b in a2a)) + "B",
                                  _fmt_count(sum(b for _, b in totals.values())) + "B"])
        memory = [self._memory_table()] if self.training_memory else []
        return [sharding, *memory, comm] + ([variants] if self.comm_variants else [])

    def _memory_table(self) -> Table:
        """Rank 0's training memory by ZeRO stage and tiling (tedfx.optimizer with AdamW)."""
        m = self.training_memory
        table = Table(f"Training memory (rank 0, {m['precision']}, tedfx.optimizer with {m['optimizer']}, "
                      f"no activations)", ["zero", "step", "weights", "grads", "fp32 master", "optimizer states",
                                           "step transient", "peak"], numeric=tuple(range(2, 8)), anchor="memory")
        for row in m["rows"]:
            step = "untiled" if row["tile_numel"] is None else f"tiles of {_fmt_count(row['tile_numel'])}"
            mine = " (this layout)" if row["zero"] == m["zero"] else ""
            table.rows.append([f"{row['zero']}{mine}", step] + [_fmt_count(row[k]) + "B" for k in (
                "weights", "grads", "master", "optimizer_states", "step_transient", "peak")])
        table.notes = ["step transient: what the optimizer step allocates at once on top of the rest (fp32 copies "
                       "of a tile's 16-bit gradients and AdamW's temporaries)"]
        return table

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=120, force_terminal=False, color_system=None)
        moe = self.moe
        console.print(f"tedfx: {self.model} -> MoE (E={moe['num_experts']}, k={moe['top_k']}, "
                      f"capacity_factor={moe['capacity_factor']}, layers={moe['layers']!r})")
        for table in self.tables():
            for note in table.notes:
                console.print(note)
            console.print(table.to_rich())
        if self.pass_timings:
            console.print("passes: " + ", ".join(f"{name} {sec * 1e3:.0f} ms" for name, sec in self.pass_timings))
        return buf.getvalue()

    def html_tables(self) -> str:
        """The report's tables as HTML sections (FFNs, parameters; sharding, collectives and DTD/CAC when parallel)."""
        return "\n".join(table.to_html() for table in self.tables())


@dataclass
class Chips:
    """A table cell of mesh axes (or "axis:dim" splits): plain text in a terminal, coloured chips in HTML."""

    splits: list[str]
    suffix: str = ""

    def __str__(self) -> str:
        return ", ".join(self.splits) + self.suffix

    def html(self) -> str:
        from .viz import AXIS_COLORS

        chips = " ".join(f'<span class="chip" style="background:{AXIS_COLORS.get(s.split(":")[0], "#6b7280")}">'
                         f"{html.escape(s)}</span>" for s in self.splits)
        return chips + html.escape(self.suffix)


@dataclass
class Table:
    """One table of a Report: built once, rendered for the terminal (rich) or as HTML."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    numeric: tuple[int, ...] = ()
    """Columns aligned right."""
    anchor: str = ""
    """The HTML section id."""
    notes: list[str] = field(default_factory=list)
    """Lines printed before the table."""

    def to_rich(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, title_justify="left")
        for i, col in enumerate(self.columns):
            table.add_column(col, justify="right" if i in self.numeric else "left")
        for row in self.rows:
            table.add_row(*(str(cell) for cell in row))
        return table

    def to_html(self) -> str:
        def cell(i: int, value: Any) -> str:
            text = value.html() if isinstance(value, Chips) else html.escape(str(value))
            return f'<td class="num">{text}</td>' if i in self.numeric else f"<td>{text}</td>"

        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in self.rows)
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return (f'<section id="{self.anchor}"><h2>{html.escape(self.title)}</h2>{notes}'
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>")
