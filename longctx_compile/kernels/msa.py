"""MSA in Triton: chunk pooling of encoded documents, and fused document routing.

Semantics are ``ops.msa``'s (``pool_ref``, ``route_ref``).

- pool: one program per (document row, head, chunk) sums the chunk's real tokens in fp32 and
  divides by their count; the count goes out too (0 for a chunk of padding).
- route: one program per (batch row, tile of BLOCK_C chunks). It walks the query tokens BLOCK_T at
  a time; for each KV head it loads the tile's router keys once and adds, for each of the G query
  heads that read them, the tokens' scores (normalised for cosine, / √d for dot) into a
  [BLOCK_T, BLOCK_C] accumulator: the mean over heads. It masks the tokens that do not route, keeps
  the running max over tokens, and finally takes the max into each chunk's document with an atomic
  max. Only [B, n_docs] scores are written: never [B, H, T, C]. The top-k over documents is then
  one small ``topk`` in torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import launch, on_cpu


# fmt: off
@triton.jit
def _pool_kernel(X, Real, Out, Count, H, L, n_chunks, D, sx_n, sx_h, sx_l, P, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[n, h, c] = mean of X[n, h, c·P : (c+1)·P] over the real tokens; Count[n, c] their number."""
    pid = tl.program_id(0)
    c = pid % n_chunks
    h = (pid // n_chunks) % H
    n = (pid // (n_chunks * H)).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    pos = c * P + p
    in_p = p < P
    real = tl.load(Real + n * L + pos, mask=in_p, other=0).to(tl.float32)
    x = tl.load(X + n * sx_n + h * sx_h + pos[:, None] * sx_l + d[None, :], mask=in_p[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    total = tl.sum(x * real[:, None], axis=0)
    count = tl.sum(real, axis=0)
    tl.store(Out + ((n * H + h) * n_chunks + c) * D + d, total / tl.maximum(count, 1.0), mask=d < D)
    if h == 0:
        tl.store(Count + n * n_chunks + c, count)


@triton.jit
def _route_kernel(Q, QMask, K, ChunkDoc, Out, T, C, n_docs, Hkv, D, sq_b, sq_h, sq_t, sk_h, sk_c, scale,
                  G: tl.constexpr, COSINE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[b, doc] = max(Out[b, doc], max over chunks c of doc in this tile of max_t mean_h score(q[b,h,t], k[h//G, c]))."""
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    in_c = cs < C
    in_d = d < D
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        in_t = ts < T
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for g in range(Hkv):
            k = tl.load(K + g * sk_h + cs[:, None] * sk_c + d[None, :], mask=in_c[:, None] & in_d[None, :], other=0.0).to(tl.float32)
            if COSINE:
                k = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None]  # F.normalize's floor on the norm
            for j in tl.static_range(G):
                q = tl.load(Q + b * sq_b + (g * G + j) * sq_h + ts[:, None] * sq_t + d[None, :], mask=in_t[:, None] & in_d[None, :], other=0.0)
                q = q.to(tl.float32)
                if COSINE:
                    q = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)[:, None]
                acc += tl.dot(q, tl.trans(k), input_precision="ieee")
        routes = tl.load(QMask + b * T + ts, mask=in_t, other=0) != 0
        acc = tl.where(routes[:, None], acc * scale, float("-inf"))
        best = tl.maximum(best, tl.max(acc, axis=0))
    docs = tl.load(ChunkDoc + cs, mask=in_c, other=0)
    tl.atomic_max(Out + b * n_docs + docs, best, mask=in_c)
# fmt: on


def pool(x: torch.Tensor, real: torch.Tensor, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``ops.msa.pool_ref``: (chunk means [N, H, L/P, D] fp32, real-token counts [N, L/P])."""
    N, H, L, D = x.shape
    n_chunks = L // pool_size
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.full((N, H, n_chunks, D), float("nan"), device=x.device)
    count = torch.full((N, n_chunks), float("nan"), device=x.device)
    if out.numel():
        grid = (N * H * n_chunks,)
        launch(_pool_kernel, grid, 
            x, real.contiguous(), out, count, H, L, n_chunks, D, x.stride(0), x.stride(1), x.stride(2), pool_size,
            BLOCK_P=triton.next_power_of_2(pool_size), BLOCK_D=triton.next_power_of_2(D),
        )  # fmt: skip
    return out, count


def route(
    router_q: torch.Tensor, query_mask: torch.Tensor, router_keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int, cosine: bool, block_c: int = 64
) -> torch.Tensor:
    """As ``ops.msa.route_ref``: document scores [B, n_docs] fp32, -inf for a document no routing token reaches."""
    B, Hq, T, D = router_q.shape
    Hkv, C = router_keys.shape[:2]
    G = Hq // Hkv
    q = router_q if router_q.stride(-1) == 1 else router_q.contiguous()
    k = router_keys if router_keys.stride(-1) == 1 else router_keys.contiguous()
    out = torch.full((B, n_docs), float("-inf"), device=q.device)  # the atomic max's identity (not a poison: every cell may stay -inf)
    if C and T and B:
        scale = (1.0 if cosine else 1.0 / math.sqrt(D)) / Hq
        block_t = 16 if not on_cpu(q) else max(1, min(16, triton.next_power_of_2(T)))
        grid = (B, triton.cdiv(C, block_c))
        launch(_route_kernel, grid, 
            q, query_mask.to(torch.int32).contiguous(), k, chunk_doc.to(torch.int64).contiguous(), out, T, C, n_docs, Hkv, D,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), scale,
            G=G, COSINE=cosine, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_D=max(16, triton.next_power_of_2(D)),
        )  # fmt: skip
    return out
