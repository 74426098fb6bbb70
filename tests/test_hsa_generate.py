"""HSA generates: the op's queries may be the last T of its keys, its cache is declared (``ops.cache.HsaCache``), and an
hsa artifact's prefill/decode programs continue the full-sequence HSA program token by token."""

from __future__ import annotations

import pytest
import torch
from decode_steps import check_decode_steps

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.ops import hsa as hsa_ops
from longctx_compile.ops import hsa_sums

PROMPTS = [[5, 17, 3, 99, 42, 7, 1, 9, 11, 13, 40, 41, 2], [12, 8], [200, 201, 3, 4, 5]]


def qkv(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    key_padding = torch.ones(2, T, dtype=torch.long)
    key_padding[1, :5] = 0
    return q, k, v, key_padding


@pytest.mark.parametrize(
    "mode,K,w,variant",
    [
        ("landmark", 2, 1, None),
        ("exact", 2, 0, None),
        ("exact", -1, 1, None),
        ("learned", 1, 0, None),
        ("landmark", 2, 1, "sink"),
        ("landmark", 1, 0, "stick"),
        ("landmark", 2, 0, "nope"),
        ("landmark", 2, 1, "joint"),
        ("bound", 2, 1, None),
        ("bound", 1, 0, "nope"),
        ("reps", 2, 1, None),
        ("reps", 1, 0, "joint"),
        ("bound", 1, 0, "rerank"),  # the bound's 2·K candidates, the K by their true LSE
        ("landmark", 1, 1, "rerank"),
        ("learned", 2, 1, "pool"),  # 3 attention-pooled landmarks per chunk, pooled again from the cached keys
        ("learned", 1, 0, "pool-nope"),  # ... of the pre-RoPE keys, which only the sums entries hold
    ],
)
@pytest.mark.parametrize("new", [1, 3, 6])
def test_last_queries_equal_the_full_sequences_last_rows(mode, K, w, variant, new, monkeypatch):
    """Queries that are the last T of S keys get exactly the rows the whole sequence gives them (per-token selection);
    with representative keys, which need every query of a chunk, from the decode op only."""
    T, chunk = 23, 4
    monkeypatch.setattr(hsa_ops, "REPS", 2)  # of a chunk's 4 keys
    q, k, v, key_padding = qkv(T)
    g = torch.Generator().manual_seed(1)
    wq, wk = (torch.randn(2, 8, 8, generator=g) for _ in range(2)) if mode == "learned" else (None, None)
    sq, sk = (torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)) if variant in ("nope", "pool-nope") else (None, None)
    sink, fusion = variant == "sink", {"stick": "stick", "joint": "joint", "rerank": "joint"}.get(variant, "softmax")
    rerank = 2 if variant == "rerank" else 0
    pool = torch.randn(2, 3, 8, generator=g) if variant in ("pool", "pool-nope") else None
    full = hsa_ops.hsa_ref(q, k, v, key_padding, 0.3, chunk, K, w, mode, "token", wq, wk, sink, fusion, sq, sk, rerank, pool)
    kept = "pooled" if pool is not None else mode  # what the sums entries keep
    sums = None if mode == "exact" else hsa_sums.landmark_sums(k if sk is None else sk, key_padding, chunk, kept, grouped(q if sq is None else sq, 0.3))
    step = torch.ops.longctx.hsa_decode(
        q[:, :, -new:], k, v, key_padding, sums, wq, wk, 0.3, chunk, K, w, mode, sink, fusion, None if sq is None else sq[:, :, -new:], rerank, pool
    )
    torch.testing.assert_close(step, full[:, :, -new:])  # the decode op reads chunk summaries from cached sums instead of the keys
    if mode == "reps":
        with pytest.raises(ValueError, match="score=reps"):
            hsa_ops.hsa_ref(q[:, :, -new:], k, v, key_padding, 0.3, chunk, K, w, mode)
        return
    tail = hsa_ops.hsa_ref(
        q[:, :, -new:], k, v, key_padding, 0.3, chunk, K, w, mode, "token", wq, wk, sink, fusion, None if sq is None else sq[:, :, -new:], sk, rerank, pool
    )
    torch.testing.assert_close(tail, full[:, :, -new:])
    op = torch.ops.longctx.hsa_attention(
        q[:, :, -new:], k, v, key_padding, wq, wk, 0.3, chunk, K, w, mode, "token", sink, fusion, None if sq is None else sq[:, :, -new:], sk, rerank, pool
    )
    torch.testing.assert_close(op, full[:, :, -new:])


