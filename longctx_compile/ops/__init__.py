"""The IR vocabulary: importing this registers every ``torch.ops.longctx`` op (needed before loading a .pt2)."""

import torch

from . import attention, collectives, evict, flash, hsa, hsa_cpu, hsa_decode, hsa_flash, loss, msa, ring  # noqa: F401  (registers every longctx op)
from .reference import attention_ref, doc_ids_from_positions

# every op that is an attention site: the canonical one, what ``lower`` binds it to, and the forms' own
ATTENTION_OPS = (
    torch.ops.longctx.attention.default,
    torch.ops.longctx.flash_attention.default,
    torch.ops.longctx.ring_attention.default,
    torch.ops.longctx.hsa_attention.default,
    torch.ops.longctx.hsa_flash.default,
    torch.ops.longctx.msa_attention.default,
    torch.ops.longctx.evict_attention.default,
)

__all__ = ["ATTENTION_OPS", "attention_ref", "doc_ids_from_positions"]
