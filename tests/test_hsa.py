"""Hierarchical sparse attention: the reference op against a per-query brute force and, in exact mode, the dense model."""

import json
import math

import lcc_cli
import pytest
import torch

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.forms.hsa import describe
from longctx_compile.forms.hsa.rewrite import HsaConfig
from longctx_compile.ops import hsa as hsa_ops
from longctx_compile.ops import hsa_cpu
from longctx_compile.ops.hsa import hsa_attention
from longctx_compile.ops.schema import Call


def brute_force(
    q, k, v, key_padding, scale, S, K, w, mode, select="token", wq=None, wk=None, sink=False, fusion="softmax", sq=None, sk=None, rerank=0, pool=None
):
    """HSA one query at a time with Python sets: the semantics of ops/hsa.py written out plainly.

    ``sq`` / ``sk`` stand in for q / k in landmark and learned scores (NoPE retrieval). ``rerank`` R: the score keeps
    R·K candidates, and their true LSEs (of q and k), summed over the same voters, pick the K. ``pool`` [Hkv, R, D]:
    learned scores summarise a chunk by R attention-pooled landmarks, scored by their LSE less log R."""
    sq, sk = (q if sq is None else sq), (k if sk is None else sk)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, T, v.shape[-1])
    for b in range(B):
        real = [bool(key_padding[b, j]) for j in range(T)]
        for h in range(Hkv):
            for t in range(T):
                c = t // S
                local = [j for j in range(max(0, c - w) * S, t + 1) if real[j]]
                chunks = {i: [j for j in range(i * S, (i + 1) * S) if real[j]] for i in range(max(0, c - w))}
                chunks = {i: keys for i, keys in chunks.items() if keys}

                def score(qh, keys, kh=k[b, h], h=h, skh=sk[b, h], i=None, sqb=sq[b], real=real):
                    if mode == "exact":
                        return torch.logsumexp(torch.stack([qh @ kh[j] * scale for j in keys]), 0)
                    if mode == "reps":  # the mean of the REPS keys the chunk's real queries (all heads of the group) score highest
                        asked = sum(sqb[h * G + g, u] for u in range(i * S, (i + 1) * S) if real[u] for g in range(G)) * scale
                        ranked = sorted(keys, key=lambda j: -float(asked @ skh[j]))[: hsa_ops.REPS]
                        return qh @ torch.stack([skh[j] for j in ranked]).mean(0) * scale + math.log(len(keys))
                    if mode == "bound":  # Σ_d max(q_d·min_d, q_d·max_d) over the chunk's real keys, plus log S
                        ks = torch.stack([skh[j] for j in keys])
                        return torch.maximum(qh * ks.min(0).values, qh * ks.max(0).values).sum() * scale + math.log(len(keys))
                    if pool is not None:  # landmark r: the chunk's keys weighed by softmax_j(u_r·k_j)
                        ks = torch.stack([skh[j] for j in keys])
                        marks = [torch.softmax(ks @ u, 0) @ ks for u in pool[h]]
                        each = torch.stack([(qh @ wq[h]) @ (mark @ wk[h]) * scale for mark in marks])
                        return torch.logsumexp(each, 0) - math.log(len(marks)) + math.log(len(keys))
                    mean = torch.stack([skh[j] for j in keys]).mean(0)
                    if mode == "learned":
                        qh, mean = qh @ wq[h], mean @ wk[h]
                    return qh @ mean * scale + math.log(len(keys))

                heads = [q[b, h * G + g, t] for g in range(G)]
                voters = range(c * S, min(T, (c + 1) * S)) if select == "block" else [t]  # whose scores pick the chunks
                group = {i: sum(score(sq[b, h * G + g, u], keys, i=i) for u in voters for g in range(G)) for i, keys in chunks.items()}
                picked = sorted(group, key=lambda i: -float(group[i].detach()))[: (len(group) if K < 0 else K * max(1, rerank))]
                if rerank:
                    true = {
                        i: sum(torch.logsumexp(torch.stack([q[b, h * G + g, u] @ k[b, h, j] * scale for j in chunks[i]]), 0) for u in voters for g in range(G))
                        for i in sorted(picked)
                    }
                    picked = sorted(true, key=lambda i: -float(true[i].detach()))[:K]
                picked = sorted(picked, reverse=True)  # most recent first (the order stick-breaking uses)
                for g, qh in enumerate(heads):
                    parts, weights = [], []
                    for keys, s in [(local, None)] + [(chunks[i], score(sq[b, h * G + g, t], chunks[i], i=i)) for i in picked]:
                        if not keys:
                            continue
                        logits = torch.stack([qh @ k[b, h, j] * scale for j in keys])
                        if sink and s is not None:  # a retrieved chunk's softmax with +1 in the denominator
                            logits = torch.cat([logits, torch.zeros(1)])
                            keys = [*keys, None]
                        values = torch.stack([v[b, h, j] if j is not None else torch.zeros(v.shape[-1]) for j in keys])
                        parts.append(torch.softmax(logits, 0) @ values)
                        weights.append(torch.logsumexp(logits, 0) if s is None or fusion == "joint" else s)  # joint: the true LSE
                    if parts and fusion == "stick":  # σ(s_p) of what the more recent parts left
                        left = 1.0
                        for part, s in zip(parts, weights, strict=True):
                            out[b, h * G + g, t] += left * torch.sigmoid(s) * part
                            left = left * (1 - torch.sigmoid(s))
                    elif parts:
                        out[b, h * G + g, t] = torch.softmax(torch.stack(weights), 0) @ torch.stack(parts)
    return out


