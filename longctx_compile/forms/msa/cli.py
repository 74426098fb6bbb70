"""``lcc memory``: build, edit, inspect and query the memory bank of an ``msa`` artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ...errors import LccError
from ...runtime.data import read_docs

memory_app = typer.Typer(
    help="The memory bank of an msa artifact: encode documents, add or remove some, show it, and query it.\n\n"
    "Examples:\n\n"
    "  lcc memory encode model.msa.lcc --docs docs.jsonl -o bank\n\n"
    "  lcc memory query model.msa.lcc --bank bank --question-ids 5,6,7 -n 8",
    no_args_is_help=True,
)


def _console():
    from ...console import err, out

    return out, err


POSITIONS_HELP = "where the selected documents sit: contiguous (before the query, as one dense prompt) or global (the paper's); default: the artifact's"


def _model(path: str, positions: str | None = None):
    from ...console import read_artifact
    from ...runtime.tokenizer import tokenizer_for
    from .runtime import MsaModel

    manifest, program = read_artifact(path)
    return MsaModel(program, manifest["signature"], positions), tokenizer_for(manifest)


def _encode(model, ids, docs, bank=None, batch_size: int = 8, prefix=None):
    _, err = _console()
    columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("encode", total=len(docs))
        return model.encode(docs, ids, batch_size=batch_size, bank=bank, progress=lambda n: progress.advance(task, n), prefix=prefix)


def _locked(bank_path: Path):
    """The bank's write lock; says once that it waits for another writer."""
    from ...artifact import write_lock

    if not Path(bank_path).is_dir():
        raise LccError(f"'{bank_path}' is not a memory bank (no such folder); write one with `lcc memory encode`")
    _, err = _console()
    return write_lock(bank_path, waiting=lambda pid: err.print(f"waiting for another writer of {bank_path} (pid {pid})", highlight=False))


def _write(bank, bank_path: Path, output: Path | None, force: bool) -> Path:
    """Save an edited bank: over BANK itself (atomically: a new folder renamed into place), or to ``-o``."""
    target = output or bank_path
    bank.save(target, force=force or target == bank_path)
    return target


