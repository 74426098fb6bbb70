"""A light, JSON-able description of an FX graph: what ``lcc diff`` compares across stages.

Node names are stable ids: passes mutate the graph in place, so a node that survives a pass keeps its
name, and a node a pass adds records the nodes it replaced in ``meta["lcc_from"]``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


def module_path(node: torch.fx.Node) -> str:
    """The innermost module the node was traced in, without the capture wrapper's ``model.`` prefix."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len("model.") :] if path.startswith("model.") else ("" if path == "model" else path)


def layer_of(path: str) -> int | None:
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def target_name(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        overload = getattr(node.target, "_overloadpacket", None)
        if overload is not None:
            return f"{node.target.namespace}.{node.target._opname}" + ("" if node.target._overloadname == "default" else f".{node.target._overloadname}")
        return name
    return str(node.target)


def _shape(node: torch.fx.Node) -> list[str] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [str(s) for s in val.shape]
    return None


def _facts(node: torch.fx.Node) -> dict[str, Any]:
    facts = node.meta.get("lcc")
    if not facts:
        return {}
    return {k: v for k, v in facts.items() if isinstance(v, (int, float, str, bool, type(None), list, dict))}


def snapshot(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """Nodes in order with op, target, inputs, module path, layer, shape and lcc facts."""
    nodes = []
    for node in gm.graph.nodes:
        path = module_path(node)
        nodes.append(
            {
                "id": node.name,
                "op": node.op,
                "target": target_name(node),
                "inputs": [a.name for a in node.all_input_nodes],
                "module": path,
                "layer": layer_of(path),
                "shape": _shape(node),
                "from": node.meta.get("lcc_from", []),
                "lcc": _facts(node),
            }
        )
    return {"nodes": nodes}
