"""Computed graph diffs between pipeline stages, associating nodes by stable id (DESIGN §1)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LccError

# collective ops a pass may insert, by the name diffs show them under
COLLECTIVES = {
    "longctx.seq_all_to_all": "all-to-all",
    "longctx.seq_all_gather": "all-gather",
    "longctx.ring_attention": "ring attention (K/V send/recv)",
}


@dataclass
class Change:
    kind: str  # "added" | "removed" | "rewired" (the same node with other inputs or another op)
    id: str
    target: str
    layer: int | None
    module: str
    inputs_before: list[str] = field(default_factory=list)
    inputs_after: list[str] = field(default_factory=list)
    replaces: list[str] = field(default_factory=list)
    target_before: str | None = None  # a rewired node's op before, when a pass changed it
    passes: list[str] = field(default_factory=list)  # the passes that made this change (empty: an artifact from before they were recorded)


@dataclass
class GraphDiff:
    from_stage: str
    to_stage: str
    layer: int | None
    passes: list[dict[str, Any]]
    changes: list[Change]
    before: dict[str, Any]
    after: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # the snapshots from ``from_stage`` to ``to_stage``

    @functools.cached_property
    def seen(self) -> dict[str, dict[str, Any]]:
        """Every node of the stages from ``from_stage`` to ``to_stage``, by id, as it last was (built once: ``origins``
        reads it at every step of its walk)."""
        return {n["id"]: n for snap in self.stages.values() for n in snap["nodes"]}

    def origins(self, node_id: str) -> set[str]:
        """The ``from`` stage's nodes a node replaced, through the nodes of the stages in between."""
        before, seen = {n["id"] for n in self.before["nodes"]}, self.seen
        if node_id in before or node_id not in seen:
            return {node_id}
        return set().union(*(self.origins(r) for r in seen[node_id].get("from", [])), set())

    def count(self, kind: str) -> int:
        return sum(c.kind == kind for c in self.changes)

    def by_layer(self) -> dict[str, list[Change]]:
        groups: dict[str, list[Change]] = {}
        for change in self.changes:
            groups.setdefault("global" if change.layer is None else f"layer {change.layer}", []).append(change)
        return dict(sorted(groups.items(), key=lambda kv: (kv[0] != "global", int(kv[0].split()[-1]) if kv[0] != "global" else -1)))

    def collectives(self) -> dict[str, dict[str, int]]:
        """The collectives the passes inserted, counted per layer group."""
        out: dict[str, dict[str, int]] = {}
        for group, changes in self.by_layer().items():
            for c in changes:
                if c.kind == "added" and c.target in COLLECTIVES:
                    kinds = out.setdefault(group, {})
                    kinds[COLLECTIVES[c.target]] = kinds.get(COLLECTIVES[c.target], 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        summary = {k: self.count(k) for k in ("added", "removed", "rewired")}
        groups = {name: [asdict(c) for c in items] for name, items in self.by_layer().items()}
        return {
            "from": self.from_stage,
            "to": self.to_stage,
            "layer": self.layer,
            "summary": summary,
            "passes": self.passes,
            "collectives": self.collectives(),
            "changes": groups,
        }


def _in_layer(node: dict[str, Any], layer: int | None) -> bool:
    return layer is None or node["layer"] == layer


def diff_snapshots(
    snapshots: dict[str, dict[str, Any]], history: list[dict[str, Any]], from_stage: str = "capture", to_stage: str | None = None, layer: int | None = None
) -> GraphDiff:
    """Diff snapshot ``from_stage`` against ``to_stage`` (default: the last), optionally one layer only."""
    stages = list(snapshots)
    to_stage = to_stage or stages[-1]
    for stage in (from_stage, to_stage):
        if stage not in snapshots:
            raise LccError(f"unknown stage '{stage}'; stages: {', '.join(stages)}")
    if stages.index(from_stage) > stages.index(to_stage):
        raise LccError(f"stage '{from_stage}' comes after '{to_stage}'")
    a = {n["id"]: n for n in snapshots[from_stage]["nodes"]}
    b = {n["id"]: n for n in snapshots[to_stage]["nodes"]}
    changes = []
    for node_id, node in a.items():
        if node_id not in b and _in_layer(node, layer):
            changes.append(Change("removed", node_id, node["target"], node["layer"], node["module"], node["inputs"]))
    for node_id, node in b.items():
        if not _in_layer(node, layer):
            continue
        if node_id not in a:
            changes.append(Change("added", node_id, node["target"], node["layer"], node["module"], [], node["inputs"], node.get("from", [])))
        elif a[node_id]["inputs"] != node["inputs"] or a[node_id]["target"] != node["target"]:
            was = a[node_id]["target"] if a[node_id]["target"] != node["target"] else None
            changes.append(Change("rewired", node_id, node["target"], node["layer"], node["module"], a[node_id]["inputs"], node["inputs"], target_before=was))
    span = stages[stages.index(from_stage) + 1 : stages.index(to_stage) + 1]
    passes = [h for h in history if h["stage"] in span]
    for change in changes:
        change.passes = [h["name"] for h in passes if any(change.id in ids for ids in h.get("changes", {}).values())]
    spanned = {stage: snapshots[stage] for stage in stages[stages.index(from_stage) : stages.index(to_stage) + 1]}
    return GraphDiff(from_stage, to_stage, layer, passes, changes, snapshots[from_stage], snapshots[to_stage], spanned)
