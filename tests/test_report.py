"""The Report's pictures: graph summaries, DOT, SVG and the HTML page (a picture a person can open).

Tier (a) of the tests, no processes: `explain` predicts rank 0 of the test GPT
on T=2 x X=2 (world 4) once per module; every test reads that report. The
pictures are checked as data (XML, DOT text, parsed HTML), never by eye.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

import tedfx
from tedfx.display import display_graph
from tedfx.graph_summary import summarize_graph
from tedfx.pipeline import build_moe_graph
from tedfx.predict import predict_rank, simulated_axes
from tedfx.runtime.mesh import Layout
from tedfx.viz import AXIS_COLORS, MOE_COLOR, to_svg

from models import tiny_gpt

SVG = "{http://www.w3.org/2000/svg}"
MOE = tedfx.MoEConfig(num_experts=4)
PARALLEL = tedfx.ParallelConfig(tensor=2, expert=2)
BLOCKS = ("h.0", "h.1")


@pytest.fixture(scope="module")
def report() -> tedfx.Report:
    model, inputs = tiny_gpt()
    return tedfx.explain(model, inputs, moe=MOE, parallel=PARALLEL, world_size=4)


def _svg_boxes(svg: str) -> list[dict]:
    """Every box of an SVG picture: kind, axis, text lines, stroke colour."""
    root = ET.fromstring(svg)
    boxes = []
    for g in root.iter(f"{SVG}g"):
        if "node" not in (g.get("class") or "").split():
            continue
        rect = g.find(f"{SVG}rect")
        boxes.append({"kind": g.get("data-kind"), "axis": g.get("data-axis"), "stroke": rect.get("stroke"),
                      "lines": [t.text for t in g.findall(f"{SVG}text")]})
    return boxes


# --- graph summaries -------------------------------------------------------------------------------


def test_summaries_are_filled_and_json_round_trips(report):
    data = json.loads(report.to_json())
    assert set(data["graphs"]) == {"dense", "rank0"}
    assert data["graphs"] == report.graphs  # plain JSON values already: nothing is lost
    again = tedfx.Report.from_json(report.to_json())
    assert again.to_json() == report.to_json()
    assert again.to_svg() == report.to_svg()  # a saved report draws the same picture


def test_rank0_summary_has_every_moe_op_and_collective(report):
    nodes = report.graphs["rank0"]
    names = {n["name"] for n in nodes}
    assert all(i in names for n in nodes for i in n["inputs"]), "an input names no node of the summary"
    for path in ("h.0.mlp", "h.1.mlp"):
        roles = {n["moe_role"] for n in nodes if n["moe_path"] == path}
        assert {"router", "dispatch", "expert_fc1", "expert_fc2", "combine", "a2a_dispatch", "a2a_combine",
                "dtd_gather", "dtd_reduce_scatter"} <= roles
    kinds = {(n["collective"], n["axis"]) for n in nodes if n["collective"]}
    assert {("all_to_all", "ep"), ("all_reduce", "tp"), ("all_gather", "tp"), ("reduce_scatter", "tp"),
            ("identity_fwd_all_reduce_bwd", "tp")} <= kinds
    dense_targets = {n["target"] for n in report.graphs["dense"]}
    assert "aten.linear" in dense_targets and not any(n["collective"] or n["moe_role"] for n in report.graphs["dense"])


def test_summary_bytes_match_the_predicted_forward_collectives(report):
    """The bytes the picture prints are the ones explain predicts rank 0 sends in the forward."""
    sends_forward = {"all-reduce", "all-to-all", "all-gather", "reduce-scatter"}
    drawn = sorted(n["comm_bytes"] for n in report.graphs["rank0"]
                   if n["collective"] and n["comm_forward"] in sends_forward)
    predicted = sorted(c["nbytes"] for c in report.collectives if c["phase"] == "forward")
    assert drawn == predicted
    a2a = next(n for n in report.graphs["rank0"] if n["collective"] == "all_to_all")
    assert a2a["shape"][0] == MOE.num_experts and a2a["dtype"] == "float32"  # [E, C/T, H] after the DTD slice


def test_sharded_parameters_carry_their_split(report):
    params = {n["param"]: n for n in report.graphs["rank0"] if n["op"] == "get_attr"}
    w1 = params["h.0.mlp.experts.w1"]
    assert w1["param_split"] == ["ep:0", "tp:2"] and w1["param_full_shape"] == [4, 32, 128]
    assert w1["param_shape"] == [2, 32, 64]
    c_attn = params["h.0.attn.c_attn.weight"]
    assert c_attn["param_split"] == ["tp:0"] and c_attn["param_chunks"] == [32, 32, 32]
    assert params["h.0.ln_1.weight"]["param_split"] is None


def test_checkpoint_regions_are_expanded():
    """With activation checkpointing the picture shows what each region recomputes, and CAC's all-to-alls
    outside the regions."""
    model, inputs = tiny_gpt()
    parallel = tedfx.ParallelConfig(tensor=2, expert=2, activation_checkpointing="block")
    moe_model, ctx = build_moe_graph(model, inputs, moe=MOE)
    layout = Layout.build(4, parallel)
    pred = predict_rank(moe_model, ctx, parallel=parallel, layout=layout, rank=0, example_inputs=inputs)
    nodes = summarize_graph(pred.graph, inputs, axes=simulated_axes(layout, 0))
    assert not any(n["target"] == "CheckpointRegion" for n in nodes)
    names = {n["name"] for n in nodes}
    assert all(i in names for n in nodes for i in n["inputs"])
    in_regions = [n for n in nodes if n["region"]]
    assert {n["moe_role"] for n in in_regions} >= {"dispatch", "expert_fc1", "combine"}
    assert all(n["shape"] is not None for n in in_regions if n["moe_role"] == "expert_fc1")
    a2a = [n for n in nodes if n["collective"] == "all_to_all"]
    assert len(a2a) == 4 and all(n["region"] is None for n in a2a)  # CAC keeps them out of recomputation
    svg = to_svg(nodes, "checkpointed")
    assert "recomputed in backward" in svg
    assert sum(b["kind"] == "moe" and b["lines"][0] == "dispatch" for b in _svg_boxes(svg)) == 2


# --- SVG -------------------------------------------------------------------------------------------


def test_svg_parses_and_shows_moe_ops_and_collectives_in_axis_colours(report):
    boxes = _svg_boxes(report.to_svg())
    moe_titles = [b["lines"][0] for b in boxes if b["kind"] == "moe"]
    for role in ("router", "dispatch", "expert_fc1", "expert_fc2", "combine"):
        assert moe_titles.count(role) == len(BLOCKS), role
    assert all(b["stroke"] == MOE_COLOR for b in boxes if b["kind"] == "moe")
    collectives = [b for b in boxes if b["kind"] == "collective"]
    for title, axis, count in (("all_to_all (ep)", "ep", 4), ("all_reduce (tp)", "tp", 2),
                               ("all_gather (tp)", "tp", 2), ("reduce_scatter (tp)", "tp", 2)):
        found = [b for b in collectives if b["lines"][0] == title]
        assert len(found) == count, title
        assert all(b["axis"] == axis and b["stroke"] == AXIS_COLORS[axis] for b in found)
    assert len(set(AXIS_COLORS.values())) == len(AXIS_COLORS)
    a2a = next(b for b in collectives if b["lines"][0] == "all_to_all (ep)")
    assert re.search(r"\[4,\d+,32\] f32 · [\d.]+ (B|KB)", a2a["lines"][-1])  # shape and bytes sent


def test_svg_collapses_plain_ops_but_keeps_sharded_parameters(report):
    nodes = report.graphs["rank0"]
    boxes = _svg_boxes(report.to_svg())
    plain = [n for n in nodes if n["op"] == "call_function" and not n["moe_role"] and not n["collective"]]
    groups = [b["lines"][0] for b in boxes if b["kind"] == "group"]
    assert len(groups) <= len(plain) / 3
    assert any(re.fullmatch(r"attn \(\d+ ops\)", g) for g in groups)
    sharded = {n["param"] for n in nodes if n["op"] == "get_attr" and n["param_split"]}
    params = [b for b in boxes if b["kind"] == "param"]
    assert len(params) == len(sharded) == 14
    w1 = next(b for b in params if b["lines"][0] == "mlp.experts.w1")
    assert w1["lines"][1:] == ["[2,32,64] of [4,32,128]", "split ep:0, tp:2"]
    everything = _svg_boxes(to_svg(nodes, collapse=False))  # one box per op (shape arithmetic aside)
    assert sum(b["kind"] == "op" for b in everything) == sum(not p["target"].startswith("aten.sym_") for p in plain)


def test_display_graph_of_one_block_reads_its_inputs_from_outside(report):
    items = display_graph(report.graphs["rank0"], block="h.1")
    refs = [i for i in items if i["kind"] == "ref"]
    assert len(refs) == 1 and refs[0]["lines"][0] == "from add"  # the residual stream out of h.0
    assert {i["block"] for i in items if i["kind"] != "ref"} == {"h.1"}
    elided = display_graph(report.graphs["rank0"], max_blocks=1)
    assert {i["block"] for i in elided} == {None, "h.0"}
    assert any(i["kind"] == "elided" and i["lines"][0].startswith("1 more block (h.1)") for i in elided)


# --- DOT -------------------------------------------------------------------------------------------


def test_dot_has_clusters_and_coloured_collectives(report):
    dot = report.to_dot()
    assert dot.startswith("digraph ") and dot.count("{") == dot.count("}")
    for block in BLOCKS:
        assert f'subgraph "cluster_{block}"' in dot and f'subgraph "cluster_moe_{block}.mlp"' in dot
    a2a = [line for line in dot.splitlines() if 'label="all_to_all (ep)' in line]
    assert len(a2a) == 4 and all(f'color="{AXIS_COLORS["ep"]}"' in line for line in a2a)
    rs = [line for line in dot.splitlines() if 'label="reduce_scatter (tp)' in line]
    assert len(rs) == 2 and all(f'color="{AXIS_COLORS["tp"]}"' in line for line in rs)
    declared = set(re.findall(r'^\s+"([^"]+)" \[label=', dot, re.M))
    edges = re.findall(r'^\s+"([^"]+)" -> "([^"]+)";', dot, re.M)
    assert edges and all(a in declared and b in declared for a, b in edges)


# --- HTML ------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Collects the tags, section headings and per-figure text of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.headings: dict[str, str] = {}
        self.figures: list[str] = []
        self._section: str | None = None
        self._in_h2 = False
        self._figure_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self._section = attrs.get("id")
        self._in_h2 = tag == "h2"
        if tag == "figure":
            self.figures.append("")
            self._figure_depth += 1

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure_depth -= 1
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2 and self._section:
            self.headings[self._section] = self.headings.get(self._section, "") + data
        if self._figure_depth:
            self.figures[-1] += data + "\n"


def test_html_is_self_contained_with_tables_pictures_and_before_after(report):
    text = report.to_html()
    page = _Page()
    page.feed(text)
    page.close()
    tags = [t for t, _ in page.tags]
    assert tags.count("table") == 6  # FFNs, parameters, sharding, training memory, collectives, DTD/CAC
    assert tags.count("svg") == 3  # rank 0's graph, and the block before and after
    assert {"ffns", "parameters", "sharding", "memory", "collectives", "variants", "graph",
            "before-after"} <= set(page.headings)
    assert "h.0" in page.headings["before-after"]
    assert "script" not in tags and "link" not in tags and "img" not in tags
    assert not any(k in ("src", "href") and v.startswith(("http:", "https:", "//")) for _, a in page.tags
                   for k, v in a.items())
    assert set(re.findall(r"https?://[^\s\"']+", text)) == {"http://www.w3.org/2000/svg"}  # only the SVG namespace
    dense, after = page.figures
    assert "gelu" in dense and "FFN h.0.mlp" in dense and "dispatch" not in dense
    assert "dispatch" in after and "all_to_all (ep)" in after and "gelu" not in after
    assert "dtd+cac (this layout)" in text


def test_save_picks_the_format_by_suffix(report, tmp_path):
    for suffix, head in ((".json", "{"), (".dot", "digraph"), (".svg", "<svg"), (".html", "<!DOCTYPE html>")):
        path = report.save(tmp_path / f"report{suffix}")
        assert path.read_text(encoding="utf-8").startswith(head), suffix
    with pytest.raises(ValueError, match=r"\.png"):
        report.save(tmp_path / "report.png")


def test_single_process_report_draws_the_moe_graph():
    model, inputs = tiny_gpt()
    report = tedfx.explain(model, inputs, moe=tedfx.MoEConfig(num_experts=4, layers=[1]))
    boxes = _svg_boxes(report.to_svg())
    assert [b["lines"][0] for b in boxes if b["kind"] == "moe"].count("dispatch") == 1
    assert not any(b["kind"] in ("collective", "param") for b in boxes)
    page = _Page()
    page.feed(report.to_html())
    assert "sharding" not in page.headings and "h.1" in page.headings["before-after"]


def test_training_memory_by_zero_stage_and_tiling(report):
    """fp32 on T=2, X=2, D=1: "dp" has 2 ranks (ZeRO-1 halves the non-expert states), "edp" one."""
    memory = report.training_memory
    assert memory["precision"] == "fp32" and memory["zero"] == 0 and memory["optimizer"] == "AdamW"
    rows = {(r["zero"], r["tile_numel"] is not None): r for r in memory["rows"]}
    assert set(rows) == {(0, False), (0, True), (1, False), (1, True)}
    param_bytes = report.param_bytes_per_rank[0]
    for row in rows.values():
        assert row["master"] == 0  # fp32: the weights are the masters
        assert row["grads"] == param_bytes
        assert row["peak"] == sum(row[k] for k in ("weights", "grads", "master", "optimizer_states", "step_transient"))
    assert rows[(0, False)]["weights"] == param_bytes
    assert rows[(0, False)]["optimizer_states"] >= 2 * param_bytes  # AdamW: two fp32 moments per entry
    assert rows[(1, False)]["optimizer_states"] < rows[(0, False)]["optimizer_states"]
    assert rows[(0, True)]["step_transient"] <= rows[(0, False)]["step_transient"]
    assert "Training memory (rank 0, fp32" in str(report)
