"""The IR vocabulary: importing this registers every ``torch.ops.longctx`` op (needed before loading a .pt2)."""

from . import attention, flash  # noqa: F401  (registers longctx::attention, longctx::doc_ids, longctx::flash_attention)
from .reference import attention_ref, doc_ids_from_positions

__all__ = ["attention_ref", "doc_ids_from_positions"]
