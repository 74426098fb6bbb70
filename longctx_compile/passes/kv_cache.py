"""``kv_cache``: turn a canonical program into a *prefill* and a *decode* program with explicit caches.

Cache layout (owned here; forms that change the cache replace :class:`CacheStep`'s two hooks):
one (K, V) pair per attention site in graph order, each ``[batch, kv_heads, keys, head_dim]``, K after
RoPE, GQA heads not repeated, key ``j`` of the cache being the ``j``-th token fed (left padding
included). ``past_mask`` ``[batch, keys]`` marks real tokens (1) and padding (0).

- prefill(input_ids, attention_mask, position_ids) -> (logits, k_0, v_0, k_1, v_1, ...)
- decode(input_ids, attention_mask, position_ids, past_mask, k_0, v_0, ...) -> (logits, k_0', v_0', ...), one new token

where ``attention_mask`` covers the new tokens only and each ``k_i'`` is the cache with the new
tokens appended. Each attention attends over cache + new tokens; the canonical op's convention
(queries are the last T of S keys) gives the causal and window offsets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import LccError
from ..ops import ATTENTION_OPS
from ..pipeline import Program


@dataclass
class CacheLayout:
    """What the runtime needs to allocate and feed the caches."""

    layers: int
    kv_heads: list[int]
    head_dims: list[int]
    v_dims: list[int]
    has_mask: bool
    max_len: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _CacheInterpreter(torch.fx.Interpreter):
    """Runs the canonical graph, feeding each attention the cache and collecting its K and V."""

    def __init__(self, gm: torch.fx.GraphModule, caches: list[torch.Tensor] | None, past_mask: torch.Tensor | None):
        super().__init__(gm)
        self.caches, self.past_mask = caches, past_mask
        self.collected: list[torch.Tensor] = []

    def call_function(self, target, args, kwargs):
        if target not in ATTENTION_OPS:
            return super().call_function(target, args, kwargs)
        q, k, v, key_padding = args[:4]
        if self.caches is not None:
            site = len(self.collected) // 2
            k = torch.cat([self.caches[2 * site], k], dim=2)
            v = torch.cat([self.caches[2 * site + 1], v], dim=2)
            if key_padding is not None:
                key_padding = torch.cat([self.past_mask.to(key_padding.dtype), key_padding], dim=1)
        self.collected += [k, v]
        return super().call_function(target, (q, k, v, key_padding, *args[4:]), kwargs)


class CacheStep(torch.nn.Module):
    """The canonical program as a prefill (``decode=False``) or decode step with explicit caches."""

    def __init__(self, ep: torch.export.ExportedProgram, decode: bool):
        super().__init__()
        self.graph_module = ep.graph_module
        self.decode = decode
        self.specs = ep.graph_signature.input_specs
        self.user_outputs = [i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
        self.tensors = torch.nn.ParameterDict()
        for i, spec in enumerate(self.specs):
            if spec.kind == InputKind.PARAMETER:
                self.tensors[f"p{i}"] = ep.state_dict[spec.target]
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
                self.register_buffer(f"b{i}", value, persistent=False)

    def forward(self, inputs: dict[str, torch.Tensor], past_mask: torch.Tensor | None = None, caches: list[torch.Tensor] | None = None):
        flat = []
        for i, spec in enumerate(self.specs):
            if spec.kind == InputKind.PARAMETER:
                flat.append(self.tensors[f"p{i}"])
            elif spec.kind == InputKind.USER_INPUT:
                flat.append(inputs[spec.arg.name])
            else:
                flat.append(getattr(self, f"b{i}"))
        runner = _CacheInterpreter(self.graph_module, caches if self.decode else None, past_mask)
        outputs = runner.run(*flat)
        logits = outputs[self.user_outputs[0]]
        return (logits, *runner.collected)


def check_generatable(program: Program) -> None:
    """Refuse programs whose attention cannot be continued token by token, saying why."""
    for node in program.attention_nodes():
        facts = node.meta["lcc"]
        where = f"cannot build a KV cache for layer {facts['layer']} ({facts['module']})"
        if not node.args[7]:
            raise LccError(f"{where}: its attention is not causal ({facts['mask']})")
        if node.args[4] is not None:
            raise LccError(f"{where}: packed-document masks need each key's document; capture with attention_mask")
        if node.args[5] is not None:
            raise LccError(f"{where}: an arbitrary mask tensor cannot be extended to cached keys")


def layout(program: Program) -> CacheLayout:
    nodes = program.attention_nodes()
    return CacheLayout(
        layers=len(nodes),
        kv_heads=[n.meta["lcc"]["hkv"] for n in nodes],
        head_dims=[int(n.args[1].meta["val"].shape[-1]) for n in nodes],
        v_dims=[int(n.args[2].meta["val"].shape[-1]) for n in nodes],
        has_mask="attention_mask" in program.signature["inputs"],
        max_len=int(program.signature["max_len"]),
    )


def export_steps(program: Program) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram, CacheLayout]:
    """Export the prefill and decode programs of ``program`` (dynamic batch, new tokens and cached keys)."""
    from torch.export import Dim

    check_generatable(program)
    cache = layout(program)
    names = program.signature["inputs"]
    max_len = cache.max_len
    batch, new, past = Dim("batch", max=1024), Dim("new", min=1, max=max_len), Dim("past", min=1, max=max_len - 1)
    example_new, example_past = min(3, max_len), min(5, max_len)
    inputs = {name: torch.ones(2, example_new, dtype=torch.long) for name in names}
    inputs["input_ids"] = torch.zeros(2, example_new, dtype=torch.long)
    if "position_ids" in names:
        inputs["position_ids"] = torch.arange(example_new).expand(2, example_new).clone()
    input_dims = {name: {0: batch, 1: new} for name in names}
    prefill = _export(CacheStep(program.ep, decode=False), (inputs,), {"inputs": input_dims})
    dtype = program.attention_nodes()[0].args[0].meta["val"].dtype
    caches = []
    for hkv, d, dv in zip(cache.kv_heads, cache.head_dims, cache.v_dims, strict=True):
        caches += [torch.zeros(2, hkv, example_past, d, dtype=dtype), torch.zeros(2, hkv, example_past, dv, dtype=dtype)]
    past_mask = torch.ones(2, example_past, dtype=torch.long) if cache.has_mask else None
    # decode feeds one token per step (its length is static: export would otherwise guard on T != 1)
    step = {name: t[:, :1] for name, t in inputs.items()}
    dims = {
        "inputs": {name: {0: batch} for name in names},
        "past_mask": {0: batch, 1: past} if cache.has_mask else None,
        "caches": [{0: batch, 2: past}] * len(caches),
    }
    decode = _export(CacheStep(program.ep, decode=True), (step, past_mask, caches), dims)
    return prefill, decode, cache


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: dict) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
