"""Running an ``msa`` program as MSA's encode and query stages (``passes/msa.py`` marks the routed layers).

- *encode*: documents one per batch row, right-padded to a multiple of the pool size, positions
  restarting at 0 in each (Parallel RoPE); every layer attends within its document, and each routed
  layer's K (after RoPE), V and router keys are mean-pooled per chunk into a :class:`MemoryBank`.
- *query*: rows ``[prefix ; query]``; in each routed layer the router query of the query tokens
  (not the prefix) scores the bank's documents, the top-k documents' pooled chunks are gathered, and
  attention runs over ``[selected chunks ; prefix ; query]`` (the order of keys does not matter: their
  positions are baked in), the prefix rows not seeing the memory. Other layers attend over
  ``[prefix ; query]`` only. Positions (``MsaConfig.positions``): with ``global`` the query starts at
  ``prefix + k`` (Global RoPE); with ``contiguous`` it starts at ``prefix + G`` (G: the k longest
  documents' positions together) and each layer moves its selected documents' keys, in routing order,
  to end right before the query's first position, as one dense prompt ``[prefix ; docs ; query]``
  would place them.

Both run the program's graph with hooks at its attention sites (``runtime.interpret``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import torch

from ...errors import LccError
from ...ops.msa import msa_pool, msa_route, route_headwise, standardised
from ...ops.schema import Call
from ...passes.rope import Rotation, rotation
from ...runtime.interpret import attention_sites, flat_inputs, logits_index, step_state, with_site_hooks
from .bank import PARTS, MemoryBank

MSA = torch.ops.longctx.msa_attention.default
ATTENTION = torch.ops.longctx.attention.default


@dataclasses.dataclass
class QueryResult:
    """Logits [B, T, V] of the query rows, per routed layer the chosen document indices [B, k] and
    their scores, per attention site the context a decode step continues (K, V, real-key mask), and
    the last positions."""

    logits: torch.Tensor
    docs: dict[int, torch.Tensor]
    scores: dict[int, torch.Tensor]
    context: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    positions: torch.Tensor


def pool_fn(kernels: str):
    """Chunk pooling as the artifact's target runs it: the reference op, or the Triton kernel."""
    if kernels == "triton":
        from ...kernels.msa import pool

        return pool
    return msa_pool


def route_fn(kernels: str):
    """Routing ``(router_q, routes, router_keys, chunk_doc, table, score) -> [B, n_docs]`` on the artifact's target
    (``score``: cosine | dot through the ``msa_route`` op or its kernel; headwise in plain torch)."""
    op = msa_route
    if kernels == "triton":
        from ...kernels.msa import route as kernel

        def op(q, routes, keys, chunk_doc, table, cosine):
            return kernel(q, routes, keys, chunk_doc, table.shape[0], cosine)

    def scores(q, routes, keys, chunk_doc, table, score):
        if score == "headwise":
            return route_headwise(q, routes, keys, chunk_doc, table.shape[0])
        return op(q, routes, keys, chunk_doc, table, score == "cosine")

    return scores


