"""MSA (EverMind memory sparse attention) ops: chunk pooling of encoded documents and document routing.

- ``longctx::msa_pool``: documents are encoded one per batch row (positions restart per document,
  right padding); a routed layer keeps K (after RoPE), V and the router keys mean-pooled over chunks
  of P tokens of the row. A chunk never crosses a document because a row is one document; a partial
  last chunk is averaged over its real tokens; a chunk with none is 0 and has count 0.
- ``longctx::msa_route``: a document's score is, per batch row, the max over its chunks of the max
  over the routing query tokens of the mean over query heads of score(router query, router key of
  the chunk), where score is the cosine or the dot product / √d (the paper says cosine; the released
  code's inference path uses the dot product). Query head h reads KV head h // G.

The references accumulate in fp32. Routing is computed over tiles of chunks, so no ``[B, H, T, C]``
tensor exists for the whole bank: memory O(B·H·T·tile).
"""

from __future__ import annotations

import math

import torch

from . import cache
from .attention import attention_backward, empty_sdpa_layout, sdpa_layout_forward

ROUTE_TILE = 16384  # chunks scored at a time (the released code's slice_chunk_size)


def pool_ref(x: torch.Tensor, real: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over each chunk's real tokens [N, H, L/P, D] fp32, real-token count per chunk [N, L/P]) of x [N, H, L, D].

    ``real`` [N, L] marks the real tokens (1) of each document row; L must be a multiple of ``pool``.
    """
    N, H, L, D = x.shape
    weights = real.to(torch.float32).view(N, 1, L // pool, pool, 1)
    total = (x.float().view(N, H, L // pool, pool, D) * weights).sum(3)
    count = weights.sum(3)  # [N, 1, L/P, 1]
    return total / count.clamp(min=1), count.view(N, L // pool)


@torch.library.custom_op("longctx::msa_pool", mutates_args=())
def msa_pool(x: torch.Tensor, real: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk means of x [N, H, L, D] over its real tokens, as :func:`pool_ref`."""
    return pool_ref(x, real, pool)


@msa_pool.register_fake
def _(x, real, pool):
    N, H, L, D = x.shape
    return x.new_empty(N, H, L // pool, D, dtype=torch.float32), x.new_empty(N, L // pool, dtype=torch.float32)


def _pool_setup(ctx, inputs, output):
    x, real, pool = inputs
    ctx.save_for_backward(real, output[1])
    ctx.pool, ctx.dtype = pool, x.dtype


def _pool_backward(ctx, grad_mean, grad_count):
    """Each real token of a chunk receives the chunk mean's gradient over the chunk's count; padding receives none.
    (MSA's continued pre-training reaches the document encoder through the pooled keys and values.)"""
    real, count = ctx.saved_tensors
    N, H, C, D = grad_mean.shape
    share = grad_mean / count.clamp(min=1).view(N, 1, C, 1)
    grad = share[:, :, :, None, :].expand(N, H, C, ctx.pool, D).reshape(N, H, C * ctx.pool, D)
    return (grad * real.to(grad.dtype).view(N, 1, -1, 1)).to(ctx.dtype), None, None


msa_pool.register_autograd(_pool_backward, setup_context=_pool_setup)


def route_ref(router_q: torch.Tensor, query_mask: torch.Tensor, router_keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int, cosine: bool) -> torch.Tensor:
    """Document scores [B, n_docs] fp32 (-inf for a document no routing token reaches).

    router_q [B, Hq, T, D]; query_mask [B, T] (nonzero: a token that routes); router_keys
    [Hkv, C, D] pooled router keys of the bank; chunk_doc [C] the document of each chunk.
    """
    B, Hq, T, D = router_q.shape
    Hkv, C = router_keys.shape[:2]
    q = router_q.float().view(B, Hkv, Hq // Hkv, T, D)
    q = torch.nn.functional.normalize(q, dim=-1) if cosine else q / math.sqrt(D)
    routes = query_mask.bool()[:, :, None]  # [B, T, 1]
    scores = torch.full((B, n_docs), float("-inf"), device=router_q.device)
    for c0 in range(0, C, ROUTE_TILE):
        c1 = min(C, c0 + ROUTE_TILE)
        keys = router_keys[:, c0:c1].float()  # per tile: the bank is never copied whole (bf16 → fp32 would double it)
        if cosine:
            keys = torch.nn.functional.normalize(keys, dim=-1)
        tile = torch.einsum("bhgtd,hcd->btc", q, keys) / Hq  # mean over query heads
        per_chunk = tile.masked_fill(~routes, float("-inf")).amax(1)  # max over routing tokens: [B, tile]
        index = chunk_doc[c0:c1].long().expand(B, c1 - c0)
        scores = scores.scatter_reduce(1, index, per_chunk, reduce="amax")
    return scores


def moments(scores: torch.Tensor) -> torch.Tensor:
    """[..., 3] fp64: how many of the last dim's entries are finite, their sum and their sum of squares (summable over
    shards of the documents: Memory Parallel all-reduces them). fp64, so the variance as E[x²] − E[x]² keeps
    its digits, and any order of summation (one process, ranks, ONNX) gives the same z-scores to fp32."""
    real = scores.isfinite()
    x = scores.double().masked_fill(~real, 0)
    return torch.stack([real.sum(-1).double(), x.sum(-1), x.square().sum(-1)], dim=-1)


def standardised(scores: torch.Tensor, totals: torch.Tensor | None = None) -> torch.Tensor:
    """``scores`` as z-scores over the last dim, finite entries only (-inf, a document no token reaches, stays -inf);
    ``totals`` (:func:`moments`, e.g. summed over every rank's documents) in place of this tensor's own."""
    totals = moments(scores) if totals is None else totals
    count = totals[..., 0:1].clamp(min=1)
    mean = totals[..., 1:2] / count
    spread = (totals[..., 2:3] / count - mean.square()).clamp(min=1e-12).sqrt()  # ≥ 1e-6, and a finite gradient (the router loss)
    return ((scores.double() - mean) / spread).to(scores.dtype).masked_fill(~scores.isfinite(), float("-inf"))


def headwise_matches(router_q: torch.Tensor, query_mask: torch.Tensor, router_keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int) -> torch.Tensor:
    """[B, Hq, T, n_docs]: per query head and token, each document's best cosine over its chunk router keys
    (-inf for a document without chunks). Plain torch ops, in one tile when exported (a loop over a dynamic bank
    size would fix it). Shapes as :func:`route_ref`."""
    B, Hq, T, D = router_q.shape
    Hkv, C = router_keys.shape[:2]
    q = torch.nn.functional.normalize(router_q.float().view(B, Hkv, Hq // Hkv, T, D), dim=-1)
    best = torch.full((B, Hq, T, n_docs), float("-inf"), device=router_q.device)

    def tile(keys: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        keys = torch.nn.functional.normalize(keys.float(), dim=-1)
        scores = torch.einsum("bhgtd,hcd->bhgtc", q, keys).flatten(1, 2)  # [B, Hq, T, tile]
        return best.scatter_reduce(3, docs.long().expand(B, Hq, T, docs.shape[0]), scores, reduce="amax")

    if torch.compiler.is_compiling():
        return tile(router_keys, chunk_doc)
    for c0 in range(0, C, ROUTE_TILE):
        best = tile(router_keys[:, c0 : c0 + ROUTE_TILE], chunk_doc[c0 : c0 + ROUTE_TILE])
    return best


def headwise_scores(matches: torch.Tensor, query_mask: torch.Tensor, totals: torch.Tensor | None = None) -> torch.Tensor:
    """Document scores [B, n_docs] from :func:`headwise_matches`: standardised over the documents (``totals``: the
    moments over every shard's documents), the best routing token, the mean over heads."""
    routes = query_mask.bool()[:, None, :, None]  # [B, 1, T, 1]
    return standardised(matches, totals).masked_fill(~routes, float("-inf")).amax(2).mean(1)


def route_headwise(router_q: torch.Tensor, query_mask: torch.Tensor, router_keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Document scores [B, n_docs] fp32 (``score=headwise``): per query head and routing token, each document's best
    cosine over its chunk router keys, standardised over the documents; then the best token, then the mean over heads.

    Each head votes with its own best match, as its softmax would weigh it (:func:`route_ref` averages the heads per
    (token, chunk) pair first, so the many heads that match nothing drown the few that match), and a token that
    matches every document alike (a template token, a common word) says nothing. Memory O(B·H·T·n_docs); plain
    torch ops (no custom op), so exported and ONNX programs take it as it is. Shapes as :func:`route_ref`.
    """
    return headwise_scores(headwise_matches(router_q, query_mask, router_keys, chunk_doc, n_docs), query_mask)


@torch.library.custom_op("longctx::msa_route", mutates_args=())
def msa_route(
    router_q: torch.Tensor, query_mask: torch.Tensor, router_keys: torch.Tensor, chunk_doc: torch.Tensor, doc_chunks: torch.Tensor, cosine: bool
) -> torch.Tensor:
    """Document scores [B, n_docs] as :func:`route_ref`; n_docs is ``doc_chunks.shape[0]`` (the bank's [n_docs, M] chunk table)."""
    return route_ref(router_q, query_mask, router_keys, chunk_doc, doc_chunks.shape[0], cosine)


@msa_route.register_fake
def _(router_q, query_mask, router_keys, chunk_doc, doc_chunks, cosine):
    return router_q.new_empty(router_q.shape[0], doc_chunks.shape[0], dtype=torch.float32)


@torch.library.custom_op("longctx::msa_attention", mutates_args=())
def msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    router_q: torch.Tensor,
    router_k: torch.Tensor,
) -> torch.Tensor:
    """A routed layer's attention: over its own input it is the canonical attention (the router
    projections ``router_q`` [B, T, Hq·D] / ``router_k`` [B, T, Hkv·D] take no part); the MSA
    programs (``runtime.msa``) read them to pool, route and attend over the selected memory."""
    return sdpa_layout_forward(q, k, v, key_padding, doc_ids, mask, scale, causal, window)


@msa_attention.register_fake
def _(q, k, v, key_padding, doc_ids, mask, scale, causal, window, router_q, router_k):
    return empty_sdpa_layout(q, v)


def _msa_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.statics = inputs[6:9]


def _msa_backward(ctx, grad_out):
    """The canonical attention's backward; the router projections get no gradient from attention (as in MSA, where the
    router learns from its auxiliary loss only)."""
    return (*attention_backward(ctx, grad_out), None, None)


msa_attention.register_autograd(_msa_backward, setup_context=_msa_setup)
cache.declare(msa_attention._opoverload, cache.KeyValueCache())  # decodes from cached K and V (``ops.cache``)
