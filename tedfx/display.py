"""The boxes and arrows of a picture of a summarized graph: pure Python, no torch.

`display_graph` turns a `tedfx.graph_summary.summarize_graph` node list into
what a picture draws: runs of plain aten ops collapse into one box per module,
while every MoE op, every collective and every sharded parameter keeps its own
box. `tedfx.viz` lays out and draws these boxes; since nothing here needs
torch, a saved report can be drawn again anywhere.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

__all__ = ["block_of", "display_graph"]

_ROUTER_OUTPUTS = ("expert", "slot", "gate", "capacity", "loss")
"""MoE roles of the getitems that unpack the router's plan: drawn as part of the router."""


def block_of(module: str) -> str | None:
    """The transformer block a module path sits in: its longest prefix ending in an index ("h.0.attn" -> "h.0")."""
    parts = module.split(".") if module else []
    for i in range(len(parts), 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return None


def _group_key(module: str) -> str:
    """Plain ops collapse per block child ("h.0.attn.c_attn" -> "h.0.attn"); outside blocks, per run."""
    block = block_of(module)
    if block is None:
        return ""
    rest = module[len(block):].lstrip(".")
    return f"{block}.{rest.split('.')[0]}" if rest else block


def display_graph(
    nodes: list[dict[str, Any]],
    *,
    collapse: bool = True,
    expand: Iterable[str] = (),
    block: str | None = None,
    max_blocks: int | None = None,
) -> list[dict[str, Any]]:
    """The boxes of a picture of a summarized graph, in graph order.

    Args:
        nodes: a `summarize_graph` list.
        collapse: merge each run of consecutive plain ops of one module (a block
            child such as "h.0.attn", or a top-level module) into one box. MoE ops,
            collectives, sharded parameters, inputs and outputs always get their own.
        expand: module paths whose plain ops are drawn one by one anyway.
        block: draw only this transformer block ("h.0"); its inputs from outside
            become "from ..." boxes.
        max_blocks: draw at most this many transformer blocks; the later ones
            become one box that counts what they hold.

    Returns:
        Dicts with keys id, kind ("io", "op", "group", "moe", "collective",
        "param", "ref", "elided"), lines (text, first line the title), axis,
        block, moe_path, module, region, split (a parameter's ["tp:0", ...]), members
        (summary node names) and inputs (ids).
    """
    expand = tuple(expand)
    shown: dict[str, str | None] = {}
    items: list[dict[str, Any]] = []
    open_group: dict[str, Any] | None = None
    used = {i for n in nodes for i in n["inputs"]}
    for n in nodes:
        kind = _kind(n, collapse, expand, used)
        if kind == "hidden":
            shown[n["name"]] = None
            continue
        if kind == "alias":  # the router's unpacked plan: drawn as the router
            shown[n["name"]] = shown.get(n["inputs"][0]) if n["inputs"] else None
            continue
        key = _group_key(n["module"]) if kind == "group" else None
        if kind == "group" and open_group is not None and (open_group["key"], open_group["region"]) == (
                key, n["region"]):
            open_group["members"].append(n)
            shown[n["name"]] = open_group["id"]
            continue
        item = {"id": n["name"], "kind": kind, "key": key, "members": [n], "region": n["region"],
                "moe_path": n["moe_path"] if kind != "group" else None,
                "block": block_of(n["moe_path"] or key or n["module"]), "axis": n["axis"], "module": n["module"],
                "split": n["param_split"]}
        items.append(item)
        shown[n["name"]] = item["id"]
        if kind != "param":  # parameters are read where they are used: they do not end a run
            open_group = item if kind == "group" else None
    for item in items:
        ids = [shown.get(i) for m in item["members"] for i in m["inputs"]]
        item["inputs"] = list(dict.fromkeys(i for i in ids if i is not None and i != item["id"]))
        item["lines"] = _lines(item)
        item["members"] = [m["name"] for m in item["members"]]
        del item["key"]
    if max_blocks is not None:
        items = _elide_blocks(items, max_blocks)
    if block is not None:
        items = _only_block(items, block)
    return items


def _kind(n: dict[str, Any], collapse: bool, expand: tuple[str, ...], used: set[str]) -> str:
    """How a summary node is drawn: its own box ("io", "param", "collective", "moe", "op"), merged into a
    "group", drawn as its input ("alias"), or not at all ("hidden")."""
    if n["op"] in ("placeholder", "output"):
        return "io"
    if n["op"] == "get_attr":
        if n["name"] not in used or (collapse and not n["param_split"]):
            return "hidden"
        return "param"
    if n["target"] == "GuardsFn" or n["target"].startswith(("aten.sym_", "aten._assert")):
        return "hidden"  # export's input guards, shape arithmetic and metadata assertions
    if n["collective"]:
        return "collective"
    if n["moe_role"] in _ROUTER_OUTPUTS and n["target"] == "getitem":
        return "alias"
    if n["moe_role"]:
        return "moe"
    if not collapse or any(n["module"] == p or n["module"].startswith(p + ".") for p in expand):
        return "op"
    return "group"


def _short(target: str) -> str:
    return target.rpartition(".")[2]


def _fmt_shape(n: dict[str, Any]) -> str:
    if n["shape"] is None:
        return ""
    return "[" + ",".join(str(s) for s in n["shape"]) + "]"


def _fmt_bytes(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int64": "i64", "int32": "i32"}


def _lines(item: dict[str, Any]) -> list[str]:
    """A box's text: its title, then what a reader needs to know about it."""
    members, kind = item["members"], item["kind"]
    n = members[-1]
    if kind == "io":
        return [f"input {n['name']}" if n["op"] == "placeholder" else "output", _fmt_shape(n)]
    if kind == "collective":
        sent = f" · {_fmt_bytes(n['comm_bytes'])}" if n["comm_bytes"] is not None else ""
        dtype = _DTYPES.get(n["dtype"], n["dtype"] or "")
        return [f"{n['collective']} ({n['axis']})", f"fwd {n['comm_forward']} · bwd {n['comm_backward']}",
                f"{_fmt_shape(n)} {dtype}{sent}".strip()]
    if kind == "param":
        chunks = f" per chunk {'/'.join(map(str, n['param_chunks']))}" if n["param_chunks"] else ""
        full = "[" + ",".join(map(str, n["param_full_shape"])) + "]" if n["param_full_shape"] else ""
        split = f"split {', '.join(n['param_split'])}{chunks}" if n["param_split"] else "replicated"
        block = item["block"]  # the block's frame names it: keep the name short
        name = n["param"][len(block) + 1:] if block and n["param"].startswith(block + ".") else n["param"]
        return [name, f"{_fmt_shape(n)} of {full}" if full else _fmt_shape(n), split]
    if kind == "moe":
        return [n["moe_role"], _fmt_shape(n)] if n["shape"] is not None else [n["moe_role"]]
    if kind == "op" or len(members) == 1:
        return [_short(n["target"]), f"{n['module']} {_fmt_shape(n)}".strip()]
    key = _group_key(n["module"])
    if key:
        name = key.rpartition(".")[2]
        name = key if name.isdigit() else name
    else:  # between or around the blocks: name the top-level modules
        tops = list(dict.fromkeys(m["module"].split(".")[0] for m in members if m["module"]))
        name = ", ".join(tops[:3]) + (", ..." if len(tops) > 3 else "") if tops else "model"
    counts = Counter(_ABBREVIATIONS.get(op, op) for op in (_short(m["target"]) for m in members))
    ops = [f"{op} ×{c}" if c > 1 else op
           for op, c in sorted(counts.items(), key=lambda oc: (oc[0] not in _COMPUTE_OPS, -oc[1]))]
    shown = ", ".join(ops[:3]) + (f", +{len(ops) - 3} more" if len(ops) > 3 else "")
    return [f"{name} ({len(members)} ops)", shown, _fmt_shape(n)]


_ABBREVIATIONS = {"scaled_dot_product_attention": "sdpa"}
_COMPUTE_OPS = {"linear", "addmm", "mm", "bmm", "matmul", "sdpa", "softmax", "layer_norm", "rms_norm", "gelu",
                "silu", "relu", "embedding", "baddbmm"}
"""Ops a reader looks for first in a collapsed box's summary."""


def _elide_blocks(items: list[dict[str, Any]], max_blocks: int) -> list[dict[str, Any]]:
    """Merge every item of the transformer blocks after the first `max_blocks` into one box."""
    blocks = list(dict.fromkeys(i["block"] for i in items if i["block"] is not None))
    hidden = set(blocks[max_blocks:])
    if not hidden:
        return items
    gone = [i for i in items if i["block"] in hidden]
    box_id = f"elided:{gone[0]['id']}"
    kinds = Counter(i["kind"] for i in gone)
    box = {"id": box_id, "kind": "elided", "axis": None, "block": None, "moe_path": None, "region": None,
           "module": "", "split": None,
           "members": [m for i in gone for m in i["members"]],
           "lines": [f"{len(hidden)} more block{'s' if len(hidden) > 1 else ''} "
                     f"({blocks[max_blocks]}{' … ' + blocks[-1] if len(hidden) > 1 else ''}), not drawn",
                     f"{kinds['moe']} MoE ops, {kinds['collective']} collectives, {kinds['param']} sharded params"]}
    gone_ids = {i["id"] for i in gone}
    box["inputs"] = list(dict.fromkeys(s for i in gone for s in i["inputs"] if s not in gone_ids))
    out: list[dict[str, Any]] = []
    for item in items:
        if item["id"] in gone_ids:
            if item is gone[0]:
                out.append(box)
            continue
        item = dict(item, inputs=list(dict.fromkeys(box_id if s in gone_ids else s for s in item["inputs"])))
        out.append(item)
    return out


def _only_block(items: list[dict[str, Any]], block: str) -> list[dict[str, Any]]:
    """The items of one block, with a "from ..." box for each value it reads from outside."""
    by_id = {i["id"]: i for i in items}
    kept = [i for i in items if i["block"] == block]
    kept_ids = {i["id"] for i in kept}
    refs: dict[str, dict[str, Any]] = {}
    for item in kept:
        for src in item["inputs"]:
            if src not in kept_ids and src not in refs:
                outside = by_id[src]
                refs[src] = {"id": f"from:{src}", "kind": "ref", "axis": None, "block": None, "moe_path": None,
                             "region": None, "module": "", "split": None, "members": [], "inputs": [],
                             "lines": [f"from {outside['lines'][0]}", *outside["lines"][1:2]]}
    return list(refs.values()) + [dict(i, inputs=[f"from:{s}" if s in refs else s for s in i["inputs"]])
                                  for i in kept]
