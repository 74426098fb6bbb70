"""Flash attention in Triton, forward and backward, with the semantics of ``ops.reference.attention_ref``.

Queries are the last T of S key positions. Masks: causal, sliding window (``q - k < window``), key
padding, packed documents (equal ids), and an arbitrary bool/additive tensor. GQA reads KV head
``h // G`` directly, without repeating KV. Scores accumulate in fp32 and are kept in base 2 (exp2);
the log-sum-exp returned is natural-log. A query that sees no key gets output 0 and lse -inf.

Each program walks only the key tiles its queries can see (from causal/window/document bounds) and
applies element masks only on the tiles that need them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..errors import LccError
from ..ops.attention import empty_sdpa_layout
from ..targets.tiles import TileConfig, padded_dim, smem_bytes, unsupported
from .launch import launch, on_cpu

LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Kernel argument lists stay packed (pointers, strides, sizes, compile-time flags) rather than one per line.
# fmt: off
@triton.jit
def _visible(
    qpos, kpos, qdoc, kdoc, kpad, mval, S, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, MASK_KIND: tl.constexpr,
):
    """Which (query, key) pairs may attend; the arguments broadcast against each other."""
    keep = kpos < S
    if CAUSAL:
        keep = keep & (qpos >= kpos)
    if HAS_WINDOW:
        keep = keep & (qpos - kpos < window)
    if HAS_PAD:
        keep = keep & (kpad != 0)
    if HAS_DOCS:
        keep = keep & (qdoc == kdoc)
    if MASK_KIND == 1:
        keep = keep & (mval != 0)
    return keep


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """a @ b with fp32 accumulation; operands cast to DOT_DTYPE (their own dtype except under the interpreter)."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def _key_range(KvRange, b, pid_m, first_q, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """[lo, hi) of the keys the query tile starting at key position first_q can see; lo on a tile boundary."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + S
    if CAUSAL:
        hi = tl.minimum(hi, first_q + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_q - window + 1)
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(KvRange + (b * tl.num_programs(0) + pid_m) * 2))
        hi = tl.minimum(hi, tl.load(KvRange + (b * tl.num_programs(0) + pid_m) * 2 + 1))
    return lo // BLOCK_N * BLOCK_N, hi


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, qpos, qdoc, k_base, v_base, kpad_base, kdoc_base, m_base, start, stop, S, window, qk_scale,
    sk_s, sv_s, sm_s, offs_n, offs_d, offs_dv, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr,
    MASK_KIND: tl.constexpr, EDGE: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Online softmax over key tiles [start, stop); EDGE tiles are element-masked, the others are not."""
    for start_n in range(start, stop, BLOCK_N):
        kpos = start_n + offs_n
        in_k = kpos < S
        k = tl.load(k_base + kpos[:, None] * sk_s + offs_d[None, :], mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, DOT_DTYPE) * qk_scale
        if EDGE:
            kpad = 1
            kdoc = 0
            mval = 0.0
            if HAS_PAD:
                kpad = tl.load(kpad_base + kpos, mask=in_k, other=0)[None, :]
            if HAS_DOCS:
                kdoc = tl.load(kdoc_base + kpos, mask=in_k, other=-1)[None, :]
            if MASK_KIND != 0:
                mval = tl.load(m_base + kpos[None, :] * sm_s, mask=in_k[None, :], other=0)
                if MASK_KIND == 2:
                    s = s + mval.to(tl.float32) * 1.4426950408889634
            keep = _visible(qpos[:, None], kpos[None, :], qdoc[:, None], kdoc, kpad, mval, S, window, CAUSAL, HAS_WINDOW, HAS_PAD, HAS_DOCS, MASK_KIND)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kpos[:, None] * sv_s + offs_dv[None, :], mask=in_k[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_DTYPE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KeyPad, Docs, KvRange, Mask, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h,
    so_t, sl_b, sl_h, sp_b, sd_b, sm_b, sm_h, sm_t, sm_s, T, S, Hq, G, qk_scale, window, HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr,
    MASK_KIND: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, query head) against every key tile they can see."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query tiles see the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    shift = S - T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < T
    qpos = offs_m + shift
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=in_q[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    qdoc = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOCS:
        qdoc = tl.load(Docs + b * sd_b + qpos, mask=in_q, other=-2)

    # the key range these queries can see, then the interior that needs no element mask
    first_q = pid_m * BLOCK_M + shift
    last_q = first_q + BLOCK_M - 1
    lo, hi = _key_range(KvRange, b, pid_m, first_q, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_DOCS)
    if HAS_PAD or HAS_DOCS or MASK_KIND != 0:
        full_lo = hi
        full_hi = hi
    else:
        full_hi = S // BLOCK_N * BLOCK_N
        if CAUSAL:
            full_hi = tl.minimum(full_hi, (first_q + 1) // BLOCK_N * BLOCK_N)
        full_lo = lo
        if HAS_WINDOW:
            full_lo = tl.maximum(lo, tl.cdiv(last_q - window + 1, BLOCK_N) * BLOCK_N)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    kpad_base = KeyPad + b * sp_b
    kdoc_base = Docs + b * sd_b
    m_base = Mask + b * sm_b + h * sm_h + tl.minimum(offs_m, T - 1)[:, None] * sm_t
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, qpos, qdoc, k_base, v_base, kpad_base, kdoc_base, m_base, lo, full_lo, S, window, qk_scale,
        sk_s, sv_s, sm_s, offs_n, offs_d, offs_dv, HEAD_DIM, V_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_PAD, HAS_DOCS,
        MASK_KIND, True, PRECISION, DOT_DTYPE,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, qpos, qdoc, k_base, v_base, kpad_base, kdoc_base, m_base, full_lo, full_hi, S, window,
        qk_scale, sk_s, sv_s, sm_s, offs_n, offs_d, offs_dv, HEAD_DIM, V_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_PAD,
        HAS_DOCS, MASK_KIND, False, PRECISION, DOT_DTYPE,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, qpos, qdoc, k_base, v_base, kpad_base, kdoc_base, m_base, full_hi, hi, S, window, qk_scale,
        sk_s, sv_s, sm_s, offs_n, offs_d, offs_dv, HEAD_DIM, V_DIM, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_PAD, HAS_DOCS,
        MASK_KIND, True, PRECISION, DOT_DTYPE,
    )

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(
        Out + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=in_q[:, None] & (offs_dv[None, :] < V_DIM)
    )
    tl.store(Lse + b * sl_b + h * sl_h + offs_m, lse, mask=in_q)


@triton.jit
def _delta_kernel(
    Out, dOut, dLse, Delta, so_b, so_h, so_t, sg_b, sg_h, sg_t, T, Hq, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(O * dO) - dLSE, the per-query term of the softmax backward."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < T) & (offs_dv[None, :] < V_DIM)
    o = tl.load(Out + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dOut + b * sg_b + h * sg_h + offs_m[:, None] * sg_t + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta = delta - tl.load(dLse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, KeyPad, Docs, QRange, Mask, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h,
    sv_s, sg_b, sg_h, sg_t, sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s, sp_b, sd_b, sm_b, sm_h, sm_t, sm_s, T, S, Hq,
    Hkv, G, qk_scale, scale, window, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, MASK_KIND: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One program: dK, dV of BLOCK_M keys of one KV head, summed over its G query heads (no atomics)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    shift = S - T
    kpos = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_k = kpos < S
    k = tl.load(K + b * sk_b + hk * sk_h + kpos[:, None] * sk_s + offs_d[None, :], mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + kpos[:, None] * sv_s + offs_dv[None, :], mask=in_k[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
    kpad = tl.full([BLOCK_M], 1, dtype=tl.int32)
    kdoc = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_PAD:
        kpad = tl.load(KeyPad + b * sp_b + kpos, mask=in_k, other=0)
    if HAS_DOCS:
        kdoc = tl.load(Docs + b * sd_b + kpos, mask=in_k, other=-1)

    # the queries that can see these keys
    first_k = pid_n * BLOCK_M
    q_lo = 0
    q_hi = T
    if CAUSAL:
        q_lo = tl.maximum(0, first_k - shift)
    if HAS_WINDOW:
        q_hi = tl.minimum(T, first_k + BLOCK_M - 1 + window - shift)
    if HAS_DOCS:
        q_lo = tl.maximum(q_lo, tl.load(QRange + (b * tl.num_programs(0) + pid_n) * 2))
        q_hi = tl.minimum(q_hi, tl.load(QRange + (b * tl.num_programs(0) + pid_n) * 2 + 1))
    q_lo = q_lo // BLOCK_N * BLOCK_N

    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        for start_m in range(q_lo, q_hi, BLOCK_N):
            tq = start_m + offs_m
            in_q = tq < T
            qpos = tq + shift
            q = tl.load(Q + b * sq_b + h * sq_h + tq[:, None] * sq_t + offs_d[None, :], mask=in_q[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            do = tl.load(dOut + b * sg_b + h * sg_h + tq[:, None] * sg_t + offs_dv[None, :], mask=in_q[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
            lse2 = tl.load(Lse + (b * Hq + h) * T + tq, mask=in_q, other=0.0) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # a query that sees nothing: every p is 0
            delta = tl.load(Delta + (b * Hq + h) * T + tq, mask=in_q, other=0.0)
            sT = _dot(k, tl.trans(q), PRECISION, DOT_DTYPE) * qk_scale
            qdoc = 0
            mval = 0.0
            if HAS_DOCS:
                qdoc = tl.load(Docs + b * sd_b + qpos, mask=in_q, other=-2)[None, :]
            if MASK_KIND != 0:
                mval = tl.load(Mask + b * sm_b + h * sm_h + tq[None, :] * sm_t + kpos[:, None] * sm_s, mask=in_q[None, :] & in_k[:, None], other=0)
                if MASK_KIND == 2:
                    sT = sT + mval.to(tl.float32) * 1.4426950408889634
            keep = (
                _visible(qpos[None, :], kpos[:, None], qdoc, kdoc[:, None], kpad[:, None], mval, S, window, CAUSAL, HAS_WINDOW, HAS_PAD, HAS_DOCS, MASK_KIND)
                & in_q[None, :]
            )
            pT = tl.where(keep, tl.exp2(sT - lse2[None, :]), 0.0)
            dv += _dot(pT.to(do.dtype), do, PRECISION, DOT_DTYPE)
            dpT = _dot(v, tl.trans(do), PRECISION, DOT_DTYPE)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(q.dtype), q, PRECISION, DOT_DTYPE)
    dk = dk * scale
    tl.store(
        dK + b * sdk_b + hk * sdk_h + kpos[:, None] * sdk_s + offs_d[None, :], dk.to(dK.dtype.element_ty), mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM)
    )
    tl.store(
        dV + b * sdv_b + hk * sdv_h + kpos[:, None] * sdv_s + offs_dv[None, :], dv.to(dV.dtype.element_ty), mask=in_k[:, None] & (offs_dv[None, :] < V_DIM)
    )


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, KeyPad, Docs, KvRange, Mask, sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    sg_b, sg_h, sg_t, sdq_b, sdq_h, sdq_t, sp_b, sd_b, sm_b, sm_h, sm_t, sm_s, T, S, Hq, G, qk_scale, scale, window,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one query head, over every key tile they can see."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query tiles see the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    shift = S - T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < T
    qpos = offs_m + shift
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=in_q[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(dOut + b * sg_b + h * sg_h + offs_m[:, None] * sg_t + offs_dv[None, :], mask=in_q[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=in_q, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # a query that sees nothing: every p is 0
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=in_q, other=0.0)
    qdoc = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOCS:
        qdoc = tl.load(Docs + b * sd_b + qpos, mask=in_q, other=-2)

    first_q = pid_m * BLOCK_M + shift
    lo, hi = _key_range(KvRange, b, pid_m, first_q, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_DOCS)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        kpos = start_n + offs_n
        in_k = kpos < S
        k = tl.load(K + b * sk_b + hk * sk_h + kpos[:, None] * sk_s + offs_d[None, :], mask=in_k[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(V + b * sv_b + hk * sv_h + kpos[:, None] * sv_s + offs_dv[None, :], mask=in_k[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, DOT_DTYPE) * qk_scale
        kpad = 1
        kdoc = 0
        mval = 0.0
        if HAS_PAD:
            kpad = tl.load(KeyPad + b * sp_b + kpos, mask=in_k, other=0)[None, :]
        if HAS_DOCS:
            kdoc = tl.load(Docs + b * sd_b + kpos, mask=in_k, other=-1)[None, :]
        if MASK_KIND != 0:
            mval = tl.load(Mask + b * sm_b + h * sm_h + offs_m[:, None] * sm_t + kpos[None, :] * sm_s, mask=in_q[:, None] & in_k[None, :], other=0)
            if MASK_KIND == 2:
                s = s + mval.to(tl.float32) * 1.4426950408889634
        keep = (
            _visible(qpos[:, None], kpos[None, :], qdoc[:, None], kdoc, kpad, mval, S, window, CAUSAL, HAS_WINDOW, HAS_PAD, HAS_DOCS, MASK_KIND) & in_q[:, None]
        )
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, DOT_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, DOT_DTYPE)
    dq = dq * scale
    tl.store(
        dQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=in_q[:, None] & (offs_d[None, :] < HEAD_DIM)
    )


# fmt: on


# ---------------------------------------------------------------------------------------------
# launchers


@functools.cache
def _max_shared_memory(device: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, cfg: TileConfig) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise LccError("attention kernels take q [B, Hq, T, D] and k, v [B, Hkv, S, D]")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise LccError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] % k.shape[1]:
        raise LccError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise LccError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]})")
    reason = unsupported(q.shape[-1], v.shape[-1], q.dtype)
    if reason:
        raise LccError(reason)
    if q.device.type == "cuda":
        limit = _max_shared_memory(q.device.index or 0)
        need = smem_bytes(kind, cfg, q.shape[-1], v.shape[-1], q.dtype)
        if need > limit:
            raise LccError(f"{kind} tile config {cfg} needs {need} bytes of shared memory for head dim {q.shape[-1]} {q.dtype}; this GPU has {limit}")


def _aux(q: torch.Tensor, k: torch.Tensor, key_padding, doc_ids, mask):
    """Key padding and document ids as int32, the mask broadcast to [B, Hq, T, S] (strides 0 where broadcast)."""
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    dummy = q.new_zeros(1, dtype=torch.int32)
    pad = key_padding.to(torch.int32).contiguous() if key_padding is not None else None
    docs = doc_ids.to(torch.int32).contiguous() if doc_ids is not None else None
    kind = 0
    if mask is not None:
        kind = 1 if mask.dtype == torch.bool else 2
        while mask.dim() < 4:
            mask = mask[None]
        mask = mask.expand(B, Hq, T, S)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    return pad, docs, mask, kind, dummy


def _doc_ranges(docs: torch.Tensor, T: int, S: int, block: int, queries: bool) -> torch.Tensor:
    """Per (batch, tile), the [lo, hi) range of the other side that shares a document, as int32 [B, tiles, 2].

    ``queries=True``: tiles of queries, range of keys; else tiles of keys, range of queries. The
    ranges assume document ids never decrease along the sequence (packed documents); a row where they
    do gets the whole range, so the element mask alone decides.
    """
    shift = S - T
    n = T if queries else S
    first = torch.arange(0, n, block, device=docs.device)
    last = (first + block).clamp(max=n) - 1
    if queries:
        first, last = first + shift, last + shift
    d_first, d_last = docs[:, first], docs[:, last]
    lo = torch.searchsorted(docs, d_first.contiguous(), side="left")
    hi = torch.searchsorted(docs, d_last.contiguous(), side="right")
    if not queries:
        lo, hi = (lo - shift).clamp(0, T), (hi - shift).clamp(0, T)
    monotone = (docs[:, 1:] >= docs[:, :-1]).all(dim=1, keepdim=True)
    lo = torch.where(monotone, lo, 0)
    hi = torch.where(monotone, hi, S if queries else T)
    return torch.stack([lo, hi], dim=-1).to(torch.int32).contiguous()


def _flags(q, causal: bool, window: int, pad, docs, kind: int) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1],
        CAUSAL=bool(causal),
        HAS_WINDOW=window > 0,
        HAS_PAD=pad is not None,
        HAS_DOCS=docs is not None,
        MASK_KIND=kind,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bfloat16 as raw integers: there, round to bf16 and multiply in fp32
        DOT_DTYPE=tl.float32 if q.dtype == torch.bfloat16 and on_cpu(q) else _TL_DTYPES[q.dtype],
    )


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    cfg: TileConfig,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32); ``out``/``lse`` may be given to write into."""
    _check(q, k, v, "fwd", cfg)
    B, Hq, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = empty_sdpa_layout(q, v) if out is None else out
    lse = q.new_empty((B, Hq, T), dtype=torch.float32) if lse is None else lse
    pad, docs, mask, kind, dummy = _aux(q, k, key_padding, doc_ids, mask)
    grid = (triton.cdiv(T, cfg.block_m), B * Hq)
    ranges = _doc_ranges(doc_ids, T, S, cfg.block_m, queries=True) if docs is not None else dummy
    m = mask if mask is not None else dummy
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    launch(_fwd_kernel, grid, 
        q, k, v, out, lse, pad if pad is not None else dummy, docs if docs is not None else dummy, ranges, m,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        pad.stride(0) if pad is not None else 0, docs.stride(0) if docs is not None else 0, *ms,
        T, S, Hq, Hq // Hkv, scale * LOG2E, window,
        V_DIM=Dv, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(Dv), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(q, causal, window, pad, docs, kind),
    )  # fmt: skip
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    cfg: TileConfig,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for outputs ``out``/``lse`` of :func:`attention_fwd`; ``grads`` may be given to write into."""
    _check(q, k, v, "bwd", cfg)
    B, Hq, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    lse = lse.contiguous()
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    pad, docs, mask, kind, dummy = _aux(q, k, key_padding, doc_ids, mask)
    delta = torch.empty_like(lse)
    grid = (triton.cdiv(T, cfg.block_m), B * Hq)
    launch(_delta_kernel, grid, 
        out, grad_out, grad_lse.contiguous() if grad_lse is not None else dummy, delta,
        *out.stride()[:3], *grad_out.stride()[:3], T, Hq,
        V_DIM=Dv, BLOCK_M=cfg.block_m, BLOCK_DV=padded_dim(Dv), HAS_DLSE=grad_lse is not None,
    )  # fmt: skip
    m = mask if mask is not None else dummy
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    common = dict(
        V_DIM=Dv, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(Dv), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(q, causal, window, pad, docs, kind),
    )  # fmt: skip
    aux_strides = (pad.stride(0) if pad is not None else 0, docs.stride(0) if docs is not None else 0, *ms)
    pad, docs_arg = (pad if pad is not None else dummy), (docs if docs is not None else dummy)
    q_ranges = _doc_ranges(doc_ids, T, S, cfg.block_m, queries=False) if doc_ids is not None else dummy
    launch(_bwd_dkdv_kernel, (triton.cdiv(S, cfg.block_m), B * Hkv), 
        q, k, v, grad_out, lse, delta, dk, dv, pad, docs_arg, q_ranges, m,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3], *aux_strides,
        T, S, Hq, Hkv, Hq // Hkv, scale * LOG2E, scale, window, **common,
    )  # fmt: skip
    kv_ranges = _doc_ranges(doc_ids, T, S, cfg.block_m, queries=True) if doc_ids is not None else dummy
    launch(_bwd_dq_kernel, (triton.cdiv(T, cfg.block_m), B * Hq), 
        q, k, v, grad_out, lse, delta, dq, pad, docs_arg, kv_ranges, m,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3], *aux_strides,
        T, S, Hq, Hq // Hkv, scale * LOG2E, scale, window, **common,
    )  # fmt: skip
    return dq, dk, dv
