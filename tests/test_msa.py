"""The msa form end to end on tiny models: exactness against the dense model, pooling, routing, bank round trip."""

from __future__ import annotations

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.forms.msa import bank as memory_bank
from longctx_compile.forms.msa.runtime import LocalMemory, MsaModel
from longctx_compile.ops import msa as msa_ops


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-phi"])
def test_query_equals_dense_with_one_unpooled_document(preset):
    """pool=1, every layer routed, top_k=all, one document, contiguous positions: the query program's logits
    equal the dense model's on [document ; query] (fp32)."""
    compiled = lcc.compile(preset, to="msa", pool=1, routed_layers="all", topk="all")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    doc, question = tokens(11, 0), torch.tensor([tokens(5, 1)])
    bank = model.encode([doc])
    got = model.query(bank, question, position_ids=torch.arange(11, 16)[None])
    want = compiled.original(torch.cat([torch.tensor([doc]), question], dim=1)).logits[:, 11:]
    torch.testing.assert_close(got.logits, want)
    assert all(d.tolist() == [[0]] for d in got.docs.values())


def _blocks(lengths: list[int], query: int) -> torch.Tensor:
    """[1, 1, T, T] attention mask of documents that each see only themselves, then a query that sees everything before it."""
    T = sum(lengths) + query
    mask = torch.zeros(T, T, dtype=torch.bool)
    start = 0
    for n in lengths:
        mask[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    mask[start:] = torch.ones(query, T, dtype=torch.bool).tril(diagonal=start)
    return mask[None, None]


@pytest.mark.parametrize("prefix", [0, 3])
def test_contiguous_positions_lay_the_documents_out_as_one_dense_prompt(monkeypatch, prefix):
    """positions=contiguous (the default without trained routers): the documents each layer selects lie one after
    another in routing order, right before the query, with the prefix first. With pool=1 and every layer routed, the
    query's logits equal the HF model's on [prefix ; 2nd-best doc … ; best doc … ; query] run with a mask in which
    each document sees only itself (as it was encoded) and the prefix no document."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=1, routed_layers="all", topk="all", prefix=prefix, score="cosine", route="layer")
    assert compiled.program.signature["msa"]["positions"] == "contiguous"
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    docs = [tokens(7, 30), tokens(4, 31), tokens(6, 32)]
    bank = model.encode(docs)
    order = [2, 0, 1]  # routing order, forced: the best document first
    monkeypatch.setattr(msa_ops, "route_ref", lambda q, *a: torch.tensor([[1.0, 0.0, 2.0]]).expand(q.shape[0], 3))
    head, question = tokens(prefix, 33), tokens(5, 34)
    got = model.query(bank, torch.tensor([head + question]))
    assert all(d.tolist() == [order] for d in got.docs.values())
    assert got.positions.tolist() == [list(range(prefix)) + list(range(prefix + 17, prefix + 22))]  # 17: every document's tokens
    laid = [docs[int(bank.docs[d])] for d in order]  # the bank's document d has the id it was given (encode sorts by length)
    ids = torch.tensor([head + [t for doc in laid for t in doc] + question])
    lengths = [prefix] * bool(prefix) + [len(doc) for doc in laid]
    want = compiled.original(ids, attention_mask=_blocks(lengths, len(question))).logits[:, -len(question) :]
    torch.testing.assert_close(got.logits[:, prefix:], want)
    glob = MsaModel(compiled.program.ep, compiled.program.signature, positions="global").query(bank, torch.tensor([head + question]))
    assert glob.positions.tolist() == [list(range(prefix)) + list(range(prefix + 3, prefix + 8))]  # the paper's: prefix + k
    assert (glob.logits - got.logits).abs().max() > 1e-3


def test_a_bank_encoded_after_the_prefix_reads_one_document_as_the_dense_prompt(tmp_path):
    """Documents encoded after the template prefix (pool=1, every layer routed, one document): the query's logits are the
    dense model's on [prefix ; document ; question], which documents encoded alone are not. The bank keeps its prefix on
    disk, and a query or an added document with another prefix is refused."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=1, routed_layers="all", topk="all", prefix=4)
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    head, doc, question = tokens(4, 50), tokens(9, 51), tokens(5, 52)
    want = compiled.original(torch.tensor([head + doc + question])).logits[:, -5:]
    bank = memory_bank.load(model.encode([doc], prefix=head).save(tmp_path / "bank"), model=model.facts)
    assert bank.prefix == head
    torch.testing.assert_close(model.query(bank, torch.tensor([head + question])).logits[:, 4:], want)
    alone = model.query(model.encode([doc]), torch.tensor([head + question])).logits[:, 4:]
    assert (alone - want).abs().max() > 1e-3
    with pytest.raises(LccError, match=r"encoded after the prefix \[.*\]; start each query with it"):
        model.query(bank, torch.tensor([tokens(4, 53) + question]))
    with pytest.raises(LccError, match="encoded after another prefix"):
        model.encode([doc], ids=["again"], bank=bank, prefix=tokens(4, 53))
    with pytest.raises(LccError, match="a prefix of 2 tokens to encode after, but the artifact was converted with --opt prefix=4"):
        model.encode([doc], prefix=head[:2])


def test_contiguous_positions_count_pooled_chunks_whole():
    """With pool P a document takes P positions per chunk (its last, partial chunk too); the query of the k=2 longest starts after them."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=4, routed_layers="upper", topk="2")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    bank = model.encode([tokens(5, 40), tokens(9, 41), tokens(3, 42)])  # 2, 3 and 1 chunks
    assert model.gap(LocalMemory.of(bank), 2) == 4 * (3 + 2)
    assert model.query(bank, torch.tensor([tokens(3, 43)])).positions.tolist() == [[20, 21, 22]]
    with pytest.raises(LccError, match="invalid positions='dense': expected contiguous or global"):
        MsaModel(compiled.program.ep, compiled.program.signature, positions="dense")


def test_generation_equals_dense_greedy_decoding():
    """Decode continues the query's assembled context: with the exactness settings, greedy tokens equal the
    dense model's greedy continuation of [document ; query] (recomputed in full each step)."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=1, routed_layers="all", topk="all")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    doc, question = tokens(9, 4), torch.tensor([tokens(4, 5)])
    got, result = model.generate(model.encode([doc]), question, 6, position_ids=torch.arange(9, 13)[None])
    ids = torch.cat([torch.tensor([doc]), question], dim=1)
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, compiled.original(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert got == ids[:, 13:].tolist()
    assert len(result.context) == 2 and result.context[0][0].shape[2] == 9 + 4 + 5  # memory, query, 5 decoded


def test_encode_pools_the_dense_keys_of_each_document_alone():
    """The bank holds, per routed layer, chunk means of the K each document gets when run alone
    (positions from 0, partial last chunk averaged over its real tokens), and the document index."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=4, routed_layers="upper")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    docs = [tokens(6, 2), tokens(9, 3)]
    bank = model.encode(docs, ids=["a", "b"], batch_size=2)
    assert bank.layers == [1] and bank.docs == ["a", "b"] and bank.chunk_doc.tolist() == [0, 0, 1, 1, 1]
    attn = compiled.original.model.layers[1].self_attn
    seen = {}
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    try:
        for d, doc in enumerate(docs):
            compiled.original(torch.tensor([doc]))
            raw = seen["k"].view(1, len(doc), -1, attn.head_dim).transpose(1, 2)  # before RoPE: compare the router keys
            router = torch.nn.functional.linear(compiled.original.model.layers[1].input_layernorm(_hidden(compiled, doc)), attn.k_proj.weight)
            router = router.view(1, len(doc), -1, attn.head_dim).transpose(1, 2)
            torch.testing.assert_close(router, raw)  # router_k_proj starts as a copy of k_proj
            want = torch.stack([router[0, :, c : c + 4].mean(1) for c in range(0, len(doc), 4)], dim=1)
            torch.testing.assert_close(bank.router_keys[1][:, bank.chunk_doc == d], want)
    finally:
        hook.remove()


def _hidden(compiled, doc):
    """The residual stream entering layer 1 of the HF model for ``doc`` alone."""
    out = compiled.original(torch.tensor([doc]), output_hidden_states=True)
    return out.hidden_states[1]


def test_routing_picks_the_documents_route_ref_ranks_first(monkeypatch):
    """With many documents the query attends over the top-k by the reference scores, per routed layer."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=2, routed_layers="all", topk="2", score="dot", route="layer")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    bank = model.encode([tokens(3 + i, 10 + i) for i in range(6)])
    calls = []
    reference = msa_ops.route_ref
    monkeypatch.setattr(msa_ops, "route_ref", lambda *a: calls.append(a) or reference(*a))
    result = model.query(bank, torch.tensor([tokens(4, 99)]))
    assert len(calls) == 2 and calls[0][5] is False  # dot scores
    for site, args in zip(bank.layers, calls, strict=True):
        scores = reference(*args)
        assert result.docs[site].tolist() == [scores.topk(2).indices[0].tolist()]


def test_bank_round_trip_gives_identical_logits(tmp_path):
    compiled = lcc.compile("tiny-llama", to="msa", pool=2, routed_layers="upper", topk="2", prefix=2)
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    bank = model.encode([tokens(5, 20), tokens(8, 21), tokens(2, 22)], ids=["x", "y", "z"])
    question = torch.tensor([tokens(6, 23)])
    want = model.query(bank, question)
    bank.save(tmp_path / "bank")
    got = model.query(memory_bank.load(tmp_path / "bank", model=model.facts), question)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    tiered = bank.placed(router="cpu", kv="cpu", pin=True)  # router keys and K/V tiers (one device here)
    torch.testing.assert_close(model.query(tiered, question).logits, want.logits, rtol=0, atol=0)
    loaded = lcc.load(compiled.save(tmp_path / "model.lcc"))  # the artifact runs the same query
    torch.testing.assert_close(MsaModel(loaded.program, loaded.signature).query(bank, question).logits, want.logits, rtol=0, atol=0)
    other = lcc.compile("tiny-llama", to="msa", pool=4, routed_layers="upper")
    with pytest.raises(LccError, match="encoded with pool=2, but this model has pool=4"):
        MsaModel(other.program.ep, other.program.signature).query(memory_bank.load(tmp_path / "bank"), question)


def test_refusals():
    with pytest.raises(LccError, match="routed_layers=7: layer 7 is out of range"):
        lcc.compile("tiny-llama", to="msa", routed_layers="7")
    with pytest.raises(LccError, match="invalid --opt pool=0"):
        lcc.compile("tiny-llama", to="msa", pool=0)
    with pytest.raises(LccError, match="fused qkv projections are not supported yet"):
        lcc.compile("tiny-gpt2", to="msa")
    with pytest.raises(LccError, match="not an msa form"):
        dense = lcc.compile("tiny-llama")
        MsaModel(dense.program.ep, dense.program.signature)


def test_verify_checks_the_query_program_against_dense():
    """Exactness-configured (pool=1, every layer routed) verify passes; pooled memory is reported, not judged."""
    report = lcc.verify("tiny-qwen2", to="msa", pool=1, routed_layers="all", lengths=(2, 9))
    assert report.exact and report.passed and all(c.hit == 1.0 for c in report.cases)
    report = lcc.verify("tiny-qwen2", to="msa", pool=4, topk="2", lengths=(9,))
    assert not report.exact and not report.passed and report.max_abs > 1e-3
    assert all(c.hit is not None for c in report.cases)


def test_router_training_with_the_auxiliary_loss_fixes_routing():
    """Copied routers miss; after InfoNCE on the document scores (backbone frozen) each question routes to its
    document in every routed layer, and a bank encoded with the old router keys is refused."""
    from longctx_compile.forms.msa.router import train_router

    compiled = lcc.compile("tiny-llama", to="msa", pool=2, routed_layers="all", topk="1", recipe="paper")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    docs = [tokens(8, 30 + i) for i in range(12)]
    questions = [d[:3] for d in docs]
    frozen = {n: t.clone() for n, t in model.state.items() if "router" not in n}

    def hits(bank):
        results = [model.query(bank, torch.tensor([q])) for q in questions]
        return sum(all(r.docs[layer][0, 0] == i for layer in model.layers) for i, r in enumerate(results)) / len(questions)

    old = model.encode(docs)
    before = hits(old)
    log = train_router(model, docs, questions, list(range(12)), steps=60, lr=3e-3)
    assert before < 0.5 and hits(model.encode(docs)) == 1.0
    assert float(log[-1].split()[-1]) < float(log[0].split()[-1])
    assert all(torch.equal(model.state[n], t) for n, t in frozen.items())  # only the routers moved
    with pytest.raises(LccError, match="encoded with weights="):
        model.query(old, torch.tensor([questions[0]]))


def test_router_init_k_makes_a_token_match_itself():
    """router_init=k: both routers come from k_proj (query heads repeat their KV head's rows), so with cosine scores
    a one-token question scores 1.0 on the chunk holding that token; qk (the paper's) copies q_proj and k_proj."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=1, routed_layers="all", router_init="k", score="cosine", route="layer")
    state = compiled.program.ep.state_dict
    k_proj = state["model.model.layers.0.self_attn.k_proj.weight"]  # the capture wrapper adds "model."; router names follow HF checkpoints
    router_q = state["model.layers.0.self_attn.router_q_proj.weight"]
    torch.testing.assert_close(router_q, k_proj.view(2, -1, k_proj.shape[-1]).repeat_interleave(2, dim=0).reshape(router_q.shape))
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    bank = model.encode([[5, 6, 7], [8, 9, 10]])
    assert model.query(bank, torch.tensor([[9]])).scores[0].max().item() == pytest.approx(1.0, abs=1e-5)
    default = lcc.compile("tiny-llama", to="msa", recipe="paper").program.ep.state_dict
    torch.testing.assert_close(default["model.layers.1.self_attn.router_q_proj.weight"], default["model.model.layers.1.self_attn.q_proj.weight"])


class NoPositions(torch.nn.Module):
    """Takes position_ids but never uses them: document-wise positions could not apply."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, input_ids, position_ids=None):
        x = self.emb(input_ids)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.transpose(1, 2).reshape(B, T, 16))


def test_doc_rope_refuses_a_model_whose_q_k_ignore_position_ids():
    with pytest.raises(LccError, match=r"its q does not depend on position_ids, so documents cannot restart their positions \(doc_rope\)"):
        lcc.compile(NoPositions(), to="msa", routed_layers="all", position_ids=True)
    compiled = lcc.compile("tiny-llama", to="msa", positions="global")
    assert compiled.program.signature["msa"]["positions"] == "global"
    (record,) = [r for r in compiled.program.history if r.name == "doc_rope"]
    assert record.notes == ["documents from position 0; the query from prefix + k = 16 (positions=global)"]
    (record,) = [r for r in lcc.compile("tiny-llama", to="msa").program.history if r.name == "doc_rope"]
    assert record.notes[1] == "positions=contiguous (a model not trained on memory)"
    assert all(n.meta["lcc"].get("doc_rope") for n in compiled.program.attention_nodes() if n.meta["lcc"].get("routed"))


def test_headwise_scores_standardise_each_tokens_matches_then_take_the_best_token_per_head():
    """route_headwise against loops: per query head and routing token, each document's best cosine over its chunks,
    as a z-score over the documents that have chunks; then the best routing token, then the mean over heads (-inf for
    a document without chunks). Tiling over the bank changes nothing."""
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)  # 4 query heads over 2 KV heads
    routes = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    chunk_doc = torch.tensor([0, 0, 1, 1, 1, 3, 3])  # document 2 has no chunk
    got = msa_ops.route_headwise(q, routes, keys, chunk_doc, 4)
    cos = torch.nn.functional.cosine_similarity
    for b in range(2):
        assert got[b, 2] == float("-inf")
        want = torch.zeros(3)
        for h in range(4):
            tokens_z = []
            for t in [t for t in range(5) if routes[b, t]]:
                best = torch.tensor([max(float(cos(q[b, h, t], keys[h // 2, c], dim=0)) for c in (chunk_doc == d).nonzero().flatten()) for d in (0, 1, 3)])
                tokens_z.append((best - best.mean()) / best.std(unbiased=False))
            want += torch.stack(tokens_z).amax(0) / 4
        torch.testing.assert_close(got[b, [0, 1, 3]], want)
    old, msa_ops.ROUTE_TILE = msa_ops.ROUTE_TILE, 3
    try:
        torch.testing.assert_close(msa_ops.route_headwise(q, routes, keys, chunk_doc, 4), got)
    finally:
        msa_ops.ROUTE_TILE = old


def test_shared_routing_gives_every_layer_the_voters_documents():
    """route=0 (the retrofit's shared routing, one voter): every routed layer attends over the top-k of layer 0's
    headwise scores of the query alone, which an independent computation from the HF model's own layer-0 input gives."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=2, topk="2", route="0")
    assert compiled.program.signature["msa"]["route"] == [0] and compiled.program.signature["msa"]["score"] == "headwise"
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    bank = model.encode([tokens(6 + i, 60 + i) for i in range(5)])
    question = tokens(4, 70)
    result = model.query(bank, torch.tensor([question]))
    layer = compiled.original.model.layers[0]
    h = layer.input_layernorm(compiled.original.model.embed_tokens(torch.tensor([question])))
    router_q = torch.nn.functional.linear(h, model.state["model.layers.0.self_attn.router_q_proj.weight"]).view(1, 4, -1, 16).transpose(1, 2)
    want = msa_ops.route_headwise(router_q, torch.ones(1, 4), bank.router_keys[0], bank.chunk_doc, 5).topk(2).indices
    assert result.docs[0].tolist() == result.docs[1].tolist() == want.tolist()
    with pytest.raises(LccError, match="invalid --opt route=1: layer 1 votes but is not routed"):
        lcc.compile("tiny-llama", to="msa", routed_layers="0", route="1")
