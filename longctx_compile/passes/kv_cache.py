"""``kv_cache``: turn a canonical program into *prefill* and *decode* programs with explicit caches.

Cache layout (owned here; a form that changes the cache supplies its own ``extend`` hook, which
rewrites each attention's K, V and masks): one (K, V) pair per attention site in graph order, each
``[batch, kv_heads, keys, head_dim]``, K after RoPE, GQA heads not repeated, key ``j`` of the cache
being the ``j``-th token fed (left padding included). ``past_mask`` ``[batch, keys]`` marks real
tokens (1) and padding or empty slots (0). ``state`` is the model program's weights by name.

- prefill(state, inputs) -> (logits, k_0, v_0, k_1, v_1, ...), logits of the last position only
- decode(state, inputs, past_mask, caches) -> (logits, k_0', ...): growing cache, one new token
  appended; the canonical op's "queries are the last T of S keys" gives the causal and window offsets.
- static(state, inputs, past_mask, caches, slots) -> (logits, k_0', ...): fixed-length cache, the
  new token written at key ``slots[b]``; every step has the same shapes (what CUDA graphs need).

``inputs`` holds ``input_ids`` and, when captured, ``attention_mask`` and ``position_ids`` of the new
tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import LccError
from ..ops import ATTENTION_OPS
from ..pipeline import Program
from .graph import CASTS, CLONES, aten, is_call, val

_END = 2**63 - 1  # slice end meaning "to the last position"


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
    """Runs the canonical graph, letting ``extend`` rewrite each attention's K, V and masks and collecting K and V."""

    def __init__(self, gm: torch.fx.GraphModule, extend: Callable[[int, tuple], tuple] | None):
        super().__init__(gm)
        self.extend = extend
        self.collected: list[torch.Tensor] = []

    def call_function(self, target, args, kwargs):
        if target not in ATTENTION_OPS:
            return super().call_function(target, args, kwargs)
        if self.extend is not None:
            args = self.extend(len(self.collected) // 2, args)
        self.collected += [args[1], args[2]]
        return super().call_function(target, args, kwargs)


def _grow(caches: list[torch.Tensor], past_mask: torch.Tensor | None) -> Callable[[int, tuple], tuple]:
    """Growing cache: append the new tokens' K and V (and padding) after the cached ones."""

    def extend(site: int, args: tuple) -> tuple:
        q, k, v, key_padding = args[:4]
        k = torch.cat([caches[2 * site], k], dim=2)
        v = torch.cat([caches[2 * site + 1], v], dim=2)
        if key_padding is not None:
            key_padding = torch.cat([past_mask.to(key_padding.dtype), key_padding], dim=1)
        return (q, k, v, key_padding, *args[4:])

    return extend


def _write_slot(caches: list[torch.Tensor], past_mask: torch.Tensor, slots: torch.Tensor) -> Callable[[int, tuple], tuple]:
    """Static cache: write the new token's K and V into slot ``slots[b]`` of a fixed-length cache.

    Keys past the slot are empty (``past_mask`` 0), so causality is a padding mask; a window becomes
    "slot - key < window". The attention then runs unmasked by position (causal False, window 0).
    """
    keys = torch.arange(past_mask.shape[1], device=past_mask.device)

    def extend(site: int, args: tuple) -> tuple:
        q, k, v, key_padding, doc_ids, mask, scale, causal, window = args[:9]
        B, H, _, _ = k.shape
        k = caches[2 * site].scatter(2, slots.view(B, 1, 1, 1).expand(B, H, 1, k.shape[-1]), k)
        v = caches[2 * site + 1].scatter(2, slots.view(B, 1, 1, 1).expand(B, H, 1, v.shape[-1]), v)
        new = key_padding.to(torch.bool) if key_padding is not None else torch.ones_like(slots[:, None], dtype=torch.bool)
        visible = past_mask.to(torch.bool).scatter(1, slots[:, None], new)
        if window > 0:
            visible = visible & (keys[None, :] > slots[:, None] - window)
        return (q, k, v, visible, doc_ids, mask, scale, False, 0, *args[9:])

    return extend


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


class CacheStep(torch.nn.Module):
    """The canonical program as a prefill, a growing-cache decode or a static-cache decode step.

    Weights are an input (``state``, keyed as in the model program's state dict and constants), so
    the step programs carry no copy of them: an artifact stores the weights once, in ``model.pt2``.
    """

    def __init__(self, ep: torch.export.ExportedProgram, mode: str):
        super().__init__()
        self.user_outputs = [i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
        self.graph_module = last_position_logits(ep.graph_module, self.user_outputs[0])
        self.mode = mode
        self.specs = ep.graph_signature.input_specs

    def forward(
        self,
        state: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        past_mask: torch.Tensor | None = None,
        caches: list[torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
    ):
        flat = [inputs[spec.arg.name] if spec.kind == InputKind.USER_INPUT else state[spec.target] for spec in self.specs]
        extend = None
        if self.mode == "decode":
            extend = _grow(caches, past_mask)
        elif self.mode == "static":
            extend = _write_slot(caches, past_mask, slots)
        runner = _CacheInterpreter(self.graph_module, extend)
        outputs = runner.run(*flat)
        return (outputs[self.user_outputs[0]], *runner.collected)


def step_state(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The tensors the step programs take as ``state``: the model program's parameters, buffers and constants."""
    state = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            if not isinstance(value, torch.Tensor):
                raise LccError(f"cannot build a KV cache: the program's constant '{spec.target}' is not a tensor")
            state[spec.target] = value
    return state


def check_generatable(program: Program) -> None:
    """Refuse programs whose attention cannot be continued token by token, saying why."""
    if program.signature.get("sequence_parallel"):
        raise LccError("sequence-parallel programs have no KV cache: generate with a dense artifact of the same model")
    for node in program.attention_nodes():
        facts = node.meta["lcc"]
        where = f"cannot build a KV cache for layer {facts['layer']} ({facts['module']})"
        if node.target not in (torch.ops.longctx.attention.default, torch.ops.longctx.flash_attention.default):
            raise LccError(f"{where}: its {facts['form']} attention has no cached decode step yet")
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


@dataclass
class Steps:
    """The exported step programs of one model and their cache layout (weights come as ``state``)."""

    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    static: torch.export.ExportedProgram
    layout: CacheLayout

    PROGRAMS: ClassVar[tuple[str, ...]] = ("prefill", "decode", "static")


def export_steps(program: Program) -> Steps:
    """Export prefill, growing decode and static decode of ``program`` (dynamic batch, new tokens and cache length)."""
    from torch.export import Dim

    check_generatable(program)
    cache = layout(program)
    names = program.signature["inputs"]
    max_len = cache.max_len
    batch, new = Dim("batch", max=1024), Dim("new", min=1, max=max_len)
    past, slots = Dim("past", min=1, max=max_len - 1), Dim("slots", min=2, max=max_len)
    example_new, example_past = min(3, max_len), min(5, max_len)
    state = step_state(program.ep)
    static_state = {name: None for name in state}
    inputs = {name: torch.ones(2, example_new, dtype=torch.long) for name in names}
    inputs["input_ids"] = torch.zeros(2, example_new, dtype=torch.long)
    if "position_ids" in names:
        inputs["position_ids"] = torch.arange(example_new).expand(2, example_new).clone()
    input_dims = {name: {0: batch, 1: new} for name in names}
    prefill = _export(CacheStep(program.ep, "prefill"), (state, inputs), {"state": static_state, "inputs": input_dims})

    def cache_examples(length: int) -> list[torch.Tensor]:
        dtype = program.attention_nodes()[0].args[0].meta["val"].dtype
        caches = []
        for hkv, d, dv in zip(cache.kv_heads, cache.head_dims, cache.v_dims, strict=True):
            caches += [torch.zeros(2, hkv, length, d, dtype=dtype), torch.zeros(2, hkv, length, dv, dtype=dtype)]
        return caches

    # decode feeds one token per step (its length is static: export would otherwise guard on T != 1)
    step = {name: t[:, :1] for name, t in inputs.items()}
    step_dims = {name: {0: batch} for name in names}
    caches = cache_examples(example_past)
    past_mask = torch.ones(2, example_past, dtype=torch.long) if cache.has_mask else None
    dims = {
        "state": static_state,
        "inputs": step_dims,
        "past_mask": {0: batch, 1: past} if cache.has_mask else None,
        "caches": [{0: batch, 2: past}] * len(caches),
    }
    decode = _export(CacheStep(program.ep, "decode"), (state, step, past_mask, caches), dims)
    length = min(example_past + 2, max_len)
    static_args = (state, step, torch.ones(2, length, dtype=torch.long), cache_examples(length), torch.full((2,), length - 1))
    static_dims = {
        "state": static_state,
        "inputs": step_dims,
        "past_mask": {0: batch, 1: slots},
        "caches": [{0: batch, 2: slots}] * len(caches),
        "slots": {0: batch},
    }
    static = _export(CacheStep(program.ep, "static"), static_args, static_dims)
    return Steps(prefill, decode, static, cache)


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: dict) -> torch.export.ExportedProgram:
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    ep.example_inputs = None  # they hold the weights (``state``), which a saved program must not copy
    return ep
