"""Sequence parallelism: ``ulysses``, ``ring`` and ``sp`` (which picks one, or Ulysses inside ring)."""

from __future__ import annotations

from .. import Form
from .rewrite import RingConfig, SpConfig, UlyssesConfig
from .verify import on_ranks

NO_CACHE = "sequence-parallel programs have no KV cache: generate with a dense artifact of the same model"


def _form(name: str, config: type, doc: str) -> Form:
    return Form(name, config, [name], doc, verify_runnable=on_ranks, cache_note=NO_CACHE)


FORMS = [
    _form("ulysses", UlyssesConfig, "per-rank Ulysses sequence parallelism: all-to-all heads ↔ sequence around attention"),
    _form("ring", RingConfig, "per-rank ring attention: K/V blocks circulate, partial outputs merge by log-sum-exp"),
    _form("sp", SpConfig, "sequence parallelism that picks ulysses, ring or Ulysses-inside-ring from the heads and bytes"),
]
