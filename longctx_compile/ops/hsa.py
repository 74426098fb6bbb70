"""``longctx::hsa_attention``: hierarchical sparse attention over chunks of S keys (causal self-attention).

For query t in chunk c = t // S:
- the *local* part is the keys of chunks max(0, c-w) .. c up to t (causal), one softmax with its LSE;
- the *candidates* are the older complete chunks 0 .. c-w-1, each scored per query head:
  ``exact`` — the chunk's true LSE; ``landmark`` — q·mean(k over the chunk)·scale + log S;
  ``learned`` — (q·Wq)·(mean(k)·Wk)·scale + log S with per-KV-head [D, D] retrieval projections,
  new parameters that start as the identity (so training starts from ``landmark``) and learn
  through the fusion weights; with ``retrieval_pool`` [Hkv, R, D] the mean key becomes R landmarks
  l_r = Σ_j softmax_j(u_r·k_j)·k_j over the chunk's real keys (attention pooling, a learned query u_r
  per landmark: a small non-linear chunk encoder, as Leng et al. find a mean-pooled landmark too weak),
  and the score LSE_r((q·Wq)·(l_r·Wk))·scale − log R + log S (u = 0 gives the ``learned`` score above);
  ``bound`` — Σ_d max(q_d·min_d, q_d·max_d)·scale + log S over the
  chunk's per-channel key range (Quest's upper bound of the chunk's best q·k, so the score bounds
  the chunk's LSE from above), computed as [q, |q|]·[centre, half-range]: linear in [q, |q|], so
  every implementation scores it as it scores landmarks; ``reps`` — q·mean(representative keys)·scale
  + log S, the representatives being the :data:`REPS` real keys of the chunk that the chunk's own
  queries (summed over its real positions and the group's heads) score highest, as InfLLM picks the
  tokens that receive the most attention: the landmark of the keys a chunk is attended for;
- the query heads of a KV group share one selection: the top-K candidates by the group's summed score,
  per query (``select="token"``) or, summed over the chunk's queries too, per query chunk (``"block"``:
  the chunk's queries then read the same K chunks, which makes the work dense-like and fast); of equal
  scores the older chunk is taken (:func:`top_chunks`), so every implementation selects alike;
- each selected chunk gets its own softmax and LSE — with ``sink``, softmax-off-by-one (a +1 in the
  denominator, so a query can take almost nothing from a chunk) — and the parts fuse linearly with
  weights over their scores (the local part scored by its LSE): ``fusion="softmax"``, or
  ``"stick"``-breaking over the parts most recent first (local, then the selected chunks by
  descending index): w_p = σ(s_p)·Π_{j<p}(1 − σ(s_j)), so Σw ≤ 1 and the rest means "attend nothing".
  In ``exact`` mode with K ≥ the candidates and softmax fusion this is dense causal attention exactly;
- ``score_q`` / ``score_k`` (optional, same shapes as q / k) replace q and k in the landmark and
  learned scores: the pre-RoPE projections give the paper's NoPE retrieval path;
- ``rerank`` R ≥ 1 makes the score a first stage: it keeps the top R·K candidates per selection unit,
  and their true LSE (summed over the unit's voters, as ``exact`` sums it) picks the K
  (:func:`rerank_top`; ties to the older chunk). The Triton path reads R·K chunks' keys per unit instead of
  all of them (the reference computes every chunk's LSE, the cheaper way on a CPU); meant with
  ``fusion="joint"``, where the chosen chunks weigh in by that LSE anyway.
Padded keys (``key_padding`` 0) take part nowhere; a chunk with no real key scores -inf and adds nothing.

The reference below is the definition and the backward (autograd through it; the selection gets no
gradient, the scores do through the fusion weights). It runs a group of query chunks at a time
(local windows are strided views of the keys, retrieved chunks gathered with ``index_select``), the
group sized so no intermediate exceeds about 2^20 elements (cache-sized: larger groups were slower
on the CPU): memory O(T·(K+w+1)·S) overall, never [T, T]; only ``exact`` scoring (and ``rerank``) reads every older
key. On the CPU, ``ops.hsa_cpu`` runs the forward of per-chunk selection faster with the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import empty_sdpa_layout

GROUP_ELEMENTS = 1 << 20  # a group of query chunks is sized so no intermediate exceeds about this many elements
REPS = 4  # representative keys per chunk for ``reps`` scores (InfLLM keeps 4 per 128-token block)


def _softmax(scores: torch.Tensor, keep: torch.Tensor, every_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, lse) of one softmax over the last dim where ``keep``; a row with no key: 0, -inf.

    ``every_row``: the caller knows each row keeps a key, which skips the empty-row handling.
    """
    scores = scores.masked_fill(~keep, float("-inf"))
    if every_row:
        lse = torch.logsumexp(scores, -1)
        return torch.exp(scores - lse[..., None]), lse
    dead = ~keep.any(-1)
    lse = torch.logsumexp(scores.masked_fill(dead[..., None], 0.0), -1).masked_fill(dead, float("-inf"))
    return torch.exp(scores - lse.masked_fill(dead, 0.0)[..., None]), lse


