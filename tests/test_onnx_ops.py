"""The portable forms the ONNX translations are built from equal the longctx ops' references (fp32, eager)."""

from __future__ import annotations

import itertools

import pytest
import torch

from longctx_compile.ops import hsa as hsa_ops
from longctx_compile.ops import portable
from longctx_compile.ops.evict import indexer_importance
from longctx_compile.ops.hsa import hsa_ref
from longctx_compile.ops.loss import IGNORE, lm_head_loss
from longctx_compile.ops.msa import route_ref
from longctx_compile.ops.reference import attention_ref, doc_ids_from_positions


@pytest.mark.parametrize("T,S", [(1, 6), (6, 6), (4, 9)])
@pytest.mark.parametrize("causal,window", [(True, 0), (True, 3), (False, 0)])
@pytest.mark.parametrize("masks", ["none", "padding", "documents", "bool", "float"])
def test_attention(T, S, causal, window, masks):
    B, Hq, Hkv, D = 2, 4, 2, 8
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, 5)
    padding = docs = mask = None
    if masks == "padding":  # the last row's first keys are padding: its first queries see nothing (output 0, lse -inf)
        padding = torch.ones(B, S, dtype=torch.long)
        padding[1, :4] = 0
    if masks == "documents":
        docs = doc_ids_from_positions(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1][:S]] * B))
    if masks == "bool":
        mask = torch.rand(B, 1, T, S) > 0.3
    if masks == "float":
        mask = torch.randn(1, Hq, T, S).masked_fill(torch.rand(1, Hq, T, S) > 0.7, float("-inf"))
    want, want_lse = attention_ref(q, k, v, padding, docs, mask, 0.3, causal, window)
    got, got_lse = portable.attention_lse(q, k, v, padding, docs, mask, 0.3, causal, window)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, want_lse)
    torch.testing.assert_close(portable.attention_op(q, k, v, padding, docs, mask, 0.3, causal, window), want)  # opset 23's Attention


HSA = [
    (mode, select, topk, window, fusion, sink, nope)
    for mode, select, topk, window, fusion, sink, nope in itertools.product(
        ["exact", "landmark", "bound", "reps", "learned"], ["token", "block"], [0, 2, -1], [0, 1], ["softmax", "stick", "joint"], [False, True], [False, True]
    )
    # sink and nope together or neither, bound and reps with a window and a finite top-k only: the matrix stays small
    if not (nope and mode == "exact") and (sink == nope) and not (mode in ("bound", "reps") and (window == 0 or topk != 2))
]


@pytest.mark.parametrize("mode,select,topk,window,fusion,sink,nope", HSA)
def test_hsa(mode, select, topk, window, fusion, sink, nope, monkeypatch):
    monkeypatch.setattr(hsa_ops, "REPS", 2)  # representatives: 2 of a chunk's 4 keys
    B, Hq, Hkv, D, chunk = 2, 4, 2, 8, 4
    for T in (3, 16, 23):  # shorter than a chunk, whole chunks, a partial last chunk
        q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
        padding = torch.ones(B, T, dtype=torch.long)
        padding[1, : T // 3] = 0
        rq = rk = sq = sk = None
        if mode == "learned":
            rq, rk = (torch.eye(D).repeat(Hkv, 1, 1) + 0.1 * torch.randn(Hkv, D, D) for _ in range(2))
        if nope:
            sq, sk = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
        want = hsa_ref(q, k, v, padding, 0.35, chunk, topk, window, mode, select, rq, rk, sink, fusion, sq, sk)
        got = portable.hsa(q, k, v, padding, rq, rk, 0.35, chunk, topk, window, mode, select, sink, fusion, sq, sk)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["landmark", "bound", "reps"])
@pytest.mark.parametrize("select", ["token", "block"])
def test_hsa_rerank(mode, select, monkeypatch):
    """The top-2·K by the score, then the K by their true LSE: the portable form selects as the reference does."""
    monkeypatch.setattr(hsa_ops, "REPS", 2)
    B, Hq, Hkv, D, chunk = 2, 4, 2, 8, 4
    for T in (16, 23, 31):
        q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
        padding = torch.ones(B, T, dtype=torch.long)
        padding[1, : T // 3] = 0
        want = hsa_ref(q, k, v, padding, 0.35, chunk, 1, 0, mode, select, None, None, False, "joint", None, None, 2)
        got = portable.hsa(q, k, v, padding, None, None, 0.35, chunk, 1, 0, mode, select, False, "joint", None, None, 2)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("select", ["token", "block"])
@pytest.mark.parametrize("fusion", ["softmax", "joint"])
def test_hsa_pooled_landmarks(select, fusion):
    """Learned scores over R attention-pooled landmarks per chunk: the portable form scores and selects as the reference."""
    B, Hq, Hkv, D, chunk = 2, 4, 2, 8, 4
    for T in (16, 23):
        q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
        padding = torch.ones(B, T, dtype=torch.long)
        padding[1, : T // 3] = 0
        rq, rk = (torch.eye(D).repeat(Hkv, 1, 1) + 0.1 * torch.randn(Hkv, D, D) for _ in range(2))
        pool = torch.randn(Hkv, 3, D)
        want = hsa_ref(q, k, v, padding, 0.35, chunk, 2, 1, "learned", select, rq, rk, False, fusion, None, None, 0, pool)
        got = portable.hsa(q, k, v, padding, rq, rk, 0.35, chunk, 2, 1, "learned", select, False, fusion, None, None, 0, pool)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cosine", [True, False])
def test_route(cosine):
    router_q, query_mask = torch.randn(2, 4, 5, 8), torch.ones(2, 5)
    query_mask[0, :2] = 0
    keys, chunk_doc = torch.randn(2, 11, 8), torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    table = torch.zeros(5, 4)  # 5 documents: the last has no chunk and scores -inf
    torch.testing.assert_close(
        portable.msa_route(router_q, query_mask, keys, chunk_doc, table, cosine), route_ref(router_q, query_mask, keys, chunk_doc, 5, cosine)
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("T,S", [(5, 5), (1, 7), (3, 7)])
def test_indexer_importance(groups, T, S):
    q, k, w = torch.randn(2, 4, T, 6), torch.randn(2, S, 6), torch.randn(2, 4, T)
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, 0] = False
    want = indexer_importance(q, k, w, groups, query_real=real, need_arg=False)[0]
    torch.testing.assert_close(portable.indexer_importance(q, k, w, groups, real), want)


def test_lm_head_loss():
    hidden, weight, bias = torch.randn(2, 7, 16), torch.randn(30, 16), torch.randn(30)
    labels = torch.randint(0, 30, (2, 7))
    labels[0, :3] = IGNORE
    torch.testing.assert_close(portable.lm_head_loss(hidden, weight, bias, labels, 4), lm_head_loss(hidden, weight, bias, labels, 4))
