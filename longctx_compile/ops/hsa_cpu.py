"""The CPU forward of ``longctx::hsa_attention`` with per-chunk selection, through PyTorch's CPU flash kernel.

Each part of HSA is an ordinary softmax attention that returns its LSE, which is what
``aten._scaled_dot_product_flash_attention_for_cpu`` computes without writing the scores: the local
part is a chunk's G·S query rows over its window of (w+1)·S keys under an additive causal mask, and
each selected chunk is the same rows over that chunk's S keys (the K chunks as "heads", the rows
broadcast to them). Only the fusion then touches memory: [rows, K+1] weights and the K+1 part
outputs. The plan and the selection are the reference's (``ops.hsa``), so only the attention
arithmetic differs from it. Used for the forward only: the backward recomputes through ``hsa_ref``.

Taken when the keys are unpadded and ``select="block"`` (per-token selection has G rows per chunk:
too small for the kernel). Per-token selection with ``fusion="joint"`` (the retrofit's) takes another
path, :func:`hsa_joint_cpu`: one softmax over the local and chosen keys is attention under a mask, so a
group of query chunks is one masked SDPA call over the keys before it. Everything else runs the reference.
"""

from __future__ import annotations

import torch

from . import hsa
from .attention import empty_sdpa_layout
from .hsa import fusion_weights, gather_chunks, hsa_attention, plan, select_chunks, unchunk

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
GROUP_CHUNKS = 4  # query chunks per kernel call (32K tokens, bench/hsa.py shapes: 2 / 4 / 8 gave 0.90 / 0.83 / 0.85 s)


def supported(q: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None, select: str) -> bool:
    """Whether :func:`hsa_block_cpu` computes this call (otherwise the reference does)."""
    return (
        _flash is not None and q.device.type == "cpu" and key_padding is None and select == "block" and q.shape[-1] == v.shape[-1] and q.shape[2] == v.shape[2]
    )


def hsa_block_cpu(
    q, k, v, scale, chunk, topk, window, mode, retrieval_q, retrieval_k, sink, fusion, score_q, score_k, rerank=0, retrieval_pool=None
) -> torch.Tensor:
    """HSA with per-chunk selection and no key padding, equal to ``hsa_ref(..., select="block")``; out fp32 [B, Hq, T, Dv]."""
    p = plan(q, k, v, None, scale, chunk, topk, window, mode, "block", retrieval_q, retrieval_k, score_q, score_k, rerank, retrieval_pool)
    B, Hkv, C, G, S, D = p.qg.shape
    w = window
    causal = p.causal.repeat(G, 1)  # row r of a chunk's G·S rows is query r mod S
    kwin, vwin = p.kwin.flatten(0, 1), p.vwin.flatten(0, 1)  # [B·Hkv, C, (w+1)S, D]: a view (the padded keys are contiguous)
    out = torch.empty(B, Hkv, C, G, S, v.shape[-1], device=q.device)
    for c0 in range(0, C, GROUP_CHUNKS):
        c1 = min(C, c0 + GROUP_CHUNKS)
        rows = p.qg[:, :, c0:c1]  # [B, Hkv, Cg, G, S, D], scaled already
        flat_rows = rows.reshape(B * Hkv, c1 - c0, G * S, D)
        # the local mask, additive: causal within the window and no key left of the sequence or past
        # its end (no padding, so the same for every batch row)
        allowed = causal[None] & p.rwin[0, c0:c1, None, :]  # [Cg, G·S, (w+1)S]
        mask = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))[None]
        local, local_lse = _flash(flat_rows, kwin[:, c0:c1], vwin[:, c0:c1], attn_mask=mask, scale=1.0)
        local = local.view(B, Hkv, c1 - c0, G, S, -1)
        local_lse = local_lse.view(B, Hkv, c1 - c0, G, S, 1)
        older = c1 - 1 - w
        if older <= 0 or topk == 0:
            out[:, :, c0:c1] = local * fusion_weights(local_lse, fusion)
            continue
        K = min(p.K, older)
        idx, chosen, flat = select_chunks(p, rows, older, c0, c1, w, K, "block")
        ks, vs = gather_chunks(p, flat, (B * Hkv * (c1 - c0), K))
        part, part_lse = _flash(flat_rows.reshape(-1, 1, G * S, D).expand(-1, K, -1, -1), ks, vs, scale=1.0)  # [·, K, G·S, Dv]
        if fusion == "joint":  # each chunk weighs in by its true LSE
            lse = part_lse.reshape(B, Hkv, c1 - c0, K, G, S).permute(0, 1, 2, 4, 5, 3)
            chosen = lse.masked_fill(~torch.isfinite(chosen), float("-inf"))
        weights = fusion_weights(torch.cat([local_lse, chosen], dim=-1), fusion)  # [B, Hkv, Cg, G, S, 1+K]
        part_weights = weights[..., 1:].reshape(-1, G * S, K).transpose(1, 2)  # [·, K, G·S]
        if sink:  # softmax-off-by-one: a chunk passes on Σexp / (Σexp + 1) of its mass
            part_weights = part_weights * torch.sigmoid(part_lse)
        mixed = part.mul_(part_weights[..., None]).sum(1).view(B, Hkv, c1 - c0, G, S, -1)
        out[:, :, c0:c1] = local * weights[..., :1] + mixed
    return unchunk(out, q.shape[2])


