"""``lcc train``: adapt a converted artifact to its form (distillation to its dense source, or the LM loss), written to a new artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..console import err, out


def train(
    path: Annotated[str, typer.Argument(help="an artifact folder (read, never changed)")],
    data: Annotated[
        str,
        typer.Option(
            "--data", help="'synthetic' (random tokens), 'passkey' or 'kv-recall' (retrieval tasks), a .jsonl of {\"text\"|\"tokens\"} lines, or a text file"
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="the trained artifact to write")],
    objective: Annotated[
        str, typer.Option("--objective", help="distill (KL to the dense source model), lm (next-token loss), or indexers (an evict artifact's)")
    ] = "distill",
    trainable: Annotated[str, typer.Option("--trainable", help="new (the form's added parameters), all, norms, or layers=0,2,5")] = "new",
    steps: Annotated[int, typer.Option("--steps")] = 100,
    seq_len: Annotated[
        Optional[int], typer.Option("--seq-len", help="tokens per training sequence (default: 1024, or the program's maximum if smaller)")
    ] = None,  # noqa: UP045
    batch: Annotated[int, typer.Option("--batch", help="sequences per micro-batch")] = 1,
    accumulate: Annotated[int, typer.Option("--accumulate", help="micro-batches per optimizer step")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate (warm-up over a tenth of the steps, then cosine)")] = 1e-4,
    clip: Annotated[float, typer.Option("--clip", help="gradient-norm clipping; 0: none")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    tile: Annotated[int, typer.Option("--tile", help="rows of logits at a time for the LM head and loss (0: all at once)")] = 0,
    recompute: Annotated[bool, typer.Option("--recompute", help="recompute each layer in the backward (per-layer activation checkpointing)")] = False,
    offload: Annotated[bool, typer.Option("--offload", help="keep what the backward needs in CPU memory")] = False,
    pack: Annotated[bool, typer.Option("--pack", help="rows of whole documents, attended within each (programs with document masks)")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="local ranks sharing each sequence (gloo on CPU, NCCL on GPUs)")] = 1,
    sp: Annotated[str, typer.Option("--sp", help="with --nproc: ulysses, ring, or auto (a form's attention runs under Ulysses)")] = "auto",
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="checkpoint file (default: OUT.train.pt beside OUT)")] = None,  # noqa: UP045
    save_every: Annotated[int, typer.Option("--save-every", help="steps between checkpoints")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run saved in the checkpoint")] = False,
    metrics: Annotated[Optional[Path], typer.Option("--metrics", help="append one JSON line per step (loss, lr, grad norm, tokens/s)")] = None,  # noqa: UP045
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
    opt: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--opt",
            help="a form's own training option key=value (repeatable); msa: docs, query, answer, aux, temperature, select; hsa: aux, temperature (the retrieval loss)",
        ),
    ] = None,
) -> None:
    """Train an artifact in its form: its new parameters (or the ones --trainable names), the rest frozen.

    Example: lcc train model.hsa.lcc --data corpus.txt --steps 200 --seq-len 2048 -o model.hsa.trained.lcc

    An msa artifact trains on documents and queries (MSA's continued pre-training): a .jsonl of
    {"documents", "query", "answer", "positive"} records, or examples cut from a corpus (--seq-len: tokens per document).
    """
    from .. import api
    from ..options import parse_pairs

    if save_every < 1:
        from ..errors import LccError

        raise LccError("--save-every must be at least 1")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("training", total=steps)

        def show(row: dict) -> None:
            progress.update(task, completed=row["step"], description=f"loss {row['loss']:.4f} · {row['tokens_per_s']:,.0f} tok/s")

        summary = api.train(
            path, data, output, force=force, checkpoint=checkpoint, resume=resume, save_every=save_every, metrics=metrics, progress=show,
            objective=objective, trainable=trainable, steps=steps, **({} if seq_len is None else {"length": seq_len}), batch=batch, accumulate=accumulate, lr=lr, clip=clip, seed=seed,
            tile=tile, recompute=recompute, offload=offload, pack=pack, nproc=nproc, sp=sp, form_options=parse_pairs(opt),
        )  # fmt: skip
    table = Table(title=f"trained {path} → {output}")
    for column in ("objective", "trainable", "parameters", "steps", "first loss", "last loss"):
        table.add_column(column, justify="right" if column not in ("objective", "trainable") else "left")
    table.add_row(
        summary["objective"],
        summary["trainable"],
        str(summary["parameters"]),
        str(summary["steps"]),
        f"{summary['first_loss']:.4f}",
        f"{summary['last_loss']:.4f}",
    )
    out.print(table)
