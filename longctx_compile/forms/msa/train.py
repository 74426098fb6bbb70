"""``lcc train`` on an msa artifact: documents and queries as the form runs them (MSA's continued pre-training).

An example is a bank of documents, a query and its answer. Each step encodes the documents into pooled memory
(``MsaModel.encode``, positions restarting per document) and answers the query over the routed top-k
(``MsaModel.query``, the artifact's position scheme), with the autograd graph kept: the answer's loss reaches the
backbone through the pooled keys and values. The top-k is a hard choice, so the routers learn from the auxiliary
loss only: InfoNCE over each routing layer's document scores, the positive documents against the rest (the
paper's ``INFONCE_DECOUPLE``: other positives are left out of each one's denominator).

Examples come from a JSONL of ``{"documents": [...], "query": ..., "answer": ..., "positive": i | [i, ...]}``
(token lists or text; an optional ``"prefix"``, e.g. a chat header, that the documents are encoded after and the
query starts with, as ``lcc memory`` banks hold them), or are cut from any corpus (text, JSONL of text/tokens, ``synthetic`` random tokens):
``docs`` documents of ``--seq-len`` tokens, one of them the positive, the query a span copied from it and the
answer the tokens that follow (recall a continuation from memory).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...errors import LccError
from ...ops.msa import route_headwise, route_ref
from ...options import build, check_known
from ...runtime.data import TASKS, jsonl_rows, read_tokens
from ...runtime.train import TrainConfig, Trainer, distill_loss, trainable_names
from .bank import MemoryBank, partition
from .parallel import ParallelMemory
from .runtime import LocalMemory, MsaModel


@dataclass
class MsaTrainConfig:
    """``lcc train --opt`` for msa. ``docs``: documents in each example's bank when examples are cut from a corpus
    (the positive and ``docs - 1`` others); ``query`` / ``answer``: the tokens of the span copied from the positive
    and of the continuation to recall. ``aux``: the router loss's weight beside the answer's (the paper: 0.1 in its
    main phase; 10 in its warm-up, where the LM loss has 0.1); ``temperature``: InfoNCE's (0.1 as in the paper).
    ``select``: ``gold`` puts the positives in the first top-k slots, so the answer loss trains reading the memory
    however the routers do; ``routed`` answers over the routers' own top-k, as MSA trains."""

    docs: int = 8
    query: int = 8
    answer: int = 8
    aux: float = 0.1
    temperature: float = 0.1
    select: Literal["gold", "routed"] = "gold"

    def check(self) -> None:
        for name in ("docs", "query", "answer"):
            if getattr(self, name) < 1:
                raise LccError(f"invalid --opt {name}={getattr(self, name)}: at least 1")
        if self.aux < 0 or not 0 < self.temperature <= 1:
            raise LccError(f"invalid --opt aux={self.aux} temperature={self.temperature}: aux at least 0, temperature in (0, 1]")


@dataclass
class Example:
    """A bank of token-id documents, a query, the answer after it, the documents that hold it, and the template
    prefix (a chat header) the documents are encoded after and the query starts with (none: documents alone)."""

    documents: list[list[int]]
    query: list[int]
    answer: list[int]
    positives: list[int]
    prefix: list[int] = dataclasses.field(default_factory=list)

    def dense_prompt(self, prefix: int) -> torch.Tensor:
        """[1, n]: what the source model reads to answer with the positives in its prompt, ``[the query's first
        prefix tokens ; positive documents ; the rest of the query ; the answer but its last token]``."""
        documents = [t for p in self.positives for t in self.documents[p]]
        return torch.tensor([self.query[:prefix] + documents + self.query[prefix:] + self.answer[:-1]])


def answer_logits(model: MsaModel, memory: Any, e: Example) -> tuple[torch.Tensor, Any]:
    """The logits [len(answer), V] (fp32) predicting ``e``'s answer after its query routed over ``memory`` (a bank or a
    training memory), the answer's tokens reading the memory without routing; and the query's result."""
    ids = torch.tensor([e.query + e.answer[:-1]])
    routing = torch.arange(ids.shape[1])[None] < len(e.query)
    result = model.query(memory, ids, routing=routing)
    return result.logits[0, len(e.query) - 1 :].float(), result


