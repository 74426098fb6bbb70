"""Portable forms of the longctx ops: plain torch with no Python branch on a sequence size, so that
``torch.export`` traces them with symbolic lengths and the ONNX exporter turns them into standard operators.

Each has the semantics of its op's reference (``ops.reference``, ``ops.hsa``, ``ops.msa``,
``ops.evict``) and is tested against it. They trade the references' streaming for whole tensors
(scores of [B, H, T, S] for attention): right for a graph a runtime optimises, not for this process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .hsa import chunk_summaries, fusion_weights, landmark_votes, pooled_landmarks, pooled_scores, score_queries, voted
from .loss import IGNORE
from .reference import visible

NEG_INF = float("-inf")


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, lse) over the last dim where ``keep``; a row that keeps nothing gets zeros and lse -inf."""
    scores = scores.masked_fill(~keep, NEG_INF)
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    total = e.sum(-1, keepdim=True)
    alive = total > 0
    probs = e / torch.where(alive, total, torch.ones_like(total))
    lse = torch.where(alive, torch.log(torch.where(alive, total, torch.ones_like(total))) + top, torch.full_like(top, NEG_INF))
    return probs, lse[..., 0]


def attention(q, k, v, key_padding, doc_ids, mask, scale: float, causal: bool, window: int) -> torch.Tensor:
    """``longctx::attention`` (:func:`ops.reference.attention_ref`): GQA by a broadcast over the query heads of a KV head."""
    return attention_lse(q, k, v, key_padding, doc_ids, mask, scale, causal, window)[0]


