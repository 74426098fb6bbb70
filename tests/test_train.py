"""``lcc train``: a converted program adapted in its form, against independent references (the HF source model's
logits, a hand-written KL), resumed bit for bit, written to a new artifact with the source untouched."""

from __future__ import annotations

import copy
import json

import lcc_cli
import pytest
import torch
from rank_steps import sharded_step

import longctx_compile as lcc
from longctx_compile import artifact
from longctx_compile.errors import LccError
from longctx_compile.runtime.train import ProgramTrainer, TrainConfig, distill_loss, trainable_names

LEARNED = dict(to="hsa", chunk="4", topk="1", window="0", score="learned")


def test_distillation_is_zero_where_the_form_is_the_dense_model():
    """Every chunk selected and weighed by its true LSE: the program is its own teacher, so the loss and its gradient vanish."""
    compiled = lcc.compile("tiny-llama", to="hsa", chunk="4", topk="all", window="1", score="exact", fusion="softmax")
    trainer = ProgramTrainer(compiled.program.ep, compiled.program.signature, TrainConfig(trainable="norms", length=24))
    leaves = trainer.leaves()
    loss = trainer.loss(torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)))
    assert abs(loss.item()) < 1e-6  # fp32: the two attention references differ in the last bits
    assert max(g.abs().max() for g in torch.autograd.grad(loss, list(leaves.values()))) < 1e-5
    logits = torch.randn(3, 5, 11)
    assert distill_loss(logits, logits.log_softmax(-1)) == 0


def test_one_steps_gradients_equal_a_hand_written_reference():
    """The distillation gradient of the learned projections equals KL(HF source model ‖ the compiled program), written
    out by hand, through autograd: the teacher is the unconverted model, not lcc's dense stand-in."""
    compiled = lcc.compile("tiny-llama", **LEARNED)
    with torch.no_grad():  # projections that are not the identity, so the learned scores differ from landmarks
        for name, p in compiled.module.named_parameters():
            if "hsa_retrieval" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) / 3)
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(1))
    trainer = ProgramTrainer(compiled.program.ep, compiled.program.signature, TrainConfig(length=29))
    assert trainer.names == compiled.program.signature["new_parameters"] and len(trainer.names) == 4
    leaves = trainer.leaves()
    got = torch.autograd.grad(trainer.loss(ids), [leaves[n] for n in trainer.names])

    params = dict(compiled.module.named_parameters())
    chosen = [params[n] for n in trainer.names]
    for p in params.values():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    with torch.no_grad():
        teacher = compiled.original(ids, position_ids=torch.arange(29)[None].expand(2, -1)).logits.log_softmax(-1)
    student = compiled(ids).log_softmax(-1)
    want = torch.autograd.grad((teacher.exp() * (teacher - student)).sum(-1).mean(), chosen)
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 1e-7  # the projections do reach the loss
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tile", [0, 8])
def test_the_teacher_is_the_source_model_not_the_weights_being_trained(tile):
    """Training every weight of a dense program, the teacher stays the source: once the weights move, the loss is
    KL(source ‖ moved model) (before the fix the teacher read the moved weights, so distilling a dense program was 0)."""
    compiled = lcc.compile("tiny-llama")
    trainer = ProgramTrainer(compiled.program.ep, compiled.program.signature, TrainConfig(trainable="all", length=16, tile=tile))
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    leaves = trainer.leaves()
    assert abs(trainer.loss(ids).item()) < 1e-6
    with torch.no_grad():
        for name, leaf in leaves.items():
            leaf.add_(torch.randn(leaf.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    moved = copy.deepcopy(compiled.original)  # the HF source model, and a copy holding the moved weights
    with torch.no_grad():
        for name, param in moved.named_parameters():
            param.copy_(leaves[f"model.{name}"])  # the program captured a wrapper around the HF model
        teacher, student = (m(ids, position_ids=torch.arange(16)[None]).logits[0] for m in (compiled.original, moved))
    torch.testing.assert_close(trainer.loss(ids), distill_loss(student, teacher.log_softmax(-1)))


def test_trainable_selections():
    compiled = lcc.compile("tiny-llama", **LEARNED)
    ep, signature = compiled.program.ep, compiled.program.signature
    every = trainable_names(ep, signature, "all")
    assert set(trainable_names(ep, signature, "new")) == set(signature["new_parameters"]) < set(every)
    assert trainable_names(ep, signature, "norms") and all("norm" in n for n in trainable_names(ep, signature, "norms"))
    layer1 = trainable_names(ep, signature, "layers=1")
    assert layer1 and all(n.startswith("model.layers.1.") for n in layer1) and "model.layers.1.self_attn.hsa_retrieval_q" in layer1
    for spec, message in [("layers=5", "layers 0..1"), ("bogus", "invalid --trainable 'bogus'"), ("layers=a", "layer indices")]:
        with pytest.raises(LccError, match=message):
            trainable_names(ep, signature, spec)
    plain = lcc.compile("tiny-llama", to="hsa", chunk="4")
    with pytest.raises(LccError, match="the hsa form added no parameters"):
        trainable_names(plain.program.ep, plain.program.signature, "new", "hsa")


@pytest.fixture(scope="module")
def learned_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "a.lcc"
    lcc.compile("tiny-llama", **LEARNED).save(path)
    return path


def test_train_writes_a_new_artifact_and_leaves_the_source(learned_artifact, tmp_path):
    """The LM objective on a repeating text, everything trainable: the loss falls, the new artifact loads and carries the
    trained weights and a record of the run, and the source's files are byte for byte what they were."""
    before = {f.name: artifact.sha256(f) for f in learned_artifact.iterdir() if f.is_file()}
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"tokens": [5, 9, 13, 200, 7, 7, 42, 3] * 8}) for _ in range(3)))
    rows = []
    summary = lcc.train(
        learned_artifact,
        str(data),
        tmp_path / "b.lcc",
        objective="lm",
        trainable="all",
        steps=12,
        length=32,
        lr=3e-3,
        metrics=tmp_path / "m.jsonl",
        progress=rows.append,
    )
    assert summary["last_loss"] < 0.7 * summary["first_loss"] and [r["step"] for r in rows] == list(range(1, 13))
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 12 and not (tmp_path / "b.lcc.train.pt").exists()
    assert {f.name: artifact.sha256(f) for f in learned_artifact.iterdir() if f.is_file()} == before
    trained = lcc.load(tmp_path / "b.lcc")
    assert trained.manifest["signature"]["train"][-1]["objective"] == "lm"
    ids = torch.tensor([[5, 9, 13, 200, 7, 7, 42, 3] * 3])
    assert (trained(ids) - lcc.load(learned_artifact)(ids)).abs().max() > 1e-2