@memory_app.command()
def encode(
    artifact: Annotated[str, typer.Argument(help="msa artifact folder")],
    docs: Annotated[Path, typer.Option("--docs", help='JSONL, one document a line: {"id": ..., "text": ...} or {"id": ..., "tokens": [...]}')],
    output: Annotated[Path, typer.Option("-o", "--output", help="bank folder to write")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="documents per forward")] = 8,
    prefix_ids: Annotated[
        Optional[str],
        typer.Option("--prefix-ids", help="encode each document after this template prefix (the queries' --prefix-ids), as a dense prompt reads it"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing bank folder")] = False,
) -> None:
    """Encode documents into a new memory bank."""
    from ...artifact import check_destination
    from ...console import parse_ids

    out, _ = _console()
    check_destination(output, force, [Path(artifact), docs])
    model, tokenizer = _model(artifact)
    ids, tokens = read_docs(docs, tokenizer)
    prefix = parse_ids(prefix_ids, "--prefix-ids") if prefix_ids else None
    bank = _encode(model, ids, tokens, batch_size=batch_size, prefix=prefix)
    bank.save(output, force=force)
    out.print(
        f"wrote {output}: {len(bank.docs)} documents, {bank.tokens:,} tokens, {bank.chunks:,} chunks over {len(bank.layers)} routed layers", soft_wrap=True
    )


@memory_app.command()
def add(
    artifact: Annotated[str, typer.Argument(help="msa artifact folder")],
    bank_path: Annotated[Path, typer.Argument(metavar="BANK", help="bank folder")],
    docs: Annotated[Path, typer.Option("--docs", help="JSONL of the new documents (as for encode)")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="write the result here instead of replacing BANK (atomically)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="documents per forward")] = 8,
    force: Annotated[bool, typer.Option("--force", help="replace an existing -o folder")] = False,
) -> None:
    """Add documents to a bank; only the new ones are encoded."""
    from . import bank as memory_bank

    out, _ = _console()
    model, tokenizer = _model(artifact)
    ids, tokens = read_docs(docs, tokenizer)
    with _locked(bank_path):  # from reading the bank to replacing it: a concurrent add waits, nothing is lost
        bank = memory_bank.load(bank_path, model=model.facts)
        before = len(bank.docs)
        bank = _encode(model, ids, tokens, bank=bank, batch_size=batch_size)
        target = _write(bank, bank_path, output, force)
    out.print(f"wrote {target}: {len(bank.docs) - before} documents added, {len(bank.docs)} in all, {bank.chunks:,} chunks", soft_wrap=True)


@memory_app.command()
def remove(
    bank_path: Annotated[Path, typer.Argument(metavar="BANK", help="bank folder")],
    ids: Annotated[str, typer.Option("--ids", help="document ids to remove, comma-separated")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="write the result here instead of replacing BANK (atomically)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing -o folder")] = False,
) -> None:
    """Remove documents from a bank by id."""
    from . import bank as memory_bank

    out, _ = _console()
    gone = [i for i in ids.split(",") if i]
    with _locked(bank_path):
        bank = memory_bank.load(bank_path)
        bank.remove(gone)
        target = _write(bank, bank_path, output, force)
    out.print(f"wrote {target}: {len(gone)} documents removed, {len(bank.docs)} left, {bank.chunks:,} chunks", soft_wrap=True)


@memory_app.command()
def info(
    bank_path: Annotated[Path, typer.Argument(metavar="BANK", help="bank folder")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Summarise a bank: documents, tokens, chunks, bytes, and what it was encoded with."""
    from . import bank as memory_bank

    out, _ = _console()
    bank = memory_bank.load(bank_path)
    nbytes = sum(t.numel() * t.element_size() for name in memory_bank.PARTS for t in getattr(bank, name).values())
    facts = {
        "documents": len(bank.docs),
        "tokens": bank.tokens,
        "chunks": bank.chunks,
        "pool": bank.pool,
        "routed_layers": bank.layers,
        "bytes": nbytes,
        "bytes_per_token_per_layer": bank.bytes_per_token() if bank.layers else 0,
        "model": bank.model,
    }
    if as_json:
        out.print_json(json.dumps(facts))
        return
    table = Table("", "", show_header=False, title=str(bank_path), title_justify="left")
    for key, value in facts.items():
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)


@memory_app.command()
def query(
    artifact: Annotated[str, typer.Argument(help="msa artifact folder")],
    bank_path: Annotated[Path, typer.Option("--bank", help="bank folder")],
    question: Annotated[Optional[str], typer.Option("--question", help="question text (needs the source's tokenizer)")] = None,
    question_ids: Annotated[Optional[str], typer.Option("--question-ids", help="question token ids, e.g. 1,2,3")] = None,
    prefix_ids: Annotated[Optional[str], typer.Option("--prefix-ids", help="the template prefix's token ids (as many as --opt prefix)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="answer tokens to generate")] = 32,
    nproc: Annotated[int, typer.Option("--nproc", help="ranks for Memory Parallel (local gloo processes; the bank is sharded over them)")] = 1,
    positions: Annotated[Optional[str], typer.Option("--positions", help=POSITIONS_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Route a question over the bank, print the documents each routed layer chose, and generate the answer."""
    import torch

    from ...console import parse_ids
    from . import bank as memory_bank

    out, _ = _console()
    if bool(question) == bool(question_ids):
        raise LccError("give the question as --question TEXT or --question-ids 1,2,3 (one of them)")
    model, tokenizer = _model(artifact, positions)
    if question and tokenizer is None:
        raise LccError(f"no tokenizer for '{artifact}': its source has none saved; use --question-ids")
    prefix = parse_ids(prefix_ids or "", "--prefix-ids")
    if len(prefix) != model.config["prefix"]:
        raise LccError(f"the artifact was converted with --opt prefix={model.config['prefix']}; give that many --prefix-ids (got {len(prefix)})")
    asked = tokenizer.encode(question, add_special_tokens=False) if question else parse_ids(question_ids, "--question-ids")
    if not asked:
        raise LccError("the question is empty")
    if nproc < 1:
        raise LccError(f"--nproc {nproc}: Memory Parallel needs at least 1 rank")
    bank = memory_bank.load(bank_path, model=model.facts)
    if nproc > len(bank.docs):
        raise LccError(f"--nproc {nproc}: the bank has only {len(bank.docs)} documents to shard")
    ids = torch.tensor([prefix + asked])
    if nproc == 1:
        tokens, routing = model.generate(bank, ids, max_new_tokens)
        docs = routing.docs
    else:
        from .parallel import msa_generate

        done = msa_generate(artifact, bank_path, nproc, ids, max_new_tokens, positions)
        tokens, docs = done["tokens"], done["docs"]
    routed = {layer: [bank.docs[d] for d in docs[layer][0].tolist()] for layer in bank.layers}
    answer = list(tokens[0])
    text = tokenizer.decode(answer) if tokenizer else None
    if as_json:
        out.print_json(json.dumps({"routed": {str(k): v for k, v in routed.items()}, "answer_ids": answer, "answer": text}))
        return
    table = Table("layer", "documents (best first)", title="routing", title_justify="left")
    for layer, chosen in routed.items():
        table.add_row(str(layer), ", ".join(chosen))
    out.print(table)
    out.print(text if text is not None else ",".join(map(str, answer)), highlight=False, soft_wrap=True)
