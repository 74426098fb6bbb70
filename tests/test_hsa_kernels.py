"""The Triton HSA kernels (``kernels/hsa.py`` through ``longctx::hsa_flash``) against the reference op.

On a CPU-only machine they run under Triton's interpreter (CPU tensors); every output buffer is NaN-filled first
there, so a value a kernel forgets to write fails the comparison. Shapes are small (the interpreter
is slow) but cover GQA, several chunks with a real choice of K, a partial last chunk, padding that
empties a chunk, and both selection units.
"""

import math

import lcc_cli
import pytest
import torch

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.kernels import hsa as kernels
from longctx_compile.ops.hsa import hsa_attention
from longctx_compile.ops.hsa_flash import hsa_flash
from longctx_compile.targets.tiles import hsa_tiles

pytestmark = pytest.mark.slow  # the slow tier (the Triton interpreter): python -m pytest -m 'not slow' leaves it out

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S = 16


def inputs(T, padded="mixed", seed=0, D=16):
    """q, k, v of 4 query heads over 2 KV heads. ``padded``: "mixed", two sequences, the second left-padded so its
    first chunk is empty (the batch stride, a padded row beside an unpadded one); "padded", that padded sequence
    alone; False, one unpadded sequence (the interpreter's time grows with the batch)."""
    g = torch.Generator().manual_seed(seed)
    B = 2 if padded == "mixed" else 1
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(DEVICE) for h in (4, 2, 2))
    key_padding = None
    if padded:
        key_padding = torch.ones(B, T, dtype=torch.long, device=DEVICE)
        key_padding[-1, : S + 3] = 0  # left padding: the first chunk of the last sequence is empty
    return q, k, v, key_padding


CASES = [  # mode, topk, window, select, sink (or "stick" / "joint" fusion, "nope" scores, "rerank" 2), T, padded (see inputs)
    ("landmark", 1, 0, "token", False, 45, "mixed"),
    ("landmark", 1, 0, "token", False, 45, False),
    ("landmark", 2, 1, "block", False, 90, "padded"),
    ("landmark", 2, 1, "block", False, 90, False),
    ("learned", 2, 0, "token", False, 45, "padded"),
    ("learned", 1, 1, "block", False, 90, "mixed"),
    ("exact", -1, 0, "token", False, 40, "padded"),
    ("exact", -1, 1, "block", False, 77, "mixed"),
    ("exact", -1, 1, "block", False, 77, False),
    ("landmark", 2, 0, "token", True, 45, "padded"),
    ("exact", -1, 0, "block", True, 64, "padded"),
    ("landmark", 2, 0, "token", "stick", 45, "padded"),
    ("exact", -1, 1, "block", "stick", 77, "padded"),
    ("learned", 2, 0, "block", "nope", 90, "padded"),
    ("landmark", 1, 0, "token", "nope", 45, False),
    ("bound", 2, 0, "token", False, 45, "padded"),  # score queries and landmarks of width 2D
    ("reps", 2, 0, "token", False, 45, "padded"),  # landmarks from each chunk's 4 representative keys (of 16)
    ("bound", 2, 1, "block", "joint", 90, "padded"),  # chunks chosen by their scores, weighed by their true LSEs
    ("bound", 1, 0, "token", "rerank", 90, "mixed"),  # the bound's 2·K candidates, the K by their true LSE (joint fusion)
    ("landmark", 1, 0, "block", "rerank", 90, "padded"),
]


