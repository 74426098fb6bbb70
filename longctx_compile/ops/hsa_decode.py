"""``longctx::hsa_decode``: HSA's rows for new queries over cached keys, from cached chunk landmarks.

A decode step's queries are the last T of the N cached keys. Query t (chunk c = t // S) attends to
its local keys (chunks c-w .. c, up to t) and to the top-K of the complete chunks 0 .. c-w-1, as
:func:`.hsa.hsa_ref` defines (per-token selection). What the reference recomputes from every cached
key — each chunk's summary (``ops.hsa.chunk_summaries``) — comes here from ``sums``, one entry per key
kept by running reductions over its chunk (``ops.hsa_sums``), so the entry at a chunk's last key
summarises that chunk. A step reads those C entries, the local window
and the K chosen chunks: O((C + (K+w+1)·S)·D) per query instead of O(N·D). ``exact`` scoring reads
every older key by definition, and takes no sums. Pooled landmarks (``retrieval_pool``) weigh a chunk's keys by a
softmax over all of them, which no running entry keeps: their entries are the scoring keys themselves (the pre-RoPE
ones with NoPE scores), and a step pools every complete chunk's entries again, O(N·R·D) per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import cache
from .attention import empty_sdpa_layout
from .hsa import _softmax, fusion_weights, pooled_landmarks, pooled_scores, rerank_top, score_queries, top_chunks
from .hsa_sums import extend_reps, extend_sums, landmark_sums, summaries, width
from .schema import Call


def hsa_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    sums: torch.Tensor | None,
    retrieval_q: torch.Tensor | None,
    retrieval_k: torch.Tensor | None,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    sink: bool,
    fusion: str,
    score_q: torch.Tensor | None,
    rerank: int = 0,
    retrieval_pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [B, Hq, T, Dv] (fp32): the rows :func:`.hsa.hsa_ref` gives the last T queries of k/v [B, Hkv, N, D]."""
    B, Hq, T, D = q.shape
    Hkv, N, S = k.shape[1], k.shape[2], chunk
    G = Hq // Hkv

    def real(lo: int, hi: int) -> torch.Tensor:  # which of keys lo .. hi-1 are real: a slice, never all N flags
        return torch.ones(B, hi - lo, dtype=torch.bool, device=q.device) if key_padding is None else key_padding[:, lo:hi] != 0

    rows = []
    for i in range(T):  # a decode step feeds one token; a few at most
        t = N - T + i
        c = t // S
        lo = max(0, (c - window) * S)
        qi = q[:, :, i].float().view(B, Hkv, G, D) * scale
        local, local_lse = _softmax(torch.einsum("bhgd,bhld->bhgl", qi, k[:, :, lo : t + 1].float()), real(lo, t + 1)[:, None, None].expand(B, Hkv, G, -1))
        out = torch.einsum("bhgl,bhld->bhgd", local, v[:, :, lo : t + 1].float())
        older = c - window  # candidates: the complete chunks 0 .. older-1
        K = older if topk < 0 else min(topk, older)
        if older <= 0 or K == 0:
            rows.append(out * fusion_weights(local_lse[..., None], fusion))
            continue
        if mode == "exact":  # each chunk's true LSE per head
            keys = k[:, :, : older * S].float().reshape(B, Hkv, older, S, D)
            keep = real(0, older * S).reshape(B, 1, 1, older, S)
            score = torch.einsum("bhgd,bhcsd->bhgcs", qi, keys).masked_fill(~keep, float("-inf"))
            score = torch.logsumexp(score.masked_fill(~keep.any(-1, keepdim=True), 0.0), -1).masked_fill(~keep.any(-1), float("-inf"))
        else:
            ends = sums[:, :, S - 1 : older * S : S].float()  # [B, Hkv, older, ·]: each complete chunk's summary and count
            if retrieval_pool is not None:  # the R pooled landmarks of every complete chunk, from its cached scoring keys
                keys = sums[:, :, : older * S, :-1].float().reshape(B, Hkv, older, S, -1)
                summary, log_count = pooled_landmarks(keys, real(0, older * S).reshape(B, 1, older, S), retrieval_pool), torch.log(ends[..., -1])
            else:
                summary, log_count = summaries(ends, mode)
            score_rows = qi if score_q is None else score_q[:, :, i].float().view(B, Hkv, G, D) * scale
            score_rows = score_queries(score_rows, mode)
            if mode == "learned":
                score_rows = torch.einsum("bhgd,hde->bhge", score_rows, retrieval_q.float())
                summary = torch.einsum("bhc...d,hde->bhc...e", summary, retrieval_k.float())
            score = pooled_scores(torch.einsum("bhgd,bhc...d->bhgc...", score_rows, summary), summary.dim() == 5) + log_count[:, :, None]
        if rerank and mode != "exact":  # the R·K best by the score, then the K best of them by their true LSE
            candidates = top_chunks(score.sum(2), min(rerank * K, older))
            score = _true_lse(qi, k, candidates, real(0, older * S), S)
            idx, at = rerank_top(candidates, score.sum(2), K)
            chosen = torch.gather(score, -1, at[:, :, None].expand(B, Hkv, G, K))
        else:
            idx = top_chunks(score.sum(2), K)  # [B, Hkv, K], most recent first
            chosen = torch.gather(score, -1, idx[:, :, None].expand(B, Hkv, G, K))
        positions = (idx[..., None] * S + torch.arange(S, device=q.device)).flatten(-2)  # [B, Hkv, K·S]
        ks, vs = (torch.gather(t[:, :, : older * S].float(), 2, positions[..., None].expand(-1, -1, -1, t.shape[-1])) for t in (k, v))
        if key_padding is None:
            keep = torch.ones(B, Hkv, 1, K, S, dtype=torch.bool, device=q.device)
        else:
            keep = torch.gather(real(0, older * S)[:, None].expand(B, Hkv, -1), 2, positions).view(B, Hkv, 1, K, S)
        probs, lse = _softmax(torch.einsum("bhgd,bhjd->bhgj", qi, ks).view(B, Hkv, G, K, S), keep.expand(B, Hkv, G, K, S))
        if sink:  # softmax-off-by-one
            probs = probs * torch.sigmoid(lse)[..., None]
        if fusion == "joint":  # each chunk weighs in by its true LSE
            chosen = lse.masked_fill(~torch.isfinite(chosen), float("-inf"))
        weights = fusion_weights(torch.cat([local_lse[..., None], chosen], dim=-1), fusion)
        selected = (probs * weights[..., 1:, None]).flatten(-2)  # [B, Hkv, G, K·S]
        rows.append(out * weights[..., :1] + torch.einsum("bhgj,bhjd->bhgd", selected, vs))
    return torch.stack(rows, dim=3).reshape(B, Hq, T, v.shape[-1])