@dataclass
class Plan:
    """The sequence laid out in chunks, as the reference and the CPU fast path both read it.

    ``qg`` / ``rows_q``: the queries (scaled) and what scores chunks, [B, Hkv, C, G, S, D] (a chunk's
    G·S rows are one matrix); ``kwin`` / ``vwin`` / ``rwin``: each chunk's local keys, values and
    real-key flags (chunks c-w .. c, a strided view); ``causal`` [S, (w+1)S]; ``kc`` / ``vc`` / ``rc``:
    the complete chunks; ``landmarks``: (mean key, log real count) per complete chunk, None in
    ``exact`` mode; ``K``: the chunks to select; ``step``: query chunks per group; ``rerank``: R (0: off).
    """

    qg: torch.Tensor
    rows_q: torch.Tensor
    kwin: torch.Tensor
    vwin: torch.Tensor
    rwin: torch.Tensor
    causal: torch.Tensor
    kc: torch.Tensor
    vc: torch.Tensor
    rc: torch.Tensor
    landmarks: tuple[torch.Tensor, torch.Tensor] | None
    K: int
    step: int
    rerank: int = 0


def plan(
    q, k, v, key_padding, scale, chunk, topk, window, mode, select, retrieval_q, retrieval_k, score_q, score_k, rerank: int = 0, retrieval_pool=None
) -> Plan:
    """Lay q, k, v out in chunks of ``chunk`` (arguments as :func:`hsa_ref`'s)."""
    B, Hq, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, S, w = Hq // Hkv, chunk, window
    C, full = math.ceil(T / S), T // S  # chunks, complete chunks
    pad = C * S - T
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding is None else key_padding != 0
    qg = torch.nn.functional.pad(q.float() * scale, (0, 0, 0, pad)).view(B, Hkv, G, C, S, D).transpose(2, 3).contiguous()
    # local windows over the keys padded by w chunks on the left
    kwin, vwin = (torch.nn.functional.pad(t.float(), (0, 0, w * S, pad)).unfold(2, (w + 1) * S, S).transpose(-1, -2) for t in (k, v))
    rwin = torch.nn.functional.pad(real, (w * S, pad)).unfold(1, (w + 1) * S, S)  # [B, C, (w+1)S]
    # key l of the window sits w·S - i places before query i of the chunk: causal is the same for every chunk
    causal = torch.arange((w + 1) * S, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None] + w * S
    kc = k.float()[:, :, : full * S].reshape(B, Hkv, full, S, D)
    vc = v.float()[:, :, : full * S].reshape(B, Hkv, full, S, Dv)
    rc = real[:, : full * S].reshape(B, 1, full, S)
    landmarks, rows_q = None, qg  # what scores the chunks: the queries (or the NoPE ones), maybe projected
    if mode != "exact":
        keys = kc if score_k is None else score_k.float()[:, :, : full * S].reshape(B, Hkv, full, S, D)
        if score_q is not None:
            rows_q = torch.nn.functional.pad(score_q.float() * scale, (0, 0, 0, pad)).view(B, Hkv, G, C, S, D).transpose(2, 3)
        qsum = None
        if mode == "reps":  # each complete chunk's queries, summed over its real positions and the group's heads
            real_q = torch.nn.functional.pad(real, (0, pad)).view(B, 1, C, 1, S, 1)
            qsum = (rows_q * real_q)[:, :, :full].sum((3, 4))
        landmarks = chunk_summaries(keys, rc, mode, qsum)
        if mode == "learned" and retrieval_pool is not None:
            landmarks = (pooled_landmarks(keys, rc, retrieval_pool), landmarks[1])
        rows_q = score_queries(rows_q, mode)
    if mode == "learned":
        rows_q = torch.einsum("bhcgsd,hde->bhcgse", rows_q, retrieval_q.float())
        landmarks = (torch.einsum("bhc...d,hde->bhc...e", landmarks[0], retrieval_k.float()), landmarks[1])
    K = full if topk < 0 else topk
    every = mode == "exact" or rerank  # scoring reads every older key
    per_chunk = B * Hq * S * S * (K + w + 1) + (B * Hq * S * T if every else 0) + B * Hkv * (S if select == "token" else 1) * K * S * D
    step = max(1, GROUP_ELEMENTS // per_chunk)
    return Plan(qg, rows_q, kwin, vwin, rwin, causal, kc, vc, rc, landmarks, K, step, rerank if mode != "exact" else 0)


def hsa_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    select: str = "token",
    retrieval_q: torch.Tensor | None = None,
    retrieval_k: torch.Tensor | None = None,
    sink: bool = False,
    fusion: str = "softmax",
    score_q: torch.Tensor | None = None,
    score_k: torch.Tensor | None = None,
    rerank: int = 0,
    retrieval_pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [B, Hq, T, Dv] (fp32) of HSA over q [B, Hq, T, D], k/v [B, Hkv, S, D]; ``topk`` < 0 means all.

    The queries are the last T of the S keys (T = S: self-attention over a sequence; T < S: the new
    tokens of a decode step over cached keys, each selecting as it would in the whole sequence — with
    per-token selection only, as a chunk's shared selection would need its queries before these).
    ``retrieval_q`` / ``retrieval_k`` [Hkv, D, D]: the ``learned`` mode's projections; ``retrieval_pool`` [Hkv, R, D]
    its pooling queries (None: the mean key).
    """
    T, n_keys = q.shape[2], k.shape[2]
    offset = n_keys - T  # queries before these: their rows are placeholders, and no chunk of them only is computed
    if offset < 0:
        raise ValueError(f"hsa_attention: {T} queries over {n_keys} keys; the queries are the last T of the keys")
    if offset and select == "block" and topk >= 0:
        raise ValueError("hsa_attention: per-chunk selection (select=block) needs all the chunk's queries; a decode step has the last ones only")
    if offset and mode == "reps":
        raise ValueError(
            "hsa_attention: representative keys (score=reps) are picked by all the chunk's queries; a decode step reads them from hsa_decode's sums"
        )
    if offset:
        q, score_q = (None if t is None else torch.nn.functional.pad(t, (0, 0, offset, 0)) for t in (q, score_q))
    p = plan(q, k, v, key_padding, scale, chunk, topk, window, mode, select, retrieval_q, retrieval_k, score_q, score_k, rerank, retrieval_pool)
    B, Hkv, C, G, S, D = p.qg.shape
    w, first = window, offset // chunk
    outs = []
    for c0 in range(first, C, p.step):
        c1 = min(C, c0 + p.step)
        rows = p.qg[:, :, c0:c1]  # [B, Hkv, Cg, G, S, D]
        keep = p.causal & p.rwin[:, None, c0:c1, None, None, :]
        local, local_lse = _softmax(torch.einsum("bhcgsd,bhcld->bhcgsl", rows, p.kwin[:, :, c0:c1]), keep, key_padding is None)
        older = c1 - 1 - w  # candidates of the group's last chunk: chunks 0 .. older-1
        if older <= 0 or topk == 0:
            only = fusion_weights(local_lse[..., None], fusion)  # the local part alone: 1 (softmax) or σ(LSE) (stick)
            outs.append(torch.einsum("bhcgsl,bhcld->bhcgsd", local, p.vwin[:, :, c0:c1]) * only)
            continue
        probs, scores, vs = _retrieve(p, rows, older, c0, c1, w, min(p.K, older), select, key_padding is None, sink, fusion)
        weights = fusion_weights(torch.cat([local_lse[..., None], scores], dim=-1), fusion)
        # the local part's weight scales its output; the selected chunks' weights fold into their
        # probabilities, so all of them are one matmul over their keys
        out = torch.einsum("bhcgsl,bhcld->bhcgsd", local, p.vwin[:, :, c0:c1]) * weights[..., :1]
        selected = (probs * weights[..., 1:, None]).flatten(-2)  # [B, Hkv, Cg, G, S, K·S]
        if select == "block":
            out = out + torch.einsum("bhcgsj,bhcjd->bhcgsd", selected, vs[:, :, :, 0].flatten(3, 4))
        else:
            out = out + torch.einsum("bhcgsj,bhcsjd->bhcgsd", selected, vs.flatten(4, 5))
        outs.append(out)
    return unchunk(torch.cat(outs, dim=2), n_keys - first * S)[:, :, -T:]


def unchunk(out: torch.Tensor, T: int) -> torch.Tensor:
    """[B, Hkv, C, G, S, Dv] chunk-major rows back to [B, Hq, T, Dv]."""
    B, Hkv, C, G, S, Dv = out.shape
    return out.transpose(2, 3).reshape(B, Hkv, G, C * S, Dv)[:, :, :, :T].reshape(B, Hkv * G, T, Dv)


def _retrieve(p: Plan, rows, older: int, c0: int, c1: int, w: int, K: int, select: str, unpadded: bool, sink: bool, fusion: str = "softmax"):
    """Each query's top-K older chunks: (probabilities [B, Hkv, Cg, G, S, K, S] within each chunk, their
    fusion scores [B, Hkv, Cg, G, S, K], their values [B, Hkv, Cg, S|1, K, S, Dv]).
    """
    B, Hkv, Cg, G, S, D = rows.shape
    idx, chosen, flat = select_chunks(p, rows, older, c0, c1, w, K, select)
    ks, vs = gather_chunks(p, flat, idx.shape)
    if select == "block":  # a chunk's shared selection: one matmul for all its G·S query rows
        scores = torch.einsum("bhcgnd,bhcksd->bhcgnks", rows, ks[:, :, :, 0])
    else:
        scores = torch.einsum("bhcgnd,bhcnksd->bhcgnks", rows, ks)
    if unpadded and not sink and fusion != "joint":  # every key of a chunk is real
        return torch.softmax(scores, dim=-1), chosen, vs
    keep = torch.ones((), dtype=torch.bool, device=rows.device)
    if not unpadded:
        keep = p.rc.expand(B, Hkv, -1, S).reshape(-1, S).index_select(0, flat).view(*idx.shape, S)[:, :, :, None]
    probs, lse = _softmax(scores, keep.expand_as(scores))
    if sink:  # softmax-off-by-one: a chunk passes on Σexp / (Σexp + 1) of its mass
        probs = probs * torch.sigmoid(lse)[..., None]
    if fusion == "joint":  # each chunk weighs in by its true LSE: one softmax over the local keys and the chosen chunks'
        chosen = lse.masked_fill(~torch.isfinite(chosen), float("-inf"))
    return probs, chosen, vs


def select_chunks(p: Plan, rows, older: int, c0: int, c1: int, w: int, K: int, select: str):
    """The top-K of chunks 0 .. older-1 for each selection unit of query chunks c0 .. c1-1:
    (indices [B, Hkv, Cg, S|1, K] most recent first, each row's fusion score of them
    [B, Hkv, Cg, G, S, K], the indices as rows of the flattened [B·Hkv·full] complete chunks).

    ``rows`` are the group's queries already multiplied by the softmax scale; ``p.rows_q`` what
    scores the chunks against the landmarks (the rows, their learned projection, or [rows, |rows|]). A chunk picked
    among fewer than K visible ones scores -inf. Chunks are addressed in the whole ``p.kc`` (a slice
    of it would be copied: O(T) per group).
    """
    B, Hkv, Cg, G, S, D = rows.shape
    kc, rc, landmarks, score_rows = p.kc, p.rc, p.landmarks, p.rows_q[:, :, c0:c1]
    full = kc.shape[2]
    chunks = torch.arange(c0, c1, device=rows.device)
    visible = torch.arange(older, device=rows.device)[None, :] < (chunks - w)[:, None]  # [Cg, older]: complete and before the window
    if landmarks is None:
        score = _exact_scores(rows, kc[:, :, :older], rc[:, :, :older]).masked_fill(~visible[:, None, None], float("-inf"))
        group = voted(score, select)  # [B, Hkv, Cg, S|1, older]
    else:
        mean, log_count = (t[:, :, :older] for t in landmarks)  # small: [B, Hkv|1, older, D|·]
        group = landmark_votes(score_rows, (mean, log_count), select).masked_fill(~visible[:, None], float("-inf"))
    if p.rerank:  # the first stage's R·K candidates, ranked again by their true LSE
        candidates = top_chunks(group, min(p.rerank * K, older))
        # every older chunk's true LSE, then the candidates': a row's logits over the older keys cost less on the CPU
        # than gathering each row's own R·K chunks (the Triton path reads the candidates only, ``kernels.hsa.rerank``)
        every = _exact_scores(rows, kc[:, :, :older], rc[:, :, :older]).masked_fill(~visible[:, None, None], float("-inf"))
        score = torch.gather(every, -1, candidates[:, :, :, None].expand(B, Hkv, Cg, G, S, -1))
        group = voted(score, select)
        idx, at = rerank_top(candidates, group, K)
        chosen = torch.gather(score, -1, at[:, :, :, None].expand(B, Hkv, Cg, G, S, K))
        flat = (torch.arange(B * Hkv, device=rows.device).view(B, Hkv, 1, 1, 1) * full + idx).flatten()
        return idx, chosen, flat
    idx = top_chunks(group, K)  # [B, Hkv, Cg, S|1, K], most recent first
    if landmarks is None:
        chosen = torch.gather(score, -1, idx[:, :, :, None].expand(B, Hkv, Cg, G, S, K))
    else:  # each row's own score of its chosen chunks; a chunk picked among fewer than K visible ones scores -inf
        flat = (torch.arange(B * Hkv, device=rows.device).view(B, Hkv, 1, 1, 1) * full + idx).flatten()
        lm = landmarks[0].flatten(0, 2).index_select(0, flat).view(*idx.shape, *landmarks[0].shape[3:])
        pattern = "bhcgsd,bhcnk...d->bhcgsk..." if select == "block" else "bhcgsd,bhcsk...d->bhcgsk..."
        chosen = (
            pooled_scores(torch.einsum(pattern, score_rows, lm), lm.dim() > idx.dim() + 1)
            + torch.gather(log_count[:, :, None, None].expand(*idx.shape[:-1], older), -1, idx)[:, :, :, None]
        )
        seen = torch.gather(visible[None, None, :, None].expand(*idx.shape[:-1], older), -1, idx)
        chosen = chosen.masked_fill(~seen[:, :, :, None], float("-inf"))
    flat = (torch.arange(B * Hkv, device=rows.device).view(B, Hkv, 1, 1, 1) * full + idx).flatten()
    return idx, chosen, flat


def voted(score: torch.Tensor, select: str) -> torch.Tensor:
    """A per-row score [B, Hkv, Cg, G, S, n] summed over each selection unit's voters (the group's heads, and with
    ``select="block"`` the chunk's queries): [B, Hkv, Cg, S|1, n]."""
    return score.sum(3) if select == "token" else score.sum((3, 4))[:, :, :, None]


def landmark_votes(score_rows: torch.Tensor, landmarks: tuple[torch.Tensor, torch.Tensor], select: str) -> torch.Tensor:
    """Each unit's score [B, Hkv, Cg, S|1, chunks] of every chunk summarised by ``landmarks`` (:func:`chunk_summaries`),
    from the rows that score them [B, Hkv, Cg, G, S, R]: linear in the row, so the voters' summed row scores at once."""
    mean, log_count = landmarks
    G, S = score_rows.shape[3:5]
    voters = G * (S if select == "block" else 1)
    if mean.dim() == 5:  # R pooled landmarks: a row's score is not linear in the row, so each row scores, then the unit sums
        return voted(pooled_scores(torch.einsum("bhcgsd,bhird->bhcgsir", score_rows, mean), True), select) + voters * log_count[:, :, None, None]
    return torch.einsum("bhcsd,bhid->bhcsi", voted(score_rows, select), mean) + voters * log_count[:, :, None, None]


def pooled_landmarks(kc: torch.Tensor, rc: torch.Tensor, pool: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """R landmarks per chunk [B, Hkv, chunks, R, D]: l_r = Σ_j softmax_j(u_r·k_j)·k_j over the chunk's real keys
    (``kc`` [B, Hkv, chunks, S, D], ``rc`` [B, 1, chunks, S]), u_r the rows of ``pool`` [Hkv, R, D]; zeros for a chunk
    with no real key. ``logits``: u_r·k_j [B, Hkv, chunks, R, S] where the caller computes them its own way."""
    if logits is None:
        logits = torch.einsum("bhcsd,hrd->bhcrs", kc, pool.float())
    empty = ~rc.any(-1)[:, :, :, None, None]
    logits = logits.masked_fill(~rc[:, :, :, None], float("-inf")).masked_fill(empty, 0.0)
    return torch.einsum("bhcrs,bhcsd->bhcrd", torch.softmax(logits, dim=-1).masked_fill(empty, 0.0), kc)


def pooled_scores(scores: torch.Tensor, pooled: bool) -> torch.Tensor:
    """A row's score of a chunk from its scores of the chunk's R landmarks (last dim): LSE − log R, so R equal
    landmarks score as one; ``scores`` as it is where the chunk has one summary (``pooled`` false)."""
    return scores.logsumexp(-1) - math.log(scores.shape[-1]) if pooled else scores


def top_chunks(scores: torch.Tensor, K: int) -> torch.Tensor:
    """Indices of the K best chunks along the last dim, most recent first; of equal scores the older chunk wins
    (a stable sort), as in the Triton selection and ONNX TopK, so every implementation picks the same chunks."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :K].sort(dim=-1, descending=True).values


def rerank_top(candidates: torch.Tensor, scores: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K best of ``candidates`` [..., R·K] (chunk indices, most recent first; -1 for none) by ``scores`` (same
    shape): (their chunk indices [..., K], most recent first; their places in ``candidates``). Of equal scores the older
    chunk wins, as in :func:`top_chunks`."""
    n = candidates.shape[-1]
    oldest_first = scores.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :K]
    at = (n - 1 - oldest_first).sort(dim=-1).values  # places in the most-recent-first list, so most recent first
    return candidates.gather(-1, at), at


def gather_chunks(p: Plan, flat: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [*shape, S, D|Dv] of the complete chunks at rows ``flat`` (index_select is fast)."""
    S, D, Dv = p.kc.shape[-2], p.kc.shape[-1], p.vc.shape[-1]
    return p.kc.reshape(-1, S, D).index_select(0, flat).view(*shape, S, D), p.vc.reshape(-1, S, Dv).index_select(0, flat).view(*shape, S, Dv)


def _exact_scores(rows: torch.Tensor, kc: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
    """Each chunk's true LSE per (scaled) query head [B, Hkv, Cg, G, S, chunks]; -inf for a chunk with no real key."""
    empty = (rc.sum(-1) == 0)[:, :, None, None, None]
    scores = torch.einsum("bhcgsd,bhijd->bhcgsij", rows, kc)
    scores = scores.masked_fill(~rc[:, :, None, None, None], float("-inf")).masked_fill(empty[..., None], 0.0)
    return scores.logsumexp(-1).masked_fill(empty, float("-inf"))


def chunk_summaries(kc: torch.Tensor, rc: torch.Tensor, mode: str, qsum: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What score queries meet: (per chunk a vector [B, Hkv, chunks, R], log of its real-key count [B, 1, chunks]):
    the mean key (R = D) for ``landmark`` / ``learned``, the key range's centre and half-width (R = 2D) for ``bound``,
    the mean of the representative keys (R = D) for ``reps``, picked by ``qsum`` [B, Hkv, chunks, D], each chunk's
    summed (scaled) queries."""
    if mode == "bound":
        return _bounds(kc, rc)
    if mode == "reps":
        received = torch.einsum("bhcd,bhcsd->bhcs", qsum, kc)
        return representatives(received, kc, rc.expand_as(received)), torch.log(rc.sum(-1).float())
    return _landmarks(kc, rc)


def representatives(received: torch.Tensor, keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The mean [..., D] of the :data:`REPS` real keys (``keys`` [..., S, D], ``real`` [..., S]) with the highest
    ``received`` score [..., S]; of fewer real keys, all of them; zeros for none."""
    received = received.masked_fill(~real, float("-inf"))
    picked = received.topk(min(REPS, received.shape[-1]), dim=-1).indices
    keep = real.gather(-1, picked).to(keys.dtype)
    chosen = keys.gather(-2, picked[..., None].expand(*picked.shape, keys.shape[-1]))
    return (chosen * keep[..., None]).sum(-2) / keep.sum(-1).clamp(min=1)[..., None]


def score_queries(rows: torch.Tensor, mode: str) -> torch.Tensor:
    """What meets :func:`chunk_summaries`: the (scaled) queries, or [q, |q|] for ``bound``, where
    q·centre + |q|·half-width = Σ_d max(q_d·min_d, q_d·max_d) — linear in [q, |q|], so a group's bound is its summed row's."""
    return torch.cat([rows, rows.abs()], dim=-1) if mode == "bound" else rows


def _landmarks(kc: torch.Tensor, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean key [B, Hkv, chunks, D], log of the real-key count [B, 1, chunks], -inf when empty) of every chunk."""
    count = rc.sum(-1)
    mean = (kc * rc[..., None]).sum(-2) / count.clamp(min=1)[..., None]
    return mean, torch.log(count.float())


def _bounds(kc: torch.Tensor, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([centre, half-width] of the real keys' per-channel range [B, Hkv, chunks, 2D], log real-key count) of every chunk."""
    real = rc[..., None]
    low, high = kc.masked_fill(~real, float("inf")).amin(-2), kc.masked_fill(~real, float("-inf")).amax(-2)
    count = rc.sum(-1)
    return centre_and_radius(low, high, count), torch.log(count.float())


def centre_and_radius(low: torch.Tensor, high: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[(low + high) / 2, (high - low) / 2] along the last dim; zeros for a chunk with no real key (its ±inf range)."""
    empty = (count == 0)[..., None]
    return torch.cat([((high + low) / 2).masked_fill(empty, 0.0), ((high - low) / 2).masked_fill(empty, 0.0)], dim=-1)


def fusion_weights(scores: torch.Tensor, fusion: str) -> torch.Tensor:
    """Weights of the parts from their scores (last dim, most recent first); a row with no finite score gets zeros.

    ``softmax``: normalised. ``stick``: σ(s_p)·Π_{j<p}(1 − σ(s_j)), in log space (log σ(-s) = log(1 − σ(s))).
    """
    if fusion == "stick":
        keep = torch.nn.functional.logsigmoid(-scores)
        return torch.exp(torch.nn.functional.logsigmoid(scores) + keep.cumsum(-1) - keep)
    dead = ~torch.isfinite(scores).any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


@torch.library.custom_op("longctx::hsa_attention", mutates_args=())
def hsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    retrieval_q: torch.Tensor | None,
    retrieval_k: torch.Tensor | None,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    select: str,
    sink: bool,
    fusion: str = "softmax",
    score_q: torch.Tensor | None = None,
    score_k: torch.Tensor | None = None,
    rerank: int = 0,
    retrieval_pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """HSA as defined by :func:`hsa_ref`; output [B, Hq, T, Dv] in SDPA's memory layout."""
    result = empty_sdpa_layout(q, v)
    args = (key_padding, scale, chunk, topk, window, mode, select, retrieval_q, retrieval_k, sink, fusion, score_q, score_k, rerank, retrieval_pool)
    result.copy_(hsa_ref(q, k, v, *args))
    return result


@hsa_attention.register_fake
def _(q, k, v, *rest, **options):  # the output's shape and layout follow q and v alone
    return empty_sdpa_layout(q, v)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], *inputs[14:16], inputs[17])
    ctx.statics = (*inputs[6:14], inputs[16])


def _backward(ctx, grad_out):
    q, k, v, key_padding, retrieval_q, retrieval_k, score_q, score_k, retrieval_pool = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in (q, k, v, retrieval_q, retrieval_k, score_q, score_k, retrieval_pool)]
        scale, chunk, topk, window, mode, select, sink, fusion, rerank = ctx.statics
        out = hsa_ref(*leaves[:3], key_padding, scale, chunk, topk, window, mode, select, *leaves[3:5], sink, fusion, *leaves[5:7], rerank, leaves[7])
        wrt = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    dq, dk, dv, dwq, dwk, dsq, dsk, dpool = (None if t is None else next(grads) for t in leaves)
    return dq, dk, dv, None, dwq, dwk, *(None,) * 8, dsq, dsk, None, dpool


hsa_attention.register_autograd(_backward, setup_context=_setup_context)  # its cache is declared in ops.hsa_decode
