"""Memory Parallel (MSA §3.4.2): the bank's documents sharded over ranks, each rank serving its own queries.

The model is replicated; rank r holds the documents ``partition(...)[r]`` (balanced by chunk count).
Per routed layer, each query round runs the paper's collectives over the default process group:

1. all-gather the router queries and routing masks of every rank's batch (padded to the largest);
2. every rank scores all of them against its own router keys and keeps a local top-k;
3. all-to-all of the local top-k (scores, global document ids): each rank receives, for its own
   queries, every owner's candidates, and merges them into the exact global top-k (the union of the
   local top-ks holds it);
4. all-to-all of requests (the winning documents, as owners' local indices) and then of the
   requested documents' pooled K and V, with variable splits.

Decoding afterwards needs no collective: the assembled context is local (``MsaModel.decode``).
Results equal one rank's up to the order of keys in the softmax and ties in scores.

The exchanges of queries, scores and K/V carry gradients (the reverse exchange), as does the all-reduce of
headwise moments, so ``lcc train --nproc P`` runs MSA's document training over a bank sharded this way: each rank
encodes only its documents, and the answer's and router's losses reach them through the collectives (``train.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ...distributed import ranks
from ...ops.msa import headwise_matches, headwise_scores, moments
from .bank import MemoryBank, partition
from .runtime import route_fn


class _Exchange(torch.autograd.Function):
    """All-to-all with variable splits whose gradient is the reverse exchange: what this rank sent to rank s comes
    back as s's gradient of it (so keys and scores fetched from their owners train the owners' encodings)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty(sum(receive), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


class _Summed(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the sum of every rank's: each rank's loss reads the same total."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ParallelMemory:
    """This rank's shard of a bank, with the routing and fetching collectives of Memory Parallel."""

    def __init__(
        self, shard: MemoryBank, shards: list[list[int]], chunk_counts: torch.Tensor, group: dist.ProcessGroup | None = None, kernels: str = "reference"
    ):
        """``shard``: the documents ``shards[rank]`` of a whole bank (global indices, in that order) whose every
        document has ``chunk_counts`` chunks; ``kernels`` as the artifact's ``msa.kernels`` (the reference routing op,
        or the Triton kernel). The collectives are differentiable: training runs them with the shard's tensors."""
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.chunk_counts, self.shards = chunk_counts, shards  # every document's, for positions=contiguous
        self.owner = torch.empty(len(chunk_counts), dtype=torch.long)  # each document's rank
        for rank, owned in enumerate(self.shards):
            self.owner[owned] = rank
        self.owned = self.shards[self.rank]  # global indices of this rank's documents, in order
        self.bank, self.table = shard, shard.doc_chunks()
        self.layers, self.model, self.n_docs, self.prefix = shard.layers, shard.model, len(chunk_counts), list(shard.prefix)
        self.sent_bytes = 0
        self.route = route_fn(kernels)

    @classmethod
    def share(cls, bank: MemoryBank, group: dist.ProcessGroup | None = None, kernels: str = "reference") -> ParallelMemory:
        """This rank's share of a whole ``bank`` (every rank passes the same one, or loads it), balanced by chunk count."""
        counts = torch.bincount(bank.chunk_doc.cpu(), minlength=len(bank.docs))
        shards = partition(counts.tolist(), dist.get_world_size(group))
        return cls(bank.subset(shards[dist.get_rank(group)]), shards, counts, group, kernels)

    def _all_to_all(self, send: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Rank r's ``send[r]`` to rank r, of any lengths along dim 0: what every rank sent to this one (on ``device``:
        the process group's, CUDA under NCCL)."""
        sizes = torch.tensor([len(t) for t in send], device=device)
        incoming = torch.empty_like(sizes)
        dist.all_to_all_single(incoming, sizes, group=self.group)
        out = _Exchange.apply(torch.cat(send).to(device), sizes.tolist(), incoming.tolist(), self.group)
        self.sent_bytes += sum(t.numel() * t.element_size() for i, t in enumerate(send) if i != self.rank)
        return list(out.split(incoming.tolist()))

    def _queries(self, router_q: torch.Tensor, routes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every rank's router queries and routing masks, padded to the largest batch and length, and that batch."""
        B, Hq, T, D = router_q.shape
        dev = router_q.device  # where the collectives run (the queries' device: CUDA under NCCL, CPU under gloo)
        shapes = torch.tensor([B, T], device=dev)
        every = [torch.empty_like(shapes) for _ in range(self.world)]
        dist.all_gather(every, shapes, group=self.group)
        Bm, Tm = (max(int(s[i]) for s in every) for i in (0, 1))
        q = torch.zeros(Bm, Hq, Tm, D, dtype=router_q.dtype, device=dev)
        q[:B, :, :T] = router_q
        r = torch.zeros(Bm, Tm, dtype=torch.uint8, device=dev)  # gloo has no bool collectives
        r[:B, :T] = routes
        rs = [torch.empty_like(r) for _ in range(self.world)]
        dist.all_gather(rs, r, group=self.group)
        qs = _Exchange.apply(q.repeat(self.world, 1, 1, 1), [Bm] * self.world, [Bm] * self.world, self.group)  # an all-gather with a gradient
        self.sent_bytes += q.numel() * q.element_size() + r.numel()
        return qs, torch.cat(rs), Bm

    def _local_scores(self, site: int, qs: torch.Tensor, rs: torch.Tensor, score: str) -> torch.Tensor:
        """This shard's document scores [world·Bm, local] for every rank's queries (headwise: standardised over every
        rank's documents, whose moments are all-reduced)."""
        if score == "headwise":
            keys = self.bank.router_keys[site]
            matches = headwise_matches(qs, rs, keys, self.bank.chunk_doc, len(self.owned)) if self.owned else qs.new_zeros(*qs.shape[:3], 0)
            totals = _Summed.apply(moments(matches), self.group)
            return headwise_scores(matches, rs, totals)
        if not self.owned:
            return torch.zeros(qs.shape[0], 0, device=qs.device)
        return self.route(qs, rs, self.bank.router_keys[site], self.bank.chunk_doc, self.table, score)

    def scores(self, site: int, router_q: torch.Tensor, routes: torch.Tensor, score: str) -> torch.Tensor:
        """Every document's routing score [B, n_docs] for this rank's queries (shared routing): each owner scores its
        documents for every rank's queries and sends each rank its rows."""
        B, dev = router_q.shape[0], router_q.device
        qs, rs, Bm = self._queries(router_q, routes)
        local = self._local_scores(site, qs, rs, score)  # [world·Bm, local]
        got = self._all_to_all([block.T for block in local.view(self.world, Bm, -1)], dev)  # per owner [its docs, Bm]
        out = torch.full((B, self.n_docs), float("-inf"), device=dev)
        for owner, block in enumerate(got):
            out[:, torch.tensor(self.shards[owner], dtype=torch.long, device=dev)] = block.T[:B]
        return out

    def select(self, site: int, router_q: torch.Tensor, routes: torch.Tensor, k: int, score: str, chosen=None):
        """As :meth:`runtime.msa.LocalMemory.select`, over the documents of every rank."""
        if chosen is not None:
            return chosen[0], chosen[1], *self.fetch(site, chosen[0], router_q.device)
        B, dev = router_q.shape[0], router_q.device
        qs, rs, Bm = self._queries(router_q, routes)
        # this shard's local top-k for all of them (-inf, id -1 where the shard has fewer than k documents)
        local = len(self.owned)
        scores = torch.full((self.world * Bm, k), float("-inf"), device=dev)
        ids = torch.full((self.world * Bm, k), -1, dtype=torch.long, device=dev)
        if local:
            top = self._local_scores(site, qs, rs, score).topk(min(k, local), dim=-1)
            scores[:, : top.values.shape[1]] = top.values
            ids[:, : top.values.shape[1]] = torch.tensor(self.owned, dtype=torch.long, device=dev)[top.indices]
        # each rank gets every owner's candidates for its own queries and merges them
        cand_scores = self._all_to_all(list(scores.view(self.world, Bm, k)), dev)
        cand_ids = self._all_to_all(list(ids.view(self.world, Bm, k)), dev)
        all_scores = torch.stack(cand_scores, 1)[:B].flatten(1)  # [B, W·k], owner-major
        all_ids = torch.stack(cand_ids, 1)[:B].flatten(1)
        best = all_scores.topk(k, dim=-1)
        docs = all_ids.gather(1, best.indices)
        return docs, best.values, *self.fetch(site, docs, dev)

    def fetch(self, site: int, docs: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`runtime.msa.LocalMemory.fetch`: each owner sends the chunks of the documents ``docs`` [B, k] it holds."""
        B, k = docs.shape
        owners = self.owner[docs.cpu()].to(dev)
        requests = [docs[owners == o] for o in range(self.world)]  # row-major: (b, j) order within each owner
        asked = self._all_to_all([t.view(-1, 1) for t in requests], dev)
        where = {g: i for i, g in enumerate(self.owned)}
        keys, values = self.bank.keys[site], self.bank.values[site]
        replies_k, replies_v, replies_n = [], [], []
        for wanted in asked:
            rows = [self.table[where[int(g)]] for g in wanted.flatten().tolist()]
            chunks = [row[row >= 0] for row in rows]
            flat = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
            # gathered where the K/V tier lives (pinned host memory, say); only the selected chunks travel
            replies_k.append(keys[:, flat.to(keys.device)].transpose(0, 1).contiguous())
            replies_v.append(values[:, flat.to(values.device)].transpose(0, 1).contiguous())
            replies_n.append(torch.tensor([[len(c)] for c in chunks], dtype=torch.long).view(-1, 1))
        got_k, got_v, got_n = (self._all_to_all(replies, dev) for replies in (replies_k, replies_v, replies_n))
        # assemble each row's chunks: k documents × up to M slots, as the one-rank gather lays them out
        per_doc = {}
        for o in range(self.world):
            counts = got_n[o].flatten().tolist()
            for (b, j), ck, cv, n in zip((owners == o).nonzero().tolist(), got_k[o].split(counts), got_v[o].split(counts), counts, strict=True):
                per_doc[(b, j)] = (ck, cv, n)
        M = max(n for _, _, n in per_doc.values())
        Hkv, Dk, Dv = keys.shape[0], keys.shape[2], values.shape[2]
        out_k = torch.zeros(B, Hkv, k * M, Dk, dtype=keys.dtype, device=dev)
        out_v = torch.zeros(B, Hkv, k * M, Dv, dtype=values.dtype, device=dev)
        valid = torch.zeros(B, k * M, dtype=torch.bool, device=dev)
        for (b, j), (ck, cv, n) in per_doc.items():
            out_k[b, :, j * M : j * M + n] = ck.transpose(0, 1)
            out_v[b, :, j * M : j * M + n] = cv.transpose(0, 1)
            valid[b, j * M : j * M + n] = True
        return out_k, out_v, valid


# Memory Parallel on local gloo ranks (``lcc memory query --nproc N``, the tests): tasks for ``distributed.ranks.spawn``


def _parallel_msa(model, bank: str, positions: str | None = None):
    """The msa runtime of a loaded artifact (``positions`` as :class:`MsaModel`'s) and this rank's shard of the bank at ``bank``."""
    from . import bank as memory_bank
    from .runtime import MsaModel

    msa = MsaModel(model.program, model.signature, positions)
    return msa, ParallelMemory.share(memory_bank.load(bank, model=msa.facts), kernels=msa.kernels)


def _msa_query(model, payload: dict, degree: int, rank: int) -> list[dict]:
    """Memory Parallel: every rank serves its own batch over its shard of the bank; rank 0 gets every rank's routing and logits."""
    msa, memory = _parallel_msa(model, payload["bank"])
    result = msa.query(memory, payload["batches"][rank])
    mine = {"docs": result.docs, "logits": result.logits, "owned": memory.owned, "sent_bytes": memory.sent_bytes}
    every = [None] * degree
    dist.all_gather_object(every, mine)
    return every


def _msa_generate(model, payload: dict, degree: int, rank: int) -> dict:
    """Memory Parallel generation of one batch that every rank serves (rank 0 returns it): routing collectives, local decode."""
    msa, memory = _parallel_msa(model, payload["bank"], payload.get("positions"))
    tokens, result = msa.generate(memory, payload["input_ids"], payload["max_new_tokens"])
    return {"tokens": tokens, "docs": result.docs}


def msa_query(path: str | Path, bank: str | Path, batches: list[torch.Tensor]) -> list[dict]:
    """Per rank (one per batch): routed documents per layer, logits, owned documents and bytes sent, with Memory Parallel."""
    return ranks.spawn(_msa_query, path, len(batches), {"bank": str(bank), "batches": batches})


def msa_generate(path: str | Path, bank: str | Path, degree: int, input_ids: torch.Tensor, max_new_tokens: int, positions: str | None = None) -> dict:
    """New tokens and routed document indices of ``input_ids`` with the bank sharded over ``degree`` ranks."""
    payload = {"bank": str(bank), "input_ids": input_ids, "max_new_tokens": max_new_tokens, "positions": positions}
    return ranks.spawn(_msa_generate, path, degree, payload)