def router_loss(scores: torch.Tensor, positives: list[int], temperature: float) -> torch.Tensor:
    """InfoNCE over one query's document scores [n_docs], each positive against the negatives only, averaged."""
    z = scores.float() / temperature
    negative = torch.ones_like(z, dtype=torch.bool)
    negative[positives] = False
    rest = z[negative].logsumexp(0)
    pos = z[positives]
    return (torch.logaddexp(pos, rest) - pos).mean()


def _route(router_q: torch.Tensor, routes: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, table: torch.Tensor, score: str) -> torch.Tensor:
    """Routing by the differentiable references (the routing op and kernel have no backward), as ``route_fn``'s."""
    if score == "headwise":
        return route_headwise(router_q, routes, keys, chunk_doc, table.shape[0])
    return route_ref(router_q, routes, keys, chunk_doc, table.shape[0], score == "cosine")


class _Training:
    """What a memory encoded in this step does for training, over a whole bank or a shard of one: each routing layer's
    scores are kept (with their gradient) for the router loss, and with ``force`` the positives (global document
    indices) take the first top-k slots."""

    def __init__(self, *memory: Any, positives: list[int], force: bool, **named: Any):
        super().__init__(*memory, **named)
        self.route, self.positives, self.force, self.scored = _route, positives, force, {}

    def scores(self, site: int, router_q: torch.Tensor, routes: torch.Tensor, score: str) -> torch.Tensor:
        scores = super().scores(site, router_q, routes, score)
        self.scored[site] = scores
        return scores.detach()  # the choice itself takes no gradient (the top-k is hard)

    def select(self, site: int, router_q: torch.Tensor, routes: torch.Tensor, k: int, score: str, chosen=None):
        if chosen is None:  # every document's score (a shard's memory gathers them): the router loss reads them all
            top = self.scores(site, router_q, routes, score).topk(k, dim=-1)
            chosen = top.indices, top.values
        if self.force:
            gold = self.positives[:k]
            rest = [d for d in chosen[0][0].tolist() if d not in gold]
            chosen = torch.tensor([gold + rest[: k - len(gold)]], device=chosen[0].device), chosen[1]
        return chosen[0], chosen[1], *self.fetch(site, chosen[0], router_q.device)


class TrainingMemory(_Training, LocalMemory):
    """A whole bank encoded in this step (its pooled tensors carry gradients), on this process."""

    def __init__(self, bank: MemoryBank, positives: list[int], force: bool):
        parts = {name: getattr(bank, name) for name in ("keys", "values", "router_keys")}
        super().__init__(parts, bank.chunk_doc, bank.doc_chunks(), bank.model, prefix=bank.prefix, positives=positives, force=force)


class TrainingParallelMemory(_Training, ParallelMemory):
    """This rank's shard of a bank encoded in this step (``ParallelMemory``'s arguments, then ``positives`` and
    ``force``): Memory Parallel's differentiable collectives reach the other ranks' documents, and the gradients of
    the keys and values they fetch from this one come back to it."""