def test_a_resumed_run_ends_where_an_uninterrupted_one_ends(learned_artifact, tmp_path):
    options = dict(steps=6, length=24, batch=2, accumulate=2, lr=1e-2, trainable="new")
    lcc.train(learned_artifact, "synthetic", tmp_path / "whole.lcc", **options)

    def interrupt(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lcc.train(learned_artifact, "synthetic", tmp_path / "cut.lcc", save_every=3, progress=interrupt, **options)
    assert not (tmp_path / "cut.lcc").exists() and (tmp_path / "cut.lcc.train.pt").exists()
    with pytest.raises(LccError, match="pass --resume"):
        lcc.train(learned_artifact, "synthetic", tmp_path / "cut.lcc", **options)
    with pytest.raises(LccError, match="another artifact, data or set of options"):
        lcc.train(learned_artifact, "synthetic", tmp_path / "cut.lcc", resume=True, **{**options, "lr": 2e-2})
    lcc.train(learned_artifact, "synthetic", tmp_path / "cut.lcc", resume=True, **options)
    whole, cut = (artifact.read_program(p, artifact.read_manifest(p)).state_dict for p in (tmp_path / "whole.lcc", tmp_path / "cut.lcc"))
    new = lcc.load(learned_artifact).manifest["signature"]["new_parameters"]
    assert all(torch.equal(whole[n], cut[n]) for n in whole) and not torch.equal(whole[new[0]], torch.eye(16).repeat(2, 1, 1))


def _uneven_gradients(path, payload, degree, rank):
    """Leaf a has a gradient on rank 0 only, b on every rank, c on none."""
    from longctx_compile.runtime.train import _summed

    leaves = {name: torch.zeros(3, requires_grad=True) for name in "abc"}
    if rank == 0:
        leaves["a"].grad = torch.ones(3)
    leaves["b"].grad = torch.full((3,), rank + 1.0)
    return _summed(leaves, float(rank)), {name: leaf.grad for name, leaf in leaves.items()}


def test_a_gradient_on_some_ranks_only_is_summed_as_zero_elsewhere():
    """Before the fix a rank without a leaf's gradient skipped its all-reduce, so the ranks' collectives paired up wrong
    (a hang on gloo; here, threads, a shape mismatch)."""
    from longctx_compile.distributed.ranks import spawn

    loss, grads = spawn(_uneven_gradients, "unused", 2, None, ranks="threads", loaded=False)
    assert loss == 1.0 and grads["c"] is None
    torch.testing.assert_close(grads["a"], torch.ones(3))
    torch.testing.assert_close(grads["b"], torch.full((3,), 3.0))


def test_bad_input_is_one_line(learned_artifact, tmp_path):
    dense, msa = tmp_path / "dense.lcc", tmp_path / "msa.lcc"
    lcc.compile("tiny-llama").save(dense)
    lcc.compile("tiny-llama", to="msa").save(msa)
    for args, message in [
        ([learned_artifact, "--data", tmp_path / "none.txt"], "no training data file"),
        ([dense, "--data", "synthetic"], "the dense form added no parameters"),
        ([dense, "--data", "synthetic", "--opt", "aux=1"], "the dense form trains on token windows and takes none"),
        ([learned_artifact, "--data", "synthetic", "--seq-len", "4096"], "exceeds the program's maximum length 512"),
        ([tmp_path, "--data", "synthetic"], "is not an lcc artifact"),
        ([learned_artifact, "--data", "synthetic", "--tile", "-1"], "--tile must be at least 0"),
        ([msa, "--data", "synthetic", "--objective", "lm", "--seq-len", "16", "--opt", "aux=0"], "none of the --trainable new parameters reaches the lm loss"),
    ]:
        result = lcc_cli.run("train", *args, "-o", tmp_path / "out.lcc")
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.lcc").exists()


def test_synthetic_tasks_are_seeded_retrieval_sequences():
    """passkey: the key after its marker twice, the second at the end; kv-recall: the asked key's value is the one
    listed with it. The same step gives the same batch (what resuming relies on), another step another."""
    from longctx_compile.runtime.data import KEY_TOKENS, task_stream

    passkey = task_stream("passkey", 256, 40, 3, 0)
    batch = passkey(7)
    assert torch.equal(batch, passkey(7)) and not torch.equal(batch, passkey(8))
    for row in batch.tolist():
        assert row[-KEY_TOKENS - 1] == 255 and row.count(255) == 2
        first = row.index(255)
        assert row[first + 1 : first + 1 + KEY_TOKENS] == row[-KEY_TOKENS:]
    for row in task_stream("kv-recall", 256, 41, 2, 1)(0).tolist():
        assert row[-3] == 254
        pairs = dict(zip(row[-3 - 2 * 19 : -3 : 2], row[-3 - 2 * 19 + 1 : -3 : 2], strict=True))
        assert len(pairs) == 19 and pairs[row[-2]] == row[-1]
    with pytest.raises(LccError, match="unknown synthetic task"):
        task_stream("copy", 256, 40, 1, 0)
    with pytest.raises(LccError, match="at least 13"):
        task_stream("passkey", 256, 8, 1, 0)


@pytest.mark.parametrize("objective", ["distill", "lm"])
def test_tiled_head_and_recomputed_layers_give_the_same_gradients(objective):
    """Long-sequence options change memory, not math: tiling the head and loss (tiles that split rows unevenly),
    recomputing each layer in the backward, and offloading what it keeps give the plain run's loss and gradients."""
    compiled = lcc.compile("tiny-llama", **LEARNED)
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(2))

    def step(**options):
        trainer = ProgramTrainer(compiled.program.ep, compiled.program.signature, TrainConfig(objective=objective, trainable="all", length=23, **options))
        leaves = trainer.leaves()
        loss = trainer.loss(ids)
        return loss, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    plain_loss, plain = step()
    for options in (dict(tile=7), dict(recompute=True), dict(recompute=True, offload=True), dict(tile=5, recompute=True)):
        loss, grads = step(**options)
        torch.testing.assert_close(loss, plain_loss, msg=lambda m, o=options: f"{o}: {m}")
        assert grads.keys() == plain.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, plain[name], msg=lambda m, o=options, n=name: f"{o} {n}: {m}")


