"""Running an exported program's graph by hand, so a runtime can intercept its attention sites.

The MSA and eviction runtimes feed the graph the program's weights (``state``) and the user inputs it
was captured with, in the order of its input specs, and read the logits back from its outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ..ops import ATTENTION_OPS


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


def attention_sites(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The attention sites of the graph, in order."""
    return [n for n in ep.graph_module.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]


class SiteInterpreter(torch.fx.Interpreter):
    """Runs a graph, handing every attention site to ``hook(site index, op, args)`` and any op in ``replace`` to its function."""

    def __init__(self, gm: torch.fx.GraphModule, hook, replace: dict[Any, Any] | None = None):
        super().__init__(gm)
        self.hook, self.replace, self.site = hook, replace or {}, -1

    def call_function(self, target, args, kwargs):
        if target in ATTENTION_OPS:
            self.site += 1
            return self.hook(self.site, target, args)
        if target in self.replace:
            return self.replace[target](*args, **kwargs)
        return super().call_function(target, args, kwargs)


class _Site(torch.nn.Module):
    """One attention site of a :func:`with_site_hooks` module: calls ``hook(site, op, args)``."""

    def __init__(self, hook, site: int, target):
        super().__init__()
        self.hook, self.site, self.target = hook, site, target

    def forward(self, *args):
        return self.hook(self.site, self.target, args)


def with_site_hooks(gm: torch.fx.GraphModule, hook) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose attention sites call ``hook(site index, op, args)``, as generated code: what an
    interpreter does, without its Python dispatch per node (a decode step of a small model runs many times faster)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    module = torch.fx.GraphModule(gm, graph)
    sites = [n for n in graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]
    for i, node in enumerate(sites):
        name = f"lcc_site_{i}"
        module.add_submodule(name, _Site(hook, i, node.target))
        with graph.inserting_before(node):
            call = graph.call_module(name, node.args, node.kwargs)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
    module.recompile()
    return module
