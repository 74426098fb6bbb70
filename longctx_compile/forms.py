"""Forms: a config dataclass plus the passes that rewrite canonical attention into that form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import LccError


@dataclass
class DenseConfig:
    """The dense form has no options: canonical attention, lowered as is."""


@dataclass
class FormSpec:
    name: str
    config_cls: type
    passes: list[str] = field(default_factory=list)
    doc: str = ""
    exact: bool = True  # whether the form (as configured) must equal the dense model
    # the form's own step programs (namespace: the form's name), exported on demand: program -> {name: ExportedProgram}
    programs: Callable[[Any], dict[str, Any]] | None = None
    program_names: tuple[str, ...] = ()


def _msa_programs(program: Any) -> dict[str, Any]:
    """encode, query and decode of an msa program (``runtime.msa_programs``), weights taken from model.pt2."""
    from .runtime.msa import MsaModel
    from .runtime.msa_programs import export_programs

    return export_programs(MsaModel(program.ep, program.signature))


def _forms() -> dict[str, FormSpec]:
    from .passes.eviction import EvictConfig
    from .passes.hsa import HsaConfig
    from .passes.msa import MsaConfig
    from .passes.sequence_parallel import RingConfig, SpConfig, UlyssesConfig

    return {
        "dense": FormSpec("dense", DenseConfig, [], "canonicalize and lower only: the proof that capture is lossless"),
        "ulysses": FormSpec("ulysses", UlyssesConfig, ["ulysses"], "per-rank Ulysses sequence parallelism: all-to-all heads ↔ sequence around attention"),
        "ring": FormSpec("ring", RingConfig, ["ring"], "per-rank ring attention: K/V blocks circulate, partial outputs merge by log-sum-exp"),
        "sp": FormSpec("sp", SpConfig, ["sp"], "sequence parallelism that picks ulysses, ring or Ulysses-inside-ring from the heads and bytes"),
        "hsa": FormSpec("hsa", HsaConfig, ["hsa"], "hierarchical sparse attention: local window + top-K chunks fused by score", exact=False),
        "msa": FormSpec(
            "msa",
            MsaConfig,
            ["msa", "doc_rope"],
            "memory sparse attention: routed layers pool documents into a memory bank and attend over the top-k",
            programs=_msa_programs,
            program_names=("encode", "query", "decode"),
        ),
        "evict": FormSpec(
            "evict",
            EvictConfig,
            ["evict"],
            "learned KV eviction (IndexMem): per-layer indexers keep the budget's most important keys, a latent memory the rest",
            exact=False,
        ),
    }


FORMS: dict[str, FormSpec] = _forms()


def get_form(name: str) -> FormSpec:
    if name not in FORMS:
        raise LccError(f"unknown form '{name}'; known forms: {', '.join(FORMS)}")
    return FORMS[name]
