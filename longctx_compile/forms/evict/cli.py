"""``lcc train-indexers``: distil an ``evict`` artifact's indexers and fit its latent memories, written back into it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


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
    from ...console import err, out, read_artifact
    from .train import TrainConfig, train_artifact

    manifest, program = read_artifact(path)
    length = min(1024, manifest["signature"]["max_len"]) if length is None else length
    cfg = TrainConfig(steps=steps, memory_steps=memory_steps, length=length, batch=batch, lr=lr, memory_lr=memory_lr, seed=seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        tasks: dict[str, int] = {}

        def show(stage: str, step: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=step, description=f"{stage} loss {loss:.4f}")

        result = train_artifact(Path(path), manifest, program, data, cfg, checkpoint=checkpoint, resume=resume, save_every=save_every, progress=show)
    table = Table(title=f"trained {path}")
    for column in ("stage", "steps", "loss", "first", "last"):
        table.add_column(column, justify="right" if column in ("steps", "first", "last") else "left")
    for stage, done in result["done"].items():
        table.add_row(stage, str(done["steps"]), done["loss"], f"{done['first_loss']:.4f}", f"{done['last_loss']:.4f}")
    out.print(table)