def _true_lse(qi: torch.Tensor, k: torch.Tensor, chunks: torch.Tensor, real: torch.Tensor, S: int) -> torch.Tensor:
    """Each head's true LSE [B, Hkv, G, n] of ``chunks`` [B, Hkv, n] for the scaled query ``qi`` [B, Hkv, G, D];
    ``real`` [B, ≥ the chunks' keys] says which keys are real."""
    B, Hkv, n = chunks.shape
    positions = (chunks[..., None] * S + torch.arange(S, device=k.device)).flatten(-2)  # [B, Hkv, n·S]
    keys = torch.gather(k.float(), 2, positions[..., None].expand(-1, -1, -1, k.shape[-1]))
    keep = torch.gather(real[:, None].expand(B, Hkv, -1), 2, positions).view(B, Hkv, 1, n, S)
    logits = torch.einsum("bhgd,bhjd->bhgj", qi, keys).view(B, Hkv, -1, n, S)
    return _softmax(logits, keep.expand_as(logits))[1]


@torch.library.custom_op("longctx::hsa_decode", mutates_args=())
def hsa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    sums: torch.Tensor | None,
    retrieval_q: torch.Tensor | None,
    retrieval_k: torch.Tensor | None,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    sink: bool,
    fusion: str = "softmax",
    score_q: torch.Tensor | None = None,
    rerank: int = 0,
    retrieval_pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """HSA decode rows as :func:`hsa_decode_ref` defines them; output [B, Hq, T, Dv] in SDPA's memory layout."""
    result = empty_sdpa_layout(q, v)
    args = (key_padding, sums, retrieval_q, retrieval_k, scale, chunk, topk, window, mode, sink, fusion, score_q, rerank, retrieval_pool)
    result.copy_(hsa_decode_ref(q, k, v, *args))
    return result


@hsa_decode.register_fake
def _(q, k, v, *rest, **options):  # the output's shape and layout follow q and v alone
    return empty_sdpa_layout(q, v)


DECODE = torch.ops.longctx.hsa_decode.default
KEYS_AND_VALUES = cache.KeyValueCache()  # how K and V themselves are extended, as for every attention op


