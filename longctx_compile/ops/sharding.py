"""How each attention op's arguments shard under Ulysses sequence parallelism, by schema name.

Ulysses gives each rank every token of 1/U of the heads, so any attention that treats heads independently
runs unchanged inside it; the sequence-parallel rewrite reads this table to put each argument in that form:

- ``heads``: [B, H, T, ·] per-head tensors: all-to-all from this rank's tokens of all heads to all tokens
  of its heads (and the output back);
- ``tokens``: [B, T] per-token inputs (key padding): gathered in token order;
- ``documents``: document ids: recomputed from the gathered positions;
- ``head_weights``: [H, ·] per-head parameters of the form (HSA's learned retrieval projections): this rank's slice;
- ``local``: left as they are (MSA's router projections: attention ignores them; the memory programs,
  which do read them, are built from the unsharded artifact);
- ``absent``: must be None (an arbitrary mask tensor cannot be sharded over the sequence).

``repeat_kv``: whether K/V heads may be repeated when the KV heads are fewer than U. Not for HSA, whose
chunk selection is shared by a KV head's query heads: a repeated head would select for only part of its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

L = torch.ops.longctx


@dataclass(frozen=True)
class Roles:
    roles: dict[str, str]
    repeat_kv: bool = True


ULYSSES: dict[Any, Roles] = {
    L.attention.default: Roles({"q": "heads", "k": "heads", "v": "heads", "key_padding": "tokens", "doc_ids": "documents", "mask": "absent"}),
    L.msa_attention.default: Roles(
        {"q": "heads", "k": "heads", "v": "heads", "key_padding": "tokens", "doc_ids": "documents", "mask": "absent", "router_q": "local", "router_k": "local"}
    ),
    L.hsa_attention.default: Roles(
        {
            "q": "heads",
            "k": "heads",
            "v": "heads",
            "score_q": "heads",
            "score_k": "heads",
            "key_padding": "tokens",
            "retrieval_q": "head_weights",
            "retrieval_k": "head_weights",
            "retrieval_pool": "head_weights",
        },
        repeat_kv=False,
    ),
}
