"""The Triton attention kernels against the reference op, forward and gradients (lse included).

On a CPU-only machine they run under Triton's interpreter (a launch on CPU tensors, ``kernels/launch.py``); with
CUDA they run compiled. Every output buffer is filled with NaN before the launch, so a tile the
kernel forgets to write fails the comparison.
"""

import math

import pytest
import torch

import longctx_compile  # noqa: F401
from longctx_compile.errors import LccError
from longctx_compile.kernels import attention as kernels
from longctx_compile.ops import attention_ref, doc_ids_from_positions
from longctx_compile.ops.reference import allowed_mask
from longctx_compile.targets.tiles import TileConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = TileConfig(16, 16, 4, 1)
MASKS = ["causal", "full", "window", "window_full", "padding", "documents", "all", "bool", "additive"]
# (Hkv, T, S) per GQA group: square, cache (T < S), one query, and a longer square run
SHAPES = {1: (2, 21, 21), 2: (2, 7, 30), 4: (1, 1, 19), 8: (1, 35, 35)}


def make_inputs(B, hq, hkv, T, S, D, Dv=None, dtype=torch.float32):
    q = torch.randn(B, hq, T, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, hkv, S, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, hkv, S, Dv or D, dtype=dtype, device=DEVICE)
    return q, k, v


def masking(kind, B, T, S):
    """(key_padding, doc_ids, mask, causal, window) for a mask kind; batch 1 is left-padded."""
    pad = torch.ones(B, S, dtype=torch.long, device=DEVICE)
    pad[-1, : S // 3] = 0
    pos = torch.arange(S, device=DEVICE).expand(B, S).clone()
    pos[0, S // 2 :] = torch.arange(S - S // 2)
    pos[0, (3 * S) // 4 :] = torch.arange(S - (3 * S) // 4)
    docs = doc_ids_from_positions(pos)
    keep = torch.rand(B, 1, T, S, device=DEVICE) > 0.4
    return {
        "causal": (None, None, None, True, 0),
        "full": (None, None, None, False, 0),
        "window": (None, None, None, True, 5),
        "window_full": (None, None, None, False, 5),
        "padding": (pad, None, None, True, 0),
        "documents": (None, docs, None, True, 0),
        "all": (pad, docs, None, True, 6),
        "bool": (None, None, keep, False, 0),
        "additive": (None, None, torch.randn(B, 1, T, S, device=DEVICE).masked_fill(~keep, float("-inf")), True, 0),
    }[kind]


def nan_like(t):
    return torch.full_like(t, float("nan"))


def run_kernels(q, k, v, grad_out, grad_lse, aux, scale, cfg):
    """Forward then backward through the kernels, every output buffer poisoned with NaN first."""
    B, H, T, _ = q.shape
    out = torch.full((B, T, H, v.shape[-1]), float("nan"), dtype=q.dtype, device=DEVICE).transpose(1, 2)
    lse = torch.full((B, H, T), float("nan"), device=DEVICE)
    out, lse = kernels.attention_fwd(q, k, v, *aux[:3], scale, *aux[3:], cfg, out=out, lse=lse)
    grads = (nan_like(q), nan_like(k), nan_like(v))
    dq, dk, dv = kernels.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, *aux[:3], scale, *aux[3:], cfg, grads=grads)
    return out, lse, dq, dk, dv


def run_reference(q, k, v, grad_out, grad_lse, aux, scale):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ref(*leaves, *aux[:3], scale, *aux[3:])
    finite = torch.isfinite(lse)
    total = (out * grad_out.float()).sum() + torch.where(finite, lse * grad_lse, 0).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(total, leaves))


@pytest.mark.parametrize("group", sorted(SHAPES))
@pytest.mark.parametrize("kind", MASKS)
def test_kernels_match_reference(kind, group):
    hkv, T, S = SHAPES[group]
    B, D, scale = 2, 16, 0.3
    q, k, v = make_inputs(B, hkv * group, hkv, T, S, D)
    aux = masking(kind, B, T, S)
    grad_out, grad_lse = torch.randn_like(q), torch.randn(B, hkv * group, T, device=DEVICE)
    got = run_kernels(q, k, v, grad_out, grad_lse, aux, scale, SMALL)
    want = run_reference(q, k, v, grad_out, grad_lse, aux, scale)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_fully_masked_queries_give_zero_and_minus_inf():
    q, k, v = make_inputs(1, 2, 1, 9, 9, 16)
    pad = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]], device=DEVICE)
    out, lse, dq, dk, dv = run_kernels(q, k, v, torch.randn_like(q), torch.zeros(1, 2, 9, device=DEVICE), (pad, None, None, True, 0), 0.25, SMALL)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isneginf(lse[:, :, :3]).all()
    assert torch.equal(dq[:, :, :3], torch.zeros_like(dq[:, :, :3])) and torch.equal(dk[:, :, :3], torch.zeros_like(dk[:, :, :3]))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


