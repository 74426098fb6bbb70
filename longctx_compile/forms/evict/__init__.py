"""``evict``: learned KV eviction (IndexMem) — per-layer indexers keep the budget's most important keys, a latent
memory the rest."""

from __future__ import annotations

from typing import Any

from .. import Form
from .rewrite import EvictConfig


def programs(program: Any) -> dict[str, Any]:
    """The decode step over explicit per-layer caches (``step.py``), weights taken from model.pt2."""
    from .runtime import EvictModel
    from .step import export_decode

    return {"decode": export_decode(EvictModel(program.ep, program.signature))}


def generate(ep, signature, prompts, max_new_tokens, pad_id, stream, bank=None, **sampling):
    """Through the evicting cache (the runtime's own, compacted between steps)."""
    from .runtime import EvictModel

    return EvictModel(ep, signature).generate(prompts, max_new_tokens, pad_id, stream, **sampling)


def verify(original, ep, signature, lengths, rtol, atol):
    from .verify import verify_evict

    return verify_evict(original, ep, signature, lengths, rtol, atol)


def onnx_model(ep, manifest):
    from .onnx import with_importance

    ep, layers = with_importance(ep, manifest)
    return ep, [f"importance_{layer}" for layer in layers]


def describe(site: dict[str, Any]) -> str:
    memory = " +memory" if site["memory"] else ""
    return f"evict {site['budget']} {site['policy']} idx {site['indexer_heads']}×{site['indexer_dim']}{memory}"


def cli(app: Any) -> None:
    from .cli import train_indexers

    app.command("train-indexers")(train_indexers)


def verify_lengths(signature: dict[str, Any], sites: list[dict[str, Any]], config: dict[str, Any]) -> tuple[int, ...]:
    """A prompt half longer than the sinks and the recent window, so a budget below it evicts."""
    return (2 * (config["sinks"] + config["window"] + 16) + 1,)


FORMS = [
    Form(
        "evict",
        EvictConfig,
        ["evict"],
        "learned KV eviction (IndexMem): per-layer indexers keep the budget's most important keys, a latent memory the rest",
        exact=False,
        programs=programs,
        program_names=("decode",),
        generate=generate,
        verify=verify,
        verify_lengths=verify_lengths,
        onnx_model=onnx_model,
        describe=describe,
        cli=cli,
    )
]