def inputs(T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    key_padding = torch.ones(2, T, dtype=torch.long)
    key_padding[1, :5] = 0  # left padding: a whole chunk of keys is empty
    return q, k, v, key_padding


@pytest.mark.parametrize(
    "mode,K,w,select",
    [
        ("landmark", 2, 1, "token"),
        ("landmark", 1, 0, "token"),
        ("exact", 2, 0, "token"),
        ("exact", -1, 1, "token"),
        ("landmark", 2, 0, "block"),
        ("learned", 2, 1, "token"),
        ("learned", 1, 0, "block"),
        ("landmark", 2, 1, "sink"),  # per token, softmax-off-by-one in the retrieved chunks
        ("landmark", 2, 1, "stick"),  # per token, stick-breaking fusion
        ("exact", -1, 0, "stick"),
        ("landmark", 2, 1, "joint"),  # every part weighed by its true LSE: one softmax over the local and chosen keys
        ("landmark", 1, 0, "joint-block"),
        ("learned", 2, 0, "nope"),  # per token, scores from separate (pre-RoPE) queries and keys
        ("learned", 2, 1, "pool"),  # R attention-pooled landmarks per chunk, trained through the fusion weights
        ("learned", 1, 0, "pool-block"),
        ("learned", 2, 1, "pool-joint"),
        ("landmark", 1, 1, "nope"),
        ("bound", 2, 1, "joint"),  # Quest's upper bound of each chunk's best q·k
        ("bound", 1, 1, "nope"),
        ("reps", 2, 1, "token"),  # the mean of the keys each chunk's own queries score highest
        ("reps", 1, 0, "joint-block"),
        ("bound", 1, 0, "rerank"),  # 2·K candidates by the bound, the K by their true LSE
        ("landmark", 1, 0, "rerank-block"),
        ("reps", 1, 1, "rerank"),
    ],
)
@pytest.mark.parametrize("group", ["one chunk", "all chunks"])
@pytest.mark.parametrize("padded", [True, False])
def test_op_equals_brute_force(mode, K, w, select, group, padded, monkeypatch):
    """Forward and gradients of the op equal the per-query brute force (GQA, T not a multiple of S).

    With padding that empties a chunk (masked softmaxes) and without (plain softmaxes); with
    one query chunk per group and every chunk in one group, so each path is checked.
    """
    if group == "one chunk":
        monkeypatch.setattr(hsa_ops, "GROUP_ELEMENTS", 1)
    monkeypatch.setattr(hsa_ops, "REPS", 2)  # of a chunk's 3 keys: so representatives are a choice
    q, k, v, key_padding = inputs()
    if not padded:
        key_padding = None
    g = torch.Generator().manual_seed(2)
    projections = [torch.randn(2, 8, 8, generator=g) / 3 for _ in range(2)] if mode == "learned" else [None, None]
    nope = [torch.randn(2, 4, 13, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)] if select == "nope" else [None, None]
    pool = [torch.randn(2, 3, 8, generator=g) if select.startswith("pool") else None]
    leaves = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, *projections, *nope, *pool)]
    refs = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, *projections, *nope, *pool)]
    fusion = {"stick": "stick", "joint": "joint", "joint-block": "joint", "rerank": "joint", "rerank-block": "joint", "pool-joint": "joint"}.get(
        select, "softmax"
    )
    rerank = 2 if select.startswith("rerank") else 0
    sink, select = select == "sink", "block" if select in ("block", "joint-block", "rerank-block", "pool-block") else "token"
    got = hsa_attention(
        *leaves[:3], key_padding, *leaves[3:5], 8**-0.5, 3, K, w, mode, select, sink, fusion, *leaves[5:7], rerank=rerank, retrieval_pool=leaves[7]
    )
    real = torch.ones(2, 13) if key_padding is None else key_padding
    want = brute_force(*refs[:3], real, 8**-0.5, 3, K, w, mode, select, *refs[3:5], sink, fusion, *refs[5:7], rerank=rerank, pool=refs[7])
    leaves, refs = [t for t in leaves if t is not None], [t for t in refs if t is not None]
    torch.testing.assert_close(got, want)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    # under joint fusion the learned scores only select: no gradient reaches them, in the op as in the brute force
    for a, b in zip(torch.autograd.grad(got, leaves, grad, allow_unused=True), torch.autograd.grad(want, refs, grad, allow_unused=True), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("T", [2, 21, 75])
@pytest.mark.parametrize(
    "mode,fusion,sink,rerank",
    [
        ("landmark", "softmax", False, 0),
        ("learned", "stick", True, 0),
        ("exact", "softmax", True, 0),
        ("landmark", "stick", False, 0),
        ("landmark", "joint", False, 0),
        ("bound", "joint", False, 2),
    ],
)
def test_cpu_fast_forward_equals_reference(T, mode, fusion, sink, rerank):
    """The CPU flash path (per-chunk selection, no padding) equals the reference: T < S, several groups of
    GROUP_CHUNKS (4) query chunks at T = 75 (25 chunks of 3), a partial last chunk, chunks picked among fewer
    than K visible."""
    g = torch.Generator().manual_seed(T)
    q, k, v = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    projections = [torch.eye(8) + torch.randn(2, 8, 8, generator=g) / 3 for _ in range(2)] if mode == "learned" else [None, None]
    want = hsa_ops.hsa_ref(q, k, v, None, 8**-0.5, 3, 4, 2, mode, "block", *projections, sink, fusion, None, None, rerank)
    got = hsa_cpu.hsa_block_cpu(q, k, v, 8**-0.5, 3, 4, 2, mode, *projections, sink, fusion, None, None, rerank)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("select", ["token", "block"])
@pytest.mark.parametrize("padded", [True, False])
def test_reranking_every_chunk_is_selection_by_the_true_lse(select, padded):
    """With R·K at least the chunks, every chunk is a candidate: the first stage's score no longer matters, and the
    K are the chunks with the largest true LSE, as ``score=exact`` selects them."""
    q, k, v, key_padding = inputs(T=40, seed=3)
    key_padding = key_padding if padded else None
    want = hsa_ops.hsa_ref(q, k, v, key_padding, 0.4, 3, 2, 1, "exact", select, None, None, False, "joint")
    for mode in ("landmark", "bound"):
        got = hsa_ops.hsa_ref(q, k, v, key_padding, 0.4, 3, 2, 1, mode, select, None, None, False, "joint", None, None, 7)
        torch.testing.assert_close(got, want)
    assert (hsa_ops.hsa_ref(q, k, v, key_padding, 0.4, 3, 2, 1, "bound", select, None, None, False, "joint") - want).abs().max() > 0.1


def test_rerank_option():
    """``--opt rerank=R`` reaches every site (and inspect's line); it is refused where it has no meaning."""
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, topk=1, window=0, heads="each", rerank=2)
    assert {s["rerank"] for s in compiled.program.sites()} == {2}
    assert all("rerank=2" in describe(site) for site in compiled.program.sites())
    assert [Call.of(n).rerank for n in compiled.program.gm.graph.nodes if n.target is torch.ops.longctx.hsa_attention.default] == [2, 2]
    for options, message in [
        ({"rerank": "-1"}, "invalid --opt rerank=-1"),
        ({"rerank": "2", "score": "exact"}, "score=exact ranks every chunk"),
        ({"rerank": "2", "fusion": "softmax"}, "fusion=softmax would weigh them by another score"),
    ]:
        with pytest.raises(LccError, match=message):
            lcc.compile("tiny-llama", to="hsa", **options)


