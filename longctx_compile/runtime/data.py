"""Training data as token lists: JSONL documents, plain text, random tokens or a synthetic retrieval task; and the
seeded stream of fixed-length windows a training loop draws, batch ``step`` the same in a run resumed from a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import LccError


def jsonl_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, ``path:line``, parsed value) of each non-blank line of a JSONL file; a line that is not JSON is
    refused in one line naming where it is."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield number, where, json.loads(line)
        except json.JSONDecodeError as e:
            raise LccError(f"{where}: not a JSON object ({e.msg})") from None


def read_docs(path: Path, tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """(ids, token lists) from JSONL lines ``{"id": ..., "text": ...}`` or ``{"id": ..., "tokens": [...]}`` (id: the line number if absent)."""
    if not path.is_file():
        raise LccError(f"no documents file '{path}'")
    ids, docs = [], []
    for number, where, row in jsonl_rows(path):
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


def packed_stream(tokens: list[list[int]], vocab: int, length: int, batch: int, seed: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``step -> (ids, position ids)`` [batch, length]: each row packs whole documents drawn at seeded random, their
    positions restarting at 0 where each begins (a program with document masks attends within documents only);
    a document longer than the room left is cut, one longer than the window gives a window of itself."""
    docs = [torch.tensor(doc, dtype=torch.long) for doc in tokens]
    top = max(int(doc.max()) for doc in docs)
    if top >= vocab:
        raise LccError(f"the training data has token id {top}, outside the model's vocabulary 0..{vocab - 1}")

    def row(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions, filled = [], [], 0
        while filled < length:
            doc = docs[int(torch.randint(0, len(docs), (1,), generator=g))]
            if len(doc) > length:
                start = int(torch.randint(0, len(doc) - length + 1, (1,), generator=g))
                doc = doc[start : start + length]
            doc = doc[: length - filled]
            ids.append(doc)
            positions.append(torch.arange(len(doc)))
            filled += len(doc)
        return torch.cat(ids), torch.cat(positions)

    def draw(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = [row(g) for _ in range(batch)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    return draw


TASKS = ("passkey", "kv-recall")  # synthetic retrieval tasks generated on the fly
KEY_TOKENS = 5  # a passkey's length in tokens


def task_stream(task: str, vocab: int, length: int, batch: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``step -> ids [batch, length]`` of a retrieval task over random tokens, seeded by the step as :func:`token_stream` is.

    ``passkey``: a marker and KEY_TOKENS key tokens at a random depth of random filler, and at the end the marker and
    the key again (the key's second copy is only predictable from its first). ``kv-recall``: (key, value) token pairs
    with distinct keys after random filler, then the query marker, one of the keys and its value. The two highest ids
    are the markers; the rest of the vocabulary is content.
    """
    if task not in TASKS:
        raise LccError(f"unknown synthetic task '{task}'; known: {', '.join(TASKS)}")
    content, ask, mark = vocab - 2, vocab - 2, vocab - 1  # ids below ``content`` are content; the two above, markers
    need = 2 * (KEY_TOKENS + 1) + 1 if task == "passkey" else 5
    if length < need or content < 4:
        raise LccError(f"the {task} task needs --seq-len of at least {need} and a vocabulary of at least 6 tokens")

    def row(g: torch.Generator) -> torch.Tensor:
        ids = torch.randint(0, content, (length,), generator=g)
        if task == "passkey":
            key = torch.randint(0, content, (KEY_TOKENS,), generator=g)
            at = int(torch.randint(0, length - 2 * (KEY_TOKENS + 1) + 1, (1,), generator=g))
            ids[at], ids[at + 1 : at + 1 + KEY_TOKENS] = mark, key
            ids[-KEY_TOKENS - 1], ids[-KEY_TOKENS:] = mark, key
            return ids
        pairs = min((length - 3) // 2, content)
        keys, values = torch.randperm(content, generator=g)[:pairs], torch.randint(0, content, (pairs,), generator=g)
        start = length - 3 - 2 * pairs
        ids[start : start + 2 * pairs] = torch.stack([keys, values], 1).flatten()
        asked = int(torch.randint(0, pairs, (1,), generator=g))
        ids[-3:] = torch.tensor([ask, keys[asked], values[asked]])
        return ids

    return lambda step: torch.stack([row(torch.Generator().manual_seed(seed * 1_000_003 + step * batch + i)) for i in range(batch)])


def data_stream(data: str, tokenizer: Any, vocab: int, length: int, batch: int, seed: int, pack: bool = False) -> Callable[[int], Any]:
    """The windows a trainer draws from ``data``: a synthetic task's name, ``synthetic`` (random tokens), or a file;
    with ``pack``, rows of whole documents with their position ids (:func:`packed_stream`)."""
    if pack and (data in TASKS or data == "synthetic"):
        raise LccError(f"--pack packs documents: give a .jsonl or text file, not '{data}'")
    if data in TASKS:
        return task_stream(data, vocab, length, batch, seed)
    if pack:
        return packed_stream(read_tokens(data, tokenizer), vocab, length, batch, seed)
    return token_stream(read_tokens(data, tokenizer), vocab, length, batch, seed)