@pytest.mark.parametrize("cfg", [TileConfig(16, 32, 4, 1), TileConfig(32, 16, 4, 2), TileConfig(64, 64, 4, 1)])
@pytest.mark.parametrize("kind", ["causal", "window", "documents"])
def test_tile_shapes_agree(cfg, kind):
    """Interior (unmasked) and edge tiles, and the document ranges, line up for any tiling."""
    q, k, v = make_inputs(1, 2, 1, 70, 70, 16)
    aux = masking(kind, 1, 70, 70)
    grad_out, grad_lse = torch.randn_like(q), torch.zeros(1, 2, 70, device=DEVICE)
    got = run_kernels(q, k, v, grad_out, grad_lse, aux, 0.25, cfg)
    want = run_reference(q, k, v, grad_out, grad_lse, aux, 0.25)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("D,Dv", [(24, 24), (16, 40), (256, 256)])
def test_head_dims(D, Dv):
    q, k, v = make_inputs(1, 2, 1, 19, 19, D, Dv)
    aux = masking("causal", 1, 19, 19)
    grad_out, grad_lse = torch.randn(1, 2, 19, Dv, device=DEVICE), torch.zeros(1, 2, 19, device=DEVICE)
    got = run_kernels(q, k, v, grad_out, grad_lse, aux, D**-0.5, TileConfig(16, 16, 4, 1))
    want = run_reference(q, k, v, grad_out, grad_lse, aux, D**-0.5)
    # fp32 sums over up to 256 products reorder differently from the reference's matmuls
    tol = {"atol": 1e-5 * math.sqrt(D / 16), "rtol": 1e-5} if D > 64 else {}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def naive_low_precision(q, k, v, aux, scale):
    """Attention computed in the inputs' dtype (softmax in fp32): the error budget a kernel must beat."""
    pad, docs, _, causal, window = aux
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    ok = allowed_mask(q.shape[2], k.shape[2], causal=causal, window=window, key_padding=pad, doc_ids=docs, device=q.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.float().masked_fill(~ok, float("-inf")), -1).to(q.dtype)
    return probs @ v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["causal", "documents"])
