"""Render graph diffs as rich text, JSON or Graphviz DOT (the HTML page is ``page.py``): each opens on the summary."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .diff import GraphDiff
from .groups import Group, all_layers, by_pass, groups, layer_range, overview

COLORS = {"added": "#c8f7c5", "removed": "#f7c5c5", "rewired": "#fbeea6", None: "#ffffff"}
RICH = {"added": "green", "removed": "red", "rewired": "yellow"}


def _shown(ids: list[str]) -> str:
    """Inputs worth reading: symbolic-size plumbing is left out."""
    return ", ".join(i for i in ids if not i.startswith("sym_size"))


def render_summary(d: GraphDiff, console: Console) -> list[Group]:
    """What changed, first: totals, the passes, and one row per group of identically changed layers."""
    rows = groups(d)
    scope = f"layer {d.layer}" if d.layer is not None else f"{len(all_layers(d))} layers"
    console.print(f"[bold]{d.from_stage} → {d.to_stage}[/bold]  ({scope})")
    console.print(f"added {d.count('added')}, removed {d.count('removed')}, rewired {d.count('rewired')}")
    passes = Table("pass", "stage", "matches", "added", "removed", "seconds", title="passes", title_justify="left")
    for p in d.passes:
        passes.add_row(p["name"], p["stage"], str(p["matches"]), str(p["added"]), str(p["removed"]), f"{p['seconds']:.3f}")
    console.print(passes)
    table = Table("where", "what changed", "passes", title="what changed", title_justify="left")
    for g in rows:
        flag = f"\n[bold yellow]⚑ differs from layers {g.differs_from}: {escape(g.difference)}[/]" if g.differs_from else ""
        table.add_row(g.name, escape(g.describe()) + flag, ", ".join(g.change.passes))
    unchanged = [n for n in all_layers(d) if n not in {m for g in rows for m in g.layers}]
    if unchanged:
        table.add_row(f"layers {layer_range(unchanged)}", "[dim]unchanged[/]", "")
    console.print(table)
    passes_table = Table("pass", "where", "what it changed", title="by pass", title_justify="left")
    for p in by_pass(d):
        for g in p["groups"]:
            passes_table.add_row(p["pass"], g["name"], escape(g["change"]))
    if passes_table.row_count:
        console.print(passes_table)
    return rows


def render_text(d: GraphDiff, console: Console) -> None:
    """The summary, the collectives inserted, then each group's changes node by node, shown on its first layer."""
    rows = render_summary(d, console)
    inserted = d.collectives()
    if inserted:
        table = Table("where", "collective", "count", title="collectives inserted", title_justify="left")
        for group, kinds in inserted.items():
            for kind, count in kinds.items():
                table.add_row(group, kind, str(count))
        console.print(table)
    by_layer = d.by_layer()
    for g in rows:
        key = f"layer {g.layers[0]}" if g.layers else "global"
        title = g.name if len(g.layers) <= 1 else f"layer {g.layers[0]} (as {g.name})"
        table = Table("", "node", "op", "inputs", "note", "passes", title=title, title_justify="left")
        for c in by_layer[key]:
            inputs = _shown(c.inputs_after if c.kind != "removed" else c.inputs_before)
            if c.kind == "rewired":
                inputs = f"{_shown(c.inputs_before)} → {inputs}"
            note = f"replaces {', '.join(c.replaces)}" if c.replaces else ""
            table.add_row(f"[{RICH[c.kind]}]{c.kind}[/]", c.id, c.target, inputs, note, ", ".join(c.passes))
        console.print(table)


def render_json(d: GraphDiff) -> str:
    """The diff as data: the same summary the text and the page open on (``overview``), then every change by layer."""
    return json.dumps({**d.to_json(), "overview": overview(d)}, indent=2, ensure_ascii=False)


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
