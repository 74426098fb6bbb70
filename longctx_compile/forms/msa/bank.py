"""The MSA memory bank: pooled K, V and router keys per routed layer, with a chunk → document index.

In memory: for each routed layer ``keys`` / ``values`` / ``router_keys`` ``[Hkv, C, D]`` over all C
chunks of the bank, ``chunk_doc [C]`` (the document of each chunk, an index into ``docs``), and per
document its id and token count. Chunks of one document are contiguous and in order. ``prefix``: the
template prefix token ids every document was encoded after (empty: each document alone, from position 0);
its documents' keys sit at positions ``len(prefix)..``, and queries must start with the same prefix.

On disk: a folder with ``bank.safetensors`` (every tensor) and ``manifest.json`` (format, pool size,
routed layers, the model facts the bank must match, the document ids, and the sha256 of the tensor
file), written atomically. Documents can be appended (only the new ones are encoded) and removed by
id. ``placed`` puts the tiers where they belong: router keys on the accelerator (scored for every
query), pooled K/V in (pinned) host memory (only the selected chunks are read).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ...artifact import atomic_folder, check_destination, sha256
from ...errors import LccError

FORMAT = "lcc-msa-bank"
FORMAT_VERSION = 1
TENSORS = "bank.safetensors"
MANIFEST = "manifest.json"
PARTS = ("keys", "values", "router_keys")


@dataclasses.dataclass
class MemoryBank:
    """Pooled memory of a converted model; ``model`` holds the facts a query program must match."""

    pool: int
    model: dict[str, Any]
    layers: list[int]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    router_keys: dict[int, torch.Tensor]
    chunk_doc: torch.Tensor
    docs: list[str]
    doc_tokens: list[int]
    prefix: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def empty(
        cls, pool: int, model: dict[str, Any], layers: list[int], kv_heads: int, head_dim: int, v_dim: int, dtype=torch.float32, prefix: list[int] = ()
    ) -> MemoryBank:
        def none(d: int) -> dict[int, torch.Tensor]:
            return {layer: torch.zeros(kv_heads, 0, d, dtype=dtype) for layer in layers}

        return cls(pool, dict(model), list(layers), none(head_dim), none(v_dim), none(head_dim), torch.zeros(0, dtype=torch.long), [], [], list(prefix))

    @property
    def chunks(self) -> int:
        return int(self.chunk_doc.numel())

    @property
    def tokens(self) -> int:
        return sum(self.doc_tokens)

    def doc_chunks(self) -> torch.Tensor:
        """[n_docs, M] the chunk indices of each document in order, -1 past its last (M: the most chunks of one document)."""
        counts = torch.bincount(self.chunk_doc, minlength=len(self.docs))
        width = int(counts.max()) if len(self.docs) else 1
        starts = torch.cumsum(counts, 0) - counts
        slots = torch.arange(width, device=counts.device)[None, :]
        return torch.where(slots < counts[:, None], starts[:, None] + slots, -1)

    def append(self, docs: list[str], doc_tokens: list[int], chunk_doc: torch.Tensor, parts: dict[str, dict[int, torch.Tensor]]) -> None:
        """Add documents: ``chunk_doc`` indexes ``docs`` (0-based), ``parts[name][layer]`` holds their [Hkv, c, D] chunks."""
        clash = sorted(set(docs) & set(self.docs)) or sorted(d for d, n in collections.Counter(docs).items() if n > 1)
        if clash:
            raise LccError(f"document id '{clash[0]}' is already in the bank; remove it first or give it another id")
        for name in PARTS:
            table = getattr(self, name)
            for layer in self.layers:
                table[layer] = torch.cat([table[layer], parts[name][layer].to(table[layer].dtype)], dim=1)
        self.chunk_doc = torch.cat([self.chunk_doc, chunk_doc.long() + len(self.docs)])
        self.docs += list(docs)
        self.doc_tokens += [int(n) for n in doc_tokens]

    def remove(self, ids: list[str]) -> None:
        """Drop the documents ``ids`` (each must be in the bank) and their chunks."""
        missing = [i for i in ids if i not in self.docs]
        if missing:
            raise LccError(f"document id '{missing[0]}' is not in the bank ({len(self.docs)} documents)")
        gone = set(ids)
        drop = torch.tensor([d in gone for d in self.docs], dtype=torch.bool)
        keep = ~drop[self.chunk_doc] if self.chunks else torch.zeros(0, dtype=torch.bool)
        for name in PARTS:
            table = getattr(self, name)
            for layer in self.layers:
                table[layer] = table[layer][:, keep]
        renumber = torch.cumsum(~drop, 0) - 1
        self.chunk_doc = renumber[self.chunk_doc[keep]]
        self.docs = [d for d, gone in zip(self.docs, drop.tolist(), strict=True) if not gone]
        self.doc_tokens = [n for n, gone in zip(self.doc_tokens, drop.tolist(), strict=True) if not gone]

    def subset(self, doc_indices: list[int]) -> MemoryBank:
        """A bank of the documents at ``doc_indices`` (in that order), e.g. one rank's shard."""
        order = torch.tensor(doc_indices, dtype=torch.long)
        chunk_doc = self.chunk_doc.cpu()  # the bookkeeping on the host; each tier is indexed on its own device
        pick = torch.cat([(chunk_doc == d).nonzero().flatten() for d in doc_indices]) if doc_indices else torch.zeros(0, dtype=torch.long)
        local = torch.full((len(self.docs),), -1, dtype=torch.long)
        local[order] = torch.arange(len(doc_indices))
        tables = {name: {layer: t[:, pick.to(t.device)] for layer, t in getattr(self, name).items()} for name in PARTS}
        return MemoryBank(
            self.pool,
            dict(self.model),
            list(self.layers),
            **tables,
            chunk_doc=local[chunk_doc[pick]].to(self.chunk_doc.device),
            docs=[self.docs[d] for d in doc_indices],
            doc_tokens=[self.doc_tokens[d] for d in doc_indices],
            prefix=list(self.prefix),
        )

    def placed(self, router: str | torch.device = "cpu", kv: str | torch.device = "cpu", pin: bool = False) -> MemoryBank:
        """The tiers on their devices: router keys on ``router``, pooled K/V on ``kv`` (pinned host memory with
        ``pin``, when an accelerator exists to copy the selected chunks to)."""

        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.to(kv)
            return t.pin_memory() if pin and t.device.type == "cpu" and torch.cuda.is_available() else t

        keys = {layer: host(t) for layer, t in self.keys.items()}
        values = {layer: host(t) for layer, t in self.values.items()}
        router_keys = {layer: t.to(router) for layer, t in self.router_keys.items()}
        return dataclasses.replace(self, keys=keys, values=values, router_keys=router_keys, chunk_doc=self.chunk_doc.to(router))

    def bytes_per_token(self) -> float:
        """Bytes of memory per document token per routed layer (K, V and router keys, pooled)."""
        layer = self.layers[0]
        per_chunk = sum(getattr(self, name)[layer].shape[0] * getattr(self, name)[layer].shape[2] * getattr(self, name)[layer].element_size() for name in PARTS)
        return per_chunk / self.pool

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write the bank folder atomically (an existing one only with ``force``)."""
        out = Path(out)
        check_destination(out, force)
        tensors = {"chunk_doc": self.chunk_doc.contiguous()}
        for name in PARTS:
            for layer, t in getattr(self, name).items():
                tensors[f"{name}.{layer}"] = t.contiguous()
        with atomic_folder(out) as tmp:
            safetensors.torch.save_file(tensors, str(tmp / TENSORS))
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "pool": self.pool,
                "model": self.model,
                "layers": self.layers,
                "docs": self.docs,
                "doc_tokens": self.doc_tokens,
                "prefix": self.prefix,
                "chunks": self.chunks,
                "sha256": sha256(tmp / TENSORS),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return out


def load(path: str | Path, model: dict[str, Any] | None = None, verify: bool = True) -> MemoryBank:
    """Read a bank folder; a missing, corrupted or (against ``model``) mismatched bank is a one-line error."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise LccError(f"'{path}' is not a memory bank (no {MANIFEST} and {TENSORS}); write one with `lcc memory encode`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        fields = [manifest[k] for k in ("format", "format_version", "pool", "model", "layers", "docs", "doc_tokens", "chunks", "sha256")]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LccError(f"memory bank '{path}' has a corrupted {MANIFEST} ({type(e).__name__}: {e})") from None
    if fields[0] != FORMAT or fields[1] != FORMAT_VERSION:
        raise LccError(f"'{path}' is a {fields[0]} v{fields[1]} folder, not a {FORMAT} v{FORMAT_VERSION} memory bank")
    if verify and sha256(path / TENSORS) != manifest["sha256"]:
        raise LccError(f"memory bank '{path}' is corrupted: {TENSORS} does not match the checksum in {MANIFEST}")
    if model is not None:
        check_matches(manifest["model"], model, path)
    try:
        tensors = safetensors.torch.load_file(str(path / TENSORS))
        tables = {name: {layer: tensors[f"{name}.{layer}"] for layer in manifest["layers"]} for name in PARTS}
        bank = MemoryBank(
            manifest["pool"],
            manifest["model"],
            manifest["layers"],
            **tables,
            chunk_doc=tensors["chunk_doc"],
            docs=manifest["docs"],
            doc_tokens=manifest["doc_tokens"],
            prefix=list(manifest.get("prefix", [])),  # banks from before prefix encoding: documents alone
        )
    except (KeyError, OSError, safetensors.SafetensorError) as e:
        raise LccError(f"memory bank '{path}' is corrupted: {type(e).__name__}: {e}") from None
    if bank.chunks != manifest["chunks"] or any(t.shape[1] != bank.chunks for name in PARTS for t in getattr(bank, name).values()):
        raise LccError(f"memory bank '{path}' is corrupted: its tensors do not hold the {manifest['chunks']} chunks its manifest lists")
    return bank


def check_matches(facts: dict[str, Any], model: dict[str, Any], where: Any) -> None:
    """Refuse a bank encoded for another model or configuration, naming the first fact that differs."""
    for key, want in model.items():
        if facts.get(key) != want:
            raise LccError(f"memory bank '{where}' was encoded with {key}={facts.get(key)!r}, but this model has {key}={want!r}; re-encode it")


def partition(chunk_counts: list[int], world: int) -> list[list[int]]:
    """Documents over ``world`` ranks, balanced by chunk count (largest first to the least-loaded rank)."""
    loads, shards = [0] * world, [[] for _ in range(world)]
    for doc in sorted(range(len(chunk_counts)), key=lambda d: -chunk_counts[d]):
        rank = min(range(world), key=lambda r: loads[r])
        shards[rank].append(doc)
        loads[rank] += chunk_counts[doc]
    return [sorted(shard) for shard in shards]
