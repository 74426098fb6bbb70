"""``longctx::ring_attention``: canonical attention over a sequence split around a ring of R ranks.

Each rank holds its shard's queries and its own K/V block. For R steps it attends its queries to the
block it holds, then passes the block to the next rank and receives the previous rank's (the
transfer overlaps the step's compute). Partial outputs merge by log-sum-exp in fp32. Work is done per
pair of chunks (query chunk, key chunk), so pairs that causality or the window rule out entirely are
skipped: with the zigzag layout every rank then does the same causal work.

The backward runs the same ring: each rank adds its dQ locally and its dK/dV contribution to an
accumulator that travels with the block, which one last transfer hands back to the block's owner.
Blocks are computed with the plain-torch reference (``attention_ref``), gradients through autograd
of that reference. Key padding and document ids come in global token order (all-gathered once).
"""

from __future__ import annotations

import torch

from . import groups
from .attention import empty_sdpa_layout
from .layout import Layout
from .reference import attention_ref, visible

SKIP = "skip"


def _pair_mask(qc: int, kc: int, size: int, causal: bool, window: int, key_padding, doc_ids, device):
    """Mask of query chunk ``qc`` against key chunk ``kc``: SKIP if it sees nothing, None if it sees everything."""
    first_rel = qc * size - (kc * size + size - 1)  # smallest query - key distance in the pair
    last_rel = qc * size + size - 1 - kc * size
    if (causal and last_rel < 0) or (window > 0 and first_rel >= window):
        return SKIP
    if key_padding is None and doc_ids is None and not (causal and first_rel < 0) and not (window > 0 and last_rel >= window):
        return None
    qpos = torch.arange(qc * size, (qc + 1) * size, device=device)
    kpos = torch.arange(kc * size, (kc + 1) * size, device=device)
    return visible(
        qpos,
        kpos,
        causal=causal,
        window=window,
        key_padding=None if key_padding is None else key_padding[:, kpos],
        q_docs=None if doc_ids is None else doc_ids[:, qpos],
        k_docs=None if doc_ids is None else doc_ids[:, kpos],
    )


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions over disjoint keys combined into one (fp32; rows that saw nothing stay 0, -inf)."""
    top = torch.maximum(lse, block_lse)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w, bw = torch.exp(lse - top), torch.exp(block_lse - top)
    total = w + bw
    merged = (out * w[..., None] + block_out * bw[..., None]) / torch.where(total > 0, total, 1.0)[..., None]
    return merged, top + torch.log(total)


class _Ring:
    """This rank's place in the ring and the chunk bookkeeping shared by forward and backward."""

    def __init__(self, q: torch.Tensor, layout: list[int]):
        self.layout = Layout.from_list(layout)
        _, self.group = groups.subgroups(self.layout)
        self.R = self.layout.ring
        self.me = groups.rank_of(self.group)
        self.size = q.shape[2] // len(self.layout.ring_chunks(0))

    def pairs(self, step: int):
        """(query slot, query chunk, key slot, key chunk) of the block held at ``step``."""
        source = (self.me - step) % self.R
        for qs, qc in enumerate(self.layout.ring_chunks(self.me)):
            for ks, kc in enumerate(self.layout.ring_chunks(source)):
                yield qs, qc, ks, kc

    def part(self, x: torch.Tensor, slot: int, dim: int = 2) -> torch.Tensor:
        return x.narrow(dim, slot * self.size, self.size)

    def send(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Start passing ``tensors`` to the next rank and receiving the previous rank's."""
        tensors = [t.contiguous() for t in tensors]
        groups.record("send_recv", sum(t.numel() * t.element_size() for t in tensors))
        return groups.shift(tensors, self.group)


@torch.library.custom_op("longctx::ring_attention", mutates_args=())
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    layout: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, T, Dv] in SDPA layout, lse [B, Hq, T] fp32) of this rank's queries over the whole ring."""
    ring = _Ring(q, layout)
    out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32)
    lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    kv = [k, v]
    for step in range(ring.R):
        pending = ring.send(kv) if step < ring.R - 1 else None
        for qs, qc, ks, kc in ring.pairs(step):
            ok = _pair_mask(qc, kc, ring.size, causal, window, key_padding, doc_ids, q.device)
            if ok is SKIP:
                continue
            block = attention_ref(ring.part(q, qs).float(), ring.part(kv[0], ks), ring.part(kv[1], ks), mask=ok, scale=scale, causal=False)
            merged_out, merged_lse = merge(ring.part(out, qs), ring.part(lse, qs), *block)
            ring.part(out, qs).copy_(merged_out)
            ring.part(lse, qs).copy_(merged_lse)
        if pending:
            kv, requests = pending
            for r in requests:
                r.wait()
    result = empty_sdpa_layout(q, v)
    result.copy_(out)
    return result, lse


@ring_attention.register_fake
def _(q, k, v, key_padding, doc_ids, scale, causal, window, layout):
    B, H, T, _ = q.shape
    return empty_sdpa_layout(q, v), q.new_empty((B, H, T), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding, doc_ids = inputs[:5]
    ctx.save_for_backward(q, k, v, key_padding, doc_ids, *output)
    ctx.statics = inputs[5:]


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding, doc_ids, out, lse = ctx.saved_tensors
    scale, causal, window, layout = ctx.statics
    ring = _Ring(q, layout)
    dq = torch.zeros_like(q, dtype=torch.float32)
    kv = [k, v]
    dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
    for step in range(ring.R):
        for qs, qc, ks, kc in ring.pairs(step):
            ok = _pair_mask(qc, kc, ring.size, causal, window, key_padding, doc_ids, q.device)
            if ok is SKIP:
                continue
            grads = _block_grads(
                [ring.part(t, qs) for t in (q, out, lse, grad_out)],
                None if grad_lse is None else ring.part(grad_lse, qs),
                [ring.part(t, ks) for t in kv],
                ok,
                scale,
            )
            ring.part(dq, qs).add_(grads[0])
            ring.part(dkv[0], ks).add_(grads[1])
            ring.part(dkv[1], ks).add_(grads[2])
        if ring.R == 1:
            break
        # the block and its gradient accumulator move on together; the last move returns the accumulator home
        received, requests = ring.send(kv + dkv if step < ring.R - 1 else dkv)
        for r in requests:
            r.wait()
        kv, dkv = (received[:2], received[2:]) if step < ring.R - 1 else (kv, received)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None


def _block_grads(rows: list[torch.Tensor], grad_lse, kv: list[torch.Tensor], ok, scale: float) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of one chunk pair's share of the merged output, through the reference's autograd.

    The merged output is Σ_j w_j·o_j with w_j = exp(lse_j - lse); so ∂L/∂o_j = w_j·dO and
    ∂L/∂lse_j = w_j·(dO·(o_j - O) + dLSE).
    """
    q, out, lse, grad_out = rows
    with torch.enable_grad():
        leaves = [q.detach().float().requires_grad_(), *(t.detach().float().requires_grad_() for t in kv)]
        block_out, block_lse = attention_ref(*leaves, mask=ok, scale=scale, causal=False)
        w = torch.where(torch.isfinite(lse), torch.exp(block_lse.detach() - torch.where(torch.isfinite(lse), lse, 0.0)), 0.0)
        d_out = grad_out.float()
        d_lse = (d_out * (block_out.detach() - out.float())).sum(-1)
        if grad_lse is not None:
            d_lse = d_lse + grad_lse
        return torch.autograd.grad((block_out, block_lse), leaves, (w[..., None] * d_out, w * d_lse))


ring_attention.register_autograd(_backward, setup_context=_setup_context)