@pytest.mark.parametrize("mode,K,w,select,sink,T,padded", CASES)
def test_kernels_equal_reference(mode, K, w, select, sink, T, padded):
    """Forward and every gradient (q, k, v, the learned projections) equal the reference op's, fp32."""
    q, k, v, key_padding = inputs(T, padded)
    g = torch.Generator().manual_seed(3)
    projections = [(torch.eye(16) + torch.randn(2, 16, 16, generator=g) / 4).to(DEVICE) for _ in range(2)] if mode == "learned" else [None, None]
    nope = list(inputs(T, padded, seed=5)[:2]) if sink == "nope" else [None, None]
    leaves = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, *projections, *nope)]
    refs = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, *projections, *nope)]
    rerank = 2 if sink == "rerank" else 0
    fusion, sink = "joint" if rerank else sink if sink in ("stick", "joint") else "softmax", sink is True
    statics = (16**-0.5, S, K, w, mode, select, sink, fusion)
    got = hsa_flash(*leaves[:3], key_padding, *leaves[3:5], *statics, *leaves[5:], rerank, hsa_tiles(S, 2, select))[0]
    want = hsa_attention(*refs[:3], key_padding, *refs[3:5], *statics, *refs[5:], rerank)
    leaves, refs = [t for t in leaves if t is not None], [t for t in refs if t is not None]
    torch.testing.assert_close(got, want)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, refs, grad), strict=True):
        torch.testing.assert_close(a, b)


def test_selection_kernel_is_a_top_k():
    """Per unit the kernel's chunks are a top-K of the visible ones (ties may pick either), most recent first, -1 when fewer exist."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, units, chunks, R, K, w = 2, 2, 70, 60, 16, 5, 1
    su, lk = torch.randn(B, Hkv, units, R, generator=g), torch.randn(B, Hkv, chunks, R, generator=g)
    lb = torch.log(torch.randint(0, 4, (B, chunks), generator=g).float())  # log real-key counts, -inf for empty chunks
    unit = 16  # units are chunks of 16 queries with chunk 16: unit u sees chunks < u - w
    idx = kernels.select(su.to(DEVICE), lk.to(DEVICE), lb.to(DEVICE), unit, 16, w, 3.0, K).cpu()
    scores = torch.einsum("bhur,bhcr->bhuc", su, lk) + 3.0 * lb[:, None, None]
    visible = torch.arange(chunks)[None, :] < (torch.arange(units) - w)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    for b in range(B):
        for h in range(Hkv):
            for u in range(units):
                row, chosen = scores[b, h, u], idx[b, h, u]
                real = chosen[chosen >= 0]
                finite = int(torch.isfinite(row).sum())
                assert len(real) == min(K, finite), (b, h, u)
                assert torch.all(real[:-1] > real[1:])  # most recent first, no repeats
                if len(real):
                    kth = row.topk(len(real)).values[-1]
                    assert torch.all(row[real.long()] >= kth - 1e-5)


@pytest.mark.parametrize(
    "preset,options", [("tiny-llama", dict(score="exact", topk="all", window=1)), ("tiny-qwen2", dict(score="exact", topk="all", window=0, select="block"))]
)
def test_lowered_exact_model_equals_dense(preset, options):
    """Lowered for ``interpret``, every HSA site runs the kernels, and exact + all chunks still equals the original model."""
    compiled = lcc.compile(preset, to="hsa", chunk=16, target="interpret", **options)
    assert {s["kernel"] for s in compiled.program.sites()} == {"longctx.hsa_flash/triton"}
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = compiled.original(ids, attention_mask=mask, position_ids=positions).logits
    got = compiled(ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])


def test_lowered_reranked_model_equals_the_cpu_program():
    """``rerank`` lowers with the rest of the site (the selection kernel's 2·K candidates, the rerank kernel, the
    forward kernel): the logits of a per-head reranked model equal the cpu program's, where 2 of 4 chunks are candidates."""
    options = dict(to="hsa", chunk=16, topk="1", window=0, heads="each", rerank=2)
    kernel, reference = lcc.compile("tiny-llama", target="interpret", **options), lcc.compile("tiny-llama", **options)
    assert {s["kernel"] for s in kernel.program.sites()} == {"longctx.hsa_flash/triton"}
    ids = (torch.arange(75)[None] * 11 + 5) % 256
    torch.testing.assert_close(kernel(ids), reference(ids))


