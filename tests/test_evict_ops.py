"""IndexMem reference ops against brute force: indexer and teacher importance, the streamed KL, the keep set, the memory."""

from __future__ import annotations

import pytest
import torch

from longctx_compile.ops import evict


def causal_mask(T, S):
    return torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)


@pytest.mark.parametrize("T,S", [(7, 7), (3, 9), (13, 13)])
@pytest.mark.parametrize("block", [2, 512])
def test_indexer_and_teacher_importance_equal_the_dense_max(T, S, block, monkeypatch):
    """Streamed in tiles or in one: the max over the queries that see each key of the full score matrix."""
    monkeypatch.setattr(evict, "BLOCK", block)
    g = torch.Generator().manual_seed(T * S)
    q_idx, k_idx, w = torch.randn(2, 3, T, 4, generator=g), torch.randn(2, S, 4, generator=g), torch.rand(2, 3, T, generator=g)
    A = torch.einsum("bhs,bhst->bst", w, torch.relu(torch.einsum("bhsd,btd->bhst", q_idx, k_idx)))
    want = A.masked_fill(~causal_mask(T, S), float("-inf")).amax(1)
    torch.testing.assert_close(evict.indexer_importance(q_idx, k_idx, w), want)
    q, k = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
    logits = torch.einsum("bhsd,bhtd->bhst", q, k.repeat_interleave(2, dim=1)) * 0.3
    want = logits.masked_fill(~causal_mask(T, S), float("-inf")).amax((1, 2))
    torch.testing.assert_close(evict.teacher_importance(q, k, 0.3), want)


def test_streamed_kl_equals_the_dense_kl_with_sinks_left_out():
    g = torch.Generator().manual_seed(0)
    q_idx, k_idx, w = torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 9, 4, generator=g), torch.rand(1, 2, 9, generator=g)
    q, k = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    teacher, student = evict.teacher_importance(q, k, 0.35), evict.indexer_importance(q_idx, k_idx, w)
    p, r = torch.softmax(teacher[:, 2:], -1), torch.softmax(student[:, 2:], -1)
    torch.testing.assert_close(evict.importance_kl(teacher, student, sinks=2), (p * (p.log() - r.log())).sum(-1).mean())
    assert evict.importance_kl(teacher, teacher, sinks=2).abs() < 1e-6


def test_keep_positions_keeps_sinks_window_and_the_most_important():
    importance = torch.tensor([[0.0, 0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 0.0, 0.0, 0.0]])
    keep = evict.keep_positions(importance, sinks=2, window=2, budget=7)
    assert keep.tolist() == [[0, 1, 2, 4, 6, 8, 9]]
    assert evict.keep_positions(importance, 2, 2, 10).tolist() == [list(range(10))]  # budget ≥ length: everything
    with pytest.raises(ValueError, match="must exceed sinks"):
        evict.keep_positions(importance, 2, 2, 4)


def test_memory_write_and_read_follow_the_formula():
    g = torch.Generator().manual_seed(1)
    M, b = torch.zeros(1, 3, 2), torch.zeros(1, 3)
    phi_k, v = torch.rand(1, 4, 3, generator=g), torch.randn(1, 4, 2, generator=g)
    M, b = evict.memory_write(M, b, phi_k, v, decay=0.9, strength=0.5)
    M2, b2 = evict.memory_write(M, b, phi_k[:, :1], v[:, :1], decay=0.9, strength=0.5)
    torch.testing.assert_close(M2, 0.9 * M + 0.5 * phi_k[0, 0, :, None] * v[0, 0, None, :])
    torch.testing.assert_close(b2, 0.9 * b + 0.5 * phi_k[:, 0] ** 2)
    phi_q = torch.rand(1, 2, 3, generator=g)
    want = torch.stack([phi_q[0, t] @ M2[0] / (phi_q[0, t] ** 2 @ b2[0] + 1e-6) for t in range(2)])[None]
    torch.testing.assert_close(evict.memory_read(M2, b2, phi_q), want)