def _grouped_queries(call: Call) -> torch.Tensor | None:
    """``reps``: the call's scoring queries (the NoPE ones when given) times the scale, summed over each KV group's
    heads, [B, Hkv, T, D]; None for other scores."""
    if call.mode != "reps":
        return None
    q = call.q if call.get("score_q") is None else call.score_q
    B, Hq, T, D = q.shape
    return q.float().view(B, call.k.shape[1], Hq // call.k.shape[1], T, D).sum(2) * call.scale


def sums_mode(call: Call) -> str:
    """What a key's sums entry keeps (``ops.hsa_sums``): the scoring mode's running reduction, or with pooled landmarks
    (``pooled``) the scoring key itself."""
    return "pooled" if call.get("retrieval_pool") is not None else call.mode


def scored_keys(call: Call) -> Any:
    """The keys the chunks are scored by: the NoPE ones when the site has them, else the keys."""
    return call.k if call.get("score_k") is None else call.score_k


@dataclass(frozen=True)
class HsaCache(cache.KeyValueCache):
    """How HSA (``hsa_attention``, or ``hsa_flash`` bound by ``lower``: ``flash`` says the site reads a tuple) is
    cached: keys and values as every attention op's, and, unless scoring is ``exact``, each key's sums entry (its
    chunk's running landmark sum or key range, or the key itself for pooled landmarks: :func:`landmark_sums`, fp32,
    from :func:`scored_keys`). A step runs :data:`DECODE` over them; the static
    step's filled prefix ends at the slot (the Generator passes it so), so the new queries are the last of the keys."""

    flash: bool = False

    def stored(self, call: Call) -> tuple[str, ...]:
        return ("k", "v") if call.mode == "exact" else ("k", "v", "sums")

    def dims(self, call: Call) -> list[tuple[Any, Any]]:
        kv = KEYS_AND_VALUES.dims(call)
        return kv if call.mode == "exact" else [*kv, (kv[0][0], width(scored_keys(call).meta["val"].shape[3], sums_mode(call)))]

    def dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if name == "sums" else model_dtype

    def refuse(self, call: Call) -> str | None:
        if call.select == "block" and call.topk >= 0:
            return "per-chunk selection (select=block) sums scores over the chunk's later queries, which a decode step has not seen; convert with --opt select=token to generate"
        if call.mode == "reps" and call.get("score_k") is not None:
            return "score=reps with nope=true picks representatives among the pre-RoPE keys, which the cache does not keep; convert without nope to generate"
        return None

    def prefill(self, call: Call) -> list[torch.Tensor]:
        kv = KEYS_AND_VALUES.prefill(call)
        if call.mode == "exact":
            return kv
        return [*kv, landmark_sums(scored_keys(call), call.key_padding, call.chunk, sums_mode(call), _grouped_queries(call))]

    def _new_sums(self, call: Call, previous: torch.Tensor, index: torch.Tensor, chunk_keys) -> torch.Tensor:
        """The new key's sums entry; ``index`` [B]: its position among the keys; ``chunk_keys()``: the S keys ending
        at it, the new one included, [B, Hkv, S, D], and which are real [B, S] (what ``reps`` picks from; only it asks)."""
        real = torch.ones_like(index) if call.key_padding is None else call.key_padding[:, -1]
        starts, ends = index % call.chunk == 0, index % call.chunk == call.chunk - 1
        if call.mode == "reps":
            return extend_reps(previous, _grouped_queries(call), real, starts, ends, *chunk_keys())
        return extend_sums(previous, scored_keys(call), real, starts, sums_mode(call))

    def grow(self, call: Call, cached: list[torch.Tensor], past_mask: torch.Tensor | None) -> Call:
        grown, sums = KEYS_AND_VALUES.grow(call, cached[:2], past_mask), None
        if call.mode != "exact":
            S, B = call.chunk, call.k.shape[0]
            index = torch.full((B,), cached[0].shape[2], dtype=torch.long, device=call.k.device)

            def chunk_keys():
                real = torch.ones(B, grown.k.shape[2], device=call.k.device) if grown.key_padding is None else (grown.key_padding != 0).float()
                return torch.nn.functional.pad(grown.k, (0, 0, S - 1, 0))[:, :, -S:], torch.nn.functional.pad(real, (S - 1, 0))[:, -S:] > 0

            sums = torch.cat([cached[2], self._new_sums(call, cached[2][:, :, -1:], index, chunk_keys)], dim=2)
        return grown.to(DECODE, sums=sums)

    def write(self, call: Call, cached: list[torch.Tensor], past_mask: torch.Tensor, slots: torch.Tensor, in_place: bool = False) -> Call:
        written, visible = KEYS_AND_VALUES.written(call, cached[:2], past_mask, slots, in_place)
        sums = None
        if call.mode != "exact":
            old, S, (B, H, _, D) = cached[2], call.chunk, written["k"].shape
            before = (slots - 1).clamp(min=0).view(-1, 1, 1, 1).expand(-1, old.shape[1], 1, old.shape[3])

            def chunk_keys():
                window = slots[:, None] - (S - 1) + torch.arange(S, device=slots.device)  # the S slots ending at the new key
                at = window.clamp(min=0)
                return written["k"].gather(2, at[:, None, :, None].expand(B, H, S, D)), visible.gather(1, at) & (window >= 0)

            sums = cache.scatter_key(old, self._new_sums(call, old.gather(2, before), slots, chunk_keys), slots, in_place)
        return call.replace(**written, key_padding=visible).to(DECODE, sums=sums)

    def run(self, call: Call) -> Any:
        out = call()
        return (out, None, None, None) if self.flash else out  # hsa_flash: (out, lse, score, indices)


cache.declare(torch.ops.longctx.hsa_attention.default, HsaCache())
