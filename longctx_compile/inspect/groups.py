"""The summary a diff opens on: each layer's change in a few words, layers whose change is identical folded into
one row, and any layer that differs from the layers changed like it flagged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..snapshot import inside_layer, parameter_path
from .diff import Change, GraphDiff


def short(target: str) -> str:
    """An op's name without the namespaces every reader knows (``aten.``, ``longctx.``)."""
    return target.removeprefix("aten.").removeprefix("longctx.")


def layer_range(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0–2, 5, 7–8"``."""
    runs: list[list[int]] = []
    for n in sorted(layers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


@dataclass(frozen=True)
class LayerChange:
    """What the diff changed in one layer (or outside every layer), in terms two layers can be compared by."""

    replaced: tuple[str, ...]  # "scaled_dot_product_attention → msa_attention", sorted
    removed: tuple[tuple[str, int], ...]  # (op, count)
    added: tuple[tuple[str, int], ...]
    rewired: int
    parameters: tuple[str, ...]  # added parameters, by their path inside the layer
    passes: tuple[str, ...]

    def describe(self) -> str:
        """One line: replacements first, then parameters, ops added and removed, rewirings."""
        counted = lambda ops: ", ".join(f"{op} ×{n}" if n > 1 else op for op, n in ops)  # noqa: E731
        parts = list(self.replaced)
        if self.parameters:
            parts.append(", ".join(f"+{p}" for p in self.parameters))
        if self.added:
            parts.append(f"+{_ops_count(self.added)} ({counted(self.added)})")
        if self.removed:
            parts.append(f"−{_ops_count(self.removed)} ({counted(self.removed)})")
        if self.rewired:
            parts.append(f"{self.rewired} rewired")
        return "; ".join(parts) or "unchanged"

    def versus(self, other: LayerChange) -> str:
        """How this change differs from ``other``'s, in ops and parameters."""
        mine, theirs = _ops(self), _ops(other)
        extra, missing = mine - theirs, theirs - mine
        words = [f"+{op}" + (f" ×{n}" if n > 1 else "") for op, n in sorted(extra.items())]
        words += [f"lacks {op}" + (f" ×{n}" if n > 1 else "") for op, n in sorted(missing.items())]
        return ", ".join(words) or "same ops, other wiring"


def _ops_count(ops: tuple[tuple[str, int], ...]) -> str:
    n = sum(count for _, count in ops)
    return f"{n} op" + ("s" if n > 1 else "")


def _ops(change: LayerChange) -> Counter:
    ops = Counter({f"added {op}": n for op, n in change.added})
    ops.update({f"removed {op}": n for op, n in change.removed})
    ops.update({f"param {p}": 1 for p in change.parameters})
    ops.update({"rewired": change.rewired} if change.rewired else {})
    return ops


@dataclass
class Group:
    """Layers changed identically: one row of the summary."""

    change: LayerChange
    layers: list[int] = field(default_factory=list)  # empty for the changes outside every layer
    differs_from: str | None = None  # the range of the larger group this one is a variant of
    difference: str = ""

    @property
    def name(self) -> str:
        if not self.layers:
            return "outside layers"
        return f"layer {self.layers[0]}" if len(self.layers) == 1 else f"layers {layer_range(self.layers)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "name": self.name,
            "count": len(self.layers),
            "change": self.describe(),
            "passes": list(self.change.passes),
            "parameters": list(self.change.parameters),
            "differs_from": self.differs_from,
            "difference": self.difference,
        }

    def describe(self) -> str:
        return self.change.describe() + (f" (×{len(self.layers)})" if len(self.layers) > 1 else "")


def _is_parameter(c: Change) -> bool:
    return c.target == c.id and c.id.startswith("p_")  # a lifted parameter: a placeholder named after its target


def _parameter(c: Change) -> str:
    """An added parameter's name inside its layer (``self_attn.router_q_proj.weight``); its full name outside layers."""
    full = parameter_path(c.id, c.module) or c.id
    return inside_layer(full) if c.layer is not None else full


def _ops_of(changes: list[Change], kind: str, headline: set[str]) -> tuple[tuple[str, int], ...]:
    """(op, count) of the ``kind`` changes, leaving out parameters and the ops the replacements already name."""
    ops = Counter(short(c.target) for c in changes if c.kind == kind and not _is_parameter(c))
    return tuple(sorted((op, n) for op, n in ops.items() if op not in headline))


def _layer_change(d: GraphDiff, changes: list[Change], direct: bool = False) -> LayerChange:
    """One layer's changes in comparable terms: what replaced what (through the stages in between, or ``direct``ly
    for one pass's changes), parameters, the other ops added and removed, the rewirings, and the passes involved."""
    origins = (lambda r: {r}) if direct else d.origins
    targets = {node_id: n["target"] for node_id, n in d.seen.items()} | {n["id"]: n["target"] for n in d.before["nodes"]}
    replacing: dict[tuple[str, ...], list[str]] = {}
    params = []
    for c in changes:
        if c.kind == "added" and c.replaces:
            was = tuple(sorted({short(targets.get(r, r)) for r in set().union(*(origins(r) for r in c.replaces))}))
            replacing.setdefault(was, []).append(short(c.target))
        if c.kind == "rewired" and c.target_before:
            replacing.setdefault((short(c.target_before),), []).append(short(c.target))
        if c.kind == "added" and _is_parameter(c):
            params.append(_parameter(c))
    replaced = Counter()
    for was, now in replacing.items():
        shown = [t for t in now if t != "getitem"] or now  # a tuple's getitems are plumbing when the op is there
        replaced[f"{' + '.join(was)} → {', '.join(sorted(set(shown)))}"] += len(now) // len(set(now))
    headline = {t for now in replacing.values() for t in now} | {t for was in replacing for t in was}
    return LayerChange(
        replaced=tuple(f"{r} ×{n}" if n > 1 else r for r, n in sorted(replaced.items())),
        removed=_ops_of(changes, "removed", headline),
        added=_ops_of(changes, "added", headline),
        rewired=sum(c.kind == "rewired" for c in changes),
        parameters=tuple(sorted(params)),
        passes=tuple(p["name"] for p in d.passes if any(p["name"] in c.passes for c in changes)),
    )


def layer_changes(d: GraphDiff, changes: list[Change] | None = None) -> dict[int | None, LayerChange]:
    """Each changed layer's ``LayerChange`` (``None``: the changes outside every layer), of the diff's changes or of
    one pass's ``changes``."""
    by_layer: dict[int | None, list[Change]] = {}
    for c in d.changes if changes is None else changes:
        by_layer.setdefault(c.layer, []).append(c)
    return {layer: _layer_change(d, items, direct=changes is not None) for layer, items in by_layer.items()}


def pass_changes(d: GraphDiff, record: dict[str, Any]) -> list[Change]:
    """The changes one pass made, as its record lists them, each node as the stages before and after the pass's
    own show it (a node added and removed within one stage is in no snapshot and is left out)."""
    names = list(d.stages)
    if record["stage"] not in names or names.index(record["stage"]) == 0:
        return []
    before = {n["id"]: n for n in d.stages[names[names.index(record["stage"]) - 1]]["nodes"]}
    after = {n["id"]: n for n in d.stages[record["stage"]]["nodes"]}
    out = []
    for kind, ids in record.get("changes", {}).items():
        for node_id in ids:
            n = (before if kind == "removed" else after).get(node_id)
            if n is None or (d.layer is not None and n["layer"] != d.layer):
                continue
            was = before[node_id]["target"] if kind == "rewired" and node_id in before and before[node_id]["target"] != n["target"] else None
            out.append(
                Change(kind, node_id, n["target"], n["layer"], n["module"], replaces=list(n.get("from", [])), target_before=was, passes=[record["name"]])
            )
    return out


def all_layers(d: GraphDiff) -> list[int]:
    """Every layer the two graphs have nodes in."""
    return sorted({n["layer"] for snap in (d.before, d.after) for n in snap["nodes"] if n["layer"] is not None})


def groups(d: GraphDiff, changes: list[Change] | None = None) -> list[Group]:
    """The summary's rows: outside-layer changes first, then layers grouped by identical change, largest group of a
    kind first; a smaller group whose replacements match a larger one's is flagged with how it differs."""
    changes = layer_changes(d, changes)
    rows: dict[LayerChange, Group] = {}
    outside = [Group(changes.pop(None))] if None in changes else []
    for layer, change in sorted(changes.items()):
        rows.setdefault(change, Group(change)).layers.append(layer)
    ordered = sorted(rows.values(), key=lambda g: (-len(g.layers), g.layers[0]))
    for i, group in enumerate(ordered):
        kin = next((g for g in ordered[:i] if g.change.replaced == group.change.replaced and len(g.layers) > len(group.layers)), None)
        if kin is not None:
            group.differs_from, group.difference = layer_range(kin.layers), group.change.versus(kin.change)
    return outside + ordered


def by_pass(d: GraphDiff) -> list[dict[str, Any]]:
    """Each pass's own changes, grouped as :func:`groups` groups the whole diff's."""
    return [{"pass": p["name"], "stage": p["stage"], "groups": [g.to_json() for g in groups(d, pass_changes(d, p))]} for p in d.passes]


def overview(d: GraphDiff, rows: list[Group] | None = None) -> dict[str, Any]:
    """The summary as data: totals, groups (``rows``: :func:`groups` of ``d`` when computed already), unchanged layers
    and the representative layer drawn in full."""
    rows = groups(d) if rows is None else rows
    changed = {n for g in rows for n in g.layers}
    layers = all_layers(d)
    representative = rows[1 if rows and not rows[0].layers else 0].layers[0] if any(g.layers for g in rows) else None
    return {
        "totals": {k: d.count(k) for k in ("added", "removed", "rewired")},
        "layers": len(layers),
        "groups": [g.to_json() for g in rows],
        "unchanged": [n for n in layers if n not in changed],
        "representative": representative,
        "flagged": [g.name for g in rows if g.differs_from],
        "by_pass": by_pass(d),
    }
