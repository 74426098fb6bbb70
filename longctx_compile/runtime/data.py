"""Training data as token lists: JSONL documents, plain text, or random tokens; and the seeded stream of
fixed-length windows a training loop draws, batch ``step`` the same in a run resumed from a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import LccError


def read_docs(path: Path, tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """(ids, token lists) from JSONL lines ``{"id": ..., "text": ...}`` or ``{"id": ..., "tokens": [...]}`` (id: the line number if absent)."""
    if not path.is_file():
        raise LccError(f"no documents file '{path}'")
    ids, docs = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LccError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or ("text" in row) == ("tokens" in row):
            raise LccError(f'{where}: expected an object with "text" or "tokens" (one of them)')
        if "text" in row:
            if tokenizer is None:
                raise LccError(f'{where}: the artifact\'s source has no tokenizer saved; give documents as "tokens"')
            tokens = tokenizer.encode(str(row["text"]), add_special_tokens=False)
        else:
            tokens = row["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
                raise LccError(f'{where}: "tokens" must be a list of token ids')
        if not tokens:
            raise LccError(f"{where}: the document is empty")
        ids.append(str(row.get("id", number)))
        docs.append(tokens)
    if not docs:
        raise LccError(f"'{path}' holds no documents")
    return ids, docs


def read_tokens(data: str, tokenizer) -> list[list[int]] | None:
    """None for ``synthetic``; token lists from a JSONL file (``text`` or ``tokens`` per line) or a plain text file."""
    if data == "synthetic":
        return None
    path = Path(data)
    if not path.is_file():
        raise LccError(f"no training data file '{data}' (give a .jsonl or text file, or 'synthetic')")
    if path.suffix == ".jsonl":
        return read_docs(path, tokenizer)[1]
    if tokenizer is None:
        raise LccError(f"'{data}' is text, and the artifact's source has no tokenizer saved; give a .jsonl file of \"tokens\"")
    return [tokenizer.encode(path.read_text(), add_special_tokens=False)]


def token_stream(tokens: list[list[int]] | None, vocab: int, length: int, batch: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``step -> ids [batch, length]``: windows at seeded offsets inside documents of at least ``length`` tokens (or, when
    none is that long, of all of them concatenated), or uniform random tokens when ``tokens`` is None."""
    if tokens is None:
        return lambda step: torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    long = [torch.tensor(doc, dtype=torch.long) for doc in tokens if len(doc) >= length]
    if not long:
        long = [torch.tensor([t for doc in tokens for t in doc], dtype=torch.long)]
        if len(long[0]) < length:
            raise LccError(f"the training data holds {len(long[0])} tokens, fewer than --length {length}")
    top = max(int(doc.max()) for doc in long)
    if top >= vocab:
        raise LccError(f"the training data has token id {top}, outside the model's vocabulary 0..{vocab - 1}")

    def draw(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = []
        for d in torch.randint(0, len(long), (batch,), generator=g).tolist():
            start = int(torch.randint(0, len(long[d]) - length + 1, (1,), generator=g))
            rows.append(long[d][start : start + length])
        return torch.stack(rows)

    return draw