def visibility(q, k, key_padding, doc_ids, mask, causal: bool, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(keep: bool [B|1, Hq|1, T, S], additive bias [.., T, S] or None) of which keys each query sees, from the
    structured masks and an arbitrary one; queries are the last T of S keys."""
    T, S = q.shape[2], k.shape[2]
    q_docs = None if doc_ids is None else doc_ids[:, S - T :]
    qpos, kpos = torch.arange(T, device=q.device) + (S - T), torch.arange(S, device=q.device)
    keep = visible(qpos, kpos, causal=causal, window=window, key_padding=key_padding, q_docs=q_docs, k_docs=doc_ids)
    bias = None
    if mask is not None:
        while mask.dim() < 4:
            mask = mask[None]
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            bias = mask.float()
            keep = keep & (bias != NEG_INF)
    return keep, bias


def attention_lse(q, k, v, key_padding, doc_ids, mask, scale: float, causal: bool, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32) of the canonical attention; queries are the last T of S keys."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scores = torch.matmul(q.float().reshape(B, Hkv, G, T, D), k.float().unsqueeze(2).transpose(-1, -2)) * scale
    keep, bias = visibility(q, k, key_padding, doc_ids, mask, causal, window)

    def grouped(t):  # [B|1, Hq|1, T, S] -> [B|1, Hkv|1, G|1, T, S]
        return t[:, :, None] if t.shape[1] == 1 else t.expand(t.shape[0], Hq, T, S).reshape(t.shape[0], Hkv, G, T, S)

    if bias is not None:
        scores = scores + grouped(bias)
    probs, lse = masked_softmax(scores, grouped(keep))
    out = torch.matmul(probs, v.float().unsqueeze(2))
    return out.reshape(B, Hq, T, v.shape[-1]).to(q.dtype), lse.reshape(B, Hq, T)


def attention_op(q, k, v, key_padding, doc_ids, mask, scale: float, causal: bool, window: int) -> torch.Tensor:
    """``longctx::attention`` as ONNX's own Attention operator (opset 23, fused in runtimes; GQA native) under the
    visibility mask; a query that sees no key gives 0, as the reference defines."""
    keep, bias = visibility(q, k, key_padding, doc_ids, mask, causal, window)
    attn_mask = keep if bias is None else bias.masked_fill(~keep, NEG_INF)
    out = torch.onnx.ops.attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, scale=scale)[0]
    return torch.where(keep.any(-1, keepdim=True), out, 0.0).to(q.dtype)


def hsa(
    q,
    k,
    v,
    key_padding,
    retrieval_q,
    retrieval_k,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    select: str,
    sink: bool,
    fusion: str = "softmax",
    score_q=None,
    score_k=None,
    rerank: int = 0,
    retrieval_pool=None,
) -> torch.Tensor:
    """``longctx::hsa_attention`` (:func:`ops.hsa.hsa_ref`), every query chunk at once.

    The top-K runs over the complete chunks padded with K empty ones (scored -inf), so K stays a
    constant whatever the length; an empty pick adds nothing in either fusion, as in the reference.
    With ``rerank`` R the top-R·K are candidates, and their true LSEs pick the K (:func:`_rerank`).
    """
    B, Hq, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, S, w = Hq // Hkv, chunk, window
    C = (T + S - 1) // S + 1  # one spare chunk of padding: C ≥ 2 whatever T, so tracing never specialises on C == 1
    pad = C * S - T
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding is None else key_padding != 0
    rows = F.pad(q.float() * scale, (0, 0, 0, pad)).view(B, Hkv, G, C, S, D).transpose(2, 3)  # [B, Hkv, C, G, S, D]

    # the local part: chunks c-w .. c of every query chunk c, causal
    def windows(t: torch.Tensor, dim: int) -> torch.Tensor:
        chunks = t.unflatten(dim, (C + w, S))
        return torch.cat([chunks.narrow(dim, j, C) for j in range(w + 1)], dim=dim + 1)

    kwin, vwin = (windows(F.pad(t.float(), (0, 0, w * S, pad)), 2) for t in (k, v))  # [B, Hkv, C, (w+1)S, D]
    rwin = windows(F.pad(real, (w * S, pad)), 1)  # [B, C, (w+1)S]
    causal = torch.arange((w + 1) * S, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None] + w * S
    keep = causal & rwin[:, None, :, None, None, :]
    local, local_lse = masked_softmax(torch.einsum("bhcgsd,bhcld->bhcgsl", rows, kwin), keep)
    out = torch.einsum("bhcgsl,bhcld->bhcgsd", local, vwin)
    if topk == 0:
        return _unchunk(out * fusion_weights(local_lse[..., None], fusion), T)

    # the candidates: chunks before each query chunk's window (complete ones: only the last chunk can be partial,
    # and no query sees it as a candidate); every chunk is addressed, so no slice depends on the length
    kc = F.pad(k.float(), (0, 0, 0, pad)).view(B, Hkv, C, S, D)
    vc = F.pad(v.float(), (0, 0, 0, pad)).view(B, Hkv, C, S, Dv)
    rc = F.pad(real, (0, pad)).view(B, 1, C, S)
    visible = torch.arange(C, device=q.device)[None, :] < (torch.arange(C, device=q.device) - w)[:, None]  # [C, C]
    if mode == "exact":
        every = torch.einsum("bhcgsd,bhjld->bhcgsjl", rows, kc).masked_fill(~rc[:, :, None, None, None], NEG_INF)
        score = masked_softmax(every, rc[:, :, None, None, None].expand_as(every))[1]  # each chunk's true LSE
        score = score.masked_fill(~visible[:, None, None], NEG_INF)  # [B, Hkv, C, G, S, C]
        group = voted(score, select)
    else:
        score_rows = rows if score_q is None else F.pad(score_q.float() * scale, (0, 0, 0, pad)).view(B, Hkv, G, C, S, D).transpose(2, 3)
        qsum = (score_rows * rc.view(B, 1, C, 1, S, 1)).sum((3, 4)) if mode == "reps" else None  # each chunk's real queries, summed
        keys = kc if score_k is None else F.pad(score_k.float(), (0, 0, 0, pad)).view(B, Hkv, C, S, D)
        mean, log_count = chunk_summaries(keys, rc, mode, qsum)
        if mode == "learned" and retrieval_pool is not None:  # R pooled landmarks per chunk [B, Hkv, C, R, D]
            mean = pooled_landmarks(keys, rc, retrieval_pool, _per_head(keys, retrieval_pool.transpose(1, 2)).movedim(-1, 3))
        score_rows = score_queries(score_rows, mode)
        if mode == "learned":
            score_rows = _per_head(score_rows, retrieval_q)
            mean = _per_head(mean, retrieval_k)
        group = landmark_votes(score_rows, (mean, log_count), select).masked_fill(~visible[:, None], NEG_INF)
        score = pooled_scores(torch.einsum("bhcgsd,bhi...d->bhcgsi...", score_rows, mean), mean.dim() == 5) + log_count[:, :, None, None, None]
        score = score.masked_fill(~visible[:, None, None], NEG_INF)
    units = group.shape[3]
    if topk < 0:  # every candidate, most recent first
        K, extra = C, 0
        idx = (C - 1 - torch.arange(C, device=q.device)).expand(B, Hkv, C, units, C)
    else:
        K = extra = topk * max(1, rerank if mode != "exact" else 1)
        group = torch.cat([group, group.new_full((B, Hkv, C, units, K), NEG_INF)], dim=-1)
        # ONNX TopK breaks ties to the lower index, as ``ops.hsa.top_chunks`` defines (a stable sort has no ONNX form)
        idx = group.topk(K, dim=-1).indices.sort(dim=-1, descending=True).values  # [B, Hkv, C, S|1, K], most recent first
    chosen = torch.cat([score, score.new_full((B, Hkv, C, G, S, extra), NEG_INF)], dim=-1)
    chosen = chosen.gather(-1, idx[:, :, :, None].expand(B, Hkv, C, G, S, K))

    # each selected chunk: its own softmax (off by one with a sink)
    kcp, vcp = (F.pad(t, (0, 0, 0, 0, 0, extra)).flatten(0, 2) for t in (kc, vc))  # [(B·Hkv·(C+K)), S, D]
    rcp = F.pad(rc, (0, 0, 0, extra)).expand(B, Hkv, C + extra, S).flatten(0, 2)

    def parts(idx: torch.Tensor) -> tuple[torch.Tensor, ...]:  # the chunks' values, and the rows' probabilities and LSEs over them
        flat = (torch.arange(B * Hkv, device=q.device).view(B, Hkv, 1, 1, 1) * (C + extra) + idx).flatten()
        ks, vs, rs = (t.index_select(0, flat).view(*idx.shape, S, -1) for t in (kcp, vcp, rcp[..., None]))
        if select == "block":
            part = torch.einsum("bhcgnd,bhcksd->bhcgnks", rows, ks[:, :, :, 0])
            keep = rs[:, :, :, 0, None, None, :, :, 0]
        else:
            part = torch.einsum("bhcgnd,bhcnksd->bhcgnks", rows, ks)
            keep = rs[:, :, :, None, :, :, :, 0]
        return vs, *masked_softmax(part, keep.expand_as(part))

    if rerank and mode != "exact" and topk >= 0:
        idx, chosen = _rerank(idx, torch.where(torch.isfinite(chosen), parts(idx)[2], chosen), topk, select)
        K = topk
    vs, probs, lse = parts(idx)
    if sink:
        probs = probs * torch.sigmoid(lse)[..., None]
    if fusion == "joint":  # each chunk weighs in by its true LSE
        chosen = torch.where(torch.isfinite(chosen), lse, chosen)
    weights = fusion_weights(torch.cat([local_lse[..., None], chosen], dim=-1), fusion)
    out = out * weights[..., :1]
    picked = (probs * weights[..., 1:, None]).flatten(-2)  # [B, Hkv, C, G, S, K·S]
    if select == "block":
        out = out + torch.einsum("bhcgsj,bhcjd->bhcgsd", picked, vs[:, :, :, 0].flatten(3, 4))
    else:
        out = out + torch.einsum("bhcgsj,bhcsjd->bhcgsd", picked, vs.flatten(4, 5))
    return _unchunk(out, T).to(q.dtype)


def _rerank(candidates: torch.Tensor, true: torch.Tensor, K: int, select: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K best ``candidates`` [B, Hkv, C, S|1, R·K] (most recent first) by their rows' ``true`` LSEs [B, Hkv, C, G, S, R·K]
    summed per unit (-inf: not a candidate a row sees): (chunk indices, most recent first; the rows' LSEs of them)."""
    group = voted(true, select)
    n = candidates.shape[-1]
    oldest_first = group.flip(-1).topk(K, dim=-1).indices  # ONNX TopK: of equal scores the lower index, the older chunk
    at = (n - 1 - oldest_first).sort(dim=-1).values  # places in the most-recent-first list
    B, Hkv, C, G, S, _ = true.shape
    return candidates.gather(-1, at), true.gather(-1, at[:, :, :, None].expand(B, Hkv, C, G, S, K))


def _per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, H, ..., D] times weight [H, D, E] per head h, as one linear layer with a block-diagonal weight: a batched
    matmul broadcasting over B would make tracing specialise on B == 1."""
    moved = x.movedim(1, -2)  # [B, ..., H, D]
    out = F.linear(moved.flatten(-2), torch.block_diag(*weight.float()).T)
    return out.unflatten(-1, (weight.shape[0], weight.shape[2])).movedim(-2, 1)


def _unchunk(out: torch.Tensor, T) -> torch.Tensor:
    B, Hkv, C, G, S, Dv = out.shape
    rows = out.transpose(2, 3).reshape(B, Hkv * G, C * S, Dv)
    return F.pad(rows, (0, 0, 0, T - C * S))  # a negative pad crops: no slice whose end depends on the length


def msa_route(router_q, query_mask, router_keys, chunk_doc, doc_chunks, cosine: bool) -> torch.Tensor:
    """``longctx::msa_route`` (:func:`ops.msa.route_ref`) over the whole bank at once: document scores [B, n_docs]."""
    B, Hq, T, D = router_q.shape
    Hkv = router_keys.shape[0]
    q = router_q.float().view(B, Hkv, Hq // Hkv, T, D)
    keys = router_keys.float()
    if cosine:
        q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
    else:
        q = q / math.sqrt(D)
    tile = torch.einsum("bhgtd,hcd->btc", q, keys) / Hq
    per_chunk = tile.masked_fill(~query_mask.bool()[:, :, None], NEG_INF).amax(1)  # [B, C]
    scores = per_chunk.new_full((B, doc_chunks.shape[0]), NEG_INF)
    return scores.scatter_reduce(1, chunk_doc.long()[None].expand_as(per_chunk), per_chunk, reduce="amax")


def indexer_importance(idx_q, idx_k, idx_w, groups: int, query_real=None, causal: bool = True) -> torch.Tensor:
    """The indexer's importance [B, groups, S] of each key (:func:`ops.evict.indexer_importance`): max over the
    queries that see it of Σ_h w·ReLU(q·k), -inf when none does."""
    B, Hi, T, Di = idx_q.shape
    S = idx_k.shape[-2]
    q = idx_q.float().view(B, groups, Hi // groups, T, Di)
    k = idx_k.float() if idx_k.dim() == 4 else idx_k.float()[:, None]
    scores = torch.einsum("bgrs,bgrst->bgst", idx_w.float().view(B, groups, Hi // groups, T), torch.relu(torch.matmul(q, k[:, :, None].transpose(-1, -2))))
    seen = torch.ones(T, S, dtype=torch.bool, device=idx_q.device)
    if causal:
        seen = torch.arange(S, device=idx_q.device)[None, :] <= (torch.arange(T, device=idx_q.device) + (S - T))[:, None]
    seen = seen[None] if query_real is None else seen[None] & (query_real != 0)[:, :, None]
    return scores.masked_fill(~seen[:, None], NEG_INF).amax(2)


def lm_head_loss(hidden, weight, bias, labels, tile: int) -> torch.Tensor:
    """``longctx::lm_head_loss`` (:func:`ops.loss.lm_head_loss`): summed cross-entropy of the LM head, all rows at once."""
    logits = F.linear(hidden, weight, bias).float().flatten(0, -2)
    labels = labels.flatten()
    target = logits.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(labels != IGNORE, torch.logsumexp(logits, dim=1) - target, 0.0).sum()
