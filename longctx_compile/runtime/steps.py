"""A program's prefill and decode steps with explicit caches, run straight from its graph (no export needed).

:class:`CacheStep` is the model program's graph with a hook at each attention site that extends the
site's cache as its op declares (``ops.cache``): *prefill* returns the last position's logits and
every stored tensor; *decode* appends one token to caches that grow; *static* writes it at
``slots[b]`` of caches allocated once. Weights are an input (``state``), so nothing is copied.
``runtime.kv_cache`` exports these same modules as portable programs; the runtime runs them directly
(``fast``), with a few named rewrites that remove per-step overhead without changing a value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ..fx import ASSERTS, aten, is_call, val
from ..ops.attention import sdpa_layout_forward
from ..ops.cache import rule_of
from ..ops.schema import Call
from .interpret import attention_sites, last_position_logits, with_site_hooks

ATTENTION = torch.ops.longctx.attention.default
MODES = {"prefill": "prefill", "growing": "decode", "static": "static"}  # the Generator's names -> step modes


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


def stored_per_site(gm: torch.fx.GraphModule) -> list[tuple[str, ...]]:
    """What each attention site of ``gm`` keeps per key, in graph order, as its op declares."""
    return [rule_of(n.target).stored(Call.of(n)) for n in attention_sites(gm)]


class CacheStep(torch.nn.Module):
    """The model program as a prefill, a growing-cache decode or a static-cache decode step.

    ``fast`` (the runtime's own use): capture-time asserts and no-op casts are dropped, the canonical
    attention runs its forward without the dispatcher, and static writes go into the caches in place
    (their owner, the Generator, never reads a step's old caches again). Exported, it stays functional.
    """

    def __init__(self, ep: torch.export.ExportedProgram, mode: str, fast: bool = False):
        super().__init__()
        self.user_outputs = [i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
        self.mode, self.fast = mode, fast
        self.specs = ep.graph_signature.input_specs
        self._step: tuple | None = None
        gm = last_position_logits(ep.graph_module, self.user_outputs[0])
        if fast:
            drop_asserts(gm)
            drop_noop_casts(gm)
        self.graph_module = with_site_hooks(gm, self._site)
        self.rules = [rule_of(n.target) for n in attention_sites(ep.graph_module)]  # looked up once, not per step
        counts = [len(names) for names in stored_per_site(ep.graph_module)]
        self.offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]  # site i's caches: offsets[i] .. offsets[i + 1]

    def _site(self, site: int, call: Call):
        caches, past_mask, slots, collected = self._step
        rule = self.rules[site]
        if self.mode == "prefill":
            collected += rule.prefill(call)
        else:
            cached = caches[self.offsets[site] : self.offsets[site + 1]]
            call = rule.grow(call, cached, past_mask) if self.mode == "decode" else rule.write(call, cached, past_mask, slots, self.fast)
            collected += [call[name] for name in rule.stored(call)]
        if self.fast and call.op is ATTENTION:
            return sdpa_layout_forward(*call.args())
        return call() if self.mode == "prefill" else rule.run(call)

    def forward(
        self,
        state: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        past_mask: torch.Tensor | None = None,
        caches: list[torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
    ):
        flat = [inputs[spec.arg.name] if spec.kind == InputKind.USER_INPUT else state[spec.target] for spec in self.specs]
        collected: list[torch.Tensor] = []
        self._step = (caches, past_mask, slots, collected)
        try:
            outputs = self.graph_module(*flat)
        finally:
            self._step = None
        return (outputs[self.user_outputs[0]], *collected)


def bind(ep: torch.export.ExportedProgram, state: dict[str, torch.Tensor]) -> dict[str, Callable]:
    """The model program's steps for the Generator, keyed prefill, growing and static, with the weights bound."""
    return {name: functools.partial(CacheStep(ep, mode, fast=True), state) for name, mode in MODES.items()}
