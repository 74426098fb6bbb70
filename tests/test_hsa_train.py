"""HSA's retrieval loss (``lcc train --opt aux=W`` on an hsa artifact with learned scores): KL from the exact chunk
ranking to the learned one, against a per-query loop written from the definition, and what training with it does."""

from __future__ import annotations

import math

import lcc_cli
import pytest
import torch

import longctx_compile as lcc
from longctx_compile.forms.hsa.train import retrieval_loss
from longctx_compile.ops.schema import Call
from longctx_compile.runtime.train import ProgramTrainer, TrainConfig, run

HSA = torch.ops.longctx.hsa_attention.default


def reference(q, k, wq, wk, scale, S, w, block, temperature=1.0, pool=None):
    """Per selection unit: KL(softmax of Σ_voters true LSE ‖ softmax of Σ_voters learned score) over its older chunks;
    ``pool`` [Hkv, R, D]: a chunk's learned score is the LSE over its R attention-pooled landmarks, less log R."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    losses = []
    for b in range(B):
        for h in range(Hkv):
            units = range(0, T, S) if block else range(T)
            for u in units:
                rows = range(u, min(u + S, T)) if block else [u]
                older = [i for i in range(T // S) if i < u // S - w]
                if not older:
                    continue
                exact = torch.zeros(len(older), dtype=torch.float64)
                learned = torch.zeros(len(older), dtype=torch.float64)
                for t in rows:
                    for g in range(G):
                        qt = q[b, h * G + g, t].double() * scale
                        for n, i in enumerate(older):
                            keys = k[b, h, i * S : (i + 1) * S].double()
                            exact[n] += torch.logsumexp(keys.detach() @ qt.detach(), 0)  # the target: no gradient
                            marks = [keys.mean(0)] if pool is None else [torch.softmax(keys @ u.double(), 0) @ keys for u in pool[h]]
                            each = torch.stack([(qt @ wq[h].double()) @ (mark @ wk[h].double()) for mark in marks])
                            learned[n] = learned[n] + torch.logsumexp(each, 0) - math.log(len(marks)) + math.log(S)
                if block:  # the chunk's padded rows are zero queries: each scores every full chunk log S
                    exact += (S - len(rows)) * G * math.log(S)
                    learned += (S - len(rows)) * G * math.log(S)
                p = (exact / temperature).log_softmax(0)
                losses.append((p.exp() * (p - learned.log_softmax(0))).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("select,temperature,pooled", [("token", 1.0, False), ("block", 1.0, False), ("token", 0.3, False), ("token", 1.0, True)])
def test_retrieval_loss_equals_a_per_query_reference(select, temperature, pooled):
    """Random q, k and projections (not the identity): the loss and its gradients in the projections, queries and
    keys (and pooling queries) equal a loop over queries and chunks in fp64 (the exact target takes none)."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, S, w = 2, 4, 2, 45, 8, 4, 1
    q, k, v = (torch.randn(B, h, T, D, generator=g, requires_grad=True) for h in (Hq, Hkv, Hkv))
    wq, wk = (torch.eye(D).repeat(Hkv, 1, 1) + torch.randn(Hkv, D, D, generator=g) / 2 for _ in range(2))
    wq.requires_grad_(), wk.requires_grad_()
    pool = torch.randn(Hkv, 3, D, generator=g, requires_grad=True) if pooled else None
    call = Call(HSA, (q, k, v, None, wq, wk, D**-0.5, S, 2, w, "learned", select, False, "softmax"), {"retrieval_pool": pool})
    got = retrieval_loss(call, temperature)
    want = reference(q, k, wq, wk, D**-0.5, S, w, select == "block", temperature, pool)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    leaves = [wq, wk, q, k] + ([pool] if pooled else [])
    grads = torch.autograd.grad(got, leaves)
    for a, b in zip(grads, torch.autograd.grad(want, leaves), strict=True):
        assert b.abs().max() > 1e-4
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert retrieval_loss(call.replace(mode="bound")) is None and retrieval_loss(call.replace(q=q[:, :, :8], k=k[:, :, :8], v=v[:, :, :8])) is None