def test_the_cli_trains_tiled_and_recomputed(learned_artifact, tmp_path):
    args = ["--data", "synthetic", "--steps", "2", "--seq-len", "24", "--tile", "10", "--recompute", "--offload", "--objective", "lm"]
    result = lcc_cli.run("train", learned_artifact, *args, "-o", tmp_path / "t.lcc")
    assert result.returncode == 0, result.stderr
    run = lcc.load(tmp_path / "t.lcc").manifest["signature"]["train"][-1]
    assert run["steps"] == 2 and run["objective"] == "lm"
    shown = lcc_cli.run("inspect", tmp_path / "t.lcc")
    assert shown.returncode == 0 and "training runs (lcc train)" in shown.stdout and "synthetic" in shown.stdout


def test_recompute_splits_the_graph_into_one_piece_per_layer():
    from longctx_compile.runtime.recompute import _Recomputed, by_layer

    compiled = lcc.compile("tiny-llama", to="hsa")
    split = by_layer(compiled.program.ep.graph_module)
    recomputed = [name for name, child in split.named_children() if isinstance(child, _Recomputed)]
    assert recomputed == ["submod_1", "submod_2"]  # tiny-llama's two layers; the embedding's piece is kept


@pytest.mark.parametrize(
    ("options", "objective", "tile"),
    [(LEARNED, "distill", 0), (dict(LEARNED, heads="each"), "lm", 6), (dict(LEARNED, landmarks="2", nope="true"), "distill", 0), (dict(to="msa"), "lm", 0)],
    ids=["hsa-learned-distill", "hsa-each-lm-tiled", "hsa-pooled-nope-distill", "msa-lm"],
)
def test_a_form_trained_on_two_ranks_under_ulysses_has_one_process_gradients(options, objective, tile, tmp_path):
    """The form's own attention runs unchanged inside Ulysses (HSA's projections and pooling queries sliced per head, its
    NoPE scoring queries and keys sharded as the queries and keys): the loss and every parameter's gradient summed over
    P=2 ranks equal one process's, for the whole model."""
    from longctx_compile.distributed.ranks import spawn
    from longctx_compile.ops.layout import Layout

    path = lcc.compile("tiny-llama", **options).save(tmp_path / "a.lcc")
    cfg = TrainConfig(objective=objective, trainable="all", length=32, tile=tile)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    manifest = artifact.read_manifest(path)
    trainer = ProgramTrainer(artifact.read_model_program(path, manifest).ep, manifest["signature"], cfg, manifest["form"])
    leaves = trainer.leaves()
    loss = trainer.loss(ids)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), strict=True))  # msa's routers: none
    sharded_loss, sharded = spawn(sharded_step, path, 2, dict(cfg=cfg, layout=Layout(ulysses=2), ids=ids), ranks="threads", loaded=False)
    assert loss.item() > 1e-3
    torch.testing.assert_close(torch.tensor(sharded_loss, dtype=torch.float32), loss.detach())
    assert sharded.keys() == grads.keys() and sum(g is not None for g in grads.values()) >= len(grads) - 4
    assert all(g is not None for n, g in grads.items() if n.endswith("hsa_retrieval_pool"))  # softmax fusion trains the pooling
    for name, g in grads.items():
        if g is None:
            assert sharded[name] is None, name
        else:
            torch.testing.assert_close(sharded[name], g, msg=lambda m, n=name: f"{n}: {m}")


