"""The MSA stages as exported programs: *encode*, *query* and *decode* (``torch.export``, weights as an input).

Each wraps the same interpreter run as :class:`runtime.msa.MsaModel` (so their semantics are its
semantics) in a module and exports it with dynamic batch, lengths and bank sizes: portable programs
that take ``model.pt2``'s weights as ``state``, derived from an artifact when asked (ONNX export); the
runtime itself runs :class:`~.msa.MsaModel` over ``model.pt2`` directly.

- encode(state, input_ids [N, L], real [N, L]) -> per routed layer (K̄, count, V̄, count, K̄ᴿ, count),
  L a multiple of the pool size; positions restart at 0 per row.
- query(state, input_ids, attention_mask, position_ids [B, T], router_keys, keys, values (one per
  routed layer, [Hkv, C, D]), chunk_doc [C], table [n_docs, M]) -> (last-position logits [B, 1, V],
  top-k documents and scores per routed layer, then K, V and real-key mask of every site's context).
  The bank must hold at least top-k documents (:func:`padded_table` adds empty ones).
- decode(state, tokens [B, 1], last positions [B, 1], contexts) -> (logits [B, 1, V], grown contexts).
"""

from __future__ import annotations

import contextlib

import torch
from torch.export import Dim

from ...runtime.interpret import export_program
from .bank import PARTS
from .runtime import LocalMemory, MsaModel, QueryResult

PROGRAMS = ("encode", "query", "decode")


@contextlib.contextmanager
def _weights(model: MsaModel, state: dict[str, torch.Tensor]):
    """Run ``model`` on the given ``state`` (the exported programs' weight input)."""
    saved, model.state = model.state, state
    try:
        yield
    finally:
        model.state = saved


def padded_table(table: torch.Tensor, k: int) -> torch.Tensor:
    """The [n_docs, M] chunk table with empty documents (no chunk: never selected over a real one) up to ``k`` rows."""
    if table.shape[0] >= k:
        return table
    return torch.cat([table, torch.full((k - table.shape[0], table.shape[1]), -1, dtype=table.dtype)])


class EncodeStep(torch.nn.Module):
    def __init__(self, model: MsaModel):
        super().__init__()
        self.model = model

    def forward(self, state, input_ids, real):
        with _weights(self.model, state):
            pooled = self.model.encode_rows(input_ids, real)
        return tuple(t for site in self.model.layers for name in PARTS for t in pooled[name][site])


class QueryStep(torch.nn.Module):
    def __init__(self, model: MsaModel):
        super().__init__()
        self.model = model

    def forward(self, state, input_ids, attention_mask, position_ids, router_keys, keys, values, chunk_doc, table):
        m = self.model
        parts = {name: dict(zip(m.layers, tensors, strict=True)) for name, tensors in zip(PARTS, (keys, values, router_keys), strict=True)}
        memory = LocalMemory(parts, chunk_doc, table, m.facts, m.kernels)
        with _weights(m, state):
            result = m.query(memory, input_ids, attention_mask, position_ids)
        routed = [t for site in m.layers for t in (result.docs[site], result.scores[site])]
        return (result.logits[:, -1:], *routed, *(t for context in result.context for t in context))


class DecodeStep(torch.nn.Module):
    def __init__(self, model: MsaModel):
        super().__init__()
        self.model = model

    def forward(self, state, tokens, positions, contexts):
        result = QueryResult(None, {}, {}, [tuple(c) for c in contexts], positions)
        with _weights(self.model, state):
            logits = self.model.decode(result, tokens)
        return (logits, *(t for context in result.context for t in context))


def export_programs(model: MsaModel) -> dict[str, torch.export.ExportedProgram]:
    """Export encode, query and decode of ``model`` with dynamic batch, lengths and bank sizes."""
    P, topk = model.config["pool"], model.config["topk"]
    k = max(topk, 1)
    state = model.state
    static_state = {name: None for name in state}
    n, chunks = Dim("n", max=4096), Dim("chunks", max=4096)
    encode = export_program(
        EncodeStep(model),
        (state, torch.zeros(2, 2 * P, dtype=torch.long), torch.ones(2, 2 * P, dtype=torch.long)),
        {"state": static_state, "input_ids": {0: n, 1: P * chunks}, "real": {0: n, 1: P * chunks}},
    )
    batch, length = Dim("batch", max=1024), Dim("length", min=2, max=4096)
    bank_chunks, docs, width = Dim("bank_chunks", min=2), Dim("docs", min=max(k, 2)), Dim("width", min=2)
    n_docs, M = max(k, 2) + 1, 2
    C = n_docs * M
    hkv, d, dv = model.kv_heads, model.head_dim, model.v_dim
    bank = [[torch.zeros(hkv, C, dim) for _ in model.layers] for dim in (d, d, dv)]
    table = torch.arange(C).view(n_docs, M)
    ids = torch.zeros(2, 3, dtype=torch.long)
    query_args = (state, ids, torch.ones_like(ids), torch.arange(3).expand(2, 3).clone(), *bank, torch.arange(C) // M, table)
    per_layer = [{1: bank_chunks}] * len(model.layers)
    query = export_program(
        QueryStep(model),
        query_args,
        {
            "state": static_state,
            "input_ids": {0: batch, 1: length},
            "attention_mask": {0: batch, 1: length},
            "position_ids": {0: batch, 1: length},
            "router_keys": per_layer,
            "keys": per_layer,
            "values": per_layer,
            "chunk_doc": {0: bank_chunks},
            "table": {0: docs, 1: width},
        },
    )
    with torch.no_grad():
        contexts = QueryStep(model)(*query_args)[1 + 2 * len(model.layers) :]
    contexts = [list(contexts[i : i + 3]) for i in range(0, len(contexts), 3)]
    context_dims = [
        [{0: batch, 2: Dim(f"keys_{i}", min=2)}, {0: batch, 2: Dim(f"keys_{i}", min=2)}, {0: batch, 1: Dim(f"keys_{i}", min=2)}] for i in range(len(contexts))
    ]
    decode = export_program(
        DecodeStep(model),
        (state, torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), 2), contexts),
        {"state": static_state, "tokens": {0: batch}, "positions": {0: batch}, "contexts": context_dims},
    )
    return {"encode": encode, "query": query, "decode": decode}
