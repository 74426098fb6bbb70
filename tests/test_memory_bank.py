"""The MSA memory bank: round trip, append/remove, shards, tiers, and refusal of corrupted or mismatched banks."""

from __future__ import annotations

import json

import pytest
import torch

from longctx_compile.errors import LccError
from longctx_compile.forms.msa import bank as memory_bank
from longctx_compile.forms.msa.bank import MemoryBank

MODEL = {"source": "tiny-llama", "kv_heads": 2, "head_dim": 4, "score": "cosine"}


def chunks_of(counts: list[int], seed: int, layers=(2, 3), dtype=torch.float32):
    """Random pooled tensors for documents with ``counts`` chunks: (chunk_doc, parts)."""
    g = torch.Generator().manual_seed(seed)
    chunk_doc = torch.cat([torch.full((n,), d) for d, n in enumerate(counts)])
    parts = {name: {layer: torch.randn(2, len(chunk_doc), 4, generator=g).to(dtype) for layer in layers} for name in memory_bank.PARTS}
    return chunk_doc, parts


def bank_with(docs: dict[str, int], seed: int = 0) -> MemoryBank:
    bank = MemoryBank.empty(8, MODEL, [2, 3], kv_heads=2, head_dim=4, v_dim=4)
    chunk_doc, parts = chunks_of(list(docs.values()), seed)
    bank.append(list(docs), [8 * n - 3 for n in docs.values()], chunk_doc, parts)
    return bank


def assert_same(a: MemoryBank, b: MemoryBank) -> None:
    assert (a.docs, a.doc_tokens, a.layers, a.pool, a.model) == (b.docs, b.doc_tokens, b.layers, b.pool, b.model)
    assert torch.equal(a.chunk_doc, b.chunk_doc)
    for name in memory_bank.PARTS:
        for layer in a.layers:
            assert torch.equal(getattr(a, name)[layer], getattr(b, name)[layer])


def test_round_trip_and_chunk_table(tmp_path):
    bank = bank_with({"a": 3, "b": 1, "c": 2})
    bank.save(tmp_path / "bank")
    loaded = memory_bank.load(tmp_path / "bank", model=MODEL)
    assert_same(bank, loaded)
    assert loaded.chunks == 6 and loaded.tokens == 6 * 8 - 9
    assert loaded.doc_chunks().tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]


def test_append_then_remove_equals_building_the_rest(tmp_path):
    """Appending encodes only the new documents; removing one leaves exactly the others, renumbered."""
    bank = bank_with({"a": 3, "b": 1})
    chunk_doc, parts = chunks_of([2], seed=5)
    bank.append(["c"], [11], chunk_doc, parts)
    assert bank.docs == ["a", "b", "c"] and bank.chunk_doc.tolist() == [0, 0, 0, 1, 2, 2]
    kept = {name: {layer: t[:, [3, 4, 5]] for layer, t in getattr(bank, name).items()} for name in memory_bank.PARTS}
    bank.remove(["a"])
    assert bank.docs == ["b", "c"] and bank.chunk_doc.tolist() == [0, 1, 1] and bank.doc_tokens == [5, 11]
    for name in memory_bank.PARTS:
        for layer in bank.layers:
            assert torch.equal(getattr(bank, name)[layer], kept[name][layer])
    bank.save(tmp_path / "bank")
    assert_same(bank, memory_bank.load(tmp_path / "bank"))


def test_refusals(tmp_path):
    bank = bank_with({"a": 3, "b": 1})
    with pytest.raises(LccError, match="already in the bank"):
        bank.append(["a"], [3], *chunks_of([1], 1))
    with pytest.raises(LccError, match="not in the bank"):
        bank.remove(["zzz"])
    path = bank.save(tmp_path / "bank")
    with pytest.raises(LccError, match="already exists"):
        bank.save(path)
    with pytest.raises(LccError, match="encoded with kv_heads=2, but this model has kv_heads=4"):
        memory_bank.load(path, model=dict(MODEL, kv_heads=4))
    with pytest.raises(LccError, match="not a memory bank"):
        memory_bank.load(tmp_path)
    data = bytearray((path / memory_bank.TENSORS).read_bytes())
    data[-3] ^= 0xFF  # one flipped bit of a value
    (path / memory_bank.TENSORS).write_bytes(bytes(data))
    with pytest.raises(LccError, match="does not match the checksum"):
        memory_bank.load(path)
    manifest = json.loads((path / memory_bank.MANIFEST).read_text())
    del manifest["docs"]
    (path / memory_bank.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LccError, match="corrupted manifest.json"):
        memory_bank.load(path)


def test_shards_are_balanced_and_cover_every_document():
    counts = [9, 1, 4, 4, 2, 7, 1]
    shards = memory_bank.partition(counts, 3)
    assert sorted(d for s in shards for d in s) == list(range(7))
    assert sorted(sum(counts[d] for d in s) for s in shards) == [9, 9, 10]
    bank = bank_with({str(d): n for d, n in enumerate(counts)})
    shard = bank.subset(shards[0])
    assert shard.docs == [str(d) for d in shards[0]]
    for local, doc in enumerate(shards[0]):
        rows = (bank.chunk_doc == doc).nonzero().flatten()
        torch.testing.assert_close(shard.keys[2][:, shard.chunk_doc == local], bank.keys[2][:, rows])


def test_bytes_per_token_and_tiers():
    """bf16 memory costs 3·Hkv·D·2 bytes per pooled chunk, over P tokens; placed() moves the tiers."""
    bank = MemoryBank.empty(64, MODEL, [0], kv_heads=8, head_dim=128, v_dim=128, dtype=torch.bfloat16)
    assert bank.bytes_per_token() == 3 * 8 * 128 * 2 / 64
    placed = bank_with({"a": 2}).placed(router="cpu", kv="cpu")
    assert placed.router_keys[2].device.type == "cpu" and placed.keys[2].device.type == "cpu"
