"""MSA Triton kernels (the interpreter on CPU) against the reference ops."""

from __future__ import annotations

import pytest
import torch

from longctx_compile.kernels import msa as kernels
from longctx_compile.ops import msa as ops


@pytest.mark.parametrize("pool", [1, 3, 4])
def test_pool_kernel_equals_reference(pool):
    """Full, partial and empty chunks; a pool size that is not a power of two; a strided input."""
    g = torch.Generator().manual_seed(pool)
    L = 4 * pool
    x = torch.randn(3, L, 2, 6, generator=g).transpose(1, 2)  # [N, H, L, D] with SDPA-like strides
    real = torch.zeros(3, L, dtype=torch.long)
    for n, length in enumerate([L, L - 1, 1]):
        real[n, :length] = 1
    got, count = kernels.pool(x, real, pool)
    want, want_count = ops.pool_ref(x, real, pool)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(count, want_count)


@pytest.mark.parametrize("cosine", [True, False])
def test_route_kernel_equals_reference(cosine):
    """GQA (8 heads on 2), masked tokens, documents with no chunk, chunks over several tiles (C not a multiple of the tile)."""
    g = torch.Generator().manual_seed(3)
    router_q = torch.randn(2, 8, 5, 16, generator=g)
    query_mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    chunk_doc = torch.tensor([0, 0, 0, 1, 3, 3, 1, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 0])
    router_keys = torch.randn(2, len(chunk_doc), 16, generator=g) * torch.linspace(0.2, 3.0, len(chunk_doc))[None, :, None]
    got = kernels.route(router_q, query_mask, router_keys, chunk_doc, 8, cosine, block_c=4)
    want = ops.route_ref(router_q, query_mask, router_keys, chunk_doc, 8, cosine)
    torch.testing.assert_close(got, want)
    assert torch.isinf(got[:, [2, 5, 7]]).all()


def test_route_kernel_with_no_routing_token():
    q, keys = torch.randn(1, 2, 3, 16), torch.randn(1, 4, 16)
    got = kernels.route(q, torch.zeros(1, 3, dtype=torch.long), keys, torch.tensor([0, 1, 1, 0]), 2, True, block_c=16)
    assert torch.isneginf(got).all()


def test_interpret_target_runs_the_kernels_end_to_end(monkeypatch):
    """Lowered for a Triton target, encode pools and query routes with the kernels: same bank, routing and logits as cpu."""
    import longctx_compile as lcc
    from longctx_compile.forms.msa.runtime import MsaModel

    calls = []
    for name in ("pool", "route"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, original=original, name=name, **kw: calls.append(name) or original(*a, **kw))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 3)]
    question = torch.randint(0, 256, (2, 4), generator=g)
    results = []
    for target in ("cpu", "interpret"):
        compiled = lcc.compile("tiny-llama", to="msa", target=target, pool=2, topk="2", score="cosine")  # headwise has no kernel
        model = MsaModel(compiled.program.ep, compiled.program.signature)
        assert model.kernels == ("reference" if target == "cpu" else "triton")
        bank = model.encode(docs)
        results.append((bank, model.query(bank, question), model.generate(bank, question, 3)[0]))
    (cpu_bank, cpu, cpu_tokens), (triton_bank, tri, tri_tokens) = results
    assert tri_tokens == cpu_tokens  # decode runs the lowered kernels over the grown context
    assert "pool" in calls and "route" in calls
    torch.testing.assert_close(triton_bank.keys[1], cpu_bank.keys[1])
    assert tri.docs[1].tolist() == cpu.docs[1].tolist()
    torch.testing.assert_close(tri.logits, cpu.logits)
