"""Render graph diffs as rich text, JSON, Graphviz DOT or one self-contained HTML page."""

from __future__ import annotations

import html
import json
from typing import Any

import networkx as nx
from rich.console import Console
from rich.table import Table

from .diff import GraphDiff

COLORS = {"added": "#c8f7c5", "removed": "#f7c5c5", "rewired": "#fbeea6", None: "#ffffff"}
RICH = {"added": "green", "removed": "red", "rewired": "yellow"}


def _shown(ids: list[str]) -> str:
    """Inputs worth reading: symbolic-size plumbing is left out."""
    return ", ".join(i for i in ids if not i.startswith("sym_size"))


def render_text(d: GraphDiff, console: Console) -> None:
    console.print(f"[bold]{d.from_stage} → {d.to_stage}[/bold]" + (f"  (layer {d.layer})" if d.layer is not None else ""))
    passes = Table("pass", "stage", "matches", "added", "removed", "seconds", title="passes")
    for p in d.passes:
        passes.add_row(p["name"], p["stage"], str(p["matches"]), str(p["added"]), str(p["removed"]), f"{p['seconds']:.3f}")
    console.print(passes)
    console.print(f"added {d.count('added')}, removed {d.count('removed')}, rewired {d.count('rewired')}")
    inserted = d.collectives()
    if inserted:
        table = Table("where", "collective", "count", title="collectives inserted", title_justify="left")
        for group, kinds in inserted.items():
            for kind, count in kinds.items():
                table.add_row(group, kind, str(count))
        console.print(table)
    for group, changes in d.by_layer().items():
        table = Table("", "node", "op", "inputs", "note", title=group, title_justify="left")
        for c in changes:
            inputs = _shown(c.inputs_after if c.kind != "removed" else c.inputs_before)
            if c.kind == "rewired":
                inputs = f"{_shown(c.inputs_before)} → {inputs}"
            note = f"replaces {', '.join(c.replaces)}" if c.replaces else ""
            table.add_row(f"[{RICH[c.kind]}]{c.kind}[/]", c.id, c.target, inputs, note)
        console.print(table)


def render_json(d: GraphDiff) -> str:
    return json.dumps(d.to_json(), indent=2)


def _status(d: GraphDiff, side: str) -> dict[str, str]:
    kinds = {"before": ("removed", "rewired"), "after": ("added", "rewired")}[side]
    return {c.id: c.kind for c in d.changes if c.kind in kinds}


def _nodes(d: GraphDiff, snap: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in snap["nodes"] if (d.layer is None or n["layer"] == d.layer) and n["op"] != "output"]


def render_dot(d: GraphDiff) -> str:
    """The ``to`` graph, with added/rewired nodes filled and removed nodes drawn dashed."""
    status = _status(d, "after")
    lines = ["digraph lcc_diff {", "  rankdir=TB; node [shape=box, style=filled, fontname=monospace];"]
    nodes = _nodes(d, d.after)
    ids = {n["id"] for n in nodes}
    for n in nodes:
        color = COLORS[status.get(n["id"])]
        lines.append(f'  "{n["id"]}" [label="{n["id"]}\\n{n["target"]}", fillcolor="{color}"];')
        lines += [f'  "{i}" -> "{n["id"]}";' for i in n["inputs"] if i in ids]
    for c in d.changes:
        if c.kind == "removed":
            lines.append(f'  "{c.id}" [label="{c.id}\\n{c.target}", style="dashed,filled", fillcolor="{COLORS["removed"]}"];')
    lines.append("}")
    return "\n".join(lines)


def _svg(d: GraphDiff, snap: dict[str, Any], status: dict[str, str]) -> str:
    """A layered drawing: one row per topological generation, edges as lines."""
    nodes = [n for n in _nodes(d, snap) if n["op"] != "placeholder" or n["id"] in {i for m in _nodes(d, snap) for i in m["inputs"]}]
    graph = nx.DiGraph()
    graph.add_nodes_from(n["id"] for n in nodes)
    by_id = {n["id"]: n for n in nodes}
    graph.add_edges_from((i, n["id"]) for n in nodes for i in n["inputs"] if i in by_id)
    width, height, gap_x, gap_y = 170, 34, 14, 26
    pos, cols = {}, 1
    for row, generation in enumerate(nx.topological_generations(graph)):
        for col, node_id in enumerate(sorted(generation, key=lambda i: list(by_id).index(i))):
            pos[node_id] = (col * (width + gap_x) + 4, row * (height + gap_y) + 4)
            cols = max(cols, col + 1)
    rows = max((y for _, y in pos.values()), default=0) // (height + gap_y) + 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * (width + gap_x) + 8}" height="{rows * (height + gap_y) + 8}">']
    for src, dst in graph.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        parts.append(f'<line x1="{x1 + width / 2}" y1="{y1 + height}" x2="{x2 + width / 2}" y2="{y2}" stroke="#999"/>')
    for node_id, (x, y) in pos.items():
        n, kind = by_id[node_id], status.get(node_id)
        label = html.escape(n["target"].replace("aten.", "")[:24])
        parts.append(
            f"<g><title>{html.escape(node_id)}: {html.escape(n['target'])} {html.escape(n['module'])}</title>"
            f'<rect x="{x}" y="{y}" width="{width}" height="{height}" rx="4" fill="{COLORS[kind]}" stroke="{"#333" if kind else "#bbb"}"/>'
            f'<text x="{x + 5}" y="{y + 14}" font-size="11" font-family="monospace">{html.escape(node_id[:24])}</text>'
            f'<text x="{x + 5}" y="{y + 28}" font-size="10" font-family="monospace" fill="#555">{label}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(d: GraphDiff) -> str:
    """One self-contained page: both graphs side by side, changes highlighted, the change list below."""
    rows = "".join(
        f'<tr style="background:{COLORS[c.kind]}"><td>{c.kind}</td><td>{"global" if c.layer is None else c.layer}</td>'
        f"<td>{html.escape(c.id)}</td><td>{html.escape(c.target)}</td><td>{html.escape(', '.join(c.inputs_before))}</td>"
        f"<td>{html.escape(', '.join(c.inputs_after))}</td></tr>"
        for c in d.changes
    )
    passes = "".join(f"<li>{html.escape(p['name'])}: {p['matches']} matches, +{p['added']} −{p['removed']} nodes, {p['seconds']:.3f}s</li>" for p in d.passes)
    title = f"lcc diff: {d.from_stage} → {d.to_stage}" + (f" (layer {d.layer})" if d.layer is not None else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:16px}} .panes{{display:flex;gap:12px}} .pane{{flex:1;overflow:auto;max-height:80vh;border:1px solid #ccc}}
table{{border-collapse:collapse;font-family:monospace;font-size:12px}} td,th{{border:1px solid #ddd;padding:2px 6px}}
</style></head><body><h2>{html.escape(title)}</h2><ul>{passes}</ul>
<p>added {d.count("added")} · removed {d.count("removed")} · rewired {d.count("rewired")}</p>
<div class="panes"><div class="pane"><h3>{html.escape(d.from_stage)}</h3>{_svg(d, d.before, _status(d, "before"))}</div>
<div class="pane"><h3>{html.escape(d.to_stage)}</h3>{_svg(d, d.after, _status(d, "after"))}</div></div>
<h3>changes</h3><table><tr><th>change</th><th>layer</th><th>node</th><th>op</th><th>inputs before</th><th>inputs after</th></tr>{rows}</table>
</body></html>"""
