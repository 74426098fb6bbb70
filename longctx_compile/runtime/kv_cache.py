"""``kv_cache``: turn a canonical program into *prefill* and *decode* programs with explicit caches.

``program`` below is a ``pipeline.Program`` (its ``ep``, ``gm``, ``signature`` and ``attention_nodes()``), passed in.

Cache layout (owned here; how each attention op extends it is declared beside the op, ``ops.cache``):
per attention site in graph order, the tensors its op stores per key (K and V; HSA also its chunks'
running landmark sums), each ``[batch, kv_heads, keys, dim]``, K after RoPE, GQA heads not repeated (but for hsa heads=each, whose op selects per query head and holds a K per query head), key ``j`` of the cache
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

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..errors import LccError
from ..ops.cache import rule_of
from ..ops.schema import Call
from .interpret import export_program, step_state
from .steps import CacheStep, stored_per_site


@dataclass
class CacheLayout:
    """What the runtime needs to allocate and feed the caches."""

    layers: int
    kv_heads: list[int]
    head_dims: list[int]
    v_dims: list[int]
    has_mask: bool
    max_len: int
    stored: list[list[str]]  # per site, the arguments its op keeps per key (``ops.cache``), one cache tensor each
    shapes: list[list[list[int]]]  # per site and stored tensor: [heads, dim]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_generatable(program: Any) -> None:
    """Refuse programs whose attention cannot be continued token by token, saying why."""
    for node in program.attention_nodes():
        facts = node.meta["lcc"]
        where = f"cannot build a KV cache for layer {facts['layer']} ({facts['module']})"
        rule = rule_of(node.target)
        if rule is None:
            raise LccError(f"{where}: its {facts['form']} attention has no cached decode step yet")
        reason = rule.refuse(Call.of(node))
        if reason:
            raise LccError(f"{where}: {reason} ({facts['mask']})")


def layout(program: Any) -> CacheLayout:
    nodes = program.attention_nodes()
    stored = stored_per_site(program.gm)
    return CacheLayout(
        layers=len(nodes),
        kv_heads=[int(Call.of(n).k.meta["val"].shape[1]) for n in nodes],  # the op's own K heads (hsa heads=each: one per query head)
        head_dims=[int(Call.of(n).k.meta["val"].shape[-1]) for n in nodes],
        v_dims=[int(Call.of(n).v.meta["val"].shape[-1]) for n in nodes],
        has_mask="attention_mask" in program.signature["inputs"],
        max_len=int(program.signature["max_len"]),
        stored=[list(names) for names in stored],
        shapes=[[[int(d) for d in dims] for dims in rule_of(n.target).dims(Call.of(n))] for n in nodes],
    )


@dataclass
class Steps:
    """The exported step programs of one model and their cache layout (weights come as ``state``)."""

    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    static: torch.export.ExportedProgram
    layout: CacheLayout

    PROGRAMS: ClassVar[tuple[str, ...]] = ("prefill", "decode", "static")


def export_steps(program: Any) -> Steps:
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
    prefill = export_program(CacheStep(program.ep, "prefill"), (state, inputs), {"state": static_state, "inputs": input_dims})

    def cache_examples(length: int) -> list[torch.Tensor]:
        dtype = Call.of(program.attention_nodes()[0]).q.meta["val"].dtype
        return [
            torch.zeros(2, heads, length, dim, dtype=rule_of(node.target).dtype(name, dtype))
            for node, names, site in zip(program.attention_nodes(), cache.stored, cache.shapes, strict=True)
            for name, (heads, dim) in zip(names, site, strict=True)
        ]

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
    decode = export_program(CacheStep(program.ep, "decode"), (state, step, past_mask, caches), dims)
    length = min(example_past + 2, max_len)
    static_args = (state, step, torch.ones(2, length, dtype=torch.long), cache_examples(length), torch.full((2,), length - 1))
    static_dims = {
        "state": static_state,
        "inputs": step_dims,
        "past_mask": {0: batch, 1: slots},
        "caches": [{0: batch, 2: slots}] * len(caches),
        "slots": {0: batch},
    }
    static = export_program(CacheStep(program.ep, "static"), static_args, static_dims)
    return Steps(prefill, decode, static, cache)
