"""Pictures of tedfx graphs and reports: DOT, self-laid-out SVG and a self-contained HTML page.

Everything here is pure Python over `tedfx.graph_summary` node lists, so a
saved report can be drawn anywhere (no graphviz binary, no browser scripts).

Colours: collectives by mesh axis (tp, ep, edp, dp each its own), MoE ops
violet, sharded parameters amber, collapsed runs of aten ops grey.

The SVG layout is a small layered (Sugiyama-style) drawing, in order:
1. Layer every box by longest path from the inputs, then pull each box down
   to just above its first consumer (parameters sit next to their op).
2. Split edges that span several layers with invisible waypoints, so long
   edges (residuals, the router's plan) route around boxes.
3. Order each layer by the barycenter of its neighbours, sweeping down and up.
4. Fix the longest path (the residual stream) as a straight spine, then place
   every other box over its neighbours, long edges before boxes, never overlapping.
"""

from __future__ import annotations

import html
import zlib
from collections import defaultdict
from typing import Any

import networkx as nx

from .display import display_graph

__all__ = ["AXIS_COLORS", "MOE_COLOR", "PARAM_COLOR", "to_dot", "to_html", "to_svg"]

AXIS_COLORS: dict[str, str] = {"tp": "#2563eb", "ep": "#dc2626", "edp": "#16a34a", "dp": "#0891b2"}
"""Stroke colour of a collective, by mesh axis."""
AXIS_FILLS: dict[str, str] = {"tp": "#dbeafe", "ep": "#fee2e2", "edp": "#dcfce7", "dp": "#cffafe"}
MOE_COLOR, MOE_FILL = "#7c3aed", "#ede9fe"
PARAM_COLOR, PARAM_FILL = "#b45309", "#fef3c7"
REGION_COLOR = "#0f766e"
_STYLE = {  # kind -> (stroke, fill, corner radius, dashed)
    "io": ("#111827", "#ffffff", 14, False),
    "op": ("#9ca3af", "#ffffff", 4, False),
    "group": ("#9ca3af", "#f3f4f6", 4, False),
    "moe": (MOE_COLOR, MOE_FILL, 4, False),
    "param": (PARAM_COLOR, PARAM_FILL, 0, False),
    "ref": ("#9ca3af", "#ffffff", 4, True),
    "elided": ("#6b7280", "#f9fafb", 4, True),
}
_LEGEND = [(f"{axis} collective", AXIS_COLORS[axis], AXIS_FILLS[axis]) for axis in AXIS_COLORS] + [
    ("MoE op", MOE_COLOR, MOE_FILL), ("sharded parameter", PARAM_COLOR, PARAM_FILL),
    ("aten ops (collapsed)", "#9ca3af", "#f3f4f6")]
_FONT = "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace"
_TITLE_PX, _TEXT_PX, _LINE_H = 12, 10.5, 13
_CHAR_W = 0.61  # monospace advance per px of font size
_GAP_X, _GAP_Y = 18, 34


def _style(item: dict[str, Any]) -> tuple[str, str, int, bool]:
    """(stroke, fill, corner radius, dashed) of a box."""
    if item["kind"] == "collective":
        axis = item["axis"] or ""
        return AXIS_COLORS.get(axis, "#374151"), AXIS_FILLS.get(axis, "#f3f4f6"), 4, False
    return _STYLE[item["kind"]]


# --- DOT -------------------------------------------------------------------------------------------


def _dot_str(text: str) -> str:
    """A DOT quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_node(item: dict[str, Any]) -> str:
    """One box as a DOT node statement, in the SVG's colours."""
    stroke, fill, radius, dashed = _style(item)
    style = ",".join(["filled"] + (["rounded"] if radius else []) + (["dashed"] if dashed else []))
    label = _dot_str("\n".join(line for line in item["lines"] if line)).replace("\n", "\\n")
    return (f"    {_dot_str(item['id'])} [label={label}, style={_dot_str(style)}, color={_dot_str(stroke)}, "
            f"fillcolor={_dot_str(fill)}, penwidth={2 if item['kind'] == 'collective' else 1}];")


