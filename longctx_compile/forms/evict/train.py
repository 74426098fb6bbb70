"""``lcc train-indexers``: fit an ``evict`` artifact's indexers, then its latent memories, with the model frozen.

- Stage 1 (indexers): per layer, KL(softmax_t max_s T[s, t] ‖ softmax_t max_s A[s, t]) between the true
  attention logits T and the indexer scores A, sinks left out, both maxima streamed in tiles
  (``ops.evict``); the student's gradient flows through each key's winning query.
- Stage 2 (memories): per layer, the last quarter of each sequence's queries attend over the first
  three quarters evicted to the budget by the trained indexer; the evicted K/V are written to the
  memory in two evictions (the older half first, so the decay is learnt too), and its gated readout is fitted to the eviction residual o_full − o_attn. The loss is that
  squared error divided by the residual's own (1: the memory adds nothing; 0: it restores dense).
  The memory is fitted to what the learned indexer evicts, whatever policy the artifact runs.

Every step's batch is drawn from a generator seeded by the step, so a run resumed from a checkpoint
sees the batches an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import LccError
from ...ops.evict import (
    dropped_positions,
    importance_kl,
    indexer_importance,
    indexer_ref,
    keep_positions,
    memory_readout,
    memory_write,
    student_importance,
    teacher_importance,
)
from ...ops.schema import Call
from ...runtime.interpret import attention_sites, flat_inputs, logits_index, with_site_hooks
from ...runtime.train import save_checkpoint, schedule
from .runtime import EVICT, Policy, take

ATTENTION = torch.ops.longctx.attention.default
INDEXER = torch.ops.longctx.evict_indexer.default


def _indexer_with_grad(*args):
    """The indexer's reference with autograd on: the graph runs under no_grad, the indexer's weights train."""
    with torch.enable_grad():
        return indexer_ref(*args)


STAGES = ("indexer", "memory")


@dataclasses.dataclass
class TrainConfig:
    """Steps per stage (``memory_steps`` -1: as many as ``steps`` when the artifact has memories), the sequence
    length and batch, learning rates (warm-up over a tenth of the steps, then cosine decay), the seed."""

    steps: int = 200
    memory_steps: int = -1
    length: int = 1024
    batch: int = 1
    lr: float = 1e-3
    memory_lr: float = 1e-2
    seed: int = 0


class Trainer:
    """The frozen program with its indexer (stage 1) or memory (stage 2) parameters as trainable leaves."""

    def __init__(self, ep: torch.export.ExportedProgram, signature: dict[str, Any]):
        from ...runtime.interpret import step_state

        if "evict" not in signature:
            raise LccError("this artifact has no eviction indexers to train; convert it with --to evict")
        self.ep, self.signature, self.config = ep, signature, signature["evict"]
        self.policy = Policy.of(self.config, {})
        self.state = dict(step_state(ep))
        self.index = logits_index(ep)
        sites = attention_sites(ep)
        self.groups = {
            i: 1 if self.config["granularity"] == "layer" else int(Call.of(n).k.meta["val"].shape[1]) for i, n in enumerate(sites) if n.target is EVICT
        }
        self.graph = with_site_hooks(ep.graph_module, lambda site, call: self._hook(site, call), replace={INDEXER: _indexer_with_grad})
        self._hook: Any = None

    def names(self, stage: str) -> list[str]:
        """The state names a stage trains."""
        part = "indexer." if stage == "indexer" else "memory."
        return sorted(name for site in self.config["params"].values() for name in site.values() if f".{part}" in name)

    def leaves(self, stage: str) -> dict[str, torch.Tensor]:
        """Trainable fp32 copies of the stage's parameters, swapped into the state the graph reads."""
        if stage == "memory" and not self.config["memory"]:
            raise LccError("this artifact was converted with memory=off: it has no latent memory to train")
        leaves = {name: self.state[name].detach().float().clone().requires_grad_() for name in self.names(stage)}
        self.state.update(leaves)
        return leaves

    def loss(self, stage: str, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the stage's loss over every evicting layer, its value) for a batch of full sequences."""
        losses = []

        def hook(site, call):
            if site in self.groups:
                with torch.enable_grad():
                    losses.append((self._indexer_loss if stage == "indexer" else self._memory_loss)(site, call))
                return call.run(ATTENTION)
            return call()

        B, T = ids.shape
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(T).expand(B, T)}
        self._hook = hook
        try:
            with torch.no_grad():
                self.graph(*flat_inputs(self.ep, self.signature["inputs"], self.state, inputs))
        finally:
            self._hook = None
        total = torch.stack(losses).mean()
        return total, total.detach().item()

    def _indexer_loss(self, site: int, call: Call) -> torch.Tensor:
        q, k, scale, idx_q, idx_k, idx_w = call.q, call.k, call.scale, call.idx_q, call.idx_k, call.idx_w
        G = self.groups[site]
        with torch.no_grad():
            teacher = teacher_importance(q, k, scale, G)
        return importance_kl(teacher, student_importance(idx_q, idx_k, idx_w, G), self.config["sinks"])

    def _memory_loss(self, site: int, call: Call) -> torch.Tensor:
        q, k, v, scale = call.q, call.k, call.v, call.scale
        idx_q, idx_k, idx_w = (t.detach() for t in (call.idx_q, call.idx_k, call.idx_w))
        phi, gate_w, gate_b, decay, strength = call.phi, call.gate_w, call.gate_b, call.decay, call.strength
        B, _, T, _ = q.shape
        G = self.groups[site]
        context = T - max(1, T // 4)
        budget = min(self.policy.resolve(context), context)
        with torch.no_grad():
            importance = indexer_importance(idx_q[..., :context, :], idx_k[:, :context], idx_w[..., :context], G)[0]
            keep = keep_positions(importance.reshape(B * G, context), self.policy.sinks, self.policy.window, budget).view(B, G, -1)
            gone = dropped_positions(keep, context)
            kc, vc, tail = k[:, :, :context], v[:, :, :context], q[:, :, context:]
            full = ATTENTION(tail, k, v, None, None, None, scale, True, 0).float()
            kept = ATTENTION(
                tail, torch.cat([take(kc, keep), k[:, :, context:]], 2), torch.cat([take(vc, keep), v[:, :, context:]], 2), None, None, None, scale, True, 0
            )
            residual = full - kept.float()
        phi_k, gone_v = F.linear(take(kc, gone).float(), phi), take(vc, gone)
        M, b = phi_k.new_zeros(B, k.shape[1], phi.shape[0], v.shape[-1]), phi_k.new_zeros(B, k.shape[1], phi.shape[0])
        half = phi_k.shape[2] // 2
        for part in (slice(0, half), slice(half, None)):  # the older half left at an earlier eviction: the decay applies to it once
            M, b = memory_write(M, b, phi_k[:, :, part], gone_v[:, :, part], torch.sigmoid(decay), F.softplus(strength))
        read = memory_readout(tail, M, b, phi, gate_w, gate_b)
        return ((residual - read) ** 2).mean() / (residual**2).mean().clamp_min(1e-12)


def train(
    trainer: Trainer,
    data: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    resume: dict[str, Any] | None = None,
    save_every: int = 50,
    progress: Callable[[str, int, int, float], None] | None = None,
    fingerprint: str = "",
) -> dict[str, Any]:
    """Run both stages (resuming mid-way from ``resume``); returns the trained parameters and per-stage summaries."""
    plan = {"indexer": cfg.steps, "memory": (cfg.steps if cfg.memory_steps < 0 else cfg.memory_steps) if trainer.config["memory"] else 0}
    done = dict(resume["done"]) if resume else {}
    trained: dict[str, torch.Tensor] = dict(resume["trained"]) if resume else {}
    trainer.state.update({name: t.to(trainer.state[name].dtype) for name, t in trained.items()})
    for stage in STAGES:
        steps = plan[stage]
        if not steps or stage in done:
            continue
        leaves = trainer.leaves(stage)
        lr = cfg.lr if stage == "indexer" else cfg.memory_lr
        optimizer = torch.optim.AdamW(list(leaves.values()), lr=lr, weight_decay=0.0)
        start, first, last = 0, None, None
        if resume and resume.get("stage") == stage:
            start, first = resume["step"], resume.get("first")
            for name, value in resume["leaves"].items():
                leaves[name].data.copy_(value)
            optimizer.load_state_dict(resume["optimizer"])
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * schedule(step, steps)
            loss, last = trainer.loss(stage, data(step))
            first = last if first is None else first
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(stage, step + 1, steps, last)
            if checkpoint is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
                payload = {"fingerprint": fingerprint, "stage": stage, "step": step + 1, "first": first, "done": done, "trained": trained}
                save_checkpoint(checkpoint, {**payload, "leaves": {n: t.detach() for n, t in leaves.items()}, "optimizer": optimizer.state_dict()})
        done[stage] = {"steps": steps, "first_loss": first, "last_loss": last, "loss": "importance KL" if stage == "indexer" else "residual error left"}
        trained.update({name: t.detach().clone() for name, t in leaves.items()})
        trainer.state.update({name: t.detach().to(trainer.state[name].dtype) for name, t in leaves.items()})
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"fingerprint": fingerprint, "stage": None, "step": 0, "done": done, "trained": trained})
    return {"trained": trained, "done": done}