def test_lcc_train_on_two_gloo_processes_ends_where_one_process_ends(learned_artifact, tmp_path):
    """A real launch: two gloo processes train the HSA artifact under Ulysses; the weights they write are the
    single process's (to float summation order), and the run is recorded with its ranks."""
    args = ["--data", "synthetic", "--steps", "2", "--seq-len", "32", "--trainable", "all", "--lr", "1e-3"]
    one = lcc_cli.run("train", learned_artifact, *args, "-o", tmp_path / "one.lcc")
    two = lcc_cli.run("train", learned_artifact, *args, "--nproc", "2", "--sp", "ulysses", "-o", tmp_path / "two.lcc")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = (artifact.read_program(p, artifact.read_manifest(p)).state_dict for p in (tmp_path / "one.lcc", tmp_path / "two.lcc"))
    source = artifact.read_program(learned_artifact, artifact.read_manifest(learned_artifact)).state_dict
    assert any(not torch.equal(a[n], source[n]) for n in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=lambda m, n=name: f"{n}: {m}")
    assert lcc.load(tmp_path / "two.lcc").manifest["signature"]["train"][-1]["ranks"] == {"nproc": 2, "ulysses": 2, "ring": 1}


def test_sequence_parallel_training_refuses_what_cannot_shard_in_one_line(learned_artifact, tmp_path):
    for args, message in [
        (["--nproc", "2", "--seq-len", "31"], "sequence length 31 is not divisible by 2"),
        (["--nproc", "2", "--sp", "ring", "--seq-len", "32"], "only Ulysses (--sp ulysses) shards it"),
        (["--nproc", "3", "--seq-len", "36"], "query heads are not divisible by the sequence-parallel degree 3"),
        (["--nproc", "2", "--sp", "zigzag", "--seq-len", "32"], "unknown --sp 'zigzag'"),
    ]:
        result = lcc_cli.run("train", learned_artifact, "--data", "synthetic", *args, "-o", tmp_path / "out.lcc")
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.lcc").exists()