def grouped(q: torch.Tensor, scale: float, heads: int = 2) -> torch.Tensor:
    """Queries [B, Hq, T, D] times the scale, summed over each KV group's heads: what ``reps`` sums per chunk."""
    B, Hq, T, D = q.shape
    return q.view(B, heads, Hq // heads, T, D).sum(2) * scale


@pytest.mark.parametrize("mode", ["landmark", "bound", "reps", "pooled"])
def test_running_sums_extended_key_by_key_equal_the_prompts(mode, monkeypatch):
    """What prefill stores (landmark_sums) extended one key at a time (extend_sums / extend_reps, as a decode step does)
    equals the sums of the whole sequence; the entry at each chunk's last key is the chunk's sum of real keys (bound:
    their per-channel minimum and maximum; reps: its real queries' sum and the mean of its representatives) and their count;
    for pooled landmarks every entry is its key (zeros where padded) and the running count."""
    T, chunk = 23, 4
    monkeypatch.setattr(hsa_ops, "REPS", 2)
    q, k, _, key_padding = qkv(T)
    queries = grouped(q, 0.3)
    sums = hsa_sums.landmark_sums(k[:, :, :9], key_padding[:, :9], chunk, mode, queries[:, :, :9])
    for j in range(9, T):
        starts, ends = torch.full((2,), j % chunk == 0), torch.full((2,), j % chunk == chunk - 1)
        if mode == "reps":
            lo = max(0, j - chunk + 1)
            window = torch.nn.functional.pad(k[:, :, lo : j + 1], (0, 0, chunk - (j + 1 - lo), 0))
            real = torch.nn.functional.pad(key_padding[:, lo : j + 1], (chunk - (j + 1 - lo), 0)) != 0
            entry = hsa_sums.extend_reps(sums[:, :, -1:], queries[:, :, j : j + 1], key_padding[:, j], starts, ends, window, real)
        else:
            entry = hsa_sums.extend_sums(sums[:, :, -1:], k[:, :, j : j + 1], key_padding[:, j], starts, mode)
        sums = torch.cat([sums, entry], dim=2)
    full = hsa_sums.landmark_sums(k, key_padding, chunk, mode, queries)
    torch.testing.assert_close(sums, full)
    if mode == "pooled":
        real = (key_padding != 0).float()[:, None, :, None]
        count = torch.stack([real[:, :, j // chunk * chunk : j + 1].sum(2) for j in range(T)], dim=2).expand(2, 2, T, 1)
        torch.testing.assert_close(full, torch.cat([k * real, count], -1))
        return
    ends = full[:, :, chunk - 1 :: chunk]
    real = key_padding[:, : T // chunk * chunk].view(2, 1, -1, chunk, 1) != 0
    chunks = k[:, :, : T // chunk * chunk].reshape(2, 2, -1, chunk, 8)
    count = real.float().sum(3).expand(2, 2, -1, 1)
    if mode == "bound":
        summary = [chunks.masked_fill(~real, float("inf")).amin(3), chunks.masked_fill(~real, float("-inf")).amax(3)]
    elif mode == "reps":
        asked = (queries[:, :, : T // chunk * chunk].reshape(2, 2, -1, chunk, 8) * real).sum(3)
        ranked = torch.einsum("bhcd,bhcsd->bhcs", asked, chunks).masked_fill(~real[..., 0], float("-inf")).topk(2, dim=-1).indices
        picked = chunks.gather(3, ranked[..., None].expand(-1, -1, -1, -1, 8))
        kept = real[..., 0].expand(-1, 2, -1, -1).gather(3, ranked)[..., None]
        summary = [asked, (picked * kept).sum(3) / kept.sum(3).clamp(min=1)]
    else:
        summary = [(chunks * real).sum(3)]
    torch.testing.assert_close(ends, torch.cat([*summary, count], -1))


def test_a_decode_step_reads_landmarks_not_old_keys():
    """Keys of an older chunk that is neither local nor selected are not read: NaN there changes nothing, while the
    landmark its sums hold still takes part in the selection (a step costs O(C + (K+w+1)·S) keys, not O(N))."""
    T, chunk = 40, 4
    q, k, v, _ = qkv(T)
    sums = hsa_sums.landmark_sums(k, None, chunk)
    args = (None, None, 0.3, chunk, 1, 0, "landmark", False, "softmax", None)
    clean = torch.ops.longctx.hsa_decode(q[:, :, -1:], k, v, None, sums, *args)
    full = hsa_ops.hsa_ref(q, k, v, None, 0.3, chunk, 1, 0, "landmark")
    torch.testing.assert_close(clean, full[:, :, -1:])
    picked = hsa_ops.top_chunks((q[:, :, -1].view(2, 2, 2, 8).sum(2)[:, :, None] * 0.3 * sums[:, :, chunk - 1 : 36 : chunk, :8] / 4).sum(-1), 1)
    unread = next(c for c in range(9) if not (picked == c).any())
    poisoned = k.clone()
    poisoned[:, :, unread * chunk : (unread + 1) * chunk] = float("nan")
    torch.testing.assert_close(torch.ops.longctx.hsa_decode(q[:, :, -1:], poisoned, v, None, sums, *args), clean)


def test_last_queries_refuse_a_shared_chunk_selection():
    q, k, v, _ = qkv(12)
    with pytest.raises(ValueError, match="select=block"):
        hsa_ops.hsa_ref(q[:, :, -1:], k, v, None, 0.3, 4, 1, 0, "landmark", "block")
    every = hsa_ops.hsa_ref(q[:, :, -2:], k, v, None, 0.3, 4, -1, 0, "exact", "block")  # all chunks: nothing to share
    torch.testing.assert_close(every, hsa_ops.hsa_ref(q, k, v, None, 0.3, 4, -1, 0, "exact", "block")[:, :, -2:])


def test_exact_mode_with_every_chunk_generates_the_dense_tokens():
    dense = lcc.compile("tiny-llama").generate(PROMPTS, max_new_tokens=12)
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, topk="all", window=1, score="exact")
    assert compiled.generate(PROMPTS, max_new_tokens=12) == dense
    assert compiled.generate(PROMPTS, max_new_tokens=12, cache="growing") == dense


@pytest.mark.parametrize(
    "options",
    [
        {"score": "landmark", "topk": "1"},
        {"score": "learned", "topk": "2", "nope": "true", "fusion": "stick"},
        {"score": "bound", "topk": "1", "fusion": "joint"},
        {"score": "bound", "topk": "1", "fusion": "joint", "heads": "group"},  # a KV group shares one selection (reranked over 4 candidates)
        {"score": "bound", "topk": "1", "heads": "each", "rerank": "2"},  # the bound's 2 candidates, the one with the larger true LSE
        {"score": "reps", "topk": "1"},
        {"score": "learned", "topk": "1", "landmarks": "3", "fusion": "joint"},  # pooled landmarks: each step pools the cached keys
        {"score": "learned", "topk": "2", "landmarks": "2", "nope": "true"},  # ... the pre-RoPE ones, kept in the sums entries
    ],
)
def test_sparse_decode_logits_equal_the_full_sequence_program(options, monkeypatch):
    """Both cache modes, stepped as the Generator steps them: each step's logits equal the HSA program over the whole
    sequence so far (left-padded prompts; the static cache passed as its filled prefix)."""
    monkeypatch.setattr(hsa_ops, "REPS", 2)  # of a chunk's 4 keys
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, window=0, **options)
    assert compiled.steps.layout.stored[0] == ["k", "v", "sums"]  # keys, values and the chunks' running landmark sums
    # per KV head: the (NoPE) score key's sum and the count; for bound its running minimum, maximum and the count; for
    # reps the queries' sum, the representatives' mean and the count; with heads=each (the retrofit's default), per query head
    assert compiled.steps.layout.shapes[0][2] == [
        4 if options.get("heads", "each") == "each" else 2,
        16 * (2 if options["score"] in ("bound", "reps") else 1) + 1,
    ]
    check_decode_steps(compiled, PROMPTS, 7, prefix_views=True)
    # and the Generator's two cache modes pick the same tokens
    assert compiled.generate(PROMPTS, max_new_tokens=7) == compiled.generate(PROMPTS, max_new_tokens=7, cache="growing")


def test_a_saved_hsa_artifact_generates(tmp_path):
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, topk="1", window=0)
    loaded = lcc.load(compiled.save(tmp_path / "h.lcc"))
    assert loaded.manifest["derived"] == {"kv_cache": ["prefill", "decode", "static"]} and loaded.manifest["cache"]["stored"][0] == ["k", "v", "sums"]
    assert loaded.generate(PROMPTS, max_new_tokens=6) == compiled.generate(PROMPTS, max_new_tokens=6)


def test_shared_chunk_selection_has_no_cache_and_says_why():
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, topk="1", select="block")
    with pytest.raises(LccError, match="select=block.*--opt select=token"):
        compiled.generate(PROMPTS, max_new_tokens=2)


def test_representatives_of_pre_rope_keys_have_no_cache_and_say_why():
    """score=reps picks among the keys that score chunks; with nope=true those are pre-RoPE keys, which no cache keeps."""
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, topk="1", score="reps", nope="true")
    with pytest.raises(LccError, match="score=reps with nope=true"):
        compiled.generate(PROMPTS, max_new_tokens=2)
