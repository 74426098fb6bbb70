"""``lcc train`` on msa: documents encoded into pooled memory and a query answered over it, with gradients through the
pooled keys and values into the backbone, against the HF source model; the router loss; examples; the CLI."""

from __future__ import annotations

import json

import lcc_cli
import pytest
import torch
from rank_steps import memory_parallel_step

import longctx_compile as lcc
from longctx_compile import artifact
from longctx_compile.forms.msa.runtime import LocalMemory, MsaModel
from longctx_compile.forms.msa.train import Example, MsaTrainConfig, MsaTrainer, TrainingMemory, example_stream, router_loss
from longctx_compile.runtime.train import TrainConfig, run

EXACT = dict(to="msa", pool=1, topk="all", routed_layers="all")


def _example(g: torch.Generator, docs: int, length: int = 12) -> Example:
    documents = torch.randint(3, 250, (docs, length), generator=g).tolist()
    return Example(documents, documents[-1][4:7], documents[-1][7:10], [docs - 1])


@pytest.mark.parametrize("objective", ["lm", "distill"])
def test_one_document_unpooled_trains_as_the_dense_prompt_does(objective):
    """Pool 1 and one document laid out before the query: MSA's answer is the source model's over
    ``[document ; query ; answer]``, so the LM loss and every backbone gradient (reaching the document's tokens through
    the encoded keys and values) equal the HF model's, by autograd. Distilling, the loss and its gradient are 0."""
    compiled = lcc.compile("tiny-llama", **EXACT)
    trainer = MsaTrainer(compiled.program.ep, compiled.program.signature, TrainConfig(objective=objective, trainable="all", length=12), MsaTrainConfig(aux=0))
    leaves = trainer.leaves()
    e = _example(torch.Generator().manual_seed(0), 1)
    loss = trainer.loss([e])
    names = [n for n in leaves if "router" not in n]
    got = torch.autograd.grad(loss, [leaves[n] for n in names])
    if objective == "distill":
        assert abs(loss.item()) < 1e-6 and max(g.abs().max() for g in got) < 1e-5
        return
    model = compiled.original
    ids = torch.tensor([e.documents[0] + e.query + e.answer[:-1]])
    logits = model(ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0, -len(e.answer) :]
    want_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(e.answer))
    params = dict(model.named_parameters())
    want = torch.autograd.grad(want_loss, [params[n.removeprefix("model.")] for n in names])
    torch.testing.assert_close(loss, want_loss)
    assert all(w.abs().max() > 0 for w in want)
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_documents_encoded_after_a_template_prefix_train_as_the_dense_prompt_does():
    """A record's prefix (a chat header) is what its documents are encoded after and its query starts with: with pool
    1 the loss equals the source model's over ``[prefix ; document ; rest of the query ; answer]``."""
    compiled = lcc.compile("tiny-llama", **EXACT, prefix=3)
    trainer = MsaTrainer(compiled.program.ep, compiled.program.signature, TrainConfig(objective="lm", trainable="all", length=12), MsaTrainConfig(aux=0))
    trainer.leaves()
    e = _example(torch.Generator().manual_seed(5), 1)
    e.prefix, e.query = [7, 8, 9], [7, 8, 9, *e.query]
    ids = torch.tensor([e.prefix + e.documents[0] + e.query[3:] + e.answer[:-1]])
    with torch.no_grad():
        logits = compiled.original(ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0, -len(e.answer) :]
        torch.testing.assert_close(trainer.loss([e]), torch.nn.functional.cross_entropy(logits, torch.tensor(e.answer)))


def test_the_router_loss_is_infonce_with_other_positives_left_out():
    """Each positive against the negatives alone (the paper's decoupled variant), averaged; written out by hand."""
    scores = torch.tensor([0.3, -1.2, 2.0, 0.5, -0.1])
    t = 0.1
    z = (scores / t).exp()
    negatives = z[[1, 3, 4]].sum()
    want = -((z[0] / (z[0] + negatives)).log() + (z[2] / (z[2] + negatives)).log()) / 2
    torch.testing.assert_close(router_loss(scores, [0, 2], t), want)
    torch.testing.assert_close(router_loss(scores, [2], t), -(z[2] / z[[1, 2, 3, 4, 0]].sum()).log())


