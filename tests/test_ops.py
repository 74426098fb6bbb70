"""longctx::attention against PyTorch SDPA with an explicit dense mask, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F

import longctx_compile  # noqa: F401
from longctx_compile.ops import attention_ref, doc_ids_from_positions

op = torch.ops.longctx.attention


def dense_mask(B, T, S, causal, window, pad, docs):
    qpos = torch.arange(T)[:, None] + (S - T)
    kpos = torch.arange(S)[None, :]
    m = torch.ones(B, 1, T, S, dtype=torch.bool)
    if causal:
        m &= (kpos <= qpos)[None, None]
    if window:
        m &= (qpos - kpos < window)[None, None]
    if pad is not None:
        m &= pad.bool()[:, None, None, :]
    if docs is not None:
        m &= docs[:, None, S - T :, None] == docs[:, None, None, :]
    return m


def sdpa_ref(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # a query that sees nothing is defined as 0 by longctx::attention
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


CASES = ["causal", "window", "padding", "documents", "all", "full"]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("T,S", [(13, 13), (1, 9), (5, 17)])
def test_attention_matches_sdpa(kind, hq, hkv, T, S):
    B, D, scale = 2, 16, 0.3
    q = torch.randn(B, hq, T, D, requires_grad=True)
    k = torch.randn(B, hkv, S, D, requires_grad=True)
    v = torch.randn(B, hkv, S, D, requires_grad=True)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, : S // 3] = 0
    pos = torch.arange(S).expand(B, S).clone()
    pos[0, S // 2 :] = torch.arange(S - S // 2)
    docs = doc_ids_from_positions(pos)
    causal = kind != "full"
    window = 4 if kind in ("window", "all") else 0
    use_pad = pad if kind in ("padding", "all") else None
    use_docs = docs if kind in ("documents", "all") else None
    out = op(q, k, v, use_pad, use_docs, None, scale, causal, window)
    mask = dense_mask(B, T, S, causal, window, use_pad, use_docs)
    ref = sdpa_ref(q, k, v, mask, scale)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("additive", [False, True])
def test_arbitrary_mask(additive):
    B, H, T, D = 2, 2, 11, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    keep = torch.rand(B, 1, T, T) > 0.4
    keep[..., 0] = True
    mask = keep if not additive else torch.zeros(B, 1, T, T).masked_fill(~keep, float("-inf"))
    out = op(q, k, v, None, None, mask, 0.5, False, 0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.5))


def test_lse_and_fully_masked_rows():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1]])
    out, lse = attention_ref(q, k, v, key_padding=pad, scale=1.0)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isinf(lse[:, :, :2]).all() and (lse[:, :, :2] < 0).all()
    scores = (q[:, :, 2:] @ k[:, :, 2:].transpose(-1, -2)).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse[:, :, 2:], torch.logsumexp(scores, -1))


def test_query_blocking_matches_one_block(monkeypatch):
    from longctx_compile.ops import reference

    q, k, v = torch.randn(1, 2, 37, 8), torch.randn(1, 1, 37, 8), torch.randn(1, 1, 37, 8)
    whole = attention_ref(q, k, v, window=5)
    monkeypatch.setattr(reference, "QUERY_BLOCK", 8)
    blocked = attention_ref(q, k, v, window=5)
    torch.testing.assert_close(whole, blocked)


def test_opcheck():
    q, k, v = torch.randn(2, 4, 7, 16, requires_grad=True), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    pad = torch.ones(2, 7, dtype=torch.long)
    torch.library.opcheck(op.default, (q, k, v, pad, None, None, 0.25, True, 3))


@pytest.mark.parametrize("padding", ["none", "leading", "trailing", "empty row", "all ones"])
@pytest.mark.parametrize("window", [0, 25, 6])
def test_one_query_paths_match_reference(padding, window):
    """Decode shapes (T = 1) take SDPA shortcuts: no mask, trimmed empty trailing slots, dead rows."""
    S = 20
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, S, 8) * 5, torch.randn(3, 2, S, 8) * 5
    pad = torch.ones(3, S, dtype=torch.long)
    if padding == "leading":
        pad[1, :7] = 0
    elif padding == "trailing":  # a static cache: slots after the newest token are empty
        pad[:, 14:] = 0
        pad[2, :3] = 0
    elif padding == "empty row":
        pad[:, 14:] = 0
        pad[0] = 0
    use = None if padding == "none" else pad
    out = op(q, k, v, use, None, None, 0.4, True, window)
    torch.testing.assert_close(out, attention_ref(q, k, v, use, None, None, 0.4, True, window)[0])


def test_op_query_blocks_match_one_block(monkeypatch):
    from longctx_compile.ops import attention

    q, k, v = torch.randn(2, 2, 13, 8), torch.randn(2, 1, 13, 8), torch.randn(2, 1, 13, 8)
    pad = torch.ones(2, 13, dtype=torch.long)
    pad[0, :5] = 0
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    torch.testing.assert_close(op(q, k, v, pad, None, None, 0.3, True, 5), attention_ref(q, k, v, pad, None, None, 0.3, True, 5)[0])