@pytest.mark.parametrize("T", [2, 13, 40])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("mode,K,w,rerank", [("bound", 2, 1, 0), ("landmark", 1, 0, 2), ("exact", 2, 0, 0), ("bound", -1, 1, 0), ("reps", 2, 1, 0)])
def test_cpu_joint_forward_equals_reference(T, padded, mode, K, w, rerank):
    """The CPU path of per-token selection with joint fusion (one masked SDPA call per group of query chunks) equals
    the reference: padding that empties a chunk and rows that see no key, T < S, a partial last chunk, reranking."""
    q, k, v, key_padding = inputs(T=T, seed=T)
    key_padding = key_padding if padded else None
    want = hsa_ops.hsa_ref(q, k, v, key_padding, 0.4, 3, K, w, mode, "token", None, None, False, "joint", None, None, rerank)
    got = hsa_cpu.hsa_joint_cpu(q, k, v, key_padding, 0.4, 3, K, w, mode, None, None, None, None, rerank)
    torch.testing.assert_close(got, want)


def test_cpu_op_takes_the_fast_path_only_where_it_applies(monkeypatch):
    """On the CPU the op runs the flash path for unpadded per-chunk selection, the masked-SDPA path for per-token
    selection with joint fusion over the whole sequence, and the reference otherwise."""
    calls = []
    for name in ("hsa_block_cpu", "hsa_joint_cpu"):
        monkeypatch.setattr(hsa_cpu, name, lambda *args, fast=getattr(hsa_cpu, name), name=name: calls.append(name) or fast(*args))
    reference = hsa_ops.hsa_ref
    monkeypatch.setattr(hsa_ops, "hsa_ref", lambda *args: calls.append("ref") or reference(*args))
    q, k, v, key_padding = inputs()
    for padding, select, fusion in ((None, "block", "softmax"), (key_padding, "block", "softmax"), (None, "token", "softmax"), (key_padding, "token", "joint")):
        hsa_attention(q, k, v, padding, None, None, 8**-0.5, 3, 2, 1, "landmark", select, False, fusion)
    hsa_attention(q[:, :, -2:], k, v, key_padding, None, None, 8**-0.5, 3, 2, 1, "landmark", "token", False, "joint")  # a decode step's rows
    assert calls == ["hsa_block_cpu", "ref", "ref", "hsa_joint_cpu", "ref"]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-phi"])
