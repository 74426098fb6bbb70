"""Hierarchical sparse attention in Triton: chunk selection, the fused forward, and its backward.

Semantics are ``ops.hsa.hsa_ref``'s. A *unit* is the set of queries that share one selection: one
query (``select="token"``) or one chunk of S queries (``"block"``). A program's rows are BLOCK_Q
queries of one unit times the G query heads of one KV head, so the G heads that share a selection
share every key tile they load (rows are padded to at least 16 for ``tl.dot``).

- ``select``: per unit, the top-K visible chunks (complete, older than the local window) by the
  group's summed landmark score, streamed over chunk tiles with a running top-K; no [T, chunks]
  tensor is ever written.
- ``rerank``: per unit and candidate chunk (from ``select`` with R·K slots), the true LSE of each of the
  unit's rows over the chunk's keys, summed over the rows: the score the K are then picked by.
- forward: the local part (chunks c-w .. c, causal) by online softmax, then each selected chunk
  (one S-key tile) with its own softmax, fused by an online softmax over the parts' scores (each
  part's true LSE with ``joint`` fusion, which makes it one softmax over all the parts' keys). It
  stores each part's natural-log LSE and score per row, [B, Hq, T, 1 + K], for the backward.
- backward: a dQ kernel walks the same parts per row (recomputing each part's output for the
  fusion-weight gradient) and stores per row and part the weight, ``D`` and score gradient; a dK/dV
  kernel per key chunk adds the local windows that contain it and the (unit, slot) pairs that
  selected it, read from an inverted index (CSR built in torch), and the landmark gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import LccError
from ..ops.attention import empty_sdpa_layout
from ..targets.tiles import hsa_rows, hsa_unsupported, padded_dim
from .attention import _TL_DTYPES, _dot
from .launch import launch, on_cpu


# Kernel argument lists stay packed (pointers, strides, sizes, compile-time flags) rather than one per line.
# fmt: off
@triton.jit
def _rows(q0, hk, T, G, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr):
    """Row r of a program is query q0 + r // G in head hk·G + r % G; rows past BLOCK_Q·G or T are padding."""
    r = tl.arange(0, ROWS)
    qi = r // G
    t = q0 + qi
    return t.to(tl.int64), (hk * G + r % G).to(tl.int64), (qi < BLOCK_Q) & (t < T)


@triton.jit
def _log_sigmoid(x):
    """log σ(x), stable, -inf at -inf."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _select_kernel(
    SU, LK, LB, Idx, ssu_b, ssu_h, ssu_u, slk_b, slk_h, slk_c, slb_b, si_b, si_h, si_u, Hkv, n_units, C, window,
    UNIT, CHUNK, bias_mult, KSLOTS, R_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Top-KSLOTS chunks per unit by su·lk + bias_mult·lb over the chunks i < chunk(unit) - window."""
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    in_u = u < n_units
    offs_r = tl.arange(0, BLOCK_R)
    su = tl.load(SU + b * ssu_b + hk * ssu_h + u[:, None].to(tl.int64) * ssu_u + offs_r[None, :], mask=in_u[:, None] & (offs_r[None, :] < R_DIM), other=0.0)
    limit = tl.where(in_u, (u * UNIT) // CHUNK - window, 0)  # visible chunks: i < limit
    cols_k = tl.arange(0, BLOCK_K)
    cols_c = tl.arange(0, BLOCK_C)
    best = tl.full([BLOCK_U, BLOCK_K], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_U, BLOCK_K], -1, tl.int32)
    for c0 in range(0, tl.max(limit, 0), BLOCK_C):
        ci = c0 + cols_c
        lk = tl.load(LK + b * slk_b + hk * slk_h + ci[:, None].to(tl.int64) * slk_c + offs_r[None, :], mask=(ci[:, None] < C) & (offs_r[None, :] < R_DIM), other=0.0)
        lb = tl.load(LB + b * slb_b + ci, mask=ci < C, other=float("-inf"))
        sc = _dot(su, tl.trans(lk), PRECISION, tl.float32) + bias_mult * lb[None, :]
        sc = tl.where(ci[None, :] < limit[:, None], sc, float("-inf"))
        # merge: KSLOTS rounds, each taking the larger of the best remaining in the buffer and in the tile
        new_v = tl.full([BLOCK_U, BLOCK_K], float("-inf"), tl.float32)
        new_i = tl.full([BLOCK_U, BLOCK_K], -1, tl.int32)
        for r in range(KSLOTS):
            mb = tl.max(best, 1)
            mt = tl.max(sc, 1)
            ab = tl.argmax(best, 1)
            at = tl.argmax(sc, 1)
            take = mt > mb
            from_buf = tl.sum(tl.where(cols_k[None, :] == ab[:, None], best_i, 0), 1)
            new_v = tl.where(cols_k[None, :] == r, tl.where(take, mt, mb)[:, None], new_v)
            new_i = tl.where(cols_k[None, :] == r, tl.where(take, c0 + at, from_buf)[:, None], new_i)
            sc = tl.where(take[:, None] & (cols_c[None, :] == at[:, None]), float("-inf"), sc)
            best = tl.where(~take[:, None] & (cols_k[None, :] == ab[:, None]), float("-inf"), best)
        best, best_i = new_v, new_i
    best_i = tl.where(best == float("-inf"), -1, best_i)
    tl.store(Idx + b * si_b + hk * si_h + u[:, None].to(tl.int64) * si_u + cols_k[None, :], best_i, mask=in_u[:, None] & (cols_k[None, :] < KSLOTS))


