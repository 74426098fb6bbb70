"""IndexMem reference ops against brute force: indexer and teacher importance, the streamed KL, the keep set, the memory."""

from __future__ import annotations

import pytest
import torch

from longctx_compile.ops import evict


def causal_mask(T, S):
    return torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)


def dense_indexer(q_idx, k_idx, w, groups):
    """The full score matrix [B, G, T, S]: Σ over each group's heads of w·ReLU(q·k)."""
    B, Hi, T, _ = q_idx.shape
    A = w[..., None] * torch.relu(torch.einsum("bhsd,btd->bhst", q_idx, k_idx))
    return A.view(B, groups, Hi // groups, T, -1).sum(2)


@pytest.mark.parametrize("T,S", [(7, 7), (3, 9), (13, 13)])
@pytest.mark.parametrize("block", [2, 512])
@pytest.mark.parametrize("groups", [1, 2])
def test_indexer_and_teacher_importance_equal_the_dense_max(T, S, block, groups, monkeypatch):
    """Streamed in tiles or in one, per layer or per KV head: the max over the queries that see each key."""
    monkeypatch.setattr(evict, "BLOCK", block)
    g = torch.Generator().manual_seed(T * S)
    q_idx, k_idx, w = torch.randn(2, 4, T, 4, generator=g), torch.randn(2, S, 4, generator=g), torch.rand(2, 4, T, generator=g)
    A = dense_indexer(q_idx, k_idx, w, groups).masked_fill(~causal_mask(T, S), float("-inf"))
    best, arg = evict.indexer_importance(q_idx, k_idx, w, groups)
    torch.testing.assert_close(best, A.amax(2))
    seen = torch.isfinite(best)
    torch.testing.assert_close(A.gather(2, arg[:, :, None]).squeeze(2)[seen], best[seen])  # the arg attains the max
    q, k = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
    logits = torch.einsum("bhsd,bhtd->bhst", q, k.repeat_interleave(2, dim=1)) * 0.3
    want = logits.masked_fill(~causal_mask(T, S), float("-inf")).view(2, groups, 4 // groups, T, S).amax((2, 3))
    torch.testing.assert_close(evict.teacher_importance(q, k, 0.3, groups), want)


def test_padded_queries_score_nothing():
    g = torch.Generator().manual_seed(3)
    q_idx, k_idx, w = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g), torch.rand(1, 2, 5, generator=g)
    real = torch.tensor([[0, 0, 1, 1, 1]])
    A = dense_indexer(q_idx, k_idx, w, 1).masked_fill(~causal_mask(5, 5), float("-inf"))[:, :, 2:]
    torch.testing.assert_close(evict.indexer_importance(q_idx, k_idx, w, query_real=real)[0], A.amax(2))


def test_student_importance_has_the_max_value_and_its_gradient():
    """The value recomputed at each key's winning query equals the max, and its gradient equals the dense max's."""
    g = torch.Generator().manual_seed(5)
    leaves = [torch.randn(1, 4, 9, 4, generator=g), torch.randn(1, 9, 4, generator=g), torch.rand(1, 4, 9, generator=g)]
    leaves = [t.requires_grad_() for t in leaves]
    weights = torch.randn(1, 2, 9, generator=g)
    student = evict.student_importance(*leaves, groups=2)
    dense = dense_indexer(*leaves, 2).masked_fill(~causal_mask(9, 9), float("-inf")).amax(2)
    torch.testing.assert_close(student, dense)
    grads = torch.autograd.grad((student * weights).sum(), leaves)
    want = torch.autograd.grad((dense * weights).sum(), leaves)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref)


def test_streamed_kl_equals_the_dense_kl_with_sinks_left_out(monkeypatch):
    monkeypatch.setattr(evict, "BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    q_idx, k_idx, w = torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 9, 4, generator=g), torch.rand(1, 2, 9, generator=g)
    q, k = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    teacher, student = evict.teacher_importance(q, k, 0.35), evict.indexer_importance(q_idx, k_idx, w)[0]
    dense_t = (torch.einsum("bhsd,bhtd->bhst", q, k) * 0.35).masked_fill(~causal_mask(9, 9), float("-inf")).amax((1, 2))
    dense_s = dense_indexer(q_idx, k_idx, w, 1).masked_fill(~causal_mask(9, 9), float("-inf")).amax(2)[:, 0]
    p, r = torch.softmax(dense_t[:, 2:], -1), torch.softmax(dense_s[:, 2:], -1)
    torch.testing.assert_close(evict.importance_kl(teacher, student, sinks=2), (p * (p.log() - r.log())).sum(-1).mean())
    assert evict.importance_kl(teacher, teacher, sinks=2).abs() < 1e-6


def test_keep_positions_keeps_sinks_window_and_the_most_important():
    importance = torch.tensor([[0.0, 0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 0.0, 0.0, 0.0]])
    keep = evict.keep_positions(importance, sinks=2, window=2, budget=7)
    assert keep.tolist() == [[0, 1, 2, 4, 6, 8, 9]]
    assert evict.keep_positions(importance, 2, 2, 10).tolist() == [list(range(10))]  # budget ≥ length: everything
    assert evict.keep_positions(importance, 2, 2, 4).tolist() == [[0, 1, 8, 9]]  # the pinned keys only
    with pytest.raises(ValueError, match="at least sinks"):
        evict.keep_positions(importance, 2, 2, 3)


def test_keep_positions_drops_padding_first_and_pins_the_first_real_keys():
    importance = torch.tensor([[5.0, 5.0, float("-inf"), 0.0, 3.0, float("-inf"), 1.0, 0.0]])
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    # the sinks are the first two real keys (2, 3); an unseen real key (5) outranks padding
    assert evict.keep_positions(importance, 2, 1, 6, real).tolist() == [[2, 3, 4, 5, 6, 7]]
    assert evict.keep_positions(importance, 2, 1, 5, real).tolist() == [[2, 3, 4, 6, 7]]


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


def test_readout_reads_each_query_heads_kv_head_and_a_closed_gate_adds_exactly_zero():
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, T, D, m = 1, 4, 2, 3, 5, 6
    q, phi = torch.randn(B, Hq, T, D, generator=g), torch.randn(m, D, generator=g)
    M, b = torch.randn(B, Hkv, m, D, generator=g), torch.rand(B, Hkv, m, generator=g)
    gate_w, gate_b = torch.randn(Hq, D, generator=g), torch.randn(Hq, generator=g)
    out = evict.memory_readout(q, M, b, phi, gate_w, gate_b)
    for h in range(Hq):
        f = q[0, h] @ phi.T
        read = (f @ M[0, h // 2]) / ((f**2) @ b[0, h // 2] + 1e-6)[:, None]
        torch.testing.assert_close(out[0, h], torch.sigmoid(q[0, h] @ gate_w[h] + gate_b[h])[:, None] * read)
    closed = evict.memory_readout(q, M, b, phi, gate_w, torch.full((Hq,), float("-inf")))
    assert torch.equal(closed, torch.zeros_like(closed))
