"""Binding the exported KV-cache step programs for running: weights bound, small run-time rewrites applied.

The saved programs stay portable and functional, as export requires. The module that runs them in
the :class:`~.generate.Generator` (always under ``inference_mode``, inputs built by the Generator
after it checked the prompts) gets a few named rewrites, each a small pattern → replacement over
its FX graph that removes per-step overhead without changing a value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..fx import ASSERTS, aten, is_call, val
from ..ops.attention import sdpa_layout_forward

STEP_NAMES = {"prefill": "prefill", "decode": "growing", "static": "static"}


def drop_asserts(gm: torch.fx.GraphModule) -> int:
    """Capture-time dtype/device assertions: the inputs are ours, so they can only pass."""
    nodes = [n for n in gm.graph.nodes if is_call(n, *ASSERTS)]
    for node in nodes:
        gm.graph.erase_node(node)
    return len(nodes)


def drop_noop_casts(gm: torch.fx.GraphModule) -> int:
    """``alias`` and casts to the dtype a tensor already has return their input; skip the call."""
    changed = 0
    for node in list(gm.graph.nodes):
        same = is_call(node, aten.to.dtype) and getattr(val(node.args[0]), "dtype", None) == node.args[1] and not node.kwargs
        if (same and len(node.args) == 2) or is_call(node, aten.alias.default):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed += 1
    return changed


def call_attention_directly(gm: torch.fx.GraphModule) -> int:
    """Call ``longctx::attention``'s forward as a function: no dispatcher or autograd is needed to decode."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.longctx.attention.default]
    for node in nodes:
        node.target = sdpa_layout_forward
    return len(nodes)


def write_caches_in_place(gm: torch.fx.GraphModule) -> int:
    """Turn the static program's cache writes (``scatter`` into a ``caches`` input) in place.

    The Generator owns the caches and never reads a step's old ones again, so writing the new
    token's slot in place makes a step cost O(1) cache writes instead of a copy of every cache.
    """
    changed = 0
    for node in gm.graph.nodes:
        cache = node.args[0] if node.op == "call_function" and node.target is aten.scatter.src else None
        if cache is None or cache.op != "placeholder" or not cache.name.startswith("caches"):
            continue
        if all(user is node or user.target is aten.sym_size.int for user in cache.users):
            node.target = aten.scatter_.src
            changed += 1
    return changed


REWRITES: dict[str, tuple[Callable[[torch.fx.GraphModule], int], ...]] = {
    "prefill": (drop_asserts, drop_noop_casts, call_attention_directly),
    "decode": (drop_asserts, drop_noop_casts, call_attention_directly),
    "static": (drop_asserts, drop_noop_casts, call_attention_directly, write_caches_in_place),
}


def runnable(ep: torch.export.ExportedProgram, name: str) -> torch.fx.GraphModule:
    """The module of step program ``name`` with its run-time rewrites applied.

    The exported module's per-call input checks (symbolic shape guards evaluated with sympy) are off
    too: they cost more than a small model's decode step, and the Generator builds every input.
    """
    module = ep.module()
    module.validate_inputs = False
    for rewrite in REWRITES[name]:
        rewrite(module)
    module.graph.lint()
    module.recompile()
    return module


def bind(steps: dict[str, torch.export.ExportedProgram], state: dict[str, torch.Tensor]) -> dict[str, Callable]:
    """Runnable step programs with the weights bound, keyed prefill, growing and static."""
    return {STEP_NAMES[name]: functools.partial(runnable(ep, name), state) for name, ep in steps.items()}
