"""``lcc train``'s loop: a converted program adapted to its form by distillation to its dense source (or the LM loss),
its chosen parameters as fp32 leaves and the rest frozen; and the parts every trainer shares (the learning-rate
schedule, atomic checkpoints)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.export.graph_signature import InputKind
from torch.utils.checkpoint import checkpoint

from ..errors import LccError
from ..ops.layout import Layout


def schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first tenth, then cosine to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a temporary file renamed over the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(checkpoint: Path, resume: bool, fingerprint: str, belongs: str) -> dict[str, Any] | None:
    """The payload to resume from (``resume``), checked against ``fingerprint``, or None for a fresh run; a fresh run
    over an existing checkpoint, or a checkpoint of another run (``belongs`` says what differs), is refused."""
    if not resume:
        if checkpoint.exists():
            raise LccError(f"a checkpoint of an earlier run exists at '{checkpoint}': pass --resume to continue it, or remove it")
        return None
    if not checkpoint.is_file():
        raise LccError(f"--resume: no checkpoint at '{checkpoint}'")
    state = torch.load(checkpoint, weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise LccError(f"the checkpoint '{checkpoint}' belongs to {belongs}")
    return state


OBJECTIVES = ("distill", "lm")


@dataclass
class TrainConfig:
    """``objective``: ``distill`` (KL from the source model's next-token distribution — the program run with every
    site dense, :mod:`..ops.teacher` — to the program's own) or ``lm`` (next-token cross-entropy). ``trainable``:
    ``new`` (the parameters the form added), ``all``, ``norms`` (normalisation weights) or ``layers=0,2`` (every
    parameter of those layers). Steps, tokens per sequence, sequences per micro-batch, micro-batches per step, peak
    learning rate (warm-up over a tenth of the steps, then cosine), gradient clipping (0: none), the data seed.

    Long sequences: ``tile`` rows of logits at a time (0: all at once) for the LM head and the loss, each tile
    recomputed in the backward; ``recompute`` each decoder layer in the backward from its input (per-layer
    activation checkpointing), ``offload`` what the backward keeps to CPU memory. ``pack``: rows of whole documents,
    attended within each (the program must have document masks), no target across a boundary."""

    objective: str = "distill"
    trainable: str = "new"
    steps: int = 100
    length: int = 1024
    batch: int = 1
    accumulate: int = 1
    lr: float = 1e-4
    clip: float = 1.0
    seed: int = 0
    tile: int = 0
    recompute: bool = False
    offload: bool = False
    pack: bool = False

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise LccError(f"unknown objective '{self.objective}'; known: {', '.join(OBJECTIVES)}, indexers (an evict artifact's)")
        for name in ("steps", "length", "batch", "accumulate"):
            if getattr(self, name) < 1:
                raise LccError(f"--{name.replace('length', 'seq-len')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.clip < 0:
            raise LccError(f"--lr must be positive and --clip at least 0, got {self.lr} and {self.clip}")
        if self.tile < 0:
            raise LccError(f"--tile must be at least 0 (0: the whole sequence at once), got {self.tile}")


def trainable_names(ep: torch.export.ExportedProgram, signature: dict[str, Any], spec: str, form: str = "dense") -> list[str]:
    """The parameters ``spec`` names (see :class:`TrainConfig`), in the program's order; one clear error for none."""
    params = [s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER]
    if spec == "all":
        chosen = params
    elif spec == "new":
        new = set(signature.get("new_parameters", ()))
        chosen = [p for p in params if p in new]
        if not chosen:
            unrecorded = "" if "new_parameters" in signature or form == "dense" else " (or it was converted before lcc recorded them: convert it again)"
            raise LccError(f"the {form} form added no parameters to this program{unrecorded}; pass --trainable all, norms or layers=… to train the model's own")
    elif spec == "norms":
        chosen = [p for p in params if re.search(r"(norm|ln_\w*)\.(weight|bias)$", p)]
    elif spec.startswith("layers="):
        prefixes = _layer_prefixes(ep, spec.removeprefix("layers="))
        chosen = [p for p in params if p.startswith(prefixes)]
    else:
        raise LccError(f"invalid --trainable '{spec}': expected new, all, norms or layers=0,2,5")
    if not chosen:
        raise LccError(f"--trainable {spec} names no parameter of this program")
    return chosen


def _layer_prefixes(ep: torch.export.ExportedProgram, text: str) -> tuple[str, ...]:
    """The module paths ("model.layers.3.") of the chosen decoder layers, from the attention sites' facts."""
    from .interpret import attention_sites

    sites = attention_sites(ep)
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise LccError(f"invalid --trainable layers={text}: expected layer indices like 0,2,5") from None
    if not layers or not all(0 <= layer < len(sites) for layer in layers):
        raise LccError(f"--trainable layers={text}: the program has layers 0..{len(sites) - 1}")
    # a layer's attention module is <layer path>.<attention name>: the layer is everything before the last part
    return tuple(sites[layer].meta["lcc"]["module"].rsplit(".", 1)[0] + "." for layer in layers)


class Trainer:
    """What every trainer :func:`run` drives has: the program's weights (``state``, frozen, never copied), the names
    of the ones it trains (``names``), a sequence-parallel ``layout`` or None; each defines its ``loss(batch)``."""

    state: dict[str, torch.Tensor]
    names: list[str]
    cfg: TrainConfig
    layout: Layout | None = None

    def sharded(self) -> bool:
        """Whether the loss is this rank's share of the step's (gradients and losses are summed over the ranks)."""
        return self.layout is not None

    def leaves(self) -> dict[str, torch.Tensor]:
        """The trainable parameters as fp32 leaves: the master weights the optimizer steps. The graph reads them cast
        to the program's own dtype (a bf16 program computes in bf16, its updates accumulate in fp32)."""
        self.trained = {name: self.state[name].float().clone().requires_grad_() for name in self.names}
        return self.trained

    def _weights(self) -> dict[str, torch.Tensor]:
        """The state the graph reads: frozen weights as they are, trained ones cast from their fp32 leaves."""
        trained = getattr(self, "trained", {})
        return {**self.state, **{name: leaf.to(self.state[name].dtype) for name, leaf in trained.items()}}


class ProgramTrainer(Trainer):
    """A program's graph with its chosen parameters as fp32 leaves (the rest frozen, shared with the program, not
    copied), the loss of a batch of token windows, and (``distill``) the same graph with every site dense as the teacher.

    With ``tile`` the graphs end at the LM head's input and the head runs a tile of rows at a time inside the
    loss; with ``recompute`` the student's layers are recomputed in the backward (:mod:`.recompute`). With a
    ``layout``, ``ep`` is the per-rank program of that sequence-parallel layout (``forms.sp.train.shard_program``):
    each rank's loss covers its shard's tokens, normalised by the whole batch's count, so the losses and the
    gradients summed over the ranks are one process's. ``site_loss`` (weight, loss(call)): an auxiliary loss the
    student's sites compute from their calls (the form's, ``Form.site_loss``), weight × its mean added to the objective."""

    def __init__(
        self,
        ep: torch.export.ExportedProgram,
        signature: dict[str, Any],
        cfg: TrainConfig,
        form: str = "dense",
        layout: Layout | None = None,
        site_loss: tuple[float, Callable[[Any], torch.Tensor | None]] | None = None,
    ):
        from ..ops.teacher import dense
        from .interpret import attention_sites, logits_index, step_state, with_site_hooks
        from .recompute import by_layer
        from .tile_loss import head_hidden

        cfg.check()
        self.ep, self.signature, self.cfg, self.layout = ep, signature, cfg, layout
        self.names = check_program(ep, signature, cfg, form)
        if layout is not None and any(n.meta.get("lcc", {}).get("layout") != layout.to_list() for n in attention_sites(ep)):
            raise LccError("a sequence-parallel trainer needs the per-rank program of its layout (forms.sp.train.shard_program)")
        self.state = {name: value.detach() for name, value in step_state(ep).items()}
        self.index = logits_index(ep)
        graph, self.head = ep.graph_module, None
        if cfg.tile:
            graph, weight, bias = head_hidden(graph)
            inputs = ep.graph_signature.inputs_to_parameters
            self.head = (inputs[weight], None if bias is None else inputs[bias])
        self.teacher = with_site_hooks(graph, lambda site, call: dense(call)) if cfg.objective == "distill" else None
        self.site_loss, self.site_losses = site_loss if site_loss and site_loss[0] else None, []
        if self.site_loss:
            if cfg.recompute or layout is not None:  # a recomputed layer would add its loss again; a rank has part of a site
                raise LccError("--opt aux (the form's site loss) runs on one process without --recompute")
            graph = with_site_hooks(graph, self._with_site_loss)
        self.student = by_layer(graph) if cfg.recompute else graph

    def _with_site_loss(self, site: int, call: Any) -> Any:
        """Run the site, keeping its auxiliary loss for :meth:`loss`."""
        extra = self.site_loss[1](call)
        if extra is not None:
            self.site_losses.append(extra)
        return call()

    def _run(self, graph: torch.fx.GraphModule, ids: torch.Tensor, positions: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph's logits (or, tiled, the LM head's input) for a batch of windows."""
        from .interpret import flat_inputs

        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}
        out = graph(*flat_inputs(self.ep, self.signature["inputs"], weights, inputs))[self.index]
        return out if self.head else out.float()

    def loss(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The objective's mean loss over the batch's predicted positions (this rank's share of it, with a layout).
        ``batch``: token ids, or (ids, position ids) of packed documents (no target across a document's end)."""
        from ..ops.groups import rank
        from ..ops.loss import IGNORE
        from .recompute import offloaded

        ids, positions = batch if isinstance(batch, tuple) else (batch, torch.arange(batch.shape[1]).expand(batch.shape))
        B, T = ids.shape
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = ids[:, 1:].masked_fill(positions[:, 1:] == 0, IGNORE)
        count = int((labels != IGNORE).sum()) if self.cfg.objective == "lm" else B * T
        if self.layout is not None:  # labels shifted before slicing: a shard's last target lives on the next rank
            ids, positions, labels = (self.layout.shard(x, rank()) for x in (ids, positions, labels))
        weights = self._weights()
        self.site_losses = []
        with offloaded() if self.cfg.offload else contextlib.nullcontext():
            out = self._run(self.student, ids, positions, weights)
        extra = self.site_loss[0] * torch.stack(self.site_losses).mean() if self.site_loss and self.site_losses else 0.0
        with torch.no_grad():  # the source model: the program's own weights, not the ones being trained
            teacher = None if self.teacher is None else self._run(self.teacher, ids, positions, self.state)
        rows = out.flatten(0, 1)
        targets = labels.flatten() if self.cfg.objective == "lm" else teacher.flatten(0, 1)
        if not self.head:
            return _loss_sum(rows, targets, self.cfg.objective) / count + extra
        head = [None if name is None else weights[name] for name in self.head]
        source = [None if name is None else self.state[name] for name in self.head]  # the teacher's head
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], self.cfg.tile):  # each tile's logits recomputed in the backward, never kept
            part = slice(start, start + self.cfg.tile)
            total = total + checkpoint(_tile_loss, rows[part], targets[part], *head, *source, self.cfg.objective, use_reentrant=False)
        return total / count + extra


