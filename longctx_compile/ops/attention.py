"""``longctx::attention``: the canonical attention op every pass reads and every form rewrites."""

from __future__ import annotations

import torch

from .reference import attention_ref, doc_ids_from_positions


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
    out, _ = attention_ref(q, k, v, key_padding, doc_ids, mask, scale, causal, window)
    result = empty_sdpa_layout(q, v)
    result.copy_(out)
    return result


def empty_sdpa_layout(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An uninitialised [B, Hq, T, Dv] output laid out as [B, T, Hq, Dv] in memory, like SDPA's."""
    B, H, T, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])).transpose(1, 2)


@attention.register_fake
def _(q, k, v, key_padding, doc_ids, mask, scale, causal, window):
    return empty_sdpa_layout(q, v)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.statics = inputs[6:]


def _backward(ctx, grad_out):
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


attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("longctx::doc_ids", mutates_args=())
def doc_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per-token document index from position ids that restart (packed sequences)."""
    return doc_ids_from_positions(position_ids)


@doc_ids.register_fake
def _(position_ids):
    return position_ids.new_empty(position_ids.shape, dtype=torch.long)