def test_a_bf16_program_trains_with_fp32_master_weights():
    """A bf16 artifact computes in bf16 and its trainables are fp32 leaves cast per step (this failed with a dtype
    mismatch when the fp32 leaves were fed to the bf16 graph): gradients arrive in fp32 and point where the fp32
    program's do."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    grads = {}
    for dtype in ("bf16", "fp32"):
        compiled = lcc.compile("tiny-llama", **LEARNED, dtype=dtype)
        trainer = ProgramTrainer(compiled.program.ep, compiled.program.signature, TrainConfig(objective="lm", trainable="norms", length=24))
        leaves = trainer.leaves()
        grads[dtype] = torch.cat([g.flatten() for g in torch.autograd.grad(trainer.loss(ids), list(leaves.values()))])
        assert all(leaf.dtype == torch.float32 for leaf in leaves.values())
    assert grads["bf16"].dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0) > 0.95


def test_packed_documents_train_as_if_each_were_alone():
    """Two documents packed into one row (positions restarting, the model's packed-document masking kept): the summed
    next-token loss is the two documents' own, with no target across the boundary; HSA, without document masks, refuses."""
    from longctx_compile.runtime.data import packed_stream

    compiled = lcc.compile("tiny-llama", attention_mask="false")
    cfg = TrainConfig(objective="lm", trainable="norms", length=24, pack=True)
    trainer = ProgramTrainer(compiled.program.ep, compiled.program.signature, cfg)
    trainer.leaves()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 256, (1, 10), generator=g), torch.randint(0, 256, (1, 14), generator=g)
    packed = trainer.loss((torch.cat([a, b], 1), torch.cat([torch.arange(10), torch.arange(14)])[None]))
    alone = [trainer.loss(x) for x in (a, b)]
    torch.testing.assert_close(packed * 22, alone[0] * 9 + alone[1] * 13)
    ids, positions = packed_stream([[1, 2, 3], list(range(10, 40))], 256, 16, 2, seed=0)(0)
    assert ids.shape == positions.shape == (2, 16) and (positions == 0).sum() >= 2
    starts = (positions == 0).nonzero()[:, 1].tolist()
    assert 0 in starts and all(ids[0, s].item() in (1, *range(10, 40)) for s in starts)
    with pytest.raises(LccError, match="--pack needs a program with document masks"):
        ProgramTrainer(*(lambda c: (c.program.ep, c.program.signature))(lcc.compile("tiny-llama", **LEARNED)), cfg)


def test_packed_documents_shard_like_one_process(tmp_path):
    """Packing under Ulysses: the documents come from the gathered positions on every rank, so two ranks' summed loss
    and gradients equal one process's."""
    from longctx_compile.distributed.ranks import spawn
    from longctx_compile.ops.layout import Layout

    path = lcc.compile("tiny-llama", attention_mask="false").save(tmp_path / "p.lcc")
    cfg = TrainConfig(objective="lm", trainable="all", length=24, pack=True)
    g = torch.Generator().manual_seed(6)
    batch = (torch.randint(0, 256, (1, 24), generator=g), torch.cat([torch.arange(11), torch.arange(13)])[None])
    manifest = artifact.read_manifest(path)
    trainer = ProgramTrainer(artifact.read_model_program(path, manifest).ep, manifest["signature"], cfg)
    leaves = trainer.leaves()
    loss = trainer.loss(batch)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    sharded_loss, sharded = spawn(sharded_step, path, 2, dict(cfg=cfg, layout=Layout(ulysses=2), ids=batch), ranks="threads", loaded=False)
    torch.testing.assert_close(torch.tensor(sharded_loss, dtype=torch.float32), loss.detach())
    for name, grad in grads.items():
        torch.testing.assert_close(sharded[name], grad, msg=lambda m, n=name: f"{n}: {m}")
