"""Plain-torch definitions of the longctx ops' semantics (fp32 accumulation, GQA without repeating KV).

Queries are the last T of the S key positions (query i sits at key position S - T + i), so the same
definitions serve self-attention (T == S) and attention over a cache (T < S).
"""

from __future__ import annotations

import math

import torch

# queries per block: bounds the reference's memory at O(block * S) per head instead of O(T * S)
QUERY_BLOCK = 512


def allowed_mask(
    T: int,
    S: int,
    *,
    causal: bool,
    window: int,
    key_padding: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    q_start: int = 0,
    q_stop: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean [B|1, 1, q_stop-q_start, S] of which keys each query in [q_start, q_stop) may see."""
    q_stop = T if q_stop is None else q_stop
    qpos = torch.arange(q_start, q_stop, device=device) + (S - T)
    q_docs = None if doc_ids is None else doc_ids[:, (S - T) + q_start : (S - T) + q_stop]
    return visible(qpos, torch.arange(S, device=device), causal=causal, window=window, key_padding=key_padding, q_docs=q_docs, k_docs=doc_ids)


def visible(
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    *,
    causal: bool,
    window: int,
    key_padding: torch.Tensor | None = None,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B|1, 1, len(qpos), len(kpos)]: which keys (at positions ``kpos``) each query (at ``qpos``) sees.

    ``key_padding`` and ``k_docs`` are [B, len(kpos)], ``q_docs`` [B, len(qpos)].
    """
    rel = qpos[:, None] - kpos[None, :]
    ok = torch.ones_like(rel, dtype=torch.bool)  # (not len(qpos): the ONNX export traces this with symbolic lengths)
    if causal:
        ok = ok & (rel >= 0)
    if window > 0:
        ok = ok & (rel < window)
    ok = ok[None, None]
    if key_padding is not None:
        ok = ok & (key_padding != 0)[:, None, None, :]
    if k_docs is not None:
        ok = ok & (q_docs[:, None, :, None] == k_docs[:, None, None, :])
    return ok


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention; returns (out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32).

    q [B, Hq, T, D], k/v [B, Hkv, S, D] with Hq % Hkv == 0 (query head h reads KV head h // (Hq/Hkv)).
    key_padding [B, S] (nonzero = real token), doc_ids [B, S] (same id = same document), mask: an
    arbitrary bool (True = keep) or additive float tensor broadcastable to [B, Hq, T, S].
    A query that may see no key gets output 0 and lse -inf.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.float().reshape(B, Hkv, G, T, D)
    # the G query heads of a KV head share one [G * rows, S] product, so K and V are never broadcast
    kt, vf = k.float().transpose(-1, -2), v.float()
    outs, lses = [], []
    for start in range(0, T, QUERY_BLOCK):
        stop = min(T, start + QUERY_BLOCK)
        rows = qg[:, :, :, start:stop].reshape(B, Hkv, G * (stop - start), D)
        scores = torch.matmul(rows, kt).view(B, Hkv, G, stop - start, S) * scale
        ok = allowed_mask(T, S, causal=causal, window=window, key_padding=key_padding, doc_ids=doc_ids, q_start=start, q_stop=stop, device=q.device)[:, :, None]
        if mask is not None:
            block = _mask_block(mask, B, Hq, T, S, start, stop).reshape(-1, Hkv, G, stop - start, S)
            if block.dtype == torch.bool:
                ok = ok & block
            else:
                scores = scores + block.float()
                ok = ok & (block != float("-inf"))
        scores = scores.masked_fill(~ok, float("-inf"))
        # a query that sees no key: lse -inf, probabilities 0, and gradients 0 rather than NaN
        dead = ~ok.any(dim=-1)
        lse = torch.logsumexp(scores.masked_fill(dead[..., None], 0.0), dim=-1).masked_fill(dead, float("-inf"))
        probs = torch.exp(scores - lse.masked_fill(dead, 0.0)[..., None])
        outs.append(torch.matmul(probs.view(B, Hkv, G * (stop - start), S), vf).view(B, Hkv, G, stop - start, -1))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, v.shape[-1])
    return out.to(q.dtype), torch.cat(lses, dim=3).reshape(B, Hq, T)


def _mask_block(mask: torch.Tensor, B: int, Hq: int, T: int, S: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of an arbitrary mask, broadcast to [B, Hq, rows, S]."""
    while mask.dim() < 4:
        mask = mask[None]
    rows = mask[:, :, start:stop] if mask.shape[2] != 1 else mask
    return rows.expand(B, Hq, stop - start, S)


def doc_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index per token: a new document starts wherever a position is not the previous + 1."""
    prev = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
    return (position_ids != prev + 1).long().cumsum(dim=1)
