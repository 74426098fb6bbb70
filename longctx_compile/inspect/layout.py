"""One layout for the before and after graphs of a layer, so what both share sits at the same place in both.

The two graphs are laid out as their union, a node a pass put in place of another drawn where that one was: rows by longest path from the inputs (a node with no inputs drawn
just above its first user, so weights do not pile up in the first row), order within a row by the mean column
of the node's inputs, placed under them where there is room. Each side then draws only its own nodes: the
unchanged spine lines up, and what a pass removed or added leaves a gap on the other side.
"""

from __future__ import annotations

from typing import Any

import networkx as nx


def partners(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, str]:
    """An added node that replaced a removed one takes its place: {added id: the removed node it replaced}."""
    only_before = {n["id"] for n in before} - {n["id"] for n in after}
    only_after = [n for n in after if n["id"] not in {m["id"] for m in before}]
    out: dict[str, str] = {}
    for n in only_after:
        replaced = next((r for r in n.get("from", []) if r in only_before and r not in out.values()), None)
        if replaced is not None:
            out[n["id"]] = replaced
    return out


def union_graph(before: list[dict[str, Any]], after: list[dict[str, Any]], alias: dict[str, str]) -> nx.DiGraph:
    """The nodes of both sides in program order (a replacement merged with what it replaced) and the edges of
    both; an edge of ``before`` that would close a cycle with ``after``'s edges is left out of the layout."""
    graph = nx.DiGraph()
    at = lambda node_id: alias.get(node_id, node_id)  # noqa: E731
    for n in [*before, *after]:
        graph.add_node(at(n["id"]))
    for n in after:
        graph.add_edges_from((at(i), at(n["id"])) for i in n["inputs"] if at(i) in graph and at(i) != at(n["id"]))
    for n in before:
        for i in n["inputs"]:
            if i in graph and not graph.has_edge(i, n["id"]) and not nx.has_path(graph, n["id"], i):
                graph.add_edge(i, n["id"])
    return graph


def rows(graph: nx.DiGraph) -> dict[str, int]:
    """Longest-path rows; a node without inputs sits one row above its nearest user."""
    row: dict[str, int] = {}
    for node in nx.topological_sort(graph):
        row[node] = max((row[p] + 1 for p in graph.predecessors(node)), default=0)
    for node in graph:
        users = [row[u] for u in graph.successors(node)]
        if graph.in_degree(node) == 0 and users:
            row[node] = max(min(users) - 1, 0)
    return row


def columns(graph: nx.DiGraph, row: dict[str, int]) -> dict[str, int]:
    """Within each row, nodes ordered by the mean column of their inputs and placed as close under them as room allows."""
    order = {node: i for i, node in enumerate(graph)}
    col: dict[str, int] = {}
    for r in sorted(set(row.values())):
        members = [n for n in graph if row[n] == r]

        def wanted(node: str) -> float:
            placed = [col[p] for p in graph.predecessors(node) if p in col]
            return sum(placed) / len(placed) if placed else 0.0

        members.sort(key=lambda n: (wanted(n), order[n]))
        last = -1
        for node in members:
            col[node] = max(last + 1, round(wanted(node)))
            last = col[node]
    return col


def aligned(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """(row, column) of every node of either side, shared by both drawings."""
    alias = partners(before, after)
    graph = union_graph(before, after, alias)
    row = rows(graph)
    col = columns(graph, row)
    where = {node: (row[node], col[node]) for node in graph}
    return where | {added: where[removed] for added, removed in alias.items()}