def test_low_precision_error_budget(dtype, kind):
    """fp16/bf16 in, fp32 accumulation, against fp32: mean error within 2x, max within 3x, of plain attention in the dtype.

    Like FlashAttention, the kernels round P and dS to the input dtype before their matmuls and take
    the backward's row term from the rounded output, so they sit a little above the naive error.
    """
    q, k, v = make_inputs(2, 4, 2, 40, 40, 32, dtype=dtype)
    aux = masking(kind, 2, 40, 40)
    grad_out = torch.randn_like(q)
    got = run_kernels(q, k, v, grad_out, torch.zeros(2, 4, 40, device=DEVICE), aux, 32**-0.5, TileConfig(32, 16, 4, 1))
    want = run_reference(q, k, v, grad_out, torch.zeros(2, 4, 40, device=DEVICE), aux, 32**-0.5)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    naive_out = naive_low_precision(*leaves, aux, 32**-0.5)
    naive = (naive_out, None, *torch.autograd.grad(naive_out, leaves, grad_out))
    for name, a, n, w in zip(("out", "lse", "dq", "dk", "dv"), got, naive, want, strict=True):
        assert a.dtype == (torch.float32 if name == "lse" else dtype)
        if n is None:
            torch.testing.assert_close(a, w, atol=1e-2, rtol=1e-2)
            continue
        ours, budget = (a.float() - w).abs(), (n.float() - w).abs()
        assert ours.mean() <= 2 * budget.mean(), f"{name}: mean error {ours.mean():.3g} vs naive {dtype} {budget.mean():.3g}"
        assert ours.max() <= 3 * budget.max(), f"{name}: max error {ours.max():.3g} vs naive {dtype} {budget.max():.3g}"


def test_flash_op_matches_canonical_op_with_autograd():
    q, k, v = (t.requires_grad_() for t in make_inputs(2, 4, 2, 13, 13, 16))
    aux = masking("all", 2, 13, 13)
    out, lse = torch.ops.longctx.flash_attention(q, k, v, *aux[:3], 0.25, *aux[3:], [16, 16, 4, 1], [16, 16, 4, 1])
    ref = torch.ops.longctx.attention(q, k, v, *aux[:3], 0.25, *aux[3:])
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, b)


def test_additive_mask_gradient_goes_through_the_reference():
    q, k, v = make_inputs(1, 2, 1, 9, 9, 16)
    bias = torch.randn(1, 2, 9, 9, device=DEVICE, requires_grad=True)
    out, _ = torch.ops.longctx.flash_attention(q, k, v, None, None, bias, 0.25, True, 0, [16, 16, 4, 1], [16, 16, 4, 1])
    (got,) = torch.autograd.grad(out.sum(), bias)
    ref, _ = attention_ref(q, k, v, None, None, bias, 0.25, True, 0)
    (want,) = torch.autograd.grad(ref.sum(), bias)
    torch.testing.assert_close(got, want)


def test_opcheck_flash_op():
    q, k, v = make_inputs(1, 2, 1, 7, 7, 16)
    q.requires_grad_()
    pad = torch.ones(1, 7, dtype=torch.long, device=DEVICE)
    torch.library.opcheck(torch.ops.longctx.flash_attention.default, (q, k, v, pad, None, None, 0.25, True, 3, [16, 16, 4, 1], [16, 16, 4, 1]))


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((1, 2, 5, 320), (1, 2, 5, 320), (1, 2, 5, 320)), "head dim 320 is larger than"),
        (((1, 3, 5, 16), (1, 2, 5, 16), (1, 2, 5, 16)), "must be a multiple of KV heads"),
        (((1, 2, 9, 16), (1, 2, 5, 16), (1, 2, 5, 16)), "more queries"),
    ],
)
def test_launcher_refuses_bad_shapes(shapes, message):
    q, k, v = (torch.randn(*s, device=DEVICE) for s in shapes)
    with pytest.raises(LccError, match=message):
        kernels.attention_fwd(q, k, v, None, None, None, 0.25, True, 0, SMALL)


def test_document_ids_that_decrease_fall_back_to_the_element_mask():
    """Tile ranges assume packed (non-decreasing) ids; interleaved ids must still be exact."""
    q, k, v = make_inputs(2, 2, 1, 40, 40, 16)
    docs = torch.stack([torch.arange(40, device=DEVICE) % 3, torch.arange(40, device=DEVICE) // 10])
    aux = (None, docs, None, False, 0)
    grad_out, grad_lse = torch.randn_like(q), torch.zeros(2, 2, 40, device=DEVICE)
    got = run_kernels(q, k, v, grad_out, grad_lse, aux, 0.25, SMALL)
    want = run_reference(q, k, v, grad_out, grad_lse, aux, 0.25)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
