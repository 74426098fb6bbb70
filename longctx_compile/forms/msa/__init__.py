"""``msa``: memory sparse attention — routed layers pool documents into a memory bank and attend over the top-k."""

from __future__ import annotations

from typing import Any

from .. import Form
from . import doc_rope  # noqa: F401  (registers the doc_rope pass)
from .rewrite import MsaConfig


def programs(program: Any) -> dict[str, Any]:
    """encode, query and decode of an msa program (``programs.py``), weights taken from model.pt2."""
    from .programs import export_programs
    from .runtime import MsaModel

    return export_programs(MsaModel(program.ep, program.signature))


def generate(ep, signature, prompts, max_new_tokens, pad_id, stream, bank=None, positions=None, **sampling):
    """Routed over ``bank`` when one is given; without it an msa program is the dense model (the KV-cache steps)."""
    if bank is None:
        return None
    from .runtime import generate_with_bank

    return generate_with_bank(ep, signature, bank, prompts, max_new_tokens, pad_id, stream, positions, **sampling)


def verify(original, ep, signature, lengths, rtol, atol):
    from .verify import verify_msa

    return verify_msa(original, ep, signature, lengths, rtol, atol)


def train(ep, signature, cfg, data, tokenizer, options, nproc=1):
    """Documents encoded into pooled memory and queries answered over it, as the form runs them (``train.py``); on
    ``nproc`` ranks each bank is sharded over them (Memory Parallel)."""
    from .train import trainer

    return trainer(ep, signature, cfg, data, tokenizer, options, nproc)


def describe(site: dict[str, Any]) -> str:
    topk = "all" if site["topk"] < 0 else site["topk"]
    votes = " (votes)" if site.get("votes") else ""  # a layer whose scores pick every layer's documents (shared routing)
    return f"msa P={site['pool']} top-{topk} docs {site['score']}{votes}" + (" (router loaded)" if site.get("loaded_router") else "")


def cli(app: Any) -> None:
    from .cli import memory_app

    app.add_typer(memory_app, name="memory")


FORMS = [
    Form(
        "msa",
        MsaConfig,
        ["msa", "doc_rope"],
        "memory sparse attention: routed layers pool documents into a memory bank and attend over the top-k",
        programs=programs,
        program_names=("encode", "query", "decode"),
        generate=generate,
        verify=verify,
        train=train,
        describe=describe,
        cli=cli,
    )
]