class MsaTrainer(Trainer):
    """An msa program trained on :class:`Example` batches: the answer's loss (``lm``: cross-entropy; ``distill``: KL to
    the source model given the positive documents in its prompt, ``[prefix ; documents ; query ; answer]``) plus
    ``aux`` × the router loss.

    On ``nproc`` ranks (Memory Parallel, the default process group) each example's documents are sharded by chunk
    count and each rank encodes only its own; every rank answers the same query over the sharded bank and takes 1/P
    of its loss, so the gradients summed over the ranks are one process's."""

    def __init__(self, ep: torch.export.ExportedProgram, signature: dict[str, Any], cfg: TrainConfig, opts: MsaTrainConfig, nproc: int = 1):
        cfg.check()
        if cfg.tile or cfg.recompute or cfg.offload or cfg.pack:
            raise LccError("msa trains on documents and queries: --tile, --recompute, --offload and --pack apply to token windows, not to it")
        self.cfg, self.opts, self.nproc = cfg, opts, nproc
        self.model = MsaModel(ep, signature)
        self.model.kernels = "reference"  # gradients run through the reference ops
        self.names = trainable_names(ep, signature, cfg.trainable, "msa")
        self.state = {name: value.detach() for name, value in self.model.state.items()}
        self.layout = None

    def sharded(self) -> bool:
        return self.nproc > 1

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """The mean over the batch's examples of the answer's loss plus ``aux`` × the router loss."""
        m = self.model
        teachers = [self._teacher(e) for e in batch] if self.cfg.objective == "distill" else [None] * len(batch)
        m.state, m.grad = self._weights(), True
        try:
            return sum(self._loss(e, t) for e, t in zip(batch, teachers, strict=True)) / len(batch)
        finally:
            m.state, m.grad = self.state, False

    def _loss(self, e: Example, teacher: torch.Tensor | None) -> torch.Tensor:
        memory = self._memory(e)
        logits, _ = answer_logits(self.model, memory, e)
        if teacher is None:
            answer = F.cross_entropy(logits, torch.tensor(e.answer))
        else:
            answer = distill_loss(logits, teacher)
        if self.opts.aux and memory.scored:
            aux = torch.stack([router_loss(s[0], memory.positives, self.opts.temperature) for s in memory.scored.values()]).mean()
            answer = answer + self.opts.aux * aux
        return answer / self.nproc  # each rank's share: the sum over the ranks is the loss

    def _memory(self, e: Example) -> _Training:
        """The example's documents encoded in this step: all of them, or on ranks this rank's shard of them."""
        force = self.opts.select == "gold"
        if not self.sharded():
            bank = self.model.encode(e.documents, ids=[str(i) for i in range(len(e.documents))], batch_size=len(e.documents), prefix=e.prefix)
            return TrainingMemory(bank, [bank.docs.index(str(p)) for p in e.positives], force)
        counts = [math.ceil(len(d) / self.model.config["pool"]) for d in e.documents]  # each document's chunks, as encode pools them
        shards = partition(counts, self.nproc)
        owned = shards[dist.get_rank()]
        bank = self.model.encode([e.documents[g] for g in owned], ids=[str(g) for g in owned], batch_size=len(owned), prefix=e.prefix)
        shard = bank.subset([bank.docs.index(str(g)) for g in owned])  # in the shard's order (encode sorts by length)
        return TrainingParallelMemory(shard, shards, torch.tensor(counts), positives=e.positives, force=force)

    def _teacher(self, e: Example) -> torch.Tensor:
        """The source model's next-token log-probabilities over the answer, the positive documents in its prompt."""
        logits = self.model.dense(e.dense_prompt(self.model.config["prefix"]))  # prefix: the template's, when it has one
        return logits[0, -len(e.answer) :].float().log_softmax(-1)


def _tokens(value: Any, tokenizer: Any, where: str, field: str) -> list[int]:
    """A record field as token ids: a list of ids, or text through the artifact's tokenizer."""
    if isinstance(value, str):
        if tokenizer is None:
            raise LccError(f'{where}: "{field}" is text, and the artifact\'s source has no tokenizer saved; give token ids')
        tokens = tokenizer.encode(value, add_special_tokens=False)
    elif isinstance(value, list) and all(isinstance(t, int) and t >= 0 for t in value):
        tokens = value
    else:
        raise LccError(f'{where}: "{field}" must be text or a list of token ids')
    if not tokens:
        raise LccError(f'{where}: "{field}" is empty')
    return tokens


def read_examples(path: Path, tokenizer: Any) -> list[Example] | None:
    """The examples of a JSONL of ``documents`` records, or None when the file holds plain documents."""
    examples = []
    for _, where, row in jsonl_rows(path):
        if not examples and (not isinstance(row, dict) or "documents" not in row):
            return None  # plain documents (read_tokens reads them)
        if not isinstance(row, dict) or not {"documents", "query", "answer", "positive"} <= set(row):
            raise LccError(f'{where}: expected an object with "documents", "query", "answer" and "positive"')
        if not isinstance(row["documents"], list) or not row["documents"]:
            raise LccError(f'{where}: "documents" must be a non-empty list')
        docs = [_tokens(d, tokenizer, where, "documents") for d in row["documents"]]
        positives = row["positive"] if isinstance(row["positive"], list) else [row["positive"]]
        prefix = _tokens(row["prefix"], tokenizer, where, "prefix") if row.get("prefix") else []
        if not positives or not all(isinstance(p, int) and 0 <= p < len(docs) for p in positives) or len(set(positives)) != len(positives):
            raise LccError(f'{where}: "positive" must be distinct indices into "documents" (0..{len(docs) - 1})')
        query = _tokens(row["query"], tokenizer, where, "query")
        if query[: len(prefix)] != prefix:
            raise LccError(f'{where}: the query must start with the "prefix" its documents are encoded after')
        examples.append(Example(docs, query, _tokens(row["answer"], tokenizer, where, "answer"), positives, prefix))
    return examples or None  # an empty file: read_tokens says so