@pytest.mark.parametrize("heads", ["group", "each"])
def test_lowered_learned_model_trains_like_the_reference(tmp_path, heads):
    """A learned-score NoPE model lowered for ``interpret`` gives the cpu program's logits and parameter gradients, and saves
    and loads; with heads=each (K/V repeated per query head in the graph), each query head has its own projections."""
    options = dict(to="hsa", chunk=16, topk="1", window=0, score="learned", nope=True, heads=heads)
    kernel, reference = lcc.compile("tiny-llama", target="interpret", **options), lcc.compile("tiny-llama", **options)
    ids = (torch.arange(40)[None] * 7 + 3) % 256
    grads = []
    for compiled in (kernel, reference):
        params = dict(compiled.module.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
        logits = compiled(ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        grads.append((logits.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    projections = {name: grad for name, grad in grads[0][1].items() if "hsa_retrieval" in name}
    assert projections and {grad.shape[0] for grad in projections.values()} == {4 if heads == "each" else 2}
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][name], msg=name)
    loaded = lcc.load(kernel.save(tmp_path / "k.lcc"))
    torch.testing.assert_close(loaded(ids), grads[0][0])


def test_kernel_refusals(tmp_path):
    with pytest.raises(LccError, match=r"chunk 8 is not supported by the HSA kernels \(one of 16, 32, 64, 128\); pass --opt fallback=reference"):
        lcc.compile("tiny-llama", to="hsa", chunk=8, target="interpret")
    with pytest.raises(LccError, match="exact scores with a finite topk"):
        lcc.compile("tiny-llama", to="hsa", chunk=16, score="exact", topk="2", target="h100")
    kept = lcc.compile("tiny-llama", to="hsa", chunk=8, target="interpret", fallback="reference")
    assert {s["kernel"] for s in kept.program.sites()} == {"longctx.hsa_attention/reference"}
    assert all("chunk 8 is not supported" in s["fallback"] for s in kept.program.sites())
    command = ["convert", "tiny-llama", "--to", "hsa", "--opt", "chunk=24", "--target", "h100", "-o", str(tmp_path / "never.lcc")]
    result = lcc_cli.run(*command)
    assert result.returncode == 2 and "chunk 24 is not supported by the HSA kernels" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr and not (tmp_path / "never.lcc").exists()


def test_tiles_fit_the_targets():
    """The default HSA tiles fit every GPU target's shared memory at chunk 64, head dim 128, bf16 (as the lowering checks)."""
    from longctx_compile.targets import TARGETS
    from longctx_compile.targets.tiles import hsa_smem_bytes

    for name, target in TARGETS.items():
        if target.kernels != "triton":
            continue
        for groups in (1, 4, 16):
            for select in ("token", "block"):
                need = hsa_smem_bytes(hsa_tiles(64, groups, select), 64, groups, 128, 128, torch.bfloat16)
                assert need <= target.smem_per_block, (name, groups, select, need)
                assert math.log2(hsa_tiles(64, groups, select)[0]).is_integer()


@pytest.mark.parametrize("mode,K", [("exact", -1), ("landmark", 2)])
def test_sequences_shorter_than_the_slots(mode, K):
    """T < S and T = S (no complete chunk to retrieve, or none older than the window): every slot is empty, nothing is read past T."""
    for T in (1, 5, 16):
        q, k, v, _ = inputs(T, padded=False)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        refs = [t.clone().requires_grad_() for t in (q, k, v)]
        statics = (16**-0.5, S, K, 1, mode, "token", False, "softmax", None, None)
        got = hsa_flash(*leaves, None, None, None, *statics, 0, hsa_tiles(S, 2, "token"))[0]
        want = hsa_attention(*refs, None, None, None, *statics)
        torch.testing.assert_close(got, want)
        grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(T)).to(DEVICE)
        for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, refs, grad), strict=True):
            torch.testing.assert_close(a, b)
