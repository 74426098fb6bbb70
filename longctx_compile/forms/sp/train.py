"""``lcc train --nproc P --sp ulysses|ring|auto``: the same training on P ranks, each running the per-rank program of a
sequence-parallel layout on its shard of every window (gloo processes on CPU, NCCL on GPUs; threads over a
``LocalWorld`` for the tests' fast tier). A form with its own training runs its trainer on the P ranks instead
(msa: each example's bank sharded over them, Memory Parallel; processes only).

A form's program composes with Ulysses unchanged: every rank attends over the whole sequence for its heads
(``ops.sharding``). A ring needs canonical attention. Every rank draws the same windows, keeps the same
parameters and takes the same optimizer step on gradients summed over the group; rank 0 reports, writes the
checkpoints and returns the trained values.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...errors import LccError
from ...ops.layout import Layout

SP = ("auto", "ulysses", "ring")


def layout_for(ep: torch.export.ExportedProgram, signature: dict[str, Any], nproc: int, sp: str, length: int) -> Layout:
    """The layout of ``--nproc P --sp …`` for this program, checked by sharding ``ep`` (which this consumes) and
    against the sequence length: what cannot run fails here in one line, before any rank starts."""
    from ...runtime.interpret import attention_sites
    from .rewrite import CANONICAL, SpConfig, choose

    if sp not in SP:
        raise LccError(f"unknown --sp '{sp}'; choose {', '.join(SP)}")
    if nproc < 2:
        raise LccError(f"--nproc must be at least 2 to shard a sequence, got {nproc}")
    sites = attention_sites(ep)
    if sp == "ulysses" or (sp == "auto" and any(n.target is not CANONICAL for n in sites)):
        layout = Layout(ulysses=nproc)
    elif sp == "ring":
        layout = Layout(ring=nproc, zigzag=True)
    else:
        layout = choose(sites, SpConfig(degree=nproc, objective="step"))[0]
    layout.check(length)
    shard_program(ep, signature, layout)
    return layout


def shard_program(ep: torch.export.ExportedProgram, signature: dict[str, Any], layout: Layout) -> None:
    """Make ``ep``'s graph the per-rank program of ``layout`` in place (the sequence-parallel rewrite, run on a
    loaded program)."""
    from ...pipeline import Program, lint
    from .rewrite import rewrite

    program = Program(ep=ep, signature={**signature}, source={})
    rewrite(program, layout, "train")
    lint(program)


def train_rank(path: str, payload: dict[str, Any], degree: int, rank: int) -> dict[str, Any] | None:
    """One rank: its own copy of the program, sharded, or (a form with its own training: ``payload["options"]``) the
    form's trainer on ``degree`` ranks; rank 0 reports progress, checkpoints and returns the result."""
    from ... import artifact
    from ...runtime.data import TASKS, data_stream
    from ...runtime.tokenizer import tokenizer_for
    from ...runtime.train import ProgramTrainer, run
    from .. import get_form

    cfg, layout = payload["cfg"], payload["layout"]
    manifest = artifact.read_manifest(Path(path))
    signature = manifest["signature"]
    ep = artifact.read_model_program(Path(path), manifest).ep
    tokenizer = None if payload["data"] in ("synthetic", *TASKS) else tokenizer_for(manifest)
    if layout is None:
        trainer, stream = get_form(manifest["form"]).train(ep, signature, cfg, payload["data"], tokenizer, payload["options"], degree)
    else:
        shard_program(ep, signature, layout)
        trainer = ProgramTrainer(ep, signature, cfg, manifest.get("form", "dense"), layout)
        stream = data_stream(payload["data"], tokenizer, signature["vocab_size"], cfg.length, cfg.batch, cfg.seed, cfg.pack)
    first = rank == 0
    report = payload["report"].put if first and payload["report"] is not None else None
    result = run(
        trainer,
        stream,
        payload["checkpoint"] if first else None,
        payload["resume"],
        payload["save_every"],
        report,
        payload["metrics"] if first else None,
        payload["fingerprint"],
    )
    return result if first else None


def train_ranks(path: Path, nproc: int, payload: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None, ranks: str = "processes") -> dict[str, Any]:
    """Run :func:`train_rank` on ``nproc`` ranks; rank 0's progress rows reach ``progress`` in this process."""
    from ...distributed.ranks import spawn

    if ranks == "threads":
        return spawn(train_rank, path, nproc, {**payload, "report": _Direct(progress)}, ranks="threads", loaded=False)
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        queue = manager.Queue()
        done = threading.Event()

        def relay() -> None:
            while not done.is_set() or not queue.empty():
                try:
                    row = queue.get(timeout=0.2)
                except Exception:  # noqa: BLE001  (queue.Empty from the manager's proxy)
                    continue
                if progress is not None:
                    progress(row)

        relaying = threading.Thread(target=relay, daemon=True)
        relaying.start()
        try:
            return spawn(train_rank, path, nproc, {**payload, "report": queue}, loaded=False)
        finally:
            done.set()
            relaying.join()


@dataclasses.dataclass
class _Direct:
    """Rank 0's reports straight to ``progress`` (ranks that are threads of this process)."""

    progress: Callable[[dict[str, Any]], None] | None

    def put(self, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(row)