class LocalMemory:
    """A whole bank on this process (tensors per routed layer, the chunk → document index and the
    [n_docs, M] chunk table): route over all of it and gather the winners' chunks."""

    def __init__(
        self,
        parts: dict[str, dict[int, torch.Tensor]],
        chunk_doc: torch.Tensor,
        table: torch.Tensor,
        model: dict,
        kernels: str = "reference",
        prefix: list[int] = (),
    ):
        self.parts, self.chunk_doc, self.table, self.model, self.prefix = parts, chunk_doc, table, model, list(prefix)
        self.layers, self.n_docs = sorted(parts["router_keys"]), table.shape[0]
        self.chunk_counts = (table >= 0).sum(1)  # [n_docs]
        self.route = route_fn(kernels)

    @classmethod
    def of(cls, bank: MemoryBank, kernels: str = "reference") -> LocalMemory:
        parts = {name: getattr(bank, name) for name in PARTS}
        return cls(parts, bank.chunk_doc, bank.doc_chunks(), bank.model, kernels, bank.prefix)

    def scores(self, site: int, router_q: torch.Tensor, routes: torch.Tensor, score: str) -> torch.Tensor:
        """Every document's routing score [B, n_docs] for layer ``site``."""
        return self.route(router_q, routes, self.parts["router_keys"][site], self.chunk_doc, self.table, score)

    def fetch(self, site: int, docs: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled keys and values [B, Hkv, k·M, D] of documents ``docs`` [B, k] in layer ``site``, and which slots hold a chunk [B, k·M]."""
        slots = self.table[docs.to(self.table.device)].flatten(1)  # chunk indices, -1 past a document's end
        # the K/V tier may live elsewhere (pinned host memory): gather there, ship only the selected chunks
        keys, values = (
            self.parts[name][site][:, slots.clamp(min=0).to(self.parts[name][site].device)].permute(1, 0, 2, 3).to(device, non_blocking=True)
            for name in ("keys", "values")
        )
        return keys, values, (slots >= 0).to(device)

    def select(self, site: int, router_q: torch.Tensor, routes: torch.Tensor, k: int, score: str, chosen=None):
        """(top-k document indices [B, k], their scores, pooled keys and values [B, Hkv, k·M, D] of their
        chunks, and which of those k·M slots hold a chunk [B, k·M]) for layer ``site``; ``chosen`` (indices,
        scores) when the documents were picked already (shared routing)."""
        if chosen is None:
            top = self.scores(site, router_q, routes, score).topk(k, dim=-1)
            chosen = top.indices, top.values
        return chosen[0], chosen[1], *self.fetch(site, chosen[0], router_q.device)


class MsaModel:
    """An ``msa`` program (a :class:`Compiled` or a loaded artifact's program) with encode and query."""

    def __init__(self, ep: torch.export.ExportedProgram, signature: dict[str, Any], positions: str | None = None):
        """``positions`` overrides the artifact's ``contiguous`` | ``global`` (artifacts from before the option: global)."""
        if "msa" not in signature:
            raise LccError("this program is not an msa form; convert it with --to msa")
        self.ep, self.signature, self.config = ep, signature, signature["msa"]
        self.positions = positions or self.config.get("positions", "global")
        if self.positions not in ("contiguous", "global"):
            raise LccError(f"invalid positions={self.positions!r}: expected contiguous or global")
        self.kernels = signature.get("kernels", "reference")  # lower records what the target runs beside the graph
        self.state = step_state(ep)
        self.logits_index = logits_index(ep)
        sites = attention_sites(ep)
        self.layers = [i for i, n in enumerate(sites) if n.target is MSA]
        first = Call.of(sites[self.layers[0]])
        self.kv_heads, self.head_dim = int(first.k.meta["val"].shape[1]), int(first.k.meta["val"].shape[-1])
        self.v_dim = int(first.v.meta["val"].shape[-1])
        # each routed layer's input h: what its router projections read (router_q = linear(h, W))
        routers = [Call.of(n).router_q.args[0].name for n in sites if n.target is MSA]
        self._hook: Any = None
        self._hidden: list | None = None
        self.grad = False  # whether runs keep the autograd graph (lcc train's document training sets it)
        self.graph = with_site_hooks(ep.graph_module, lambda site, call: self._hook(site, call), taps=routers, tap=self._tap)
        self.rotations = self._rotations(sites) if self.positions == "contiguous" else {}
        self.voters = set(self.config.get("route") or ())  # the layers whose scores pick every layer's documents (shared routing)
        self.facts = {"weights": self._fingerprint(), "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "pool": self.config["pool"]}

    def _rotations(self, sites: list[torch.fx.Node]) -> dict[int, Rotation]:
        """Each routed layer's key rotation (``passes.rope``), which moves documents to their contiguous places."""
        positions = next(n for n in self.ep.graph_module.graph.nodes if n.op == "placeholder" and n.name == "position_ids")
        out = {}
        for site in self.layers:
            found = rotation(self.ep, Call.of(sites[site]).k, positions)
            if found is None:
                raise LccError(f"attention site {site}: positions=contiguous needs a RoPE lcc can cut out of the graph; use positions=global")
            out[site] = found
        return out

    def gap(self, memory: Any, k: int) -> int:
        """Positions between the prefix and the query under ``contiguous``: the k longest documents' chunks times the pool."""
        return int(memory.chunk_counts.topk(min(k, memory.n_docs)).values.sum()) * self.config["pool"]

    def _place(self, site: int, keys: torch.Tensor, valid: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """The selected documents' keys [B, Hkv, k·M, D] (each rotated from the position it was encoded at; ``valid``
        [B, k, M] marks real chunks) moved by up to ``start`` [B] (the query's first position less that encoding start)
        to lie one after another, in routing order, ending right before the query."""
        spans = valid.sum(-1) * self.config["pool"]  # [B, k] the positions each selected document takes
        starts = start[:, None] - spans.flip(1).cumsum(1).flip(1)  # document j starts where the ones after it end
        offsets = starts[:, :, None].expand(valid.shape).flatten(1)  # [B, k·M] (not repeat_interleave: ONNX mistranslates it)
        return self.rotations[site].shift(keys, offsets, self.state)

    def _fingerprint(self) -> str:
        """A short hash of the routed layers' projection weights that a bank's keys depend on (router k, and the k/v
        projections beside it): a bank encoded by other weights is refused, not silently misread."""
        digest = hashlib.sha256()
        for name in sorted(n for n in self.state if "router_k_proj" in n or ".k_proj." in n or ".v_proj." in n):
            digest.update(name.encode())
            digest.update(self.state[name].detach().float().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _tap(self, name: str, value: torch.Tensor) -> None:
        if self._hidden is not None:
            self._hidden.append(value)

    def _run(self, hook, inputs: dict[str, torch.Tensor], every: bool = False, hidden: list | None = None) -> torch.Tensor:
        """Logits of the graph over ``inputs``, ``hook(site, call)`` at each routed site (at every site with ``every``:
        the others run their own op, a lowered kernel included); ``hidden`` receives the routed layers' inputs."""
        flat = flat_inputs(self.ep, self.signature["inputs"], self.state, inputs)
        self._hook = hook if every else (lambda site, call: hook(site, call) if call.op is MSA else call())
        self._hidden = hidden
        try:
            with torch.set_grad_enabled(self.grad):
                return self.graph(*flat)[self.logits_index]
        finally:
            self._hook, self._hidden = None, None

    def _inputs(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": input_ids, "position_ids": positions}
        if "attention_mask" in self.signature["inputs"]:
            inputs["attention_mask"] = mask
        return inputs

    def encode(
        self,
        docs: list[list[int]],
        ids: list[str] | None = None,
        batch_size: int = 8,
        bank: MemoryBank | None = None,
        progress=None,
        prefix: list[int] | None = None,
    ) -> MemoryBank:
        """Encode token-id documents into ``bank`` (a new one if None); ``ids`` default to their indices as strings.

        ``prefix`` (a new bank's; a bank keeps the one it was started with): the template prefix's token ids, which
        each document is encoded after, as a dense prompt ``[prefix ; document]`` would run it; its keys are not
        stored (the query holds the prefix). Without one, documents run alone from position 0 (the paper's), and
        each document's first token becomes an attention sink the query then meets once per document.
        """
        ids = [str(i + (len(bank.docs) if bank else 0)) for i in range(len(docs))] if ids is None else list(ids)
        if len(ids) != len(docs) or any(len(d) == 0 for d in docs):
            raise LccError("every document needs an id and at least one token")
        P = self.config["pool"]
        if bank is None:
            dtype = self.state[next(iter(self.state))].dtype
            bank = MemoryBank.empty(P, self.facts, self.layers, self.kv_heads, self.head_dim, self.v_dim, dtype, prefix or [])
        elif prefix is not None and list(prefix) != bank.prefix:
            raise LccError("the bank's documents were encoded after another prefix; add to it with the prefix it has, or start a new bank")
        head = bank.prefix
        if head and len(head) != self.config["prefix"]:
            raise LccError(f"a prefix of {len(head)} tokens to encode after, but the artifact was converted with --opt prefix={self.config['prefix']}")
        lead = math.ceil(len(head) / P) * P  # the prefix, left-padded so each document starts a chunk
        order = sorted(range(len(docs)), key=lambda d: len(docs[d]))
        new_ids, new_tokens, new_doc, new_parts = [], [], [], {name: {layer: [] for layer in self.layers} for name in PARTS}
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            L = lead + math.ceil(max(len(docs[d]) for d in rows) / P) * P
            ids_t = torch.zeros(len(rows), L, dtype=torch.long)
            real = torch.zeros(len(rows), L, dtype=torch.long)
            ids_t[:, lead - len(head) : lead] = torch.tensor(head, dtype=torch.long)
            real[:, lead - len(head) : lead] = 1
            for n, d in enumerate(rows):
                ids_t[n, lead : lead + len(docs[d])] = torch.tensor(docs[d])
                real[n, lead : lead + len(docs[d])] = 1
            pooled = self.encode_rows(ids_t, real, lead)
            for n, d in enumerate(rows):
                keep = pooled["keys"][self.layers[0]][1][n] > 0
                for name in PARTS:
                    for layer in self.layers:
                        new_parts[name][layer].append(pooled[name][layer][0][n][:, keep])
                new_doc.append(torch.full((int(keep.sum()),), len(new_ids), dtype=torch.long))
                new_ids.append(ids[d])
                new_tokens.append(len(docs[d]))
            if progress is not None:
                progress(len(rows))
        # one append for all of them: appending per document would copy the growing bank each time
        parts = {name: {layer: torch.cat(ts, dim=1) for layer, ts in by_layer.items()} for name, by_layer in new_parts.items()}
        bank.append(new_ids, new_tokens, torch.cat(new_doc), parts)
        return bank

    def encode_rows(self, input_ids: torch.Tensor, real: torch.Tensor, lead: int = 0) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """One document per row (right padding, its length a multiple of the pool), after ``lead`` positions of
        left-padded prefix: per part and routed layer, (pooled [N, Hkv, (L - lead)/P, D], counts) of the documents."""
        N, L = input_ids.shape
        pool = pool_fn(self.kernels)
        pooled = {name: {} for name in PARTS}

        def hook(site, call):
            router_k = call.router_k.view(N, L, call.k.shape[1], -1).transpose(1, 2)
            for name, t in zip(PARTS, (call.k, call.v, router_k), strict=True):
                pooled[name][site] = pool(t[:, :, lead:], real[:, lead:], self.config["pool"])
            return call.run(ATTENTION)

        positions = (real.cumsum(-1) - 1).clamp(min=0)  # 0.. over the prefix, then on through the document
        self._run(hook, self._inputs(input_ids, real, positions))
        return pooled

    def query(
        self,
        bank: MemoryBank | Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden: list | None = None,
        routing: torch.Tensor | None = None,
    ) -> QueryResult:
        """Logits of ``[prefix ; query]`` rows (left padding allowed) routed over ``bank``: a :class:`MemoryBank`,
        or a memory with the same ``select`` as :class:`LocalMemory` (``runtime.memory_parallel.ParallelMemory``).
        ``hidden``, when given, receives each routed layer's input hidden states (what the routers project).
        ``routing`` [B, T] (default: every token after the prefix) limits which of those tokens route; the others
        still read the memory, as decoded tokens do (training appends the answer to the query this way)."""
        from .bank import check_matches

        memory = LocalMemory.of(bank, self.kernels) if isinstance(bank, MemoryBank) else bank
        check_matches(memory.model, self.facts, "given")
        if not memory.n_docs:
            raise LccError("the memory bank holds no documents; add some with `lcc memory add`")
        B, T = input_ids.shape
        mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device) if attention_mask is None else attention_mask.long()
        prefix, topk = self.config["prefix"], self.config["topk"]
        if memory.prefix:  # documents encoded after a prefix are read after that same prefix
            for b in range(B):
                if input_ids[b][mask[b] > 0][:prefix].tolist() != memory.prefix:
                    raise LccError(f"the bank's documents were encoded after the prefix {memory.prefix}; start each query with it")
        k = memory.n_docs if topk < 0 else min(topk, memory.n_docs)
        seen = mask.cumsum(-1)  # real tokens so far, this one included
        after = (seen > prefix) & (mask > 0)  # query tokens read the memory; the prefix and padding do not
        routes = after if routing is None else after & routing.bool()  # and those route
        if position_ids is None:  # the prefix at 0.., the query from prefix + k (global) or prefix + G (contiguous)
            offset = self.gap(memory, k) if self.rotations else (topk if topk > 0 else memory.n_docs)
            position_ids = (seen - 1).clamp(min=0) + torch.where(after, offset, 0)
        # the first query position of each row: contiguous documents end right before it
        start = torch.where(after.any(1), position_ids.masked_fill(~after, torch.iinfo(position_ids.dtype).max).amin(1), 0)
        inputs = self._inputs(input_ids, mask, position_ids)
        votes: list[torch.Tensor] = []  # shared routing: the voting layers' standardised scores so far
        chosen, scored, context = {}, {}, []
        own_keys = mask.bool()

        def hook(site, call):
            q, k_self, v_self = call.q, call.k, call.v
            if call.get("doc_ids") is not None or call.get("mask") is not None:
                raise LccError("msa queries take plain causal attention with padding; this program has document or arbitrary masks")
            if site not in memory.layers:  # a layer without memory: [prefix ; query] as the graph has it
                context.append((k_self, v_self, own_keys))
                return call()
            Hq, D = q.shape[1], q.shape[-1]
            router_q = call.router_q.view(B, T, Hq, D).transpose(1, 2)
            shared = None
            if site in self.voters:
                votes.append(standardised(memory.scores(site, router_q, routes, self.config["score"])))
            if votes:  # each layer reads the top-k of the votes cast up to it; past the last voter, of them all
                top = torch.stack(votes).sum(0).topk(k, dim=-1)
                shared = top.indices, top.values
            chosen[site], scored[site], keys, values, valid = memory.select(site, router_q, routes, k, self.config["score"], shared)
            if self.rotations:
                keys = self._place(site, keys, valid.view(B, k, -1), start - len(memory.prefix))
            keys, values = torch.cat([keys.to(k_self.dtype), k_self], dim=2), torch.cat([values.to(v_self.dtype), v_self], dim=2)
            padding = torch.cat([valid, own_keys], dim=1)
            context.append((keys, values, padding))
            memory_rows = torch.cat([after[:, :, None].expand(B, T, valid.shape[1]), torch.ones(B, T, T, dtype=torch.bool, device=q.device)], dim=2)
            return ATTENTION(q, keys, values, padding, None, memory_rows[:, None], call.scale, True, 0)

        logits = self._run(hook, inputs, every=True, hidden=hidden)
        return QueryResult(logits, chosen, scored, context, position_ids)

    def dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of plain rows from position 0, every layer over its own input: the source model."""
        ones = torch.ones_like(input_ids)
        return self._run(lambda site, call: call(), self._inputs(input_ids, ones, ones.cumsum(-1) - 1), every=True)

    def document_hidden(self, docs: list[list[int]]) -> list[list[torch.Tensor]]:
        """Per document, each routed layer's input hidden states [L, hidden] as encode computes them (positions from 0)."""
        out = []
        for doc in docs:
            ids = torch.tensor([doc])
            hidden: list = []
            self._run(lambda site, call: call.run(ATTENTION), self._inputs(ids, torch.ones_like(ids), torch.arange(len(doc))[None]), hidden=hidden)
            out.append([h[0] for h in hidden])
        return out

    def decode(self, result: QueryResult, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of one new token per row after ``result``, whose context grows by it (in place).

        A decode step routes nothing and needs no collective: each layer attends over the context the
        query assembled plus the tokens decoded so far (MSA's append-only decode).
        """
        B = tokens.shape[0]
        result.positions = result.positions[:, -1:] + 1
        ones = torch.ones(B, 1, dtype=torch.bool, device=tokens.device)

        def hook(site, call):
            keys, values, real = result.context[site]
            keys, values, real = torch.cat([keys, call.k], 2), torch.cat([values, call.v], 2), torch.cat([real, ones], 1)
            result.context[site] = (keys, values, real)
            return call.replace(k=keys, v=values, key_padding=real, doc_ids=None, mask=None, causal=True, window=0)()

        return self._run(hook, self._inputs(tokens.view(B, 1), ones.long(), result.positions), every=True)

    def generate(
        self,
        bank: MemoryBank | Any,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        stream=None,
        **sampling,
    ) -> tuple[list[list[int]], QueryResult]:
        """New tokens of each query row (greedy unless ``sampling`` — keys of :class:`runtime.generate.Sampling` —
        says otherwise; a stop id, when hit, is the last) and the query's result, through the one generation loop."""
        from ...runtime.generate import Sampling, collect, token_steps

        result = self.query(bank, input_ids, attention_mask, position_ids)
        steps = token_steps(result.logits[:, -1], lambda token: self.decode(result, token)[:, -1], max_new_tokens, Sampling(**sampling))
        return collect(steps, input_ids.shape[0], stream), result


def generate_with_bank(
    ep: torch.export.ExportedProgram,
    signature: dict[str, Any],
    bank,
    prompts,
    max_new_tokens: int,
    pad_id: int,
    stream,
    positions: str | None = None,
    **sampling,
):
    """New tokens of each prompt (``[prefix ; question]`` token ids) routed over ``bank`` (a :class:`MemoryBank` or its
    folder), prompts left-padded to one batch; ``positions`` as :class:`MsaModel`'s."""
    from ...runtime.generate import pad_prompts
    from . import bank as memory_bank

    model = MsaModel(ep, signature, positions)
    if not isinstance(bank, MemoryBank):
        bank = memory_bank.load(bank, model=model.facts)
    ids, mask = pad_prompts(prompts, max_new_tokens, pad_id, signature["inputs"], signature["max_len"], signature["vocab_size"])
    return model.generate(bank, ids, max_new_tokens, attention_mask=mask, stream=stream, **sampling)[0]
