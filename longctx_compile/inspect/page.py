"""``lcc diff --format html``: one self-contained page (no network) that opens on the summary, shows the whole model
as one box per layer, and draws a chosen layer's before and after side by side on one aligned layout.

The graphs travel as data (strings interned once, so 128 alike layers stay small) and are drawn when a layer
is opened; the page's script reads top to bottom: data, drawing, the model boxes, node details, scrolling.
"""

from __future__ import annotations

import html
import json
from typing import Any

from ..snapshot import inside_layer, parameter_path
from .diff import GraphDiff
from .groups import all_layers, groups, layer_range, overview
from .layout import aligned

PLUMBING = ("sym_size", "_assert")  # symbolic-size reads and metadata asserts: drawn nowhere


def _plumbing(node: dict[str, Any]) -> bool:
    return node["op"] == "output" or node["target"].removeprefix("aten.").startswith(PLUMBING)


def _label(node: dict[str, Any]) -> tuple[str, str]:
    """The two lines a node's box shows: a parameter by its path inside the layer, anything else by id and op."""
    full = parameter_path(node["id"], node["module"]) if node["op"] == "placeholder" else None
    if full is not None:
        path = inside_layer(full)
        return ".".join(path.split(".")[-2:]), f"parameter {path}"
    return node["id"], node["target"].removeprefix("aten.")


def _drawn(snap: dict[str, Any], layer: int | None) -> list[dict[str, Any]]:
    """The nodes of one layer worth drawing: no output, no plumbing, placeholders only when something here reads them."""
    nodes = [n for n in snap["nodes"] if n["layer"] == layer and not _plumbing(n)]
    read = {i for n in nodes for i in n["inputs"]}
    return [n for n in nodes if n["op"] != "placeholder" or n["id"] in read]