def check_program(ep: torch.export.ExportedProgram, signature: dict[str, Any], cfg: TrainConfig, form: str) -> list[str]:
    """What ``cfg`` asks of the program, refused in one line where it cannot be: the trainable parameters' names."""
    if cfg.pack and not _has_documents(ep):
        raise LccError(
            "--pack needs a program with document masks (convert with --opt attention_mask=false to keep the model's packed-document masking; HSA has none)"
        )
    return trainable_names(ep, signature, cfg.trainable, form)


def _has_documents(ep: torch.export.ExportedProgram) -> bool:
    """Whether the program's attention masks documents (document ids from position resets reach its sites)."""
    from ..ops.schema import Call
    from .interpret import attention_sites

    return any(Call.of(n).get("doc_ids") is not None for n in attention_sites(ep))


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor, objective: str) -> torch.Tensor:
    """Summed over rows: cross-entropy against next tokens (ignored targets skipped), or KL(teacher ‖ student) from
    the teacher's logits."""
    if objective == "lm":
        return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    return distill_loss(logits, targets.float().log_softmax(-1)) * logits.shape[0]


def _tile_loss(
    rows: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    source: torch.Tensor,
    source_bias: torch.Tensor | None,
    objective: str,
) -> torch.Tensor:
    """A tile's summed loss, its rows headed here by the trained head (and, distilling, the teacher's rows by the source's)."""
    logits = F.linear(rows, weight, bias).float()
    if objective == "lm":
        return _loss_sum(logits, targets, objective)
    with torch.no_grad():
        teacher = F.linear(targets, source, source_bias)
    return _loss_sum(logits, teacher, objective)


