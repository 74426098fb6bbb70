"""Sequence parallelism: ``ulysses``, ``ring`` and ``sp`` (which picks one, or Ulysses inside ring)."""

from __future__ import annotations

from typing import Any

from ...distributed import Layout
from .. import Form
from .rewrite import RingConfig, SpConfig, UlyssesConfig
from .verify import on_ranks

NO_CACHE = "sequence-parallel programs have no KV cache: generate with a dense artifact of the same model"


def verify_lengths(signature: dict[str, Any], sites: list[dict[str, Any]], config: dict[str, Any]) -> tuple[int, ...]:
    """One, two and five times what the layout splits evenly: a shard of one token, and several per rank."""
    multiple = Layout.of(signature).multiple
    return (multiple, 2 * multiple, 5 * multiple)


def _form(name: str, config: type, doc: str) -> Form:
    return Form(name, config, [name], doc, verify_runnable=on_ranks, verify_lengths=verify_lengths, cache_note=NO_CACHE)


FORMS = [
    _form("ulysses", UlyssesConfig, "per-rank Ulysses sequence parallelism: all-to-all heads ↔ sequence around attention"),
    _form("ring", RingConfig, "per-rank ring attention: K/V blocks circulate, partial outputs merge by log-sum-exp"),
    _form("sp", SpConfig, "sequence parallelism that picks ulysses, ring or Ulysses-inside-ring from the heads and bytes"),
]