class _Strings:
    """A string table: each distinct string stored once in the page, nodes refer to it by index."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def __call__(self, text: str | None) -> int:
        return self.index.setdefault(text or "", len(self.index))

    def table(self) -> list[str]:
        return list(self.index)


def _layer_data(d: GraphDiff, layer: int | None, strings: _Strings) -> dict[str, Any]:
    """One layer's union of nodes with shared positions, each side's status and edges."""
    before, after = _drawn(d.before, layer), _drawn(d.after, layer)
    where = aligned(before, after)
    status = {("b", c.id): c.kind for c in d.changes if c.kind in ("removed", "rewired")}
    status |= {("a", c.id): c.kind for c in d.changes if c.kind in ("added", "rewired")}
    passes = {c.id: c.passes for c in d.changes}
    sides = {n["id"]: "b" for n in before}
    for n in after:
        sides[n["id"]] = sides.get(n["id"], "") + "a"
    nodes_by_id = {n["id"]: n for n in before} | {n["id"]: n for n in after}
    order = list(where)
    nodes = []
    for node_id in order:
        n = nodes_by_id[node_id]
        row, col = where[node_id]
        name, op = _label(n)
        nodes.append(
            {
                "id": node_id,
                "l1": strings(name),
                "l2": strings(op),
                "t": strings(n["target"]),
                "r": row,
                "c": col,
                "in": sides[node_id],
                "sb": status.get(("b", node_id), ""),
                "sa": status.get(("a", node_id), ""),
                "shape": strings("×".join(n["shape"]) if n.get("shape") else ""),
                "dtype": strings(n.get("dtype")),
                "m": strings(n["module"]),
                "src": strings(n.get("source")),
                "p": [strings(p) for p in passes.get(node_id, [])],
                "from": list(dict.fromkeys(n.get("from", []))),
            }
        )
    at = {node_id: i for i, node_id in enumerate(order)}
    edges = lambda side: [[at[i], at[n["id"]]] for n in side for i in n["inputs"] if i in at and i in {m["id"] for m in side}]  # noqa: E731
    return {"nodes": nodes, "eb": edges(before), "ea": edges(after)}


def page_data(d: GraphDiff) -> dict[str, Any]:
    """Everything the page draws: the summary, each layer's group, and every layer's graphs."""
    strings = _Strings()
    rows = groups(d)
    summary = overview(d, rows)
    layers: list[int | None] = [None, *all_layers(d)] if d.layer is None else [d.layer]
    group_of = {n: i for i, g in enumerate(rows) for n in g.layers} | {None: 0 if rows and not rows[0].layers else -1}
    data = {
        "title": f"{d.from_stage} → {d.to_stage}",
        "from": d.from_stage,
        "to": d.to_stage,
        "summary": summary,
        "start": d.layer if d.layer is not None else summary["representative"],
        "layers": [
            {
                "key": "outside" if n is None else n,
                "name": "outside layers" if n is None else f"layer {n}",
                "group": group_of.get(n, -1),
                "graph": _layer_data(d, n, strings),
            }
            for n in layers
        ],
    }
    data["strings"] = strings.table()
    return data


def _summary_html(d: GraphDiff, summary: dict[str, Any]) -> str:
    totals = summary["totals"]
    rows = []
    for i, g in enumerate(summary["groups"]):
        flag = f'<div class="flag">⚑ differs from layers {html.escape(g["differs_from"])}: {html.escape(g["difference"])}</div>' if g["differs_from"] else ""
        rows.append(
            f'<tr class="group g{i % 8}{" flagged" if flag else ""}" data-group="{i}"><td class="who">{html.escape(g["name"])}</td>'
            f"<td>{html.escape(g['change'])}{flag}</td><td>{html.escape(', '.join(g['passes']))}</td></tr>"
        )
    if summary["unchanged"]:
        rows.append(f'<tr class="unchanged"><td class="who">layers {layer_range(summary["unchanged"])}</td><td>unchanged</td><td></td></tr>')
    passes = " · ".join(
        f"<b>{html.escape(p['name'])}</b> ({html.escape(p['stage'])}: {p['matches']} matches, +{p['added']} −{p['removed']} nodes, {p['seconds']:.2f} s)"
        for p in d.passes
    )
    by_pass = "".join(
        f'<tr><td>{html.escape(p["pass"])}</td><td class="who">{html.escape(g["name"])}</td><td>{html.escape(g["change"])}</td></tr>'
        for p in summary["by_pass"]
        for g in p["groups"]
    )
    scope = f"layer {d.layer}" if d.layer is not None else f"{summary['layers']} layers"
    return (
        f'<header id="summary"><h1>lcc diff: {html.escape(d.from_stage)} → {html.escape(d.to_stage)}</h1>'
        f'<p class="totals">{scope} · <span class="added">added {totals["added"]}</span> · '
        f'<span class="removed">removed {totals["removed"]}</span> · <span class="rewired">rewired {totals["rewired"]}</span></p>'
        f'<p class="passes">passes: {passes or "none"}</p>'
        f'<table class="groups"><tr><th>where</th><th>what changed</th><th>passes</th></tr>{"".join(rows)}</table>'
        f'<details><summary>by pass</summary><table class="groups"><tr><th>pass</th><th>where</th><th>what it changed</th></tr>{by_pass}</table></details>'
        "</header>"
    )


def render_html(d: GraphDiff) -> str:
    """The page: summary first, then the model as layer boxes beside the chosen layer's aligned before/after."""
    data = page_data(d)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>lcc diff: {html.escape(data['title'])}</title><style>{_STYLE}</style></head><body>"
        f"{_summary_html(d, data['summary'])}"
        '<main><nav id="model" aria-label="layers"></nav>'
        '<section id="view"><h2 id="view-title"></h2><div class="panes">'
        f'<div class="pane" id="pane-before"><h3>{html.escape(d.from_stage)}</h3><svg></svg></div>'
        f'<div class="pane" id="pane-after"><h3>{html.escape(d.to_stage)}</h3><svg></svg></div></div></section>'
        '<aside id="details"><p class="hint">Click a node for its op, shape, dtype and source line.</p></aside></main>'
        f'<script id="lcc-data" type="application/json">{payload}</script><script>{_SCRIPT}</script></body></html>'
    )


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
#summary{padding:8px 14px;border-bottom:1px solid #ccc;background:#fafafa}
h1{font-size:17px;margin:2px 0} .totals,.passes{margin:3px 0;font-size:13px}
.added{color:#17702a} .removed{color:#a11} .rewired{color:#8a6d00}
table.groups{border-collapse:collapse;font-size:12px;margin-top:4px;width:100%}
table.groups td,table.groups th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
td.who{white-space:nowrap;font-weight:600} tr.flagged td{background:#fff4d6} .flag{color:#8a4b00;font-weight:600}
tr.unchanged td{color:#888} details summary{font-size:12px;cursor:pointer;margin-top:3px}
main{display:flex;gap:8px;padding:8px;align-items:flex-start}
nav#model{position:relative;width:150px;flex:none;max-height:78vh;overflow:auto;font-size:12px}
nav#model button{display:block;width:100%;text-align:left;margin:0 0 3px;padding:3px 6px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer;font-size:12px}
nav#model button.changed{border-left:6px solid var(--c)} nav#model button.on{outline:2px solid #246;font-weight:700}
#view{flex:1;min-width:0} #view h2{font-size:14px;margin:0 0 4px}
.panes{display:flex;gap:8px} .pane{flex:1;overflow:auto;height:74vh;border:1px solid #ccc;min-width:0}
.pane h3{position:sticky;top:0;left:0;margin:0;padding:3px 6px;background:#eee;font-size:13px;z-index:1}
#details{width:220px;flex:none;font-size:12px;border:1px solid #ccc;padding:6px;max-height:74vh;overflow:auto;word-break:break-word}
#details dt{font-weight:700;margin-top:4px} #details dd{margin:0 0 0 6px;font-family:monospace}
svg text{font-family:monospace;pointer-events:none} svg g.node{cursor:pointer} svg g.node.picked rect{stroke:#246;stroke-width:3}
.g0{--c:#4c78a8}.g1{--c:#f58518}.g2{--c:#54a24b}.g3{--c:#b279a2}.g4{--c:#e45756}.g5{--c:#72b7b2}.g6{--c:#9d755d}.g7{--c:#bab0ac}
"""

_SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('lcc-data').textContent);
const S = DATA.strings, NS = 'http://www.w3.org/2000/svg';
const FILL = {added: '#c8f7c5', removed: '#f7c5c5', rewired: '#fbeea6', '': '#fff'};
const W = 158, H = 32, GX = 10, GY = 22;

function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}

// One side of a layer: its own nodes at the shared positions, its own edges.
function draw(svg, graph, side) {
  svg.replaceChildren();
  const nodes = graph.nodes, edges = side === 'b' ? graph.eb : graph.ea;
  const cols = Math.max(1, ...nodes.map(n => n.c + 1)), rows = Math.max(1, ...nodes.map(n => n.r + 1));
  svg.setAttribute('width', cols * (W + GX) + 10);
  svg.setAttribute('height', rows * (H + GY) + 30);
  const x = n => n.c * (W + GX) + 5, y = n => n.r * (H + GY) + 28;
  for (const [i, j] of edges) {
    const a = nodes[i], b = nodes[j], x1 = x(a) + W / 2, y1 = y(a) + H, x2 = x(b) + W / 2, y2 = y(b);
    el('path', {d: `M${x1},${y1} C${x1},${y1 + GY} ${x2},${y2 - GY} ${x2},${y2}`, fill: 'none', stroke: '#999'}, svg);
  }
  nodes.forEach((n, i) => {
    if (!n.in.includes(side)) return;
    const status = side === 'b' ? n.sb : n.sa;
    const g = el('g', {class: 'node' + (status ? ' ' + status : ''), 'data-id': n.id, 'data-layer': graph.layer, 'data-status': status}, svg);
    el('rect', {x: x(n), y: y(n), width: W, height: H, rx: 4, fill: FILL[status], stroke: status ? '#333' : '#bbb'}, g);
    const fit = (text, n) => text.length > n ? text.slice(0, n - 1) + '…' : text;  // the full text is in the details
    el('text', {x: x(n) + 4, y: y(n) + 13, 'font-size': 10.5}, g).textContent = fit(S[n.l1], 24);
    el('text', {x: x(n) + 4, y: y(n) + 26, 'font-size': 9.5, fill: '#555'}, g).textContent = fit(S[n.l2], 26);
    g.addEventListener('click', () => show(n, status, g));
  });
}

// The whole model: one box per layer, coloured by its group; opening one draws it.
const nav = document.getElementById('model');
const buttons = DATA.layers.map((layer, i) => {
  const b = document.createElement('button');
  const group = DATA.summary.groups[layer.group];
  const counts = {added: 0, removed: 0, rewired: 0};
  for (const n of layer.graph.nodes) { if (n.sa) counts[n.sa]++; if (n.sb === 'removed') counts.removed++; }
  b.textContent = `${layer.name}` + (group ? `  +${counts.added} −${counts.removed} ~${counts.rewired}` : '');
  b.title = group ? `${group.name}: ${group.change}` : 'unchanged';
  b.dataset.key = layer.key;
  if (group) b.className = `changed g${layer.group % 8}`;
  b.addEventListener('click', () => open(i));
  nav.appendChild(b);
  return b;
});

function open(i) {
  const layer = DATA.layers[i];
  layer.graph.layer = layer.key;
  buttons.forEach((b, j) => b.classList.toggle('on', i === j));
  nav.scrollTop = Math.max(0, buttons[i].offsetTop - nav.clientHeight / 2);
  const group = DATA.summary.groups[layer.group];
  const others = group && group.layers.length > 1 ? ` — one of ${group.name}, changed alike` : '';
  document.getElementById('view-title').textContent = layer.name + others + (group && group.differs_from ? ` — ⚑ differs from layers ${group.differs_from}` : '');
  draw(document.querySelector('#pane-before svg'), layer.graph, 'b');
  draw(document.querySelector('#pane-after svg'), layer.graph, 'a');
  document.getElementById('view').dataset.layer = layer.key;
  // Open on the change, not on the layer's unchanged start: the first replacement a pass made, else the first change.
  const nodes = layer.graph.nodes;
  const focus = nodes.find(n => n.sa === 'added' && n.from.length) || nodes.find(n => n.sa || n.sb);
  for (const pane of document.querySelectorAll('.pane')) {
    pane.scrollTop = focus ? Math.max(0, focus.r * (H + GY) - pane.clientHeight / 3) : 0;
    pane.scrollLeft = focus ? Math.max(0, focus.c * (W + GX) - (pane.clientWidth - W) / 2) : 0;
  }
}

// Details of a clicked node: op, shape, dtype, where it came from.
function show(n, status, g) {
  document.querySelectorAll('g.node.picked').forEach(e => e.classList.remove('picked'));
  g.classList.add('picked');
  const rows = [['node', n.id], ['op', S[n.t]], ['change', status || 'unchanged'], ['shape', S[n.shape] || '—'], ['dtype', S[n.dtype] || '—'],
    ['module', S[n.m] || '(model)'], ['source', S[n.src] || '—'], ['passes', n.p.map(p => S[p]).join(', ') || '—'], ['replaces', n.from.join(', ') || '—']];
  const dl = document.createElement('dl');
  for (const [k, v] of rows) {
    dl.appendChild(Object.assign(document.createElement('dt'), {textContent: k}));
    dl.appendChild(Object.assign(document.createElement('dd'), {textContent: v}));
  }
  document.getElementById('details').replaceChildren(dl);
}

// The two panes scroll together (both drawings have the union's size, so each can follow the other exactly).
const panes = [...document.querySelectorAll('.pane')];
panes.forEach(p => p.addEventListener('scroll', () => {
  const other = panes.find(q => q !== p);
  if (other.scrollTop !== p.scrollTop) other.scrollTop = p.scrollTop;
  if (other.scrollLeft !== p.scrollLeft) other.scrollLeft = p.scrollLeft;
}));

// Open the layer (and node) the address names, as in diff.html#layer=15&node=attention_default_15; else the representative.
const asked = new URLSearchParams(location.hash.slice(1));
const key = asked.get('layer') || String(DATA.start === null ? 'outside' : DATA.start);
open(Math.max(DATA.layers.findIndex(l => String(l.key) === key), 0));
const picked = asked.get('node') && document.querySelector(`#pane-after g.node[data-id="${CSS.escape(asked.get('node'))}"]`);
if (picked) picked.dispatchEvent(new MouseEvent('click'));
window.addEventListener('hashchange', () => location.reload());
"""
