"""Small torch.fx helpers shared by passes and runtimes: matching aten nodes, reading call arguments, fake values, dead code."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._guards import detect_fake_mode

aten = torch.ops.aten

CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device, aten.type_as.default}
# the metadata a node that replaces or joins another takes from it (where it came from in the model)
COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")
CLONES = {aten.clone.default, aten.contiguous.default, aten.alias.default}
RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
ASSERTS = {aten._assert_tensor_metadata.default}


def is_call(node: Any, *targets) -> bool:
    """Whether ``node`` is a call to one of ``targets`` (op overloads or overload packets)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "_overloadpacket", None)
    return any(node.target is t or packet is t for t in targets)


def call_args(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def strip(node: torch.fx.Node, targets: set) -> torch.fx.Node:
    """Follow first arguments back through nodes calling ``targets`` (casts, clones …)."""
    while is_call(node, *targets):
        node = node.args[0]
    return node


def fake_call(op, *args) -> Any:
    """Run ``op`` on the fake values of ``args`` to produce the ``val`` metadata of a new node."""
    vals = [val(a) for a in args]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with mode:
        return op(*vals)


def new_call(graph: torch.fx.Graph, op, *args, like: torch.fx.Node | None = None) -> torch.fx.Node:
    """A new call node (at the graph's insertion point) with its fake value; ``like``'s module metadata places it in that node's layer."""
    node = graph.call_function(op, args)
    node.meta["val"] = fake_call(op, *args)
    if like is not None:
        node.meta.update({key: like.meta[key] for key in COPIED_META if key in like.meta})
    return node


def ancestors(roots: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    """Every node the roots depend on, the roots included."""
    seen: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _has_side_effects(node: torch.fx.Node) -> bool:
    """Mutating ops and assertions stay; an unused random op (dropout in eval) has no effect and goes."""
    if is_call(node, *ASSERTS):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        if str(node.target).startswith(("aten._assert", "aten.sym_constrain")):
            return True
        mutated = [node.args[i] for i, a in enumerate(schema.arguments) if a.is_write and i < len(node.args)]
        # writing into a temporary that nothing else reads has no visible effect
        return any(not isinstance(m, torch.fx.Node) or m.op == "placeholder" or len(m.users) > 1 for m in mutated)
    return node.is_impure()


def eliminate_dead_code(gm: torch.fx.GraphModule) -> int:
    """Remove unused nodes, and metadata assertions whose checked tensor is otherwise unused."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output"):
                continue
            if node.users:
                if all(is_call(u, *ASSERTS) for u in node.users):
                    for user in list(node.users):
                        gm.graph.erase_node(user)
                        removed += 1
                    changed = True
                continue
            if _has_side_effects(node):
                continue
            gm.graph.erase_node(node)
            removed += 1
            changed = True
    return removed


def nearest_upstream(node: torch.fx.Node, matches: Callable[[torch.fx.Node], bool]) -> torch.fx.Node | None:
    """The nearest node upstream of ``node`` (itself included, breadth first, not through placeholders) that ``matches``."""
    queue, seen = deque([node]), {node}
    while queue:
        current = queue.popleft()
        if matches(current):
            return current
        for arg in current.all_input_nodes:
            if arg not in seen and arg.op != "placeholder":
                seen.add(arg)
                queue.append(arg)
    return None
