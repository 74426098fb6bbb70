"""Running an exported program's graph with hooks at its attention sites: the one way every runtime does it.

:func:`with_site_hooks` turns the graph into generated code whose attention sites call
``hook(site index, call)`` (``call`` an :class:`~..ops.schema.Call`, arguments by schema name); the
hook may run the op, change its arguments or return anything of the op's output shape. The graph is
fed by :func:`flat_inputs` (the program's weights as ``state`` plus the user inputs it was captured
with) and its logits are read at :func:`logits_index`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import LccError
from ..fx import CASTS, CLONES, aten, is_call, val
from ..ops import ATTENTION_OPS
from ..ops.schema import Call

Hook = Callable[[int, Call], Any]
_END = 2**63 - 1  # slice end meaning "to the last position"


def flat_inputs(ep: torch.export.ExportedProgram, names, state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The graph's placeholders in order: weights from ``state``, user inputs (those in ``names``) from ``inputs``."""
    return [
        inputs[s.arg.name] if s.kind == InputKind.USER_INPUT else state[s.target]
        for s in ep.graph_signature.input_specs
        if s.kind != InputKind.USER_INPUT or s.arg.name in names
    ]


def logits_index(ep: torch.export.ExportedProgram) -> int:
    """Which graph output is the logits (the first user output)."""
    return next(i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT)


def attention_sites(ep: torch.export.ExportedProgram | torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The attention sites of the graph, in order."""
    gm = ep.graph_module if isinstance(ep, torch.export.ExportedProgram) else ep
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]


class _Site(torch.nn.Module):
    """One attention site of a :func:`with_site_hooks` module: calls ``hook(site, Call(op, args))``."""

    def __init__(self, hook: Hook, site: int, target):
        super().__init__()
        self.hook, self.site, self.target = hook, site, target

    def forward(self, *args):
        return self.hook(self.site, Call(self.target, args))


class _Tap(torch.nn.Module):
    """A value the runtime wants to see as it is computed: ``tap(name, value)``, then the value goes on unchanged."""

    def __init__(self, tap: Callable[[str, torch.Tensor], None], name: str):
        super().__init__()
        self.tap, self.name = tap, name

    def forward(self, value):
        self.tap(self.name, value)
        return value


def with_site_hooks(
    gm: torch.fx.GraphModule,
    hook: Hook,
    replace: dict[Any, Callable] | None = None,
    taps: Iterable[str] = (),
    tap: Callable[[str, torch.Tensor], None] | None = None,
) -> torch.fx.GraphModule:
    """A copy of ``gm`` as generated code whose attention sites call ``hook(site index, call)``.

    ``replace`` maps other ops to the functions that run instead; ``tap(name, value)`` sees the value
    of each node named in ``taps`` as it is computed. No Python dispatch per node, as an FX interpreter
    would have: a decode step of a small model runs many times faster, and torch.export traces it.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    module = torch.fx.GraphModule(gm, graph)
    taps = set(taps)
    site = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in ATTENTION_OPS:
            name = f"lcc_site_{site}"
            module.add_submodule(name, _Site(hook, site, node.target))
            site += 1
            with graph.inserting_before(node):
                call = graph.call_module(name, node.args, node.kwargs)
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
        elif replace and node.target in replace:
            node.target = replace[node.target]
    for node in [n for n in graph.nodes if n.name in taps]:
        name = f"lcc_tap_{node.name}"
        module.add_submodule(name, _Tap(tap, node.name))
        with graph.inserting_after(node):
            seen = graph.call_module(name, (node,))
        node.replace_all_uses_with(seen, delete_user_cb=lambda user, seen=seen: user is not seen)
    graph.lint()
    module.recompile()
    return module


def step_state(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The tensors the step programs take as ``state``: the model program's parameters, buffers and constants."""
    state = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            if not isinstance(value, torch.Tensor):
                raise LccError(f"cannot run the program's steps: its's constant '{spec.target}' is not a tensor")
            state[spec.target] = value
    return state


# ops that map each position on its own and read no other tensor: a last-position slice can move past them
_POSITIONWISE = (*CASTS, *CLONES, aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.tanh.default)


def last_position_logits(gm: torch.fx.GraphModule, index: int) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose output ``index`` (the logits) keeps only the last position.

    When the logits come from a ``linear`` through position-wise ops only, the slice goes before the
    linear, so the LM head runs on one position, not all T (at 100K tokens and a 128K vocabulary full
    logits would be 51 GB in fp32); otherwise the logits are sliced after the fact.
    """
    graph = torch.fx.Graph()
    outputs = graph.graph_copy(gm.graph, {})
    out = graph.output(outputs)
    node = outputs[index]
    while is_call(node, *_POSITIONWISE) and len(node.users) == 1 and not any(isinstance(a, torch.fx.Node) for a in node.args[1:]):
        node = node.args[0]
    head = is_call(node, aten.linear) and len(node.users) == 1 and getattr(val(node.args[0]), "ndim", 0) == 3
    target = node.args[0] if head else outputs[index]
    with graph.inserting_before(node if head else out):
        last = graph.call_function(aten.slice.Tensor, (target, 1, -1, _END))
    (node if head else out).replace_input_with(target, last)
    return torch.fx.GraphModule(gm, graph)


def export_program(module: torch.nn.Module, args: tuple, dynamic_shapes: dict) -> torch.export.ExportedProgram:
    """Export a step module whose first argument is the weights (``state``): the saved program keeps no copy of them
    (no example inputs) and no stack traces of lcc's own wrappers (nothing a user reads; most of a small file)."""
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    ep.example_inputs = None
    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    return ep