def joint_supported(q: torch.Tensor, k: torch.Tensor, select: str, sink: bool, fusion: str) -> bool:
    """Whether :func:`hsa_joint_cpu` computes this call: per-token selection, joint fusion, the queries are all the keys."""
    return q.device.type == "cpu" and select == "token" and fusion == "joint" and not sink and q.shape[2] == k.shape[2]


def hsa_joint_cpu(
    q, k, v, key_padding, scale, chunk, topk, window, mode, retrieval_q, retrieval_k, score_q, score_k, rerank=0, retrieval_pool=None
) -> torch.Tensor:
    """HSA with per-token selection and joint fusion, equal to ``hsa_ref(..., select="token", fusion="joint")``: each
    group of query chunks attends, in one SDPA call, to the keys before it under the mask local window ∪ chosen chunks."""
    p = plan(q, k, v, key_padding, scale, chunk, topk, window, mode, "token", retrieval_q, retrieval_k, score_q, score_k, rerank, retrieval_pool)
    B, Hkv, C, G, S, D = p.qg.shape
    T, w = q.shape[2], window
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding is None else key_padding != 0
    out = torch.empty(B, Hkv, C, G, S, v.shape[-1], device=q.device)
    position = torch.arange(T, device=q.device)
    for c0 in range(0, C, GROUP_CHUNKS):
        c1 = min(C, c0 + GROUP_CHUNKS)
        n = min(T, c1 * S)  # the keys the group's queries may see
        rows = p.qg[:, :, c0:c1]  # [B, Hkv, Cg, G, S, D], scaled already
        query = torch.arange(c0 * S, c1 * S, device=q.device).view(c1 - c0, S, 1)
        keep = (position[:n] <= query) & (position[:n] >= (query // S - w) * S)  # the local window, causal: [Cg, S, n]
        keep = keep[None, None] & real[:, None, None, None, :n]  # [B, 1, Cg, S, n]
        older = c1 - 1 - w
        if older > 0 and topk != 0:
            idx, chosen, _ = select_chunks(p, rows, older, c0, c1, w, min(p.K, older), "token")  # idx [B, Hkv, Cg, S, K]
            picked = torch.zeros(*idx.shape[:-1], older + 1, dtype=torch.bool, device=q.device)
            # a pick that is no candidate (-inf: among fewer than K visible, or empty) goes to the spare last column
            picked.scatter_(-1, torch.where(torch.isfinite(chosen[:, :, :, 0]), idx, older), True)
            chunks = picked[..., :older].repeat_interleave(S, dim=-1)  # [B, Hkv, Cg, S, older·S]
            keep = keep | torch.nn.functional.pad(chunks & real[:, None, None, None, : older * S], (0, n - older * S))
        mask = keep[:, :, :, None].expand(B, keep.shape[1], c1 - c0, G, S, n).expand(B, Hkv, -1, -1, -1, -1).reshape(B, Hkv, -1, n)
        flat = rows.reshape(B, Hkv, -1, D)
        part = torch.nn.functional.scaled_dot_product_attention(flat, k[:, :, :n].float(), v[:, :, :n].float(), attn_mask=mask, scale=1.0)
        out[:, :, c0:c1] = torch.where(mask.any(-1, keepdim=True), part, 0.0).view(B, Hkv, c1 - c0, G, S, -1)  # no key: 0
    return unchunk(out, T)


@hsa_attention.register_kernel("cpu")
def _(
    q,
    k,
    v,
    key_padding,
    retrieval_q,
    retrieval_k,
    scale,
    chunk,
    topk,
    window,
    mode,
    select,
    sink,
    fusion="softmax",
    score_q=None,
    score_k=None,
    rerank=0,
    retrieval_pool=None,
):
    result = empty_sdpa_layout(q, v)
    retrieval = (retrieval_q, retrieval_k)
    if supported(q, v, key_padding, select):
        result.copy_(hsa_block_cpu(q, k, v, scale, chunk, topk, window, mode, *retrieval, sink, fusion, score_q, score_k, rerank, retrieval_pool))
    elif joint_supported(q, k, select, sink, fusion):
        result.copy_(hsa_joint_cpu(q, k, v, key_padding, scale, chunk, topk, window, mode, *retrieval, score_q, score_k, rerank, retrieval_pool))
    else:
        args = (key_padding, scale, chunk, topk, window, mode, select, *retrieval, sink, fusion, score_q, score_k, rerank, retrieval_pool)
        result.copy_(hsa.hsa_ref(q, k, v, *args))
    return result
