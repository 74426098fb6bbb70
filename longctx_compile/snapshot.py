"""A light, JSON-able description of an FX graph: what ``lcc diff`` compares across stages.

Node names are stable ids: passes mutate the graph in place, so a node that survives a pass keeps its
name, and a node a pass adds records the nodes it replaced in ``meta["lcc_from"]``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n([^\n]*)')
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


def module_path(node: torch.fx.Node) -> str:
    """The innermost module the node was traced in, without the capture wrapper's ``model.`` prefix.

    A node a pass added without a module stack carries the one ``attribute`` inferred for it.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.meta.get("lcc_module", "")
    path = list(stack.values())[-1][0]
    return path[len("model.") :] if path.startswith("model.") else ("" if path == "model" else path)


def layer_of(path: str) -> int | None:
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def inside_layer(path: str) -> str:
    """The part of a module path inside its layer: ``model.layers.15.self_attn.q_proj`` → ``self_attn.q_proj``."""
    match = _LAYER.search(path)
    return path[match.end() :] if match else path


def parameter_path(node_id: str, module: str | None) -> str | None:
    """The parameter a placeholder holds, from its name (``p_<module with _>_<name>``) and the module it was filed
    under: ``model.layers.3.self_attn.router_q_proj.weight``; None when the name is not a parameter of that module."""
    stem = "p_" + (module or "").replace(".", "_") + "_"
    return f"{module}.{node_id[len(stem) :]}" if module and node_id.startswith(stem) else None


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


def _dtype(node: torch.fx.Node) -> str | None:
    val = node.meta.get("val")
    return str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else None


def source_line(node: torch.fx.Node) -> str:
    """Where the node came from: the model's own line (the trace's last frame), or the lcc pass that added it."""
    if "lcc_pass" in node.meta:
        return node.meta["lcc_pass"]
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, line, code = frames[-1]
    file = file.split("site-packages/")[-1]
    return f"{file}:{line}  {code.strip()}"


def attribute(gm: torch.fx.GraphModule, added: set[str], parameters: dict[str, str], by: str) -> None:
    """File each node a pass added under a module: nodes the pass left without a module stack get the deepest
    module their users share (else their inputs'), a new parameter its own module; all record the pass ``by``.

    Without this, what a form adds inside a layer (router projections, their weights) would read as global.
    """
    nodes = [n for n in gm.graph.nodes if n.name in added]
    for node in nodes:
        node.meta["lcc_pass"] = by
    known: dict[torch.fx.Node, str] = {}

    def path(node: torch.fx.Node, direction: str) -> str:
        if node in known:
            return known[node]
        own = module_path(node) or (parameters[node.name].rpartition(".")[0] if node.name in parameters else "")
        if own or node.name not in added:
            known[node] = own
            return own
        neighbours = list(node.users) if direction == "users" else node.all_input_nodes
        paths = [p for p in (path(m, direction) for m in neighbours) if p]
        known[node] = _common(paths)
        return known[node]

    for node in nodes:
        if not module_path(node):
            found = path(node, "users")
            known.clear()
            found = found or path(node, "inputs")
            known.clear()
            if found:
                node.meta["lcc_module"] = found


def _common(paths: list[str]) -> str:
    """The deepest module path every one of ``paths`` lies in ("" when none or no common one)."""
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    common = []
    for names in zip(*parts, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


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
                "dtype": _dtype(node),
                "source": source_line(node),
                "from": node.meta.get("lcc_from", []),
                "lcc": _facts(node),
            }
        )
    return {"nodes": nodes}