def to_dot(nodes: list[dict[str, Any]], title: str = "tedfx graph", *, collapse: bool = True) -> str:
    """A DOT digraph of a summarized graph: one cluster per transformer block and per MoE block.

    Args:
        nodes: a `summarize_graph` list.
        title: the graph's label.
        collapse: collapse runs of plain aten ops as the SVG does; False draws every node.

    Example:
        >>> open("rank0.dot", "w").write(to_dot(report.graphs["rank0"]))  # then: dot -Tsvg rank0.dot
    """
    items = display_graph(nodes, collapse=collapse)
    lines = [f"digraph {_dot_str(title)} {{",
             f"  graph [label={_dot_str(title)}, labelloc=t, fontname=\"monospace\", rankdir=TB, nodesep=0.25];",
             "  node [shape=box, fontname=\"monospace\", fontsize=10];",
             "  edge [color=\"#6b7280\", arrowsize=0.6];"]
    clusters: dict[str | None, dict[str | None, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        clusters[item["block"]][item["moe_path"]].append(item)
    for block, by_moe in clusters.items():
        if block is not None:
            lines.append(f"  subgraph {_dot_str('cluster_' + block)} {{ label={_dot_str('block ' + block)}; "
                         f"style=rounded; color=\"#9ca3af\";")
        for moe_path, members in by_moe.items():
            if moe_path is not None:
                label = _dot_str("MoE " + moe_path)
                lines.append(f"  subgraph {_dot_str('cluster_moe_' + moe_path)} {{ label={label}; "
                             f"style=\"rounded,dashed\"; color=\"{MOE_COLOR}\";")
            lines += [_dot_node(item) for item in members]
            lines += ["  }"] if moe_path is not None else []
        lines += ["  }"] if block is not None else []
    for item in items:
        for src in item["inputs"]:
            lines.append(f"  {_dot_str(src)} -> {_dot_str(item['id'])};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- layout ----------------------------------------------------------------------------------------


def _box_size(lines: list[str]) -> tuple[float, float]:
    """Width and height of a box holding `lines` (a bold title, then smaller text)."""
    widths = [len(lines[0]) * _TITLE_PX * _CHAR_W] + [len(s) * _TEXT_PX * _CHAR_W for s in lines[1:]]
    return max(widths) + 2 * 8, 9 + _LINE_H * len(lines)


def _layers(g: nx.DiGraph, order: dict[str, int]) -> dict[str, int]:
    """Step 1: longest path from the inputs, then every box as late as its consumers allow."""
    topo = list(nx.lexicographical_topological_sort(g, key=order.__getitem__))
    layer: dict[str, int] = {}
    for n in topo:
        layer[n] = max((layer[p] + 1 for p in g.predecessors(n)), default=0)
    for n in reversed(topo):
        if g.out_degree(n):
            layer[n] = max(layer[n], min(layer[s] for s in g.successors(n)) - 1)
    return layer


def _layout(items: list[dict[str, Any]]) -> tuple[dict[str, tuple[float, float, float, float]], list[list]]:
    """Boxes {id: (x_center, y_top, width, height)} and edge polylines [[(x, y), ...], ...]."""
    order = {item["id"]: i for i, item in enumerate(items)}
    g = nx.DiGraph()
    g.add_nodes_from(order)
    g.add_edges_from((src, item["id"]) for item in items for src in item["inputs"] if src in order)
    layer = _layers(g, order)
    light = {item["id"] for item in items if item["kind"] in ("param", "ref")}
    size = {item["id"]: _box_size([s for s in item["lines"] if s]) for item in items}
    # Step 2: waypoints for edges that span layers.
    chains: list[list[str]] = []
    for src, dst in g.edges:
        chain = [src] + [f"\0{src}\0{dst}\0{k}" for k in range(layer[src] + 1, layer[dst])] + [dst]
        for k, w in enumerate(chain[1:-1], start=layer[src] + 1):
            layer[w], size[w] = k, (6.0, 0.0)
        chains.append(chain)
    ups, downs = defaultdict(list), defaultdict(list)
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            downs[a].append(b)
            ups[b].append(a)
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in sorted(layer, key=lambda n: (order.get(n, len(order)), n)):
        rows[layer[n]].append(n)
    # Step 3: barycenter ordering.
    for sweep in range(6):
        neighbours, seq = (ups, rows[1:]) if sweep % 2 == 0 else (downs, rows[-2::-1])
        for row in seq:
            rank = {n: i for r in rows for i, n in enumerate(r)}
            bary = {n: sum(rank[m] for m in neighbours[n]) / len(neighbours[n]) if neighbours[n] else rank[n]
                    for n in row}
            row.sort(key=lambda n: bary[n])
    # Step 4: x positions; long edges stay straight first, then the busiest boxes, parameters last.
    # The longest path (the residual stream, through every block) is the fixed spine at x = 0.
    spine = set(nx.dag_longest_path(g)) if len(g) else set()
    prio = {n: 0.0 if n in light else (50.0 if n.startswith("\0") else len(ups[n]) + len(downs[n])) for n in layer}
    prio.update({n: 1000.0 for n in spine})
    x: dict[str, float] = {}
    for row in rows:
        left = 0.0
        for n in row:
            x[n] = left + size[n][0] / 2
            left += size[n][0] + _GAP_X
    for sweep in range(12):
        neighbours, seq = (ups, rows) if sweep % 2 == 0 else (downs, rows[::-1])
        for row in seq:
            want = [0.0 if n in spine else _mean_x(n, neighbours[n], x, light) for n in row]
            _place_row(row, want, x, size, prio)
    y, tops = 0.0, []
    for row in rows:
        tops.append(y)
        y += max((size[n][1] for n in row), default=0) + _GAP_Y
    min_x = min((x[n] - size[n][0] / 2 for n in x), default=0.0)
    boxes = {n: (x[n] - min_x, tops[layer[n]], *size[n]) for n in order}
    waypoints = {n: (x[n] - min_x, tops[layer[n]], max((size[m][1] for m in rows[layer[n]]), default=0))
                 for n in x if n not in order}
    return boxes, _edge_paths(chains, boxes, waypoints)


def _mean_x(n: str, neighbours: list[str], x: dict[str, float], light: set[str]) -> float:
    """Where a box would like to be: over its neighbours, leaning to the data flow rather than parameters."""
    if not neighbours:
        return x[n]
    weights = [0.2 if m in light else 1.0 for m in neighbours]
    return sum(w * x[m] for w, m in zip(weights, neighbours)) / sum(weights)


def _place_row(row: list[str], want: list[float], x: dict[str, float], size: dict, prio: dict[str, float]) -> None:
    """Put the boxes of `row` where they want to be, most important first, keeping their order.

    Each box is clamped between the boxes already placed on either side, leaving
    room for the boxes still to come between them, so nothing ever overlaps.
    """
    widths = [size[n][0] for n in row]
    pos: dict[int, float] = {}
    for i in sorted(range(len(row)), key=lambda i: -prio.get(row[i], 0.0)):
        lo, hi = float("-inf"), float("inf")
        for j, p in pos.items():
            between = sum(widths[min(i, j) + 1:max(i, j)]) + _GAP_X * abs(i - j)
            dist = widths[i] / 2 + widths[j] / 2 + between
            if j < i:
                lo = max(lo, p + dist)
            else:
                hi = min(hi, p - dist)
        pos[i] = min(max(want[i], lo), hi)
    for i, n in enumerate(row):
        x[n] = pos[i]


def _edge_paths(chains, boxes, waypoints) -> list[list[tuple[float, float]]]:
    """Polylines from the bottom of each source to the top of its consumer, spread over the box edges."""
    outs, ins = defaultdict(list), defaultdict(list)
    for i, chain in enumerate(chains):
        outs[chain[0]].append(i)
        ins[chain[-1]].append(i)

    def first_x(i: int, at: int) -> float:
        n = chains[i][at]
        return boxes[n][0] if n in boxes else waypoints[n][0]

    port: dict[tuple[int, int], float] = {}
    for ports, at, end in ((outs, 1, 0), (ins, -2, -1)):
        for n, edges in ports.items():
            edges.sort(key=lambda i: first_x(i, at))
            cx, _, w, _ = boxes[n]
            span = min(w * 0.6, 14.0 * (len(edges) - 1))
            for k, i in enumerate(edges):
                port[(i, end)] = cx - span / 2 + (span * k / (len(edges) - 1) if len(edges) > 1 else span / 2)
    paths = []
    for i, chain in enumerate(chains):
        src, dst = boxes[chain[0]], boxes[chain[-1]]
        pts = [(port[(i, 0)], src[1] + src[3])]
        for w in chain[1:-1]:
            wx, top, h = waypoints[w]
            pts += [(wx, top), (wx, top + h)]
        pts.append((port[(i, -1)], dst[1]))
        paths.append(pts)
    return paths


# --- SVG -------------------------------------------------------------------------------------------


def _svg_path(pts: list[tuple[float, float]]) -> str:
    """An SVG path through `pts`: straight where vertical, an S-curve where it changes column."""
    d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if abs(x0 - x1) < 0.5:
            d += f" L{x1:.1f},{y1:.1f}"
        else:
            m = (y0 + y1) / 2
            d += f" C{x0:.1f},{m:.1f} {x1:.1f},{m:.1f} {x1:.1f},{y1:.1f}"
    return d


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _legend_svg(x: float, y: float, max_width: float) -> tuple[list[str], float]:
    """The colour key, wrapped to `max_width`; returns its parts and its height."""
    parts, cx, cy = [], x, y
    for label, stroke, fill in _LEGEND:
        step = 19 + len(label) * _TEXT_PX * _CHAR_W + 16
        if cx > x and cx + step > x + max_width:
            cx, cy = x, cy + 17
        parts.append(f'<rect x="{cx:.1f}" y="{cy:.1f}" width="14" height="11" rx="2" fill="{fill}" '
                     f'stroke="{stroke}" stroke-width="1.5"/>')
        parts.append(f'<text x="{cx + 19:.1f}" y="{cy + 9.5:.1f}" font-size="{_TEXT_PX}" fill="#374151">'
                     f'{_esc(label)}</text>')
        cx += step
    return parts, cy + 17 - y


def _node_svg(item: dict[str, Any], box: tuple[float, float, float, float]) -> str:
    """One box: a <g> with data-kind / data-axis, a tooltip naming its graph nodes, and its text."""
    cx, top, w, h = box
    stroke, fill, radius, dashed = _style(item)
    width = 2.2 if item["kind"] == "collective" else 1.2
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    tip = ", ".join(item["members"][:24]) + (" ..." if len(item["members"]) > 24 else "")
    if item["kind"] == "param" and item["block"]:
        tip = f"{item['block']}.{item['lines'][0]}"
    parts = [f'<g class="node {item["kind"]}" data-id="{_esc(item["id"])}" data-kind="{item["kind"]}"'
             + (f' data-axis="{_esc(item["axis"])}"' if item["axis"] else "") + ">",
             f"<title>{_esc(tip or item['lines'][0])}</title>",
             f'<rect x="{cx - w / 2:.1f}" y="{top:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{radius}" '
             f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"{dash}/>']
    axes = [s.split(":")[0] for s in item.get("split") or ()]
    for k, axis in enumerate(axes):  # a parameter gets one stripe per mesh axis it is split over
        parts.append(f'<rect x="{cx - w / 2 + k * w / len(axes):.1f}" y="{top + h - 4:.1f}" '
                     f'width="{w / len(axes):.1f}" height="4" fill="{AXIS_COLORS.get(axis, PARAM_COLOR)}"/>')
    lines = [s for s in item["lines"] if s]
    for i, text in enumerate(lines):
        size, weight = (_TITLE_PX, "bold") if i == 0 else (_TEXT_PX, "normal")
        color = stroke if i == 0 and item["kind"] in ("collective", "moe", "param") else "#111827"
        parts.append(f'<text x="{cx:.1f}" y="{top + 4 + _LINE_H * (i + 1) - 2:.1f}" font-size="{size}" '
                     f'font-weight="{weight}" fill="{color}" text-anchor="middle">{_esc(text)}</text>')
    parts.append("</g>")
    return "".join(parts)


def _frames(items: list[dict[str, Any]], boxes: dict, highlight: str | None) -> list[list]:
    """[x0, y0, x1, y1, label, colour, dashed, ids] of the frames behind the boxes: transformer blocks,
    MoE blocks, checkpointed regions and the `highlight`ed module; each wide enough for its label and,
    for a block, for the frames nested in it."""
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    for item in items:
        module = item.get("module") or ""
        for kind, name in (("block", item["block"]), ("moe", item["moe_path"]), ("region", item.get("region")),
                           ("ffn", highlight if highlight and f"{module}.".startswith(f"{highlight}.") else None)):
            if name:
                members[(kind, name)].append(item["id"])
    labels = {"block": "block {}", "moe": "MoE {}", "region": "{} (recomputed in backward)",
              "ffn": "FFN {} (becomes the MoE block)"}
    colors = {"block": "#9ca3af", "moe": MOE_COLOR, "region": REGION_COLOR, "ffn": MOE_COLOR}
    frames = []
    for (kind, name), ids in sorted(members.items(), key=lambda kv: kv[0][0] != "block"):  # blocks behind
        label, color, dashed = labels[kind].format(name), colors[kind], kind != "block"
        pad = 5 if dashed else 14
        x0 = min(boxes[i][0] - boxes[i][2] / 2 for i in ids) - pad
        x1 = max(max(boxes[i][0] + boxes[i][2] / 2 for i in ids) + pad, x0 + len(label) * _TEXT_PX * _CHAR_W + 16)
        y0 = min(boxes[i][1] for i in ids) - (16 if dashed else 20)
        y1 = max(boxes[i][1] + boxes[i][3] for i in ids) + (5 if dashed else 8)
        frames.append([x0, y0, x1, y1, label, color, dashed, set(ids)])
    for outer in frames:
        for inner in frames:
            if inner is not outer and not outer[6] and inner[7] <= outer[7]:
                outer[0], outer[2] = min(outer[0], inner[0] - 8), max(outer[2], inner[2] + 8)
    return frames


def _items_svg(items: list[dict[str, Any]], title: str, *, highlight: str | None = None,
               legend: bool = True) -> str:
    """Lay out and draw display items (see `display_graph`) as one standalone SVG."""
    boxes, paths = _layout(items)
    frames = _frames(items, boxes, highlight)
    left = min([b[0] - b[2] / 2 for b in boxes.values()] + [f[0] for f in frames] + [0.0])
    right = max([b[0] + b[2] / 2 for b in boxes.values()] + [f[2] for f in frames] + [0.0])
    margin = 16.0
    inner_w = max(right - left, len(title) * 15 * _CHAR_W, 200.0)
    key, key_h = _legend_svg(margin, 32 if title else 8, inner_w) if legend else ([], 0.0)
    head = (36 if title else 12) + key_h + 8
    off_x, off_y = margin - left, head - min([f[1] for f in frames] + [b[1] for b in boxes.values()] + [0.0])
    width = max(inner_w + 2 * margin, max([f[2] for f in frames] + [0.0]) + off_x + margin)
    height = max([b[1] + b[3] for b in boxes.values()] + [f[3] for f in frames] + [0.0]) + off_y + margin
    uid = f"arrow{zlib.crc32(f'{title}/{len(items)}'.encode()):08x}"  # unique per picture on one page
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{_esc(_FONT)}">',
           f'<defs><marker id="{uid}" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
           f'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#6b7280"/></marker></defs>',
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
           f'<text x="{margin}" y="22" font-size="15" font-weight="bold" fill="#111827">{_esc(title)}</text>'
           if title else "",
           *key, f'<g transform="translate({off_x:.1f},{off_y:.1f})">']
    for x0, y0, x1, y1, label, color, dashed, _ in frames:
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        fill = "none" if dashed else "#fafafa"
        out.append(f'<rect class="cluster" data-label="{_esc(label)}" x="{x0:.1f}" y="{y0:.1f}" '
                   f'width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" rx="8" fill="{fill}" stroke="{color}" '
                   f'stroke-width="1.2"{dash}/>')
    for pts in paths:
        out.append(f'<path d="{_svg_path(pts)}" fill="none" stroke="#9ca3af" stroke-width="1.2" '
                   f'marker-end="url(#{uid})"/>')
    for x0, y0, _, _, label, color, _, _ in frames:  # over the edges, on a backing, so they stay legible
        out.append(f'<rect x="{x0 + 4:.1f}" y="{y0 + 3:.1f}" width="{len(label) * _TEXT_PX * _CHAR_W + 8:.1f}" '
                   f'height="13" fill="#fafafa"/><text x="{x0 + 8:.1f}" y="{y0 + 13:.1f}" '
                   f'font-size="{_TEXT_PX}" font-weight="bold" fill="{color}">{_esc(label)}</text>')
    for item in items:
        out.append(_node_svg(item, boxes[item["id"]]))
    out += ["</g>", "</svg>"]
    return "\n".join(out) + "\n"


def to_svg(
    nodes: list[dict[str, Any]],
    title: str = "tedfx graph",
    *,
    collapse: bool = True,
    expand: tuple[str, ...] = (),
    block: str | None = None,
    max_blocks: int | None = None,
    highlight: str | None = None,
    legend: bool = True,
) -> str:
    """A standalone SVG picture of a summarized graph, laid out here (no graphviz needed).

    Args:
        nodes: a `summarize_graph` list.
        title: printed above the picture.
        collapse, expand, block, max_blocks: what to draw, as in `tedfx.display.display_graph`.
        highlight: a module path framed with a dashed violet border (the dense FFN of a before/after).
        legend: draw the colour key under the title.

    Example:
        >>> open("rank0.svg", "w").write(to_svg(report.graphs["rank0"], "rank 0"))
    """
    items = display_graph(nodes, collapse=collapse, expand=expand, block=block, max_blocks=max_blocks)
    return _items_svg(items, title, highlight=highlight, legend=legend)


# --- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #111827; margin: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #4b5563; margin: 0 0 12px; } nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid #e5e7eb; padding: 3px 9px; text-align: left; }
th { background: #f3f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.chip { display: inline-block; padding: 0 6px; border-radius: 3px; color: #fff; font-size: 12px; margin-right: 3px; }
.scroll { overflow: auto; border: 1px solid #e5e7eb; max-width: 100%; }
.pair { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; }
.pair figure { margin: 0; border: 1px solid #e5e7eb; overflow: auto; max-width: 100%; }
figcaption { font-weight: 600; padding: 6px 10px; background: #f9fafb; border-bottom: 1px solid #e5e7eb; }
"""


def _before_after_html(report: Any) -> list[str]:
    """One transformer block drawn from the dense graph and from the rewritten one, side by side."""
    dense, after = report.graphs.get("dense"), report.graphs.get("rank0")
    if not dense or not after:
        return []
    from .display import block_of

    moe_paths = [n["moe_path"] for n in after if n["moe_path"]]
    if not moe_paths:
        return []
    ffn, block = moe_paths[0], block_of(moe_paths[0])
    if block is None:
        return []
    where = "rank 0" if report.parallel is not None else "MoE model"
    return [f'<section id="before-after"><h2>Before and after: transformer block {_esc(block)}</h2>',
            f"<p>The dense FFN <code>{_esc(ffn)}</code> (framed) becomes the MoE block on the right.</p>",
            '<div class="pair">',
            f"<figure><figcaption>dense: block {_esc(block)}</figcaption>"
            f"{to_svg(dense, '', block=block, expand=(ffn,), highlight=ffn, legend=False)}</figure>",
            f"<figure><figcaption>{where}: block {_esc(block)}</figcaption>"
            f"{to_svg(after, '', block=block, legend=False)}</figure>",
            "</div></section>"]


def to_html(report: Any, *, max_blocks: int = 4) -> str:
    """A self-contained HTML page of a `tedfx.Report`: its tables and pictures, no external assets.

    Args:
        report: what `tedfx.explain` returned (or `Report.from_json` read back).
        max_blocks: transformer blocks drawn in the whole-graph picture; later ones are summarised.

    Example:
        >>> open("report.html", "w").write(to_html(tedfx.explain(model, (tokens,), moe=moe)))
    """
    moe = report.moe
    layout = f" · {_esc(report.layout)}" if report.layout else " · one process"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tedfx report: {_esc(report.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>tedfx: {_esc(report.model)} → Mixture of Experts</h1>",
        f'<p class="meta">E={_esc(moe["num_experts"])}, k={_esc(moe["top_k"])}, '
        f'capacity factor {_esc(moe["capacity_factor"])}, layers={_esc(repr(moe["layers"]))}{layout}</p>',
        '<nav><a href="#ffns">FFNs</a><a href="#parameters">parameters</a>'
        + ('<a href="#sharding">sharding</a><a href="#collectives">collectives</a><a href="#variants">DTD/CAC</a>'
           if report.parallel is not None else "")
        + '<a href="#graph">graph</a><a href="#before-after">before/after</a></nav>',
        report.html_tables(),
    ]
    if report.graphs.get("rank0"):
        title = "rank 0's graph" if report.parallel is not None else "the MoE graph"
        picture = {"max_blocks": max_blocks}
        parts += [f'<section id="graph"><h2>{title[0].upper() + title[1:]}</h2>',
                  "<p>Runs of plain aten ops are collapsed per module; every MoE op, collective (with its mesh "
                  "axis, forward and backward communication, shape and bytes sent) and sharded parameter is "
                  "drawn. Hover a box for the graph nodes it stands for.</p>",
                  f'<div class="scroll">{to_svg(report.graphs["rank0"], f"{report.model}: {title}", **picture)}'
                  "</div></section>"]
    parts += _before_after_html(report)
    if report.pass_timings:
        timings = ", ".join(f"{_esc(name)} {sec * 1e3:.0f} ms" for name, sec in report.pass_timings)
        parts.append(f'<section id="passes"><h2>Passes</h2><p>{timings}</p></section>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
