"""``hsa``: hierarchical sparse attention (local window + top-K chunks fused by score)."""

from __future__ import annotations

from typing import Any

from .. import Form
from .rewrite import HsaConfig


def describe(site: dict[str, Any]) -> str:
    """Chunk size S, top-K, window w, score mode and options of one hsa site."""
    topk = "all" if site["topk"] < 0 else site["topk"]
    extras = (" per block" if site.get("select") == "block" else "") + (" sink" if site.get("sink") else "")
    extras += (" stick" if site.get("fusion") == "stick" else "") + (" nope" if site.get("nope") else "")
    return f"hsa S={site['chunk']} K={topk} w={site['hsa_window']} {site['score']}{extras}"


FORMS = [Form("hsa", HsaConfig, ["hsa"], "hierarchical sparse attention: local window + top-K chunks fused by score", exact=False, describe=describe)]