@triton.jit
def _chunk_scores(q, k_base, kpad_base, kpos, t, scale, sk_s, offs_d, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
                  CAUSAL: tl.constexpr, T, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Logits [ROWS, N] of the rows against keys kpos, -inf where a key is padded, outside [0, T) or (CAUSAL) after the row's query."""
    in_k = (kpos >= 0) & (kpos < T)
    k = tl.load(k_base + kpos[:, None] * sk_s + offs_d[None, :], mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    s = _dot(q, tl.trans(k), PRECISION, DOT_DTYPE) * scale
    keep = in_k[None, :]
    if CAUSAL:
        keep = keep & (kpos[None, :] <= t[:, None])
    if HAS_PAD:
        keep = keep & (tl.load(kpad_base + kpos, mask=in_k, other=0)[None, :] != 0)
    return tl.where(keep, s, float("-inf")), k


@triton.jit
def _rerank_kernel(
    Q, K, KeyPad, Idx, Out, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, si_b, si_h, si_u, so_b, so_h, so_u, sp_b, Hkv, T, G, NCAND,
    scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UNIT: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
    HAS_PAD: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program: one unit's queries × G heads; per candidate chunk, Σ over those rows of the row's LSE over the chunk.

    Rows past T count as zero queries (an LSE of log(real keys)), as the reference's zero-padded last chunk does."""
    u = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    t, h, valid = _rows(u * UNIT, hk, T, G, UNIT, ROWS)
    voter = (tl.arange(0, ROWS) // G) < UNIT
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, CHUNK)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    for j in range(NCAND):
        ci = tl.load(Idx + b * si_b + hk * si_h + u * si_u + j)
        kpos = ci.to(tl.int64) * CHUNK + offs_n  # negative for an empty slot: no key
        s, _ = _chunk_scores(q, K + b * sk_b + hk * sk_h, KeyPad + b * sp_b, kpos, t, scale, sk_s, offs_d, HEAD_DIM, HAS_PAD,
                             False, T, PRECISION, DOT_DTYPE)
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        lse = m + tl.log(tl.sum(tl.exp(s - m[:, None]), 1))  # -inf for a row that sees no real key
        total = tl.sum(tl.where(voter, lse, 0.0), 0)
        tl.store(Out + b * so_b + hk * so_h + u * so_u + j, tl.where(ci >= 0, total, float("-inf")))


@triton.jit
def _fwd_kernel(
    Q, K, V, KeyPad, SQ, LK, LB, Idx, Out, Lse, Score, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h,
    so_t, ssq_b, ssq_h, ssq_t, slk_b, slk_h, slk_c, slb_b, si_b, si_h, si_u, sl_b, sl_h, sl_t, sp_b, Hkv, T, G, KSLOTS,
    window, scale, UNIT, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, R_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
    HAS_PAD: tl.constexpr, EXACT: tl.constexpr, JOINT: tl.constexpr, SINK: tl.constexpr, STICK: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_Q queries × G heads; the local part, then each selected chunk, fused online."""
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    q0 = tl.program_id(0) * BLOCK_Q
    t, h, valid = _rows(q0, hk, T, G, BLOCK_Q, ROWS)
    offs_n = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_R)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    kpad_base = KeyPad + b * sp_b
    row_lse = Lse + b * sl_b + h * sl_h + t * sl_t
    row_score = Score + b * sl_b + h * sl_h + t * sl_t

    # local part: chunks c-w .. c, causal, one online softmax
    c = q0 // CHUNK
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for start in range(tl.maximum(c - window, 0) * CHUNK, tl.minimum(T, q0 + BLOCK_Q), CHUNK):
        kpos = start + offs_n
        s, k = _chunk_scores(q, k_base, kpad_base, kpos, t, scale, sk_s, offs_d, HEAD_DIM, HAS_PAD, True, T, PRECISION, DOT_DTYPE)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = tl.load(v_base + kpos[:, None] * sv_s + offs_dv[None, :], mask=(kpos[:, None] < T) & (offs_dv[None, :] < V_DIM), other=0.0)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_DTYPE)
        m = m_new
    lse = tl.where(l_sum > 0, m + tl.log(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
    tl.store(row_lse, lse, mask=valid)
    tl.store(row_score, lse, mask=valid)
    # fusion state. softmax: running max f of the parts' scores, their exp-sum z, the weighted outputs;
    # stick: f is log Π(1 - σ(s)) of the parts so far (what they left), z unused
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    if STICK:
        out = out * tl.exp(_log_sigmoid(lse))[:, None]
        f = _log_sigmoid(-lse)
        z = tl.zeros([ROWS], tl.float32)
    else:
        f = lse
        z = tl.where(lse > float("-inf"), 1.0, 0.0)

    sq = tl.zeros([ROWS, BLOCK_R], tl.float32)
    if not EXACT:
        sq = tl.load(SQ + b * ssq_b + h[:, None] * ssq_h + t[:, None] * ssq_t + offs_r[None, :], mask=valid[:, None] & (offs_r[None, :] < R_DIM), other=0.0)
    idx_base = Idx + b * si_b + hk * si_h + (q0 // UNIT) * si_u
    for slot in range(0, KSLOTS):
        idx = tl.load(idx_base + slot)
        kpos = idx * CHUNK + offs_n  # negative for an empty slot (idx -1): every load below is masked off
        s, k = _chunk_scores(q, k_base, kpad_base, kpos, t, scale, sk_s, offs_d, HEAD_DIM, HAS_PAD, False, T, PRECISION, DOT_DTYPE)
        cm = tl.max(s, 1)
        cm_safe = tl.where(cm == float("-inf"), 0.0, cm)
        p = tl.exp(s - cm_safe[:, None])
        cl = tl.sum(p, 1)
        chunk_lse = tl.where(cl > 0, cm + tl.log(tl.where(cl > 0, cl, 1.0)), float("-inf"))
        denom = cl
        if SINK:  # softmax-off-by-one: a +1 (e^0) in the denominator
            denom = cl + tl.exp(-cm_safe)
        v = tl.load(v_base + kpos[:, None] * sv_s + offs_dv[None, :], mask=(kpos[:, None] >= 0) & (kpos[:, None] < T) & (offs_dv[None, :] < V_DIM), other=0.0)
        o = _dot(p.to(v.dtype), v, PRECISION, DOT_DTYPE) / tl.where(denom > 0, denom, 1.0)[:, None]
        if EXACT or JOINT:  # the chunk's true LSE (joint: one softmax over every part's keys)
            score = chunk_lse
        else:
            lk = tl.load(LK + b * slk_b + hk * slk_h + tl.maximum(idx, 0).to(tl.int64) * slk_c + offs_r, mask=offs_r < R_DIM, other=0.0)
            score = tl.sum(sq * lk[None, :], 1) + tl.load(LB + b * slb_b + tl.maximum(idx, 0))  # an empty slot's score is -inf below
        score = tl.where((idx >= 0) & (chunk_lse > float("-inf")), score, float("-inf"))
        if STICK:
            out += tl.exp(_log_sigmoid(score) + f)[:, None] * o
            f += _log_sigmoid(-score)
        else:
            f_new = tl.maximum(f, score)
            f_safe = tl.where(f_new == float("-inf"), 0.0, f_new)
            a = tl.exp(f - f_safe)
            e = tl.exp(score - f_safe)
            z = z * a + e
            out = out * a[:, None] + e[:, None] * o
            f = f_new
        tl.store(row_lse + 1 + slot, chunk_lse, mask=valid)
        tl.store(row_score + 1 + slot, score, mask=valid)
    if not STICK:
        out = out / tl.where(z > 0, z, 1.0)[:, None]
    tl.store(Out + b * so_b + h[:, None] * so_h + t[:, None] * so_t + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=valid[:, None] & (offs_dv[None, :] < V_DIM))


@triton.jit
def _part_grads(s, lse, w, do, v, dsum, SINK: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """For one part with logits s: (probabilities the output used, true-softmax probabilities, ⟨dO, v⟩ tile, the part's weight gradient)."""
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.exp(s - lse_safe[:, None])
    pa = p
    if SINK:
        pa = p * tl.sigmoid(lse)[:, None]
    dp = _dot(do.to(v.dtype), tl.trans(v), PRECISION, DOT_DTYPE)
    return pa, p, dp, dsum + tl.sum(pa * dp, 1)


@triton.jit
def _weight(score, flse, left, STICK: tl.constexpr):
    """A part's fusion weight: exp(s - logsumexp of all scores) (softmax), or σ(s) times what the earlier parts left (stick)."""
    if STICK:
        return tl.exp(_log_sigmoid(score) + left)
    return tl.where(score > float("-inf"), tl.exp(score - flse), 0.0)


@triton.jit
def _score_grad(score, w, dw, out_dot, left, done, STICK: tl.constexpr):
    """(dL/d score of a part with weight w and weight gradient dw, the updated stick state (left, done)).

    softmax: w·(dw - Σ_p w_p dw_p), the sum being ⟨out, dO⟩. stick: w·dw·σ(-s) - σ(s)·Σ_{later p} w_p dw_p,
    the later parts' sum being ⟨out, dO⟩ minus the parts so far (this one included).
    """
    if STICK:
        done += w * dw
        return w * dw * tl.sigmoid(-score) - tl.sigmoid(score) * (out_dot - done), left + _log_sigmoid(-score), done
    return w * (dw - out_dot), left, done


@triton.jit
def _dq_kernel(
    Q, K, V, KeyPad, SQ, LK, Idx, Out, DOut, Lse, Score, DQ, DSQ, Wt, Dd, DS, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h,
    sv_s, so_b, so_h, so_t, ssq_b, ssq_h, ssq_t, slk_b, slk_h, slk_c, si_b, si_h, si_u, sl_b, sl_h, sl_t, sp_b, Hkv, T,
    G, KSLOTS, window, scale, UNIT, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, R_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, HAS_PAD: tl.constexpr, EXACT: tl.constexpr, JOINT: tl.constexpr,
    SINK: tl.constexpr, STICK: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """dQ (and the score queries' gradient) of BLOCK_Q queries × G heads; per part it stores the weight w, D = w·⟨O_p, dO⟩ and dscore."""
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    q0 = tl.program_id(0) * BLOCK_Q
    t, h, valid = _rows(q0, hk, T, G, BLOCK_Q, ROWS)
    offs_n = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    row_o = b * so_b + h[:, None] * so_h + t[:, None] * so_t + offs_dv[None, :]
    do = tl.load(DOut + row_o, mask=valid[:, None] & (offs_dv[None, :] < V_DIM), other=0.0).to(tl.float32)
    o = tl.load(Out + row_o, mask=valid[:, None] & (offs_dv[None, :] < V_DIM), other=0.0).to(tl.float32)
    out_dot = tl.sum(o * do, 1)  # ⟨out, dO⟩ = Σ_p w_p ⟨O_p, dO⟩: the softmax fusion's shared term
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    kpad_base = KeyPad + b * sp_b
    row = b * sl_b + h * sl_h + t * sl_t
    scores = tl.load(Score + row[:, None] + offs_p[None, :], mask=valid[:, None] & (offs_p[None, :] < KSLOTS + 1), other=float("-inf"))
    fmax = tl.max(scores, 1)
    fmax = tl.where(fmax == float("-inf"), 0.0, fmax)
    fsum = tl.sum(tl.exp(scores - fmax[:, None]), 1)
    flse = tl.where(fsum > 0, fmax + tl.log(tl.where(fsum > 0, fsum, 1.0)), float("-inf"))  # -inf when every part is empty
    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)

    # local part: one pass for ⟨O_local, dO⟩, a second for dQ
    c = q0 // CHUNK
    lo = tl.maximum(c - window, 0) * CHUNK
    hi = tl.minimum(T, q0 + BLOCK_Q)
    lse = tl.load(Lse + row, mask=valid, other=float("-inf"))
    left = tl.zeros([ROWS], tl.float32)  # stick: log of what the parts before this one left
    done = tl.zeros([ROWS], tl.float32)  # stick: Σ D over the parts so far
    w = _weight(lse, flse, left, STICK)
    dw = tl.zeros([ROWS], tl.float32)
    for start in range(lo, hi, CHUNK):
        kpos = start + offs_n
        s, k = _chunk_scores(q, k_base, kpad_base, kpos, t, scale, sk_s, offs_d, HEAD_DIM, HAS_PAD, True, T, PRECISION, DOT_DTYPE)
        v = tl.load(v_base + kpos[:, None] * sv_s + offs_dv[None, :], mask=(kpos[:, None] < T) & (offs_dv[None, :] < V_DIM), other=0.0)
        pa, p, dp, dw = _part_grads(s, lse, w, do, v, dw, False, PRECISION, DOT_DTYPE)
    big_d = w * dw
    ds, left, done = _score_grad(lse, w, dw, out_dot, left, done, STICK)  # the local part's score is its LSE
    tl.store(Wt + row, w, mask=valid)
    tl.store(Dd + row, big_d, mask=valid)
    tl.store(DS + row, ds, mask=valid)
    for start in range(lo, hi, CHUNK):
        kpos = start + offs_n
        s, k = _chunk_scores(q, k_base, kpad_base, kpos, t, scale, sk_s, offs_d, HEAD_DIM, HAS_PAD, True, T, PRECISION, DOT_DTYPE)
        v = tl.load(v_base + kpos[:, None] * sv_s + offs_dv[None, :], mask=(kpos[:, None] < T) & (offs_dv[None, :] < V_DIM), other=0.0)
        pa, p, dp, unused = _part_grads(s, lse, w, do, v, dw, False, PRECISION, DOT_DTYPE)
        dx = p * (w[:, None] * dp - big_d[:, None] + ds[:, None])
        dq += _dot(dx.to(k.dtype), k, PRECISION, DOT_DTYPE) * scale

    dsq = tl.zeros([ROWS, BLOCK_R], tl.float32)
    idx_base = Idx + b * si_b + hk * si_h + (q0 // UNIT) * si_u
    for slot in range(0, KSLOTS):
        idx = tl.load(idx_base + slot)
        kpos = idx * CHUNK + offs_n  # negative for an empty slot (idx -1): every load below is masked off
        s, k = _chunk_scores(q, k_base, kpad_base, kpos, t, scale, sk_s, offs_d, HEAD_DIM, HAS_PAD, False, T, PRECISION, DOT_DTYPE)
        v = tl.load(v_base + kpos[:, None] * sv_s + offs_dv[None, :], mask=(kpos[:, None] >= 0) & (kpos[:, None] < T) & (offs_dv[None, :] < V_DIM), other=0.0)
        lse = tl.load(Lse + row + 1 + slot, mask=valid, other=float("-inf"))
        score = tl.load(Score + row + 1 + slot, mask=valid, other=float("-inf"))
        w = _weight(score, flse, left, STICK)
        pa, p, dp, dw = _part_grads(s, lse, w, do, v, tl.zeros([ROWS], tl.float32), SINK, PRECISION, DOT_DTYPE)
        big_d = w * dw
        ds, left, done = _score_grad(score, w, dw, out_dot, left, done, STICK)
        dx = pa * (w[:, None] * dp - big_d[:, None])
        if EXACT or JOINT:  # the score is the chunk's true LSE (the selection, by landmarks, takes no gradient)
            dx += ds[:, None] * p
        else:
            lk = tl.load(LK + b * slk_b + hk * slk_h + tl.maximum(idx, 0).to(tl.int64) * slk_c + offs_r, mask=offs_r < R_DIM, other=0.0)
            dsq += ds[:, None] * lk[None, :]
        dq += _dot(dx.to(k.dtype), k, PRECISION, DOT_DTYPE) * scale
        tl.store(Wt + row + 1 + slot, w, mask=valid)
        tl.store(Dd + row + 1 + slot, big_d, mask=valid)
        tl.store(DS + row + 1 + slot, ds, mask=valid)
    tl.store(DQ + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :], dq, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    if not EXACT:
        tl.store(DSQ + b * ssq_b + h[:, None] * ssq_h + t[:, None] * ssq_t + offs_r[None, :], dsq, mask=valid[:, None] & (offs_r[None, :] < R_DIM))


@triton.jit
def _dkdv_rows(dk, dv, dlk, q0, k, v, kpos, part, Q, DOut, SQ, Lse, Wt, Dd, DS, KeyPad, b, hk, sq_b, sq_h, sq_t, so_b, so_h,
               so_t, ssq_b, ssq_h, ssq_t, sl_b, sl_h, sl_t, sp_b, T, G, scale, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
               R_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
               LOCAL: tl.constexpr, EXACT: tl.constexpr, JOINT: tl.constexpr, SINK: tl.constexpr, PRECISION: tl.constexpr,
               DOT_DTYPE: tl.constexpr):
    """Add to one key chunk's dK, dV (and landmark gradient) what BLOCK_Q queries × G heads took from it through ``part``."""
    t, h, valid = _rows(q0, hk, T, G, BLOCK_Q, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DOut + b * so_b + h[:, None] * so_h + t[:, None] * so_t + offs_dv[None, :], mask=valid[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
    row = b * sl_b + h * sl_h + t * sl_t + part
    lse = tl.load(Lse + row, mask=valid, other=float("-inf"))
    w = tl.load(Wt + row, mask=valid, other=0.0)
    big_d = tl.load(Dd + row, mask=valid, other=0.0)
    ds = tl.load(DS + row, mask=valid, other=0.0)
    s = _dot(q, tl.trans(k), PRECISION, DOT_DTYPE) * scale
    keep = valid[:, None] & (kpos[None, :] < T)
    if CAUSAL:
        keep = keep & (kpos[None, :] <= t[:, None])
    if HAS_PAD:
        keep = keep & (tl.load(KeyPad + b * sp_b + kpos, mask=kpos < T, other=0)[None, :] != 0)
    s = tl.where(keep, s, float("-inf"))
    pa, p, dp, unused = _part_grads(s, lse, w, do, v, w, SINK, PRECISION, DOT_DTYPE)
    dv += _dot(tl.trans((w[:, None] * pa).to(do.dtype)), do, PRECISION, DOT_DTYPE)
    dx = pa * (w[:, None] * dp - big_d[:, None])
    if LOCAL or EXACT or JOINT:  # the part's score is its LSE
        dx += ds[:, None] * p
    dk += _dot(tl.trans(dx.to(q.dtype)), q, PRECISION, DOT_DTYPE) * scale
    if not LOCAL and not EXACT and not JOINT:
        offs_r = tl.arange(0, BLOCK_R)
        sq = tl.load(SQ + b * ssq_b + h[:, None] * ssq_h + t[:, None] * ssq_t + offs_r[None, :], mask=valid[:, None] & (offs_r[None, :] < R_DIM), other=0.0)
        dlk += tl.sum(ds[:, None] * sq, 0)
    return dk, dv, dlk


@triton.jit
def _dkdv_kernel(
    Q, K, V, KeyPad, SQ, DOut, Lse, Wt, Dd, DS, Offsets, Entries, DK, DV, DLK, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b,
    sv_h, sv_s, so_b, so_h, so_t, ssq_b, ssq_h, ssq_t, slk_b, slk_h, slk_c, sl_b, sl_h, sl_t, sp_b, Hkv, T, G, C, KSLOTS,
    window, scale, UNIT, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, R_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_QL: tl.constexpr, ROWS_L: tl.constexpr,
    BLOCK_QR: tl.constexpr, ROWS_R: tl.constexpr, CHUNK: tl.constexpr, HAS_PAD: tl.constexpr, EXACT: tl.constexpr,
    JOINT: tl.constexpr, SINK: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """dK, dV of key chunk i: the queries of chunks i .. i+w through their local part, then each (unit, slot) that selected it."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    offs_n = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kpos = i * CHUNK + offs_n
    in_k = kpos < T
    k = tl.load(K + b * sk_b + hk * sk_h + kpos[:, None] * sk_s + offs_d[None, :], mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + kpos[:, None] * sv_s + offs_dv[None, :], mask=in_k[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
    dk = tl.zeros([CHUNK, BLOCK_D], tl.float32)
    dv = tl.zeros([CHUNK, BLOCK_DV], tl.float32)
    dlk = tl.zeros([BLOCK_R], tl.float32)
    for q0 in range(i * CHUNK, tl.minimum(T, (i + window + 1) * CHUNK), BLOCK_QL):
        dk, dv, dlk = _dkdv_rows(dk, dv, dlk, q0, k, v, kpos, 0, Q, DOut, SQ, Lse, Wt, Dd, DS, KeyPad, b, hk, sq_b, sq_h, sq_t,
                                 so_b, so_h, so_t, ssq_b, ssq_h, ssq_t, sl_b, sl_h, sl_t, sp_b, T, G, scale, HEAD_DIM, V_DIM, R_DIM,
                                 BLOCK_D, BLOCK_DV, BLOCK_R, BLOCK_QL, ROWS_L, HAS_PAD, True, True, EXACT, JOINT, False, PRECISION,
                                 DOT_DTYPE)
    csr = bh * (C + 1) + i
    for e in range(tl.load(Offsets + csr), tl.load(Offsets + csr + 1)):
        entry = tl.load(Entries + e)
        unit = entry // KSLOTS
        part = 1 + entry % KSLOTS
        for q0 in range(unit * UNIT, tl.minimum(T, unit * UNIT + UNIT), BLOCK_QR):
            dk, dv, dlk = _dkdv_rows(dk, dv, dlk, q0, k, v, kpos, part, Q, DOut, SQ, Lse, Wt, Dd, DS, KeyPad, b, hk, sq_b, sq_h, sq_t,
                                     so_b, so_h, so_t, ssq_b, ssq_h, ssq_t, sl_b, sl_h, sl_t, sp_b, T, G, scale, HEAD_DIM, V_DIM,
                                     R_DIM, BLOCK_D, BLOCK_DV, BLOCK_R, BLOCK_QR, ROWS_R, HAS_PAD, False, False, EXACT, JOINT, SINK,
                                     PRECISION, DOT_DTYPE)
    tl.store(DK + b * sk_b + hk * sk_h + kpos[:, None] * sk_s + offs_d[None, :], dk, mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * sv_b + hk * sv_h + kpos[:, None] * sv_s + offs_dv[None, :], dv, mask=in_k[:, None] & (offs_dv[None, :] < V_DIM))
    if not EXACT:
        if i * CHUNK + CHUNK <= T:  # only complete chunks have a landmark
            offs_r = tl.arange(0, BLOCK_R)
            tl.store(DLK + b * slk_b + hk * slk_h + i * slk_c + offs_r, dlk, mask=offs_r < R_DIM)
# fmt: on


# ---------------------------------------------------------------------------------------------
# launchers


def _new(shape, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """An output buffer; NaN-filled under the interpreter, so a value a kernel forgets to write shows in the tests."""
    buf = torch.empty(shape, dtype=dtype, device=like.device)
    return buf.fill_(float("nan")) if on_cpu(like) and dtype.is_floating_point else buf


def _strides(*tensors: torch.Tensor, n: int = 3) -> list[int]:
    """The first ``n`` strides of each tensor (0 past a placeholder's own dims), in the kernels' argument order."""
    return [stride for t in tensors for stride in (list(t.stride()[:n]) + [0] * n)[:n]]


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r_dim: int, chunk: int, pad, exact: bool, sink: bool, joint: bool) -> dict:
    reason = hsa_unsupported(chunk, -1, "landmark", q.shape[-1], v.shape[-1], q.dtype)  # what lower checks, again at launch
    if reason:
        raise LccError(reason)
    return dict(
        HEAD_DIM=q.shape[-1],
        V_DIM=v.shape[-1],
        R_DIM=r_dim,
        BLOCK_D=padded_dim(q.shape[-1]),
        BLOCK_DV=padded_dim(v.shape[-1]),
        BLOCK_R=padded_dim(r_dim),
        CHUNK=chunk,
        HAS_PAD=pad is not None,
        EXACT=exact,
        JOINT=joint,
        SINK=sink,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_DTYPE=tl.float32 if q.dtype == torch.bfloat16 and on_cpu(q) else _TL_DTYPES[q.dtype],
    )


def select(su: torch.Tensor, lk: torch.Tensor, lb: torch.Tensor, unit: int, chunk: int, window: int, bias_mult: float, slots: int) -> torch.Tensor:
    """Indices [B, Hkv, units, slots] (int32, -1 when empty) of each unit's top chunks by su·lk + bias_mult·lb, most recent first.

    su [B, Hkv, units, R]: the unit's summed score queries; lk [B, Hkv, chunks, R] landmarks; lb [B, chunks] their bias.
    """
    B, Hkv, n_units, r_dim = su.shape
    su, lk, lb = (_last_contiguous(t.float()) for t in (su, lk, lb))
    idx = torch.empty(B, Hkv, n_units, slots, dtype=torch.int32, device=su.device)
    block_u = 16
    grid = (triton.cdiv(n_units, block_u), B * Hkv)
    launch(
        _select_kernel,
        grid,
        su,
        lk,
        lb,
        idx,
        *_strides(su, lk),
        *_strides(lb, n=1),
        *_strides(idx),
        Hkv,
        n_units,
        lk.shape[2],
        window,
        unit,
        chunk,
        float(bias_mult),
        slots,
        R_DIM=r_dim,
        BLOCK_R=padded_dim(r_dim),
        BLOCK_U=block_u,
        BLOCK_C=32,
        BLOCK_K=max(2, triton.next_power_of_2(slots)),
        PRECISION="ieee",
        num_warps=4,
    )
    return idx.sort(dim=-1, descending=True).values  # recency order; -1 (empty) last


def rerank(q, k, key_padding, candidates: torch.Tensor, scale: float, chunk: int, unit: int) -> torch.Tensor:
    """[B, Hkv, units, R·K] fp32: per unit and candidate chunk (``candidates`` [B, Hkv, units, R·K], -1 empty: -inf),
    the true LSE of each of the unit's rows (its queries × the KV head's G query heads) over the chunk's keys, summed."""
    q, k = (_last_contiguous(t) for t in (q, k))
    B, Hq, T, _ = q.shape
    Hkv, n_units, n = k.shape[1], candidates.shape[2], candidates.shape[3]
    G = Hq // Hkv
    pad = key_padding.to(torch.int32).contiguous() if key_padding is not None else None
    pad_arg = pad if pad is not None else q.new_zeros(1, dtype=torch.float32)
    flags = _flags(q, k, k, q.shape[-1], chunk, pad, False, False, True)
    candidates = candidates.contiguous()
    out = _new((B, Hkv, n_units, n), q)
    launch(
        _rerank_kernel,
        (n_units, B * Hkv),
        q,
        k,
        pad_arg,
        candidates,
        out,
        *_strides(q, k, candidates, out),
        *_strides(pad_arg, n=1),
        Hkv,
        T,
        G,
        n,
        scale,
        HEAD_DIM=flags["HEAD_DIM"],
        BLOCK_D=flags["BLOCK_D"],
        UNIT=unit,
        ROWS=hsa_rows(unit, G),
        CHUNK=chunk,
        HAS_PAD=flags["HAS_PAD"],
        PRECISION=flags["PRECISION"],
        DOT_DTYPE=flags["DOT_DTYPE"],
        num_warps=4,
    )
    return out


def hsa_fwd(
    q, k, v, key_padding, sq, lk, lb, idx, scale: float, chunk: int, window: int, unit: int, tiles: list[int], sink: bool, stick: bool, joint: bool = False
):
    """(out [B, Hq, T, Dv] in SDPA layout, lse and score [B, Hq, T, 1 + slots] fp32); sq/lk/lb None means exact scores;
    ``joint``: the selected chunks fuse by their true LSEs (the landmark scores only select)."""
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    B, Hq, T, _ = q.shape
    Hkv, slots = k.shape[1], idx.shape[-1]
    G = Hq // Hkv
    exact = sq is None
    pad = key_padding.to(torch.int32).contiguous() if key_padding is not None else None
    dummy = q.new_zeros(1, dtype=torch.float32)
    pad_arg = pad if pad is not None else dummy
    sq, lk, lb = (
        (dummy, dummy.view(1, 1, 1), dummy.view(1, 1)) if exact else (_last_contiguous(sq.float()), _last_contiguous(lk.float()), lb.float().contiguous())
    )
    flags = _flags(q, k, v, 16 if exact else sq.shape[-1], chunk, pad, exact, sink, joint)
    out = empty_sdpa_layout(q, v)
    if on_cpu(q):
        out.fill_(float("nan"))
    lse, score = _new((B, Hq, T, slots + 1), q), _new((B, Hq, T, slots + 1), q)
    block_q, _, warps = tiles
    grid = (triton.cdiv(T, block_q), B * Hkv)
    launch(
        _fwd_kernel,
        grid,
        q,
        k,
        v,
        pad_arg,
        sq,
        lk,
        lb,
        idx,
        out,
        lse,
        score,
        *_strides(q, k, v, out, sq, lk),
        *_strides(lb, n=1),
        *_strides(idx, lse),
        *_strides(pad_arg, n=1),
        Hkv,
        T,
        G,
        slots,
        window,
        scale,
        unit,
        BLOCK_Q=block_q,
        ROWS=hsa_rows(block_q, G),
        STICK=stick,
        num_warps=warps,
        **flags,
    )
    return out, lse, score


def inverted_index(idx: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of which (unit, slot) selected each chunk: offsets [B·Hkv·(chunks+1)+1] and entries unit·slots + slot (int32)."""
    B, Hkv, n_units, slots = idx.shape
    bucket = torch.where(idx < 0, chunks, idx.long()) + torch.arange(B * Hkv, device=idx.device).view(B, Hkv, 1, 1) * (chunks + 1)
    flat = bucket.flatten()
    order = torch.argsort(flat, stable=True)
    entries = (order % max(1, n_units * slots)).to(torch.int32)
    offsets = torch.searchsorted(flat[order], torch.arange(B * Hkv * (chunks + 1) + 1, device=idx.device)).to(torch.int32)
    return offsets, entries


def hsa_bwd(
    grad_out,
    q,
    k,
    v,
    key_padding,
    sq,
    lk,
    idx,
    out,
    lse,
    score,
    scale: float,
    chunk: int,
    window: int,
    unit: int,
    tiles: list[int],
    sink: bool,
    stick: bool,
    joint: bool = False,
):
    """(dq, dk, dv, dsq, dlk): gradients of the attention inputs, the score queries and the landmarks (the last two None for exact scores)."""
    q, k, v = (t.contiguous() for t in (q, k, v))  # dq, dk, dv are written with these strides
    B, Hq, T, _ = q.shape
    Hkv, slots = k.shape[1], idx.shape[-1]
    G, C = Hq // Hkv, triton.cdiv(T, chunk)
    exact = sq is None
    pad = key_padding.to(torch.int32).contiguous() if key_padding is not None else None
    dummy = q.new_zeros(1, dtype=torch.float32)
    pad_arg = pad if pad is not None else dummy
    sq, lk = (dummy, dummy.view(1, 1, 1)) if exact else (sq.float().contiguous(), _last_contiguous(lk.float()))
    flags = _flags(q, k, v, 16 if exact else sq.shape[-1], chunk, pad, exact, sink, joint)
    if grad_out.stride() != out.stride():  # both are read with one set of strides
        out, grad_out = out.contiguous(), grad_out.contiguous()
    dq = _new(q.shape, q)
    dsq = _new(sq.shape, q) if not exact else dummy
    wt, dd, ds = (_new(lse.shape, q) for _ in range(3))
    block_q, block_l, warps = tiles
    launch(
        _dq_kernel,
        (triton.cdiv(T, block_q), B * Hkv),
        q,
        k,
        v,
        pad_arg,
        sq,
        lk,
        idx,
        out,
        grad_out,
        lse,
        score,
        dq,
        dsq,
        wt,
        dd,
        ds,
        *_strides(q, k, v, out, sq, lk, idx, lse),
        *_strides(pad_arg, n=1),
        Hkv,
        T,
        G,
        slots,
        window,
        scale,
        unit,
        BLOCK_P=triton.next_power_of_2(slots + 1),
        BLOCK_Q=block_q,
        ROWS=hsa_rows(block_q, G),
        STICK=stick,
        num_warps=warps,
        **flags,
    )
    offsets, entries = inverted_index(idx, C)
    dk, dv = _new(k.shape, q), _new(v.shape, q)
    dlk = _new(lk.shape, q) if not exact else dummy
    block_r = block_q if unit > 1 else 1
    launch(
        _dkdv_kernel,
        (C, B * Hkv),
        q,
        k,
        v,
        pad_arg,
        sq,
        grad_out,
        lse,
        wt,
        dd,
        ds,
        offsets,
        entries,
        dk,
        dv,
        dlk,
        *_strides(q, k, v, out, sq, dlk, lse),
        *_strides(pad_arg, n=1),
        Hkv,
        T,
        G,
        C,
        slots,
        window,
        scale,
        unit,
        BLOCK_QL=block_l,
        ROWS_L=hsa_rows(block_l, G),
        BLOCK_QR=block_r,
        ROWS_R=hsa_rows(block_r, G),
        num_warps=warps,
        **flags,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (None if exact else dsq), (None if exact else dlk)
