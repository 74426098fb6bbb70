"""``longctx::attention``: the canonical attention op every pass reads and every form rewrites."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cache
from .reference import QUERY_BLOCK, _mask_block, allowed_mask, attention_ref, doc_ids_from_positions


@torch.library.custom_op("longctx::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
) -> torch.Tensor:
    """Softmax attention with structured masking; semantics in ``ops.reference.attention_ref``.

    The output is [B, Hq, T, Dv] laid out as [B, T, Hq, Dv] in memory, like SDPA's, so the
    ``transpose(1, 2).view(B, T, -1)`` that models apply after SDPA stays valid.
    """
    return sdpa_layout_forward(q, k, v, key_padding, doc_ids, mask, scale, causal, window)


def sdpa_layout_forward(q, k, v, key_padding, doc_ids, mask, scale: float, causal: bool, window: int) -> torch.Tensor:
    """:func:`sdpa_forward` in the op's output layout: the op's forward as a plain function."""
    result = empty_sdpa_layout(q, v)
    result.copy_(sdpa_forward(q, k, v, key_padding, doc_ids, mask, scale, causal, window))
    return result


def sdpa_forward(q, k, v, key_padding, doc_ids, mask, scale: float, causal: bool, window: int) -> torch.Tensor:
    """The op's forward through PyTorch SDPA (GQA native), a block of queries at a time.

    Faster than the reference's explicit softmax, which stays the definition and the backward.
    Masks are built per block of ``QUERY_BLOCK`` queries, so memory stays O(block * S); a query that
    may see no key gets 0, as the reference defines.
    """
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    sdpa = functools.partial(F.scaled_dot_product_attention, scale=scale, enable_gqa=Hq != k.shape[1])
    if key_padding is not None and bool(key_padding.all()):
        key_padding = None  # no padding at all: let SDPA skip the mask (and use its causal kernel)
    if doc_ids is None and mask is None and key_padding is None and causal and T == S and not window:
        return sdpa(q, k, v, is_causal=True)
    if doc_ids is None and mask is None and T == 1 and (window <= 0 or window >= S):
        # one query, the last key position: causality and the window exclude nothing, only padding can
        if key_padding is None:
            return sdpa(q, k, v)
        keep = (key_padding != 0)[:, None, None, :]
        return torch.where(keep.any(-1, keepdim=True), sdpa(q, k, v, attn_mask=keep), 0.0)
    outs = []
    for start in range(0, T, QUERY_BLOCK):
        stop = min(T, start + QUERY_BLOCK)
        ok = allowed_mask(T, S, causal=causal, window=window, key_padding=key_padding, doc_ids=doc_ids, q_start=start, q_stop=stop, device=q.device)
        bias = None
        if mask is not None:
            block = _mask_block(mask, B, Hq, T, S, start, stop)
            if block.dtype == torch.bool:
                ok = ok & block
            else:
                bias, ok = block.to(q.dtype), ok & (block != float("-inf"))
        attn_mask = ok if bias is None else bias.masked_fill(~ok, float("-inf"))
        out = sdpa(q[:, :, start:stop], k, v, attn_mask=attn_mask)
        outs.append(torch.where(ok.any(-1, keepdim=True), out, 0.0))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def empty_sdpa_layout(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An uninitialised [B, Hq, T, Dv] output laid out as [B, T, Hq, Dv] in memory, like SDPA's."""
    B, H, T, _ = q.shape
    return new_sdpa_layout(q, (B, H, T, v.shape[-1]))


def new_sdpa_layout(like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` [B, H, T, D] (``like``'s dtype and device) laid out as [B, T, H, D]."""
    B, H, T, D = shape
    return like.new_empty((B, T, H, D)).transpose(1, 2)


@attention.register_fake
def _(q, k, v, key_padding, doc_ids, mask, scale, causal, window):
    return empty_sdpa_layout(q, v)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.statics = inputs[6:]


def attention_backward(ctx, grad_out):
    q, k, v, key_padding, doc_ids, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(needs[i] and t.is_floating_point()) if t is not None else None
            for i, t in enumerate((q, k, v, key_padding, doc_ids, mask))
        ]
        out, _ = attention_ref(*leaves, *ctx.statics)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out)) if wrt else iter(())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves) + (None, None, None)


attention.register_autograd(attention_backward, setup_context=_setup_context)
cache.declare(attention._opoverload, cache.KeyValueCache())  # decodes from cached K and V (``ops.cache``)


@torch.library.custom_op("longctx::doc_ids", mutates_args=())
def doc_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per-token document index from position ids that restart (packed sequences)."""
    return doc_ids_from_positions(position_ids)


@doc_ids.register_fake
def _(position_ids):
    return position_ids.new_empty(position_ids.shape, dtype=torch.long)
