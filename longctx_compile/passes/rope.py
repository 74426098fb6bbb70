"""Find the tensor a rotary position embedding was applied to (the pre-RoPE q or k of an attention).

HF applies RoPE as ``x·cos + rotate_half(x)·sin``, where ``rotate_half`` is a ``cat`` of negated and
plain slices of x; partial rotary (phi) concatenates the rotated slice with the untouched rest. The
rules below undo exactly those shapes and return None for anything else.
"""

from __future__ import annotations

import torch
from torch.export.graph_signature import InputKind

aten = torch.ops.aten
_VIEWS = (aten.neg.default, aten.slice.Tensor)


def _root(node):
    """``node`` with any chain of negations and slices peeled off."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def _rotation(node) -> torch.fx.Node | None:
    """x for ``x·cos + cat(-x2, x1)·sin`` (either operand order), else None."""
    if not (isinstance(node, torch.fx.Node) and node.target == aten.add.Tensor and len(node.args) == 2):
        return None
    products = [a for a in node.args if isinstance(a, torch.fx.Node) and a.target == aten.mul.Tensor]
    if len(products) != 2:
        return None
    for plain, rotated in (products, products[::-1]):
        cats = [a for a in rotated.args if isinstance(a, torch.fx.Node) and a.target == aten.cat.default]
        for x in plain.args:
            if cats and all(_root(part) is _root(x) for part in cats[0].args[0]):
                return x
    return None


def pre_rope(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node RoPE rotated to give ``node`` (full or partial rotary), or None when ``node`` is not a rotary output."""
    x = _rotation(node)
    if x is not None:
        return x
    if isinstance(node, torch.fx.Node) and node.target == aten.cat.default:  # partial: cat(rotate(x[..., :r]), x[..., r:])
        parts = node.args[0]
        rotated = [_rotation(part) for part in parts]
        if any(r is not None for r in rotated):
            roots = {_root(r if r is not None else part) for r, part in zip(rotated, parts, strict=True)}
            if len(roots) == 1:
                return roots.pop()
    return None


class Rotation:
    """A model's own RoPE, cut out of its graph: ``rotate(x, positions, state)`` applies it to x [B, H, n, D] at
    ``positions`` [B, n] exactly as the model does (its convention, partial rotary, scaling and casts), reading
    the buffers it needs (``inv_freq``) from ``state`` (the program's weights by name, as ``step_state``).

    :meth:`shift` moves vectors that are already rotated by ``offsets`` positions: RoPE composes
    (R(p + Δ) = R(Δ)·R(p)) and is linear, so this holds for a mean of rotated keys too.
    """

    def __init__(self, graph: torch.fx.GraphModule, weights: list[str]):
        self.graph, self.weights = graph, weights

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.graph(x, positions, *(state[name] for name in self.weights))

    def shift(self, x: torch.Tensor, offsets: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [B, H, n, D] (rotated) moved by ``offsets`` [B, n] positions; a scaled RoPE's factor (the rotation at
        position 0) is divided out so it is not applied twice."""
        zero = torch.zeros(1, 1, dtype=offsets.dtype, device=offsets.device)
        return self.rotate(x, offsets, state) / self.rotate(torch.ones_like(x[:1, :1, :1]), zero, state)


def rotation(ep: torch.export.ExportedProgram, rotated: torch.fx.Node, positions: torch.fx.Node) -> Rotation | None:
    """The RoPE that gave ``rotated`` (a node of ``ep``'s graph, casts allowed after it) as a :class:`Rotation`,
    or None when ``rotated`` is not a recognised rotary output or its rotation reads any input but
    ``positions`` and the program's weights and buffers."""
    from ..fx import CASTS, strip

    x = pre_rope(strip(rotated, CASTS))
    if x is None:
        return None
    weights = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT}
    needed, stack = set(), [rotated]
    while stack:  # everything between x (and positions, and the weights) and the rotated output
        node = stack.pop()
        if node in needed or node is x:
            continue
        needed.add(node)
        if node.op == "placeholder" and node is not positions and node.name not in weights:
            return None
        stack.extend(node.all_input_nodes)
    graph = torch.fx.Graph()
    env = {x: graph.placeholder("x"), positions: graph.placeholder("positions")}
    used = []
    for node in ep.graph_module.graph.nodes:
        if node in needed and node not in env:
            if node.op == "placeholder":
                env[node] = graph.placeholder(node.name)
                used.append(weights[node.name])
            else:
                env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(env[rotated])
    return Rotation(torch.fx.GraphModule(ep.graph_module, graph), used)
