"""Find the tensor a rotary position embedding was applied to (the pre-RoPE q or k of an attention).

HF applies RoPE as ``x·cos + rotate_half(x)·sin``, where ``rotate_half`` is a ``cat`` of negated and
plain slices of x; partial rotary (phi) concatenates the rotated slice with the untouched rest. The
rules below undo exactly those shapes and return None for anything else.
"""

from __future__ import annotations

import torch

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
