"""IndexMem (learned KV eviction with latent memory) references: importance, the keep set, and the memory.

- ``indexer_importance``: the lightning-indexer score of key t for query s is
  A[s, t] = Σ_h w[s, h] · ReLU(q[s, h] · k[t]) (causal; queries are the last T of S key positions), and
  a key's importance is the max over the queries that see it (-inf when none does).
- ``teacher_importance``: the same max over queries (and heads) of the true attention logits
  q·k·scale: what the indexer is distilled to.
- ``importance_kl``: KL(softmax(teacher) ‖ softmax(student)) over the keys, sinks left out.
- ``keep_positions``: the first ``sinks`` keys, the last ``window`` keys, and the most important of
  the rest up to ``budget`` in all, in ascending order (what compaction gathers).
- ``memory_write`` / ``memory_read``: the latent memory's fast state, M ← λM + η Σ φ(k)vᵀ and
  b ← λb + η Σ φ(k)², read as φ(q)ᵀM / (φ(q)²ᵀb + ε).

Plain functions for now (the evict pass of issue #8 will wrap what its graphs need as ops). The importance
references stream over blocks of queries and keys with a running max, so no [T, S]
tensor exists: memory O(block² · heads).
"""

from __future__ import annotations

import torch

BLOCK = 512  # queries and keys per streamed tile


def _tiles(T: int, S: int, causal: bool, q0: int, q1: int, k0: int, k1: int, device) -> torch.Tensor:
    """[q1-q0, k1-k0] bool: which keys of the tile the tile's queries see (query i sits at key position S - T + i)."""
    if not causal:
        return torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    qpos = torch.arange(q0, q1, device=device) + (S - T)
    return torch.arange(k0, k1, device=device)[None, :] <= qpos[:, None]


def _stream_max(score_tile, B: int, T: int, S: int, causal: bool, device) -> torch.Tensor:
    """max over queries of ``score_tile(q0, q1, k0, k1)`` [B, q1-q0, k1-k0] under the causal rule, tile by tile: [B, S]."""
    best = torch.full((B, S), float("-inf"), device=device)
    for q0 in range(0, T, BLOCK):
        q1 = min(T, q0 + BLOCK)
        for k0 in range(0, S, BLOCK):
            k1 = min(S, k0 + BLOCK)
            seen = _tiles(T, S, causal, q0, q1, k0, k1, device)
            if not bool(seen.any()):
                continue
            tile = score_tile(q0, q1, k0, k1).masked_fill(~seen, float("-inf"))
            best[:, k0:k1] = torch.maximum(best[:, k0:k1], tile.amax(1))
    return best


def indexer_importance(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Importance [B, S] fp32 of each key: max over queries of Σ_h w·ReLU(q·k). q_idx [B, Hi, T, Di], k_idx [B, S, Di], weights [B, Hi, T]."""
    B, _, T, _ = q_idx.shape
    S = k_idx.shape[1]
    q, k, w = q_idx.float(), k_idx.float(), weights.float()

    def tile(q0, q1, k0, k1):
        z = torch.relu(torch.einsum("bhsd,btd->bhst", q[:, :, q0:q1], k[:, k0:k1]))
        return torch.einsum("bhs,bhst->bst", w[:, :, q0:q1], z)

    return _stream_max(tile, B, T, S, causal, q_idx.device)


def teacher_importance(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """Importance [B, S] fp32 from the true logits: max over query heads and queries of q·k·scale. q [B, Hq, T, D], k [B, Hkv, S, D]."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, T, D)
    kf = k.float()

    def tile(q0, q1, k0, k1):
        logits = torch.einsum("bhgsd,bhtd->bhgst", qg[:, :, :, q0:q1], kf[:, :, k0:k1]) * scale
        return logits.amax((1, 2))

    return _stream_max(tile, B, T, S, causal, q.device)


def importance_kl(teacher: torch.Tensor, student: torch.Tensor, sinks: int) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student)) over keys sinks.. (keys no query saw, -inf in both, drop out)."""
    t, s = teacher[:, sinks:], student[:, sinks:]
    seen = torch.isfinite(t)
    log_p = torch.log_softmax(t.masked_fill(~seen, float("-inf")), -1)
    log_q = torch.log_softmax(s.masked_fill(~seen, float("-inf")), -1)
    return (log_p.exp() * (log_p - log_q)).masked_fill(~seen, 0.0).sum(-1).mean()


def keep_positions(importance: torch.Tensor, sinks: int, window: int, budget: int) -> torch.Tensor:
    """[B, min(budget, S)] key positions to keep, ascending: sinks, the recent window, then the most important of the rest."""
    B, S = importance.shape
    if budget >= S:
        return torch.arange(S, device=importance.device).expand(B, S)
    if budget <= sinks + window:
        raise ValueError(f"budget {budget} must exceed sinks + window = {sinks + window}")
    score = importance.float().clone()
    pinned = torch.zeros(S, dtype=torch.bool, device=importance.device)
    pinned[:sinks] = True
    pinned[S - window :] = True
    score[:, pinned] = float("inf")
    return score.topk(budget, dim=-1).indices.sort(dim=-1).values


def memory_write(M: torch.Tensor, b: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, decay: float, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M', b') after writing evicted entries: M [B, m, dv], b [B, m], φ(k) [B, E, m], v [B, E, dv]."""
    M = decay * M + strength * torch.einsum("bem,bed->bmd", phi_k.float(), v.float())
    b = decay * b + strength * (phi_k.float() ** 2).sum(1)
    return M, b


def memory_read(M: torch.Tensor, b: torch.Tensor, phi_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Readout [B, T, dv] = φ(q)ᵀM / (φ(q)²ᵀb + ε) for φ(q) [B, T, m]."""
    phi = phi_q.float()
    return torch.einsum("btm,bmd->btd", phi, M) / (torch.einsum("btm,bm->bt", phi**2, b) + eps)[..., None]
