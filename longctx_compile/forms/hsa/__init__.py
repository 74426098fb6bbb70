"""``hsa``: hierarchical sparse attention (local window + top-K chunks fused by score)."""

from __future__ import annotations

from typing import Any

from .. import Form
from .rewrite import HsaConfig
from .train import site_loss


def describe(site: dict[str, Any]) -> str:
    """Chunk size S, top-K, window w, score mode and options of one hsa site."""
    topk = "all" if site["topk"] < 0 else site["topk"]
    extras = (" per block" if site.get("select") == "block" else "") + (" per head" if site.get("heads") == "each" else "")
    extras += f" rerank={site['rerank']}" if site.get("rerank") else ""
    extras += " sink" if site.get("sink") else ""
    extras += (" stick" if site.get("fusion") == "stick" else "") + (" nope" if site.get("nope") else "")
    extras += f" landmarks={site['landmarks']}" if site.get("landmarks") else ""
    return f"hsa S={site['chunk']} K={topk} w={site['hsa_window']} {site['score']}{extras}"


def verify_lengths(signature: dict[str, Any], sites: list[dict[str, Any]], config: dict[str, Any]) -> tuple[int, ...]:
    """Past the local window with one older chunk, and with more older chunks than the top-K (a real selection;
    with ``rerank`` R, than the R·K candidates) and a partial last chunk."""
    S, w = config["chunk"], config["window"]
    K = max((s["topk"] * max(1, s.get("rerank", 0)) for s in sites if "topk" in s), default=1)
    return (S * (w + 1) + 1, S * (w + (K if K > 0 else 2) + 2) + S // 2 + 1)


FORMS = [
    Form(
        "hsa",
        HsaConfig,
        ["hsa"],
        "hierarchical sparse attention: local window + top-K chunks fused by score",
        exact=False,
        describe=describe,
        verify_lengths=verify_lengths,
        site_loss=site_loss,
    )
]
