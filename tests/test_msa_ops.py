"""MSA ops against brute force: chunk pooling per document, and routing with every score materialised."""

from __future__ import annotations

import math

import pytest
import torch

from longctx_compile.ops import msa


def test_pool_averages_each_chunk_over_its_real_tokens():
    """Pooling equals a per-document loop: full chunks, a partial last chunk, an empty chunk (count 0, value 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 12, 5, generator=g)
    lengths = [12, 7, 1]
    real = torch.zeros(3, 12, dtype=torch.long)
    for n, length in enumerate(lengths):
        real[n, :length] = 1
    pooled, count = msa.msa_pool(x, real, 4)
    for n, length in enumerate(lengths):
        for c in range(3):
            tokens = x[n, :, 4 * c : min(4 * c + 4, length)]
            assert count[n, c] == tokens.shape[1]
            want = tokens.mean(1) if tokens.shape[1] else torch.zeros(2, 5)
            torch.testing.assert_close(pooled[n, :, c], want)


def test_pool_gradient_equals_the_loop_of_means():
    """The op's backward (MSA's continued pre-training reaches the encoder through it) equals autograd through the
    per-document loop of means; padding gets none. Fails where the op has no gradient at all."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    real = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    weight = torch.randn(2, 2, 2, 3, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((msa.msa_pool(x, real, 4)[0] * weight).sum(), x)
    want = [torch.stack([x[n, :, 4 * c : min(4 * c + 4, int(real[n].sum()))].mean(1) for c in range(2)], 1) for n in range(2)]
    (expected,) = torch.autograd.grad((torch.stack(want) * weight).sum(), x)
    torch.testing.assert_close(grad, expected)
    assert grad[1, :, 5:].abs().sum() == 0


def brute_force_route(router_q, query_mask, router_keys, chunk_doc, n_docs, cosine):
    """Every (batch, head, token, chunk) score, then the paper's reductions one by one."""
    B, Hq, T, D = router_q.shape
    G = Hq // router_keys.shape[0]
    keys = router_keys.repeat_interleave(G, dim=0)  # [Hq, C, D]
    if cosine:
        s = torch.einsum("bhtd,hcd->bhtc", torch.nn.functional.normalize(router_q, dim=-1), torch.nn.functional.normalize(keys, dim=-1))
    else:
        s = torch.einsum("bhtd,hcd->bhtc", router_q, keys) / math.sqrt(D)
    s = s.mean(1)  # heads
    out = torch.full((B, n_docs), float("-inf"))
    for b in range(B):
        for doc in range(n_docs):
            chunks = (chunk_doc == doc).nonzero().flatten()
            tokens = query_mask[b].bool().nonzero().flatten()
            if len(chunks) and len(tokens):
                out[b, doc] = s[b][tokens][:, chunks].max()
    return out


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("tile", [3, 16384])
def test_route_equals_brute_force(cosine, tile, monkeypatch):
    """GQA (8 query heads on 2 KV heads), masked query tokens, uneven documents, a document with no chunk; tiled or not."""
    monkeypatch.setattr(msa, "ROUTE_TILE", tile)
    g = torch.Generator().manual_seed(1)
    router_q = torch.randn(2, 8, 5, 16, generator=g)
    query_mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 1, 1]])
    chunk_doc = torch.tensor([0, 0, 0, 1, 3, 3, 1, 4, 4, 4, 4])  # document 2 has no chunk
    router_keys = torch.randn(2, len(chunk_doc), 16, generator=g)
    doc_chunks = torch.zeros(5, 4, dtype=torch.long)
    got = msa.msa_route(router_q, query_mask, router_keys, chunk_doc, doc_chunks, cosine)
    want = brute_force_route(router_q, query_mask, router_keys, chunk_doc, 5, cosine)
    torch.testing.assert_close(got, want)
    assert torch.isinf(got[:, 2]).all() and torch.isfinite(got[:, [0, 1, 3, 4]]).all()


def test_route_rankings_of_cosine_and_dot_differ():
    """The flag matters: keys of very different norms rank documents differently under the two scores."""
    q = torch.tensor([[[[1.0, 0.0]]]])  # one head, one token
    keys = torch.tensor([[[1.0, 0.1], [3.0, 3.0]]])  # doc 0: aligned, small; doc 1: 45°, large
    chunk_doc, table, mask = torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.long), torch.ones(1, 1)
    assert msa.msa_route(q, mask, keys, chunk_doc, table, True).argmax() == 0
    assert msa.msa_route(q, mask, keys, chunk_doc, table, False).argmax() == 1
