"""``lcc train-indexers``: distil an ``evict`` artifact's indexers and fit its latent memories, written back into it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ...errors import LccError


def train_indexers(
    path: Annotated[str, typer.Argument(help="an evict artifact folder (updated in place, atomically)")],
    data: Annotated[str, typer.Option("--data", help='\'synthetic\' (random tokens), a .jsonl of {"text"|"tokens"} lines, or a text file')] = "synthetic",
    steps: Annotated[int, typer.Option("--steps", help="indexer (stage 1) steps")] = 200,
    memory_steps: Annotated[int, typer.Option("--memory-steps", help="latent-memory (stage 2) steps; -1: as many as --steps")] = -1,
    length: Annotated[Optional[int], typer.Option("--length", help="tokens per training sequence (default: 1024, or the program's maximum if smaller)")] = None,
    batch: Annotated[int, typer.Option("--batch", help="sequences per step")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="indexer learning rate")] = 1e-3,
    memory_lr: Annotated[float, typer.Option("--memory-lr", help="latent-memory learning rate")] = 1e-2,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="checkpoint file (default: ARTIFACT.train-indexers.pt beside it)")] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="steps between checkpoints")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run saved in the checkpoint")] = False,
) -> None:
    """Train an evict artifact's indexers (KL to the model's own attention) and latent memories (the eviction residual), model frozen.

    Example: lcc train-indexers model.evict.lcc --data synthetic --steps 200 --length 1024
    """
    from ... import artifact
    from ...console import err, out, read_artifact
    from ...runtime.data import read_tokens, token_stream
    from ...runtime.tokenizer import tokenizer_for
    from ...runtime.train import load_checkpoint
    from .train import TrainConfig, Trainer, train

    manifest, program = read_artifact(path)
    signature = manifest["signature"]
    trainer = Trainer(program, signature)
    length = min(1024, signature["max_len"]) if length is None else length
    cfg = TrainConfig(steps=steps, memory_steps=memory_steps, length=length, batch=batch, lr=lr, memory_lr=memory_lr, seed=seed)
    evict = signature["evict"]
    pinned = evict["sinks"] + evict["window"]
    if steps < 1 or batch < 1 or save_every < 1:
        raise LccError("--steps, --batch and --save-every must be at least 1")
    if not pinned < length <= signature["max_len"]:
        raise LccError(f"--length {length} must exceed sinks + window ({pinned}) and stay within the program's maximum length {signature['max_len']}")
    stream = token_stream(read_tokens(data, tokenizer_for(manifest) if data != "synthetic" else None), signature["vocab_size"], length, batch, seed)
    checkpoint = checkpoint or Path(str(Path(path)).rstrip("/") + ".train-indexers.pt")
    fingerprint = manifest["files"][artifact.PROGRAM]
    state = load_checkpoint(checkpoint, resume, fingerprint, "another artifact (or an earlier version of this one)")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        tasks: dict[str, int] = {}

        def show(stage: str, step: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=step, description=f"{stage} loss {loss:.4f}")

        result = train(trainer, stream, cfg, checkpoint, state, save_every, show, fingerprint)
    manifest["signature"]["evict"]["trained"] = {**result["done"], "data": data, "length": length, "batch": batch, "seed": seed}
    artifact.rewrite_weights(Path(path), manifest, program, result["trained"])
    checkpoint.unlink(missing_ok=True)
    table = Table(title=f"trained {path}")
    for column in ("stage", "steps", "loss", "first", "last"):
        table.add_column(column, justify="right" if column in ("steps", "first", "last") else "left")
    for stage, done in result["done"].items():
        table.add_row(stage, str(done["steps"]), done["loss"], f"{done['first_loss']:.4f}", f"{done['last_loss']:.4f}")
    out.print(table)
