"""How each attention op is cached: what it stores per key, how new tokens extend it, what a decode step runs.

``runtime.kv_cache`` reads these declarations to turn any form's program into prefill and decode
programs; an op without one has no cached decode step (the pass says so, naming the form). A rule is
given the site's :class:`~.schema.Call` (arguments by schema name) and the cached tensors, one
``[batch, heads, keys, dim]`` tensor per stored argument, in :meth:`KeyValueCache.stored` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .schema import Call


def scatter_key(old: torch.Tensor, new: torch.Tensor, slots: torch.Tensor, in_place: bool, dim: int = 2) -> torch.Tensor:
    """``old`` with ``new`` (one key: size 1 along ``dim``, the keys' dimension) written at key ``slots[b]`` of row b
    (into ``old`` itself with ``in_place``). K and V are [B, H, S, D]; masks [B, S] and scores [B, G, S] work alike."""
    index = slots.view(-1, *[1] * (new.dim() - 1)).expand(new.shape)
    return old.scatter_(dim, index, new) if in_place else old.scatter(dim, index, new)


@dataclass(frozen=True)
class KeyValueCache:
    """An op with the canonical masking arguments (``key_padding doc_ids mask scale causal window``) that
    reads only its keys and values from the past: it stores K and V per key.

    A growing step appends the new keys and runs the op with queries as the last T of S keys (the
    canonical offsets give causality and the window); a static step writes the new key at ``slots[b]``
    of a fixed-length cache and runs it with causality and the window turned into a key mask.
    """

    def stored(self, call: Call) -> tuple[str, ...]:
        """The tensors kept per key (each [batch, heads, keys, dim]): arguments of the op, or of the call a step runs."""
        return ("k", "v")

    def dims(self, call: Call) -> list[tuple[Any, Any]]:
        """(heads, dim) of each stored tensor, for a call of graph nodes (their ``val`` metadata)."""
        return [tuple(call[name].meta["val"].shape[1::2]) for name in self.stored(call)]

    def dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of stored tensor ``name`` in a model computing in ``model_dtype``."""
        return model_dtype

    def prefill(self, call: Call) -> list[torch.Tensor]:
        """What a prompt's call stores, in :meth:`stored` order."""
        return [call[name] for name in self.stored(call)]

    def refuse(self, call: Call) -> str | None:
        """Why this call cannot be continued token by token, or None."""
        if not call.causal:
            return "its attention is not causal"
        if call.doc_ids is not None:
            return "packed-document masks need each key's document; capture with attention_mask"
        if call.mask is not None:
            return "an arbitrary mask tensor cannot be extended to cached keys"
        return None

    def grow(self, call: Call, cached: list[torch.Tensor], past_mask: torch.Tensor | None) -> Call:
        """The call over the cached keys followed by the new ones."""
        grown = {name: torch.cat([old, call[name]], dim=2) for name, old in zip(self.stored(call), cached, strict=True)}
        key_padding = call.key_padding
        if key_padding is not None:
            key_padding = torch.cat([past_mask.to(key_padding.dtype), key_padding], dim=1)
        return call.replace(**grown, key_padding=key_padding)

    def written(self, call: Call, cached: list[torch.Tensor], past_mask: torch.Tensor, slots: torch.Tensor, in_place: bool) -> tuple[dict, torch.Tensor]:
        """(the stored tensors with the new key written at ``slots[b]``, which keys are real now)."""
        written = {name: scatter_key(old, call[name], slots, in_place) for name, old in zip(self.stored(call), cached, strict=True)}
        new = call.key_padding.to(torch.bool) if call.key_padding is not None else torch.ones_like(slots[:, None], dtype=torch.bool)
        return written, past_mask.to(torch.bool).scatter(1, slots[:, None], new)

    def write(self, call: Call, cached: list[torch.Tensor], past_mask: torch.Tensor, slots: torch.Tensor, in_place: bool = False) -> Call:
        """The call over a fixed-length cache with the one new key written at ``slots[b]`` (in place: the
        runtime owns its caches; an exported program stays functional)."""
        written, visible = self.written(call, cached, past_mask, slots, in_place)
        if call.window > 0:
            keys = torch.arange(past_mask.shape[1], device=past_mask.device)
            visible = visible & (keys[None, :] > slots[:, None] - call.window)
        return call.replace(**written, key_padding=visible, causal=False, window=0)

    def run(self, call: Call) -> Any:
        """The op's output over the extended call, in the structure the graph reads."""
        return call()


RULES: dict[Any, KeyValueCache] = {}


def declare(op: Any, rule: KeyValueCache) -> None:
    """Declare how ``op`` (an OpOverload) is cached."""
    RULES[op] = rule


def rule_of(op: Any) -> KeyValueCache | None:
    """The cache declaration of ``op``, or None when it has no cached decode step."""
    return RULES.get(op)