def train_artifact(
    path: Path,
    manifest: dict[str, Any],
    program: torch.export.ExportedProgram,
    data: str,
    cfg: TrainConfig,
    out: Path | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    save_every: int = 50,
    progress: Callable[[str, int, int, float], None] | None = None,
    note: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Both stages on the artifact at ``path``, written to ``out`` (None: in place, atomically): what ``lcc
    train-indexers`` and ``lcc train --objective indexers`` run; ``note``, with the indexer stage's losses and
    both stages' summaries, joins the signature's ``train`` records. Returns the per-stage summaries."""
    from ... import artifact
    from ...runtime.data import read_tokens, token_stream
    from ...runtime.tokenizer import tokenizer_for
    from ...runtime.train import load_checkpoint

    signature = manifest["signature"]
    trainer = Trainer(program, signature)
    evict = signature["evict"]
    pinned = evict["sinks"] + evict["window"]
    if cfg.steps < 1 or cfg.batch < 1 or save_every < 1:
        raise LccError("--steps, --batch and --save-every must be at least 1")
    if not pinned < cfg.length <= signature["max_len"]:
        raise LccError(f"--length {cfg.length} must exceed sinks + window ({pinned}) and stay within the program's maximum length {signature['max_len']}")
    stream = token_stream(read_tokens(data, tokenizer_for(manifest) if data != "synthetic" else None), signature["vocab_size"], cfg.length, cfg.batch, cfg.seed)
    checkpoint = checkpoint or Path(str(Path(out or path)).rstrip("/") + ".train-indexers.pt")
    fingerprint = manifest["files"][artifact.PROGRAM]
    state = load_checkpoint(checkpoint, resume, fingerprint, "another artifact (or an earlier version of this one)")
    result = train(trainer, stream, cfg, checkpoint, state, save_every, progress, fingerprint)
    manifest["signature"]["evict"]["trained"] = {**result["done"], "data": data, "length": cfg.length, "batch": cfg.batch, "seed": cfg.seed}
    if note is not None:
        losses = {"first_loss": result["done"]["indexer"]["first_loss"], "last_loss": result["done"]["indexer"]["last_loss"]}
        note.update(parameters=len(result["trained"]), **losses, stages=result["done"])
        manifest["signature"]["train"] = [*manifest["signature"].get("train", []), note]
    artifact.rewrite_weights(Path(path), manifest, program, result["trained"], out=out)
    checkpoint.unlink(missing_ok=True)
    return result
