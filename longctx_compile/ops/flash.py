"""``longctx::flash_attention``: canonical attention bound to the Triton kernels and a tile config per pass.

``lower`` swaps ``longctx::attention`` for this op on Triton targets. The tile configs are op
arguments, so the saved program carries what the target chose. Returns (out, lse); the lse is
differentiable too, so forms that merge partial attentions (ring) can train through it.
"""

from __future__ import annotations

import torch

from . import cache
from .attention import empty_sdpa_layout
from .reference import attention_ref


def _tiles(values: list[int]):
    from ..targets.tiles import TileConfig

    return TileConfig.from_list(values)


@torch.library.custom_op("longctx::flash_attention", mutates_args=())
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    fwd_config: list[int],
    bwd_config: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same semantics as ``longctx::attention``; out [B, Hq, T, Dv] (SDPA memory layout), lse [B, Hq, T] fp32."""
    from ..kernels import attention as kernels

    return kernels.attention_fwd(q, k, v, key_padding, doc_ids, mask, scale, causal, window, _tiles(fwd_config))


@flash_attention.register_fake
def _(q, k, v, key_padding, doc_ids, mask, scale, causal, window, fwd_config, bwd_config):
    B, H, T, _ = q.shape
    return empty_sdpa_layout(q, v), q.new_empty((B, H, T), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding, doc_ids, mask = inputs[:6]
    ctx.save_for_backward(q, k, v, key_padding, doc_ids, mask, *output)
    ctx.statics = inputs[6:9]
    ctx.bwd_config = inputs[10]


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding, doc_ids, mask, out, lse = ctx.saved_tensors
    if ctx.needs_input_grad[5] and mask is not None and mask.is_floating_point():
        return *_reference_backward(ctx, grad_out, grad_lse), *(None,) * 5
    dq, dk, dv = flash_attention_backward(grad_out, grad_lse, q, k, v, out, lse, key_padding, doc_ids, mask, *ctx.statics, ctx.bwd_config)
    return dq, dk, dv, *(None,) * 8


@torch.library.custom_op("longctx::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    bwd_config: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``flash_attention`` from the Triton backward kernels; an op so traced backwards stay opaque."""
    from ..kernels import attention as kernels

    return kernels.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, key_padding, doc_ids, mask, scale, causal, window, _tiles(bwd_config))


@flash_attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding, doc_ids, mask, scale, causal, window, bwd_config):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _reference_backward(ctx, grad_out, grad_lse):
    """Gradients through the reference, used when the additive mask itself needs a gradient."""
    q, k, v, key_padding, doc_ids, mask, _, _ = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v, mask)]
        out, lse = attention_ref(leaves[0], leaves[1], leaves[2], key_padding, doc_ids, leaves[3], *ctx.statics)
        finite = torch.isfinite(lse)
        total = (out * grad_out).sum()
        if grad_lse is not None:
            total = total + torch.where(finite, lse * grad_lse, 0).sum()
        dq, dk, dv, dmask = torch.autograd.grad(total, leaves)
    return dq, dk, dv, None, None, dmask


flash_attention.register_autograd(_backward, setup_context=_setup_context)
cache.declare(flash_attention._opoverload, cache.KeyValueCache())  # decodes from cached K and V (``ops.cache``)
