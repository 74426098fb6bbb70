"""What each attention site computes without its form: the source model's attention over the same q, k, v and mask.

``lcc train`` distils a converted program towards its source, and the source is the same program with every site
run this way (the form's added inputs — retrieval projections, routers, indexers — take no part). Ops bound by
``lower`` return their kernel's extra outputs too; the dense stand-in fills those with None (no graph reads them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import LccError
from .schema import Call

L = torch.ops.longctx
ATTENTION = L.attention.default


def _hsa(call: Call) -> torch.Tensor:
    """HSA's chunks cover causal self-attention with at most key padding: dense is causal attention over all keys."""
    return ATTENTION(call.q, call.k, call.v, call.key_padding, None, None, call.scale, True, 0)


DENSE: dict[Any, Callable[[Call], Any]] = {
    L.attention.default: lambda call: call(),
    L.flash_attention.default: lambda call: (call.run(ATTENTION), None),
    L.ring_attention.default: lambda call: call(),  # exact attention over every rank's keys: already dense
    L.msa_attention.default: lambda call: call.run(ATTENTION),  # over the sequence, msa is dense; its memory is read at query time
    L.evict_attention.default: lambda call: call.run(ATTENTION),  # the full program is dense; eviction acts on the cache
    L.hsa_attention.default: _hsa,
    L.hsa_flash.default: lambda call: (_hsa(call), None, None, None),
}


def dense(call: Call) -> Any:
    """The site's output as the source model's attention gives it (the op's output structure)."""
    if call.op not in DENSE:
        raise LccError(f"{call.op} has no dense form to distil towards (a sequence-parallel site runs on several ranks)")
    return DENSE[call.op](call)