LEARNED = dict(to="hsa", chunk="4", topk="2", window="1", score="learned")


def test_training_with_the_retrieval_loss_lowers_it():
    """The objective plus W × the sites' mean retrieval loss: the term is what the sites computed, and 40 steps of
    the projections lower it by more than half."""
    compiled = lcc.compile("tiny-llama", **LEARNED)
    with torch.no_grad():  # a random model attends almost uniformly: sharper attention gives chunks distinct LSEs
        for name, p in compiled.module.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    ep, signature = compiled.program.ep, compiled.program.signature
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(length=48, batch=2, steps=40, lr=3e-2, trainable="new")
    plain, trainer = ProgramTrainer(ep, signature, cfg), ProgramTrainer(ep, signature, cfg, site_loss=(4.0, retrieval_loss))
    plain.leaves()
    with torch.no_grad():
        extra = trainer.loss(ids) - plain.loss(ids)
    assert len(trainer.site_losses) == 2 and extra > 0
    before = torch.stack(trainer.site_losses).mean()
    torch.testing.assert_close(extra, 4.0 * before)
    run(trainer, lambda step: ids)
    with torch.no_grad():
        trainer.loss(ids)  # with the trained projections
    assert torch.stack(trainer.site_losses).mean() < 0.5 * before, (before, trainer.site_losses)


def test_lcc_train_takes_the_retrieval_loss_and_refuses_what_it_cannot_teach(tmp_path):
    """``--opt aux=W`` trains and is recorded; on scores with nothing to learn, with ranks or recomputation, an
    unknown or negative option: one line, exit 2, nothing written."""
    learned, bound, joint = tmp_path / "learned.lcc", tmp_path / "bound.lcc", tmp_path / "joint.lcc"
    lcc.compile("tiny-llama", **LEARNED).save(learned)
    lcc.compile("tiny-llama", **LEARNED, fusion="joint", landmarks="2").save(joint)  # the scores select only: the aux loss alone trains them
    lcc.compile("tiny-llama", to="hsa", chunk="4", topk="2", window="1").save(bound)
    common = ["--data", "synthetic", "--seq-len", "32", "--steps", "2"]
    result = lcc_cli.run("train", learned, *common, "--opt", "aux=1", "-o", tmp_path / "out.lcc")
    assert result.returncode == 0, result.stderr
    assert lcc.load(tmp_path / "out.lcc").manifest["signature"]["train"][-1]["options"] == {"aux": "1"}
    result = lcc_cli.run("train", joint, *common, "--opt", "aux=1", "-o", tmp_path / "joint.trained.lcc")
    assert result.returncode == 0, result.stderr
    pools = [dict(lcc.load(path).module.named_parameters()) for path in (joint, tmp_path / "joint.trained.lcc")]
    pooling = [name for name in pools[0] if name.endswith("hsa_retrieval_pool")]
    assert len(pooling) == 2 and all((pools[0][n] - pools[1][n]).abs().max() > 0 for n in pooling)  # the pooled landmarks trained
    for path, args, message in [
        (bound, ["--opt", "aux=1"], "--opt aux teaches learned retrieval scores; this artifact's hsa sites score by bound"),
        (learned, ["--opt", "aux=1", "--recompute"], "runs on one process without --recompute"),
        (learned, ["--opt", "aux=1", "--nproc", "2"], "trains on one process"),
        (learned, ["--opt", "topk=3"], "unknown --opt 'topk'; valid options: aux, temperature"),
        (learned, ["--opt", "aux=-1"], "invalid --opt aux=-1.0"),
        (learned, ["--opt", "temperature=0"], "temperature above 0"),
        (joint, [], "hsa's learned scores under joint fusion, learn from their --opt aux loss alone"),
    ]:
        result = lcc_cli.run("train", path, *common, *args, "-o", tmp_path / "refused.lcc")
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused.lcc").exists()