def recall_examples(tokens: list[list[int]] | None, vocab: int, length: int, opts: MsaTrainConfig) -> Callable[[torch.Generator], Example]:
    """``g -> Example`` cut from a corpus (None: random tokens): ``docs`` windows of ``length`` tokens, one the positive,
    the query a span of it and the answer the tokens after the span."""
    need = opts.query + opts.answer
    if length < need:
        raise LccError(f"--seq-len {length} (tokens per document) is shorter than --opt query={opts.query} plus answer={opts.answer}")
    corpus = None if tokens is None else torch.tensor([t for doc in tokens for t in doc], dtype=torch.long)
    if corpus is not None and len(corpus) < length:
        raise LccError(f"the training data holds {len(corpus)} tokens, fewer than one document of --seq-len {length}")

    def draw(g: torch.Generator) -> Example:
        if corpus is None:
            docs = torch.randint(0, vocab, (opts.docs, length), generator=g)
        else:
            starts = torch.randint(0, len(corpus) - length + 1, (opts.docs,), generator=g)
            docs = torch.stack([corpus[s : s + length] for s in starts.tolist()])
        positive = int(torch.randint(0, opts.docs, (1,), generator=g))
        at = int(torch.randint(0, length - need + 1, (1,), generator=g))
        span = docs[positive, at : at + need].tolist()
        return Example(docs.tolist(), span[: opts.query], span[opts.query :], [positive])

    return draw


def example_stream(
    data: str, tokenizer: Any, signature: dict[str, Any], cfg: TrainConfig, opts: MsaTrainConfig, nproc: int = 1
) -> Callable[[int], list[Example]]:
    """``step -> [Example] * batch``, seeded by the step (a resumed run draws what an uninterrupted one would); on
    ``nproc`` ranks every bank must give each rank a document."""
    vocab, longest = signature["vocab_size"], signature["max_len"]
    if data in TASKS:
        raise LccError(f"msa trains on documents and queries, not on '{data}' windows: give a .jsonl of documents records, a text corpus, or synthetic")
    examples = read_examples(Path(data), tokenizer) if data != "synthetic" and Path(data).suffix == ".jsonl" and Path(data).is_file() else None
    fewest = opts.docs if examples is None else min(len(e.documents) for e in examples)
    if fewest < nproc:
        raise LccError(f"--nproc {nproc} shards each bank's documents over the ranks, and a bank of the training data holds only {fewest}")
    if examples is None:
        if signature["msa"]["prefix"]:
            raise LccError(
                f"the artifact routes after a {signature['msa']['prefix']}-token template prefix, which examples cut from a corpus lack: "
                'give a .jsonl of records with a "prefix"'
            )
        if math.ceil(cfg.length / signature["msa"]["pool"]) * signature["msa"]["pool"] > longest:
            raise LccError(f"--seq-len {cfg.length} (tokens per document) exceeds the program's maximum length {longest}")
        draw = recall_examples(read_tokens(data, tokenizer), vocab, cfg.length, opts)
    else:
        top = max(max(max(d) for d in e.documents + [e.query, e.answer]) for e in examples)
        if top >= vocab:
            raise LccError(f"the training data has token id {top}, outside the model's vocabulary 0..{vocab - 1}")
        if max(len(d) for e in examples for d in e.documents) > longest:
            raise LccError(f"a document of the training data is longer than the program's maximum length {longest}")

        def draw(g: torch.Generator) -> Example:
            return examples[int(torch.randint(0, len(examples), (1,), generator=g))]

    def batch(step: int) -> list[Example]:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return [draw(g) for _ in range(cfg.batch)]

    return batch


def trainer(ep: torch.export.ExportedProgram, signature: dict[str, Any], cfg: TrainConfig, data: str, tokenizer: Any, options: dict[str, Any], nproc: int = 1):
    """(:class:`MsaTrainer`, its example stream) for ``lcc train`` on an msa artifact; ``options``: ``--opt`` of
    :class:`MsaTrainConfig`; ``nproc`` ranks share each example's bank (Memory Parallel)."""
    check_known(options, [MsaTrainConfig])
    opts = build(MsaTrainConfig, options)
    return MsaTrainer(ep, signature, cfg, opts, nproc), example_stream(data, tokenizer, signature, cfg, opts, nproc)