def test_exact_mode_with_all_chunks_equals_dense(preset):
    """score=exact, topk=all is dense attention: logits equal the original model for T < S, T = kS and T ≠ kS."""
    compiled = lcc.compile(preset, to="hsa", chunk=4, topk="all", window=1, score="exact")
    assert compiled.program.signature["exact"]
    for T in (3, 16, 19):
        ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(T))
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        want = compiled.original(ids, attention_mask=mask, position_ids=positions).logits
        got = compiled(ids, attention_mask=mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()])


def test_landmark_mode_trains():
    """A landmark-HSA model (chunk 4, top-2) trains: AdamW on a repeated pattern lowers the loss."""
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, topk="2", window=1)
    params = list(compiled.module.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    ids = torch.arange(16).repeat(3)[None] * 7 % 256
    losses = []
    for _ in range(8):
        logits = compiled(ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5


def test_learned_mode_starts_as_landmark_and_trains(tmp_path):
    """New retrieval projections start as the identity (logits equal landmark's), receive gradients,
    train the model down, and survive save and load."""
    options = dict(to="hsa", chunk=4, topk="2", window=1, recipe="paper")  # landmark scores, softmax fusion
    landmark, learned = lcc.compile("tiny-llama", score="landmark", **options), lcc.compile("tiny-llama", score="learned", **options)
    ids = torch.arange(16).repeat(3)[None] * 7 % 256
    torch.testing.assert_close(learned(ids), landmark(ids))
    new = {name: p for name, p in learned.module.named_parameters() if "hsa_retrieval" in name}
    assert sorted(new) == [f"model.layers.{i}.self_attn.hsa_retrieval_{s}" for i in (0, 1) for s in "kq"]
    params = list(learned.module.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(learned(ids)[0, :-1], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new.values())
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    loaded = lcc.load(learned.save(tmp_path / "learned.lcc"))
    torch.testing.assert_close(loaded(ids), learned(ids))


def test_layers_and_refusals():
    compiled = lcc.compile("tiny-llama", to="hsa", layers="1", chunk=8)
    assert [s["form"] for s in compiled.program.sites()] == ["dense", "hsa"]
    with pytest.raises(LccError, match="layer 2 is out of range; the model has attention layers 0..1"):
        lcc.compile("tiny-llama", to="hsa", layers="0,2")
    with pytest.raises(LccError, match="invalid --opt topk=0"):
        lcc.compile("tiny-llama", to="hsa", topk="0")
    with pytest.raises(LccError, match="invalid --opt chunk=0"):
        lcc.compile("tiny-llama", to="hsa", chunk=0)
    with pytest.raises(LccError, match=r"sliding window \(8\) would be widened"):
        lcc.compile("tiny-mistral", to="hsa")
    with pytest.raises(LccError, match="packed-document masks are not supported by hsa yet"):
        lcc.compile("tiny-llama", to="hsa", attention_mask=False)
    assert len(compiled.generate([[1, 2]], max_new_tokens=2)[0]) == 2  # a dense and an hsa layer decode together
    with pytest.raises(LccError, match="exact scores are the chunks' true LSE and have no NoPE form"):
        lcc.compile("tiny-llama", to="hsa", score="exact", nope=True)
    with pytest.raises(LccError, match=r"layer 0 \(transformer.h.0.attn\): --opt nope=true found no rotary embedding"):
        lcc.compile("tiny-gpt2", to="hsa", nope=True)
    with pytest.raises(LccError, match="expected one of exact, landmark, bound, reps, learned"):
        lcc.compile("tiny-llama", to="hsa", score="nearest")


def test_cli_inspect_and_verify(tmp_path):
    wide = {"COLUMNS": "250"}
    exact, sparse = tmp_path / "exact.lcc", tmp_path / "sparse.lcc"
    for path, opts in [(exact, ["chunk=4", "topk=all", "window=0", "score=exact"]), (sparse, ["chunk=4", "topk=1", "window=0"])]:
        result = lcc_cli.run("convert", "tiny-llama", "--to", "hsa", "-o", path, *[x for o in opts for x in ("--opt", o)])
        assert result.returncode == 0, result.stderr
    result = lcc_cli.run("inspect", sparse, env=wide)
    assert "hsa S=4 K=1 w=0 bound" in result.stdout and "hsa (reference)" in result.stdout  # the retrofit recipe's score
    result = lcc_cli.run("verify", exact, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["passed"]
    result = lcc_cli.run("verify", sparse, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and not report["exact"] and report["max_abs"] > 1e-3  # reported, not failed
    result = lcc_cli.run("verify", sparse, env=wide)
    assert result.returncode == 0 and "DIVERGES (approximate form" in result.stdout and "FAIL" not in result.stdout


def test_nope_scores_read_the_projections_before_rope(monkeypatch):
    """With nope=true the hsa op's score inputs are the q/k projections before RoPE (captured from the HF model's own
    q_proj/k_proj), while attention still takes the rotated ones; stick fusion makes the artifact inexact."""
    compiled = lcc.compile("tiny-llama", to="hsa", chunk=4, topk="2", window=1, nope=True, fusion="stick", heads="group")
    assert not compiled.program.signature["exact"]
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(0))
    attn = compiled.original.model.layers[0].self_attn
    seen, calls = {}, []
    hooks = [getattr(attn, f"{s}_proj").register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s, o)) for s in "qk"]
    compiled.original(ids)
    for hook in hooks:
        hook.remove()
    reference = hsa_ops.hsa_ref
    monkeypatch.setattr(hsa_ops, "hsa_ref", lambda *args: calls.append(args) or reference(*args))
    compiled(ids)
    q, score_q, score_k, fusion = calls[0][0], calls[0][14], calls[0][15], calls[0][13]
    d = attn.head_dim
    assert fusion == "stick"
    torch.testing.assert_close(score_q, seen["q"].view(1, 21, -1, d).transpose(1, 2))
    torch.testing.assert_close(score_k, seen["k"].view(1, 21, -1, d).transpose(1, 2))
    assert (q - score_q).abs().max() > 1e-3  # attention itself keeps RoPE


@pytest.mark.parametrize("score", ["landmark", "exact"])
def test_joint_fusion_over_every_chunk_is_the_dense_model(score):
    """fusion=joint weighs each chunk by its true LSE, so with every chunk selected it is dense whatever scores select."""
    report = lcc.verify("tiny-llama", to="hsa", chunk="4", topk="all", window="1", fusion="joint", score=score)
    assert report.exact and report.passed


def test_joint_fusion_refuses_a_sink():
    """A sink (+1 per chunk) has no place in one softmax."""
    with pytest.raises(LccError, match="fusion=joint"):
        lcc.compile("tiny-llama", to="hsa", fusion="joint", sink="true")


def test_the_retrofit_defaults_run_the_kernels_on_a_gpu_target():
    """The defaults (bound scores, joint fusion) lower to the HSA kernels on a Triton target, as the paper's recipe does."""
    for recipe in ("retrofit", "paper"):
        compiled = lcc.compile("tiny-llama", to="hsa", target="h100", chunk="16", recipe=recipe)
        assert {s["kernel"] for s in compiled.program.sites()} == {"longctx.hsa_flash/triton"}
    facts = compiled.program.sites()[0]
    assert (facts["score"], facts["fusion"]) == ("landmark", "softmax")


def test_pooled_landmarks_start_near_the_mean_and_equal_it_with_zero_queries():
    """``--opt landmarks=R``: a [heads, R, D] pooling parameter per layer (per query head with heads=each), its first
    query zero; with every query zero the R landmarks are the mean key and score as ``learned`` without them (the LSE
    of R equal scores less log R). The kernels and the options it does not go with say so in one line."""
    options = dict(to="hsa", chunk="4", topk="2", window="1", score="learned")
    plain, pooled = lcc.compile("tiny-llama", **options), lcc.compile("tiny-llama", landmarks="3", **options)
    pools = {name: p for name, p in pooled.module.named_parameters() if name.endswith("hsa_retrieval_pool")}
    assert [tuple(p.shape) for p in pools.values()] == [(4, 3, 16)] * 2 and all(p[:, 0].abs().max() == 0 for p in pools.values())
    assert {s["landmarks"] for s in pooled.program.sites()} == {3} and all("landmarks=3" in describe(s) for s in pooled.program.sites())
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    assert (pooled(ids) - plain(ids)).abs().max() > 1e-4  # the other queries pool other landmarks
    with torch.no_grad():
        for p in pools.values():
            p.zero_()
    torch.testing.assert_close(pooled(ids), plain(ids))
    with pytest.raises(LccError, match="pooled landmarks .* the HSA kernels take one"):
        lcc.compile("tiny-llama", target="h100", landmarks="2", **{**options, "chunk": "16"})
    kept = lcc.compile("tiny-llama", target="h100", landmarks="2", fallback="reference", **{**options, "chunk": "16"})
    assert {s["kernel"] for s in kept.program.sites()} == {"longctx.hsa_attention/reference"}
    for bad, message in [({"landmarks": "2", "score": "landmark"}, "need score=learned"), ({"landmarks": "-1"}, "invalid --opt landmarks=-1")]:
        with pytest.raises(LccError, match=message):
            lcc.compile("tiny-llama", **{**options, **bad})


def test_recipes_set_what_is_not_given():
    """retrofit: bound scores, joint fusion, per-head selection reranked over 4·K candidates; paper: landmark, softmax,
    shared selection, no reranking; an explicit setting wins, learned scores (trained through the fusion weights)
    default to softmax fusion, and reranking is off wherever the fusion is not joint or the scores are exact."""
    settings = lambda cfg: (cfg.score, cfg.fusion, cfg.heads, cfg.rerank)  # noqa: E731
    assert settings(HsaConfig()) == ("bound", "joint", "each", 4)
    assert settings(HsaConfig(recipe="paper")) == ("landmark", "softmax", "group", 0)
    assert HsaConfig(score="reps").fusion == "joint" and HsaConfig(fusion="stick").score == "bound"
    assert settings(HsaConfig(score="learned")) == ("learned", "softmax", "each", 0)
    assert HsaConfig(score="exact").rerank == 0 and HsaConfig(sink=True).rerank == 0 and HsaConfig(heads="group", rerank=2).heads == "group"
    with pytest.raises(LccError, match="expected one of retrofit, paper"):
        lcc.compile("tiny-llama", to="hsa", recipe="fast")


def test_bound_scores_bound_every_key_of_the_chunk():
    """[q, |q|]·[centre, half-width] is Σ_d max(q_d·min_d, q_d·max_d), at least q·k for each real key of the chunk, and
    equal to it for a chunk of one key; an empty chunk scores -inf (its summary is zeros, not NaN)."""
    g = torch.Generator().manual_seed(3)
    kc, q = torch.randn(2, 3, 5, 4, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    rc = torch.rand(2, 1, 5, 4, generator=g) > 0.3
    rc[:, :, 0] = False  # an empty chunk
    rc[:, :, 1] = torch.tensor([True, False, False, False])  # a chunk of one key
    summary, log_count = hsa_ops.chunk_summaries(kc, rc, "bound")
    assert summary.shape == (2, 3, 5, 16) and not summary.isnan().any()
    score = torch.einsum("bhd,bhcd->bhc", hsa_ops.score_queries(q, "bound"), summary)
    low, high = kc.masked_fill(~rc[..., None], float("inf")).amin(3), kc.masked_fill(~rc[..., None], float("-inf")).amax(3)
    want = torch.maximum(q[:, :, None] * low, q[:, :, None] * high).sum(-1)
    torch.testing.assert_close(score[:, :, 1:], want[:, :, 1:])
    dots = torch.einsum("bhd,bhcsd->bhcs", q, kc).masked_fill(~rc, float("-inf"))
    assert (score[:, :, 1:] >= dots[:, :, 1:].amax(-1) - 1e-5).all()
    torch.testing.assert_close(score[:, :, 1], dots[:, :, 1, 0])
    assert (log_count[:, :, 0] == float("-inf")).all()


@pytest.mark.parametrize("rerank", [0, 2])
def test_each_head_selects_its_own_chunks(rerank):
    """heads=each: the model's logits equal the HF model whose attention is the per-query brute force with every query
    head its own group (its own top-K by its own bound, or of its bound's 2·K by their true LSE); the shared selection
    (heads=group) gives other logits."""
    from transformers import AttentionInterface

    from longctx_compile.presets import build_preset

    def per_head(module, query, key, value, attention_mask, scaling, **kwargs):
        G = query.shape[1] // key.shape[1]
        k, v = (t.repeat_interleave(G, dim=1) for t in (key, value))
        out = brute_force(query, k, v, torch.ones(query.shape[0], query.shape[2]), scaling, 4, 2, 1, "bound", fusion="joint", rerank=rerank)
        return out.transpose(1, 2), None

    AttentionInterface.register("hsa_each_brute_force", per_head)
    model = build_preset("tiny-llama")
    ids = torch.randint(3, 200, (1, 22), generator=torch.Generator().manual_seed(0))
    options = dict(max_len="32", chunk="4", topk="2", window="1", score="bound", fusion="joint", rerank=str(rerank))
    each = lcc.compile(model, to="hsa", heads="each", **options)
    group = lcc.compile(model, to="hsa", heads="group", **options)
    assert {s["heads"] for s in each.program.sites()} == {"each"}
    got = each(ids, torch.ones_like(ids), torch.arange(22)[None])
    model.config._attn_implementation = "hsa_each_brute_force"
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(got, want)
    assert (group(ids, torch.ones_like(ids), torch.arange(22)[None]) - want).abs().max() > 1e-3