def _summed(leaves: dict[str, torch.Tensor], loss: float) -> float:
    """Sum the leaves' gradients and the loss over the sequence-parallel group; the loss's sum. A leaf with a gradient
    on some ranks only counts as zero on the others (each rank must make the same collectives, or the group hangs)."""
    from ..ops import groups

    present = torch.tensor([leaf.grad is not None for leaf in leaves.values()], dtype=torch.float64)
    groups.all_reduce(present, groups.group())
    for leaf, anywhere in zip(leaves.values(), present.tolist(), strict=True):
        if anywhere and leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
        if leaf.grad is not None:
            groups.all_reduce(leaf.grad, groups.group())
    value = torch.tensor([loss], dtype=torch.float64)
    groups.all_reduce(value, groups.group())
    return float(value)


def distill_loss(student: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) = Σ p_t (log p_t − log p_s): zero exactly when they agree."""
    logp = student.log_softmax(-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()


def run(
    trainer: ProgramTrainer,
    data: Callable[[int], torch.Tensor],
    checkpoint: Path | None = None,
    resume: dict[str, Any] | None = None,
    save_every: int = 50,
    progress: Callable[[dict[str, Any]], None] | None = None,
    metrics: Path | None = None,
    fingerprint: str = "",
) -> dict[str, Any]:
    """Train (resuming from ``resume``, a checkpoint's payload): AdamW, warm-up + cosine, clipping, accumulation.
    Micro-batch i of step s is ``data(s · accumulate + i)``, so a resumed run sees what an uninterrupted one would.
    Returns the trained values and a summary; each step appends a line to ``metrics`` (JSONL) and calls ``progress``."""
    cfg = trainer.cfg
    leaves = trainer.leaves()
    optimizer = torch.optim.AdamW(list(leaves.values()), lr=cfg.lr, weight_decay=0.0)
    start, first = 0, None
    if resume:
        start, first = resume["step"], resume["first"]
        for name, value in resume["leaves"].items():
            leaves[name].data.copy_(value)
        optimizer.load_state_dict(resume["optimizer"])
    last = None
    for step in range(start, cfg.steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * schedule(step, cfg.steps)
        optimizer.zero_grad()
        total = 0.0
        for micro in range(cfg.accumulate):
            loss = trainer.loss(data(step * cfg.accumulate + micro)) / cfg.accumulate
            if loss.requires_grad:  # else no trainable reaches it: refused below
                loss.backward()
            total += loss.item()
        if trainer.sharded():  # each rank's loss is its share of the batch's: the sums are one process's
            total = _summed(leaves, total)
        if all(leaf.grad is None for leaf in leaves.values()):  # else every step would leave the weights as they are
            raise LccError(
                f"none of the --trainable {cfg.trainable} parameters reaches the {cfg.objective} loss (msa's routers, and hsa's learned "
                "scores under joint fusion, learn from their --opt aux loss alone: give it a weight); choose --trainable all, norms or layers=…"
            )
        norm = torch.nn.utils.clip_grad_norm_(list(leaves.values()), cfg.clip if cfg.clip > 0 else float("inf"))
        optimizer.step()
        first, last = total if first is None else first, total
        row = {
            "step": step + 1,
            "loss": total,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(norm),
            "tokens_per_s": cfg.accumulate * cfg.batch * cfg.length / (time.perf_counter() - began),
        }
        if checkpoint is not None and ((step + 1) % save_every == 0 or step + 1 == cfg.steps):
            payload = {"fingerprint": fingerprint, "step": step + 1, "first": first, "leaves": {n: t.detach() for n, t in leaves.items()}}
            save_checkpoint(checkpoint, {**payload, "optimizer": optimizer.state_dict()})
        if metrics is not None:
            with metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if progress is not None:
            progress(row)
    summary = {"objective": cfg.objective, "trainable": cfg.trainable, "parameters": len(leaves), "steps": cfg.steps, "first_loss": first, "last_loss": last}
    return {"trained": {n: t.detach() for n, t in leaves.items()}, "summary": summary}