def test_gold_selection_puts_the_positives_in_every_layers_top_k():
    """With ``select=gold`` the positive is read in every routed layer whatever the routers score; with ``routed`` the
    layers read what plain routing reads."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=4, topk="1", routed_layers="all")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    g = torch.Generator().manual_seed(3)
    docs = torch.randint(3, 250, (4, 12), generator=g).tolist()
    bank = model.encode(docs)
    query = torch.tensor([docs[0][2:6]])
    plain = model.query(bank, query).docs
    outsider = next(d for d in range(4) if all(d not in chosen[0].tolist() for chosen in plain.values()))
    forced = model.query(TrainingMemory(bank, [outsider], force=True), query).docs
    assert all(chosen[0].tolist() == [outsider] for chosen in forced.values())
    routed = model.query(TrainingMemory(bank, [outsider], force=False), query).docs
    assert {k: v.tolist() for k, v in routed.items()} == {k: v.tolist() for k, v in plain.items()}
    assert isinstance(TrainingMemory(bank, [0], True), LocalMemory)


@pytest.mark.parametrize(
    ("options", "objective", "select"),
    [
        (dict(score="headwise", positions="contiguous", route="lower"), "lm", "routed"),
        (dict(score="dot", positions="global", route="layer"), "distill", "gold"),
    ],
    ids=["headwise-contiguous-shared-routed", "dot-global-gold-distill"],
)
def test_memory_parallel_training_on_two_ranks_has_one_process_gradients(options, objective, select, tmp_path):
    """Each example's documents sharded over 2 gloo processes (uneven shards), every rank answering the query over the
    sharded bank: the loss and every parameter's gradient summed over the ranks equal one process's, so the answer's
    and router's losses reach the documents on the other rank through the collectives' gradients (routers included)."""
    from longctx_compile.distributed.ranks import spawn

    compiled = lcc.compile("tiny-llama", to="msa", pool=2, topk="2", routed_layers="all", router_init="qk", **options)
    path = compiled.save(tmp_path / "m.lcc")
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (9, 4, 13, 6, 3)]
    batch = [Example(docs, docs[2][3:8], docs[2][8:11], [2]), Example(docs[:4], docs[0][1:5], docs[0][5:8], [0, 3])]
    cfg = TrainConfig(objective=objective, trainable="all", length=16)
    opts = MsaTrainConfig(aux=0.5, select=select)
    trainer = MsaTrainer(compiled.program.ep, compiled.program.signature, cfg, opts)
    leaves = trainer.leaves()
    loss = trainer.loss(batch)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), strict=True))
    sharded_loss, sharded = spawn(memory_parallel_step, path, 2, dict(cfg=cfg, opts=opts, batch=batch), loaded=False)
    assert loss.item() > 1e-3
    torch.testing.assert_close(torch.tensor(sharded_loss, dtype=torch.float32), loss.detach())
    routers = [n for n in grads if "router" in n and grads[n] is not None]  # the scoring layers' (the voters', when shared)
    assert len(routers) >= 2 and all(grads[n].abs().max() > 0 for n in routers)
    for name, grad in grads.items():
        if grad is None:
            assert sharded[name] is None, name
        else:
            torch.testing.assert_close(sharded[name], grad, msg=lambda m, n=name: f"{n}: {m}")


def test_training_the_routers_alone_fits_them_to_the_positives():
    """``--trainable new`` with the router loss: routers that start at chance (``router_init=qk`` on a random model)
    come to rank each example's positive first in every layer (a broken gradient path, or a loss on the wrong
    document, would leave them at chance)."""
    compiled = lcc.compile("tiny-llama", to="msa", pool=4, topk="1", routed_layers="all", router_init="qk", route="layer")
    cfg = TrainConfig(objective="lm", trainable="new", length=16, batch=4, steps=40, lr=3e-2)
    opts = MsaTrainConfig(docs=6, query=4, answer=1, aux=1.0)
    trainer = MsaTrainer(compiled.program.ep, compiled.program.signature, cfg, opts)
    batch = example_stream("synthetic", None, compiled.program.signature, cfg, opts)(0)

    def hits() -> int:
        m, found = trainer.model, 0
        for e in batch:
            bank = m.encode(e.documents, ids=[str(i) for i in range(len(e.documents))])
            docs = m.query(bank, torch.tensor([e.query])).docs
            found += sum(chosen[0].tolist() == [bank.docs.index(str(e.positives[0]))] for chosen in docs.values())
        return found

    before = hits()
    result = run(trainer, lambda step: batch)  # the answer's loss does not reach the routers
    with torch.no_grad():
        for name, value in result["trained"].items():
            trainer.model.state[name].copy_(value)
    assert before <= 4 and hits() == 8 and result["summary"]["last_loss"] < result["summary"]["first_loss"]


def test_examples_from_records_and_from_a_corpus(tmp_path):
    """Records give their own banks; a corpus gives banks of windows whose query is a span of the positive and whose
    answer follows it; both are seeded by the step."""
    compiled = lcc.compile("tiny-llama", **EXACT)
    signature = compiled.program.signature
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"documents": [[5, 6, 7], [8, 9]], "query": [6], "answer": [7], "positive": 0}) + "\n")
    cfg = TrainConfig(length=10, batch=2)
    batch = example_stream(str(records), None, signature, cfg, MsaTrainConfig())(0)
    assert batch[0] == Example([[5, 6, 7], [8, 9]], [6], [7], [0])
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"tokens": list(range(10, 110))}) + "\n")
    opts = MsaTrainConfig(docs=3, query=2, answer=3)
    stream = example_stream(str(corpus), None, signature, cfg, opts)
    for e in stream(4):
        doc = e.documents[e.positives[0]]
        assert len(e.documents) == 3 and all(len(d) == 10 for d in e.documents)
        at = doc.index(e.query[0])
        assert doc[at : at + 5] == e.query + e.answer
    assert stream(4) == stream(4) and stream(4) != stream(5)


def test_lcc_train_on_an_msa_artifact_writes_trained_weights_and_refuses_bad_input(tmp_path):
    """The CLI end to end (records, ``--opt``), the source untouched, and bad input in one line each."""
    path = lcc.compile("tiny-llama", to="msa", pool=2, topk="1").save(tmp_path / "m.lcc")
    before = {f.name: artifact.sha256(f) for f in path.iterdir() if f.is_file()}
    g = torch.Generator().manual_seed(1)
    records = tmp_path / "r.jsonl"
    lines = []
    for _ in range(4):
        e = _example(g, 3)
        lines.append(json.dumps({"documents": e.documents, "query": e.query, "answer": e.answer, "positive": e.positives}))
    records.write_text("\n".join(lines))
    result = lcc_cli.run(
        "train", path, "--data", records, "--steps", "3", "--trainable", "all", "--opt", "aux=0.5", "--opt", "select=routed", "-o", tmp_path / "t.lcc"
    )
    assert result.returncode == 0, result.stderr
    assert {f.name: artifact.sha256(f) for f in path.iterdir() if f.is_file()} == before
    trained = lcc.load(tmp_path / "t.lcc")
    assert trained.manifest["signature"]["train"][-1]["options"] == {"aux": "0.5", "select": "routed"}
    ids = torch.tensor([[5, 9, 13, 200, 7]])
    assert (trained(ids) - lcc.load(path)(ids)).abs().max() > 1e-4
    # a real launch: two gloo processes share each bank (Memory Parallel) and end where one process ends
    two = lcc_cli.run(
        "train",
        path,
        "--data",
        records,
        "--steps",
        "3",
        "--trainable",
        "all",
        "--opt",
        "aux=0.5",
        "--opt",
        "select=routed",
        "--nproc",
        "2",
        "-o",
        tmp_path / "t2.lcc",
    )
    assert two.returncode == 0, two.stderr
    a, b = (artifact.read_program(p, artifact.read_manifest(p)).state_dict for p in (tmp_path / "t.lcc", tmp_path / "t2.lcc"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=lambda m, n=name: f"{n}: {m}")
    assert lcc.load(tmp_path / "t2.lcc").manifest["signature"]["train"][-1]["ranks"] == {"nproc": 2}
    hsa = lcc.compile("tiny-llama", **{"to": "hsa", "chunk": "4"}).save(tmp_path / "h.lcc")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"documents": [[1, 2]], "query": [1], "positive": 0}))
    stray = tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({"documents": [[1, 2]], "prefix": [4, 5], "query": [1, 2], "answer": [3], "positive": 0}))
    headed = lcc.compile("tiny-llama", to="msa", pool=2, topk="1", prefix=2).save(tmp_path / "p.lcc")
    out = tmp_path / "x.lcc"
    for args, message in [
        ((path, "--data", records, "--opt", "bogus=1"), "unknown --opt 'bogus'"),
        ((path, "--data", records, "--opt", "select=maybe"), "expected one of gold, routed"),
        ((path, "--data", bad), '"answer" and "positive"'),
        ((path, "--data", "passkey"), "msa trains on documents and queries"),
        ((path, "--data", records, "--nproc", "4"), "a bank of the training data holds only 3"),
        ((path, "--data", records, "--nproc", "2", "--sp", "ring"), "--sp ring lays out token windows"),
        ((path, "--data", records, "--tile", "4"), "--tile, --recompute"),
        ((path, "--data", records, "--opt", "aux=0"), "reaches the"),
        ((hsa, "--data", "synthetic", "--opt", "select=routed"), "unknown --opt 'select'; valid options: aux, temperature"),
        ((path, "--data", stray), "must start with the"),
        ((headed, "--data", "synthetic"), "template prefix"),
    ]:
        result = lcc_cli.run("train", *args, "--steps", "1", "-o", out)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, (args, result.stderr)
        assert not out.exists()
