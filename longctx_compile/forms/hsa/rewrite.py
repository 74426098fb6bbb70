"""``hsa``: hierarchical sparse attention in chosen layers (semantics in ``ops/hsa.py``).

Each chosen canonical attention becomes ``longctx::hsa_attention``: a local causal window of the
current chunk plus ``window`` complete chunks, and the top-``topk`` older chunks by ``score``, fused
by softmax weights over the parts' scores. ``score=exact`` with ``topk=all`` is dense attention
exactly (the equivalence check of the form); ``landmark``, ``bound`` and ``reps`` need no new weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import LccError
from ...fx import fake_call, new_call, val
from ...ops.schema import Call
from ...passes.refuse import plain_causal
from ...passes.rope import pre_rope
from ...pipeline import PassResult, Program, Stage, register

HSA = torch.ops.longctx.hsa_attention.default
aten = torch.ops.aten


# why hsa refuses a site (``passes.refuse.plain_causal``): HSA is defined for causal self-attention with at most key padding
REFUSALS = {
    "mask": "an arbitrary mask tensor has no chunked form; hsa needs causal attention with at most padding",
    "causal": "hsa needs causal attention",
    "documents": "packed-document masks are not supported by hsa yet; capture with attention_mask",
    "window": "the model's own sliding window ({window}) would be widened by retrieval; hsa needs full causal attention",
}


# what score, fusion, heads and rerank default to: ``retrofit`` keeps a pretrained model's quality without training
# (chosen by bench/real on SmolLM2-135M, bench/RESULTS.md: per-head selection by the bound, reranked by the true LSE of
# 4·topk candidates, fused as one softmax); ``paper`` is HSA-UltraLong's, for a model trained in its form
RECIPES = {
    "retrofit": {"score": "bound", "fusion": "joint", "heads": "each", "rerank": 4},
    "paper": {"score": "landmark", "fusion": "softmax", "heads": "group", "rerank": 0},
}


@dataclass
class HsaConfig:
    """``--opt chunk=64 topk=16|all window=4 recipe=retrofit|paper score=exact|landmark|bound|reps|learned
    select=token|block heads=group|each rerank=4 sink=false fusion=softmax|stick|joint nope=false layers=all|0,2,5``. ``joint`` weighs each part by
    its true LSE: one softmax over the local keys and the chosen chunks' keys, so selection alone decides what is lost.
    ``bound`` selects by an upper bound of each chunk's best q·k from its per-channel key range (Quest); ``reps`` by the
    mean of the few keys the chunk's own queries score highest (InfLLM's representative tokens). Both are training-free
    and query-aware. ``heads=each`` lets every query head select its own chunks, where ``group`` has a KV group's heads
    share one selection (their summed scores). ``rerank=R`` (R ≥ 1) makes the score a first stage keeping R·topk candidates,
    of which the topk with the largest true LSE are chosen (reads R·topk chunks' keys per query; needs ``fusion=joint``).
    ``recipe`` sets the score, fusion, heads and rerank not given (:data:`RECIPES`; ``learned`` trains through softmax
    fusion weights, so its fusion defaults to softmax, and rerank to 0 wherever the fusion is not joint; with
    ``fusion=joint`` its scores train from ``lcc train --opt aux`` only). ``landmarks=R`` (R ≥ 1, with ``learned``) summarises
    each chunk by R attention-pooled landmarks instead of its mean key (:data:`POOL_INIT`)."""

    chunk: int = 64
    topk: str = "16"
    window: int = 4
    recipe: Literal["retrofit", "paper"] = "retrofit"
    score: Literal["exact", "landmark", "bound", "reps", "learned"] | None = None
    select: Literal["token", "block"] = "token"
    heads: Literal["group", "each"] | None = None
    rerank: int | None = None
    sink: bool = False
    fusion: Literal["softmax", "stick", "joint"] | None = None
    nope: bool = False
    landmarks: int = 0
    layers: str = "all"

    def __post_init__(self) -> None:
        recipe = RECIPES[self.recipe]
        self.score = self.score or recipe["score"]
        self.fusion = self.fusion or ("softmax" if self.score == "learned" or self.sink else recipe["fusion"])
        self.heads = self.heads or recipe["heads"]
        if self.rerank is None:  # reranking by the true LSE goes with joint fusion, and exact scores are that LSE already
            self.rerank = recipe["rerank"] if self.fusion == "joint" and self.score != "exact" else 0

    def check(self) -> None:
        """The values that need no graph (``options.build`` calls this before the model loads)."""
        if self.chunk < 1:
            raise LccError(f"invalid --opt chunk={self.chunk}: a chunk holds at least 1 key")
        if self.window < 0:
            raise LccError(f"invalid --opt window={self.window}: the local window counts complete chunks, 0 or more")
        parse_topk(self.topk)
        if self.fusion == "joint" and self.sink:
            raise LccError("--opt fusion=joint is one softmax over the local and chosen keys; sink=true (a +1 per chunk) does not apply to it")
        if self.rerank < 0:
            raise LccError(f"invalid --opt rerank={self.rerank}: a multiple of topk (candidates ranked again by their true LSE), or 0 for none")
        if self.rerank and self.score == "exact":
            raise LccError("--opt rerank ranks a first stage's candidates by their true LSE; score=exact ranks every chunk by it already")
        if self.rerank and self.fusion != "joint":
            raise LccError(
                f"--opt rerank=R picks chunks by their true LSE, which fusion=joint weighs them by; fusion={self.fusion} would weigh them by another score"
            )
        if self.landmarks < 0 or (self.landmarks and self.score != "learned"):
            raise LccError(f"invalid --opt landmarks={self.landmarks}: pooled landmarks (R ≥ 1) are learned, so they need score=learned; 0 is the mean key")
        if self.nope and self.score == "exact":
            raise LccError("--opt nope=true changes landmark, bound, reps and learned scores; exact scores are the chunks' true LSE and have no NoPE form")


POOL_INIT = 0.1  # the spread of the pooling queries past the first: distinct, so they learn apart, and small, so u·k starts mild


def pooling_queries(heads: int, count: int, head_dim: int, layer: int) -> torch.Tensor:
    """The initial pooling queries [heads, count, head_dim] of one layer's pooled landmarks: the first zero (it pools the
    mean key, as ``learned`` does without them), the others N(0, POOL_INIT²), seeded by the layer so a conversion repeats."""
    init = torch.randn(heads, count, head_dim, generator=torch.Generator().manual_seed(layer)) * POOL_INIT
    init[:, 0] = 0.0
    return init


def per_query_head(graph: torch.fx.Graph, t: torch.fx.Node, groups: int, like: torch.fx.Node) -> torch.fx.Node:
    """[B, Hkv, T, D] -> [B, Hkv·groups, T, D], each KV head repeated for its group's query heads (unsqueeze, expand,
    flatten: shape-free, and ONNX translates it, where it mistranslates repeat_interleave)."""
    wide = new_call(graph, aten.expand.default, new_call(graph, aten.unsqueeze.default, t, 2, like=like), [-1, -1, groups, -1, -1], like=like)
    return new_call(graph, aten.flatten.using_ints, wide, 1, 2, like=like)


def parse_topk(text: str) -> int:
    """``"all"`` -> -1 (every older chunk), else a count of at least 1."""
    if str(text).lower() == "all":
        return -1
    if not str(text).isdigit() or int(text) < 1:
        raise LccError(f"invalid --opt topk={text}: expected a number of chunks ≥ 1 or 'all'")
    return int(text)


def parse_layers(text: str, count: int, option: str = "layers", named: str = "'all'") -> list[int]:
    """``"all"`` or comma-separated layer indices, each checked against the ``count`` attention layers; errors name ``--opt option``."""
    if str(text).lower() == "all":
        return list(range(count))
    try:
        layers = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise LccError(f"invalid --opt {option}={text}: expected {named} or layer indices like 0,2,5") from None
    for layer in layers:
        if not 0 <= layer < count:
            raise LccError(f"--opt {option}={text}: layer {layer} is out of range; the model has attention layers 0..{count - 1}")
    return layers


@register("hsa", Stage.FORM, HsaConfig)
def hsa(program: Program, cfg: HsaConfig) -> PassResult:
    """Replace the chosen layers' attention by hierarchical sparse attention."""
    cfg.check()
    topk = parse_topk(cfg.topk)
    nodes = program.attention_nodes()
    chosen = set(parse_layers(cfg.layers, len(nodes)))
    graph = program.gm.graph
    for i, node in enumerate(nodes):
        if i not in chosen:
            continue
        facts = node.meta["lcc"]
        plain_causal(node, f"layer {facts['layer']} ({facts['module']})", "hsa", REFUSALS)
        call = Call.of(node)
        q, k = call.q, call.k
        scoring = (None, None)
        if cfg.nope:  # retrieval scores from the q and k before RoPE
            scoring = tuple(pre_rope(t) for t in (q, k))
            if None in scoring or any(val(a).shape != val(b).shape for a, b in zip(scoring, (q, k), strict=True)):
                raise LccError(f"layer {facts['layer']} ({facts['module']}): --opt nope=true found no rotary embedding on its q and k to leave out")
        groups = facts["hq"] // facts["hkv"] if cfg.heads == "each" else 1
        if groups > 1:  # every query head its own KV head, so the op's selection (one per KV head) is per query head
            with graph.inserting_before(node):
                k, v, score_k = (None if t is None else per_query_head(graph, t, groups, node) for t in (k, call.v, scoring[1]))
            call, scoring = call.replace(k=k, v=v), (scoring[0], score_k)
        projections = (None, None)
        if cfg.score == "learned":  # per KV head (or query head, with heads=each) [D, D], the identity: training starts from landmark scores
            hkv, d = facts["hkv"] * groups, facts["head_dim"]
            projections = tuple(
                program.add_parameter(f"{facts['module']}.hsa_retrieval_{side}", torch.eye(d).repeat(hkv, 1, 1).to(val(q).dtype)) for side in "qk"
            )
        if cfg.landmarks:  # per KV head (or query head) R pooling queries: the first 0 (the mean key), the rest small and distinct
            hkv, d = facts["hkv"] * groups, facts["head_dim"]
            projections = (
                *projections,
                program.add_parameter(f"{facts['module']}.hsa_retrieval_pool", pooling_queries(hkv, cfg.landmarks, d, i).to(val(q).dtype)),
            )
        options = {"chunk": cfg.chunk, "topk": topk, "window": cfg.window, "mode": cfg.score, "select": cfg.select, "sink": cfg.sink, "fusion": cfg.fusion}
        options["rerank"] = cfg.rerank if topk >= 0 else 0  # with every chunk selected there is nothing to rank
        retrieval = dict(zip(("retrieval_q", "retrieval_k", "retrieval_pool"), projections, strict=False))
        args = call.to(HSA, **retrieval, **options, **dict(zip(("score_q", "score_k"), scoring, strict=True))).args()
        node.target, node.args = HSA, args
        node.meta["val"] = fake_call(HSA, *args)
        facts.update(
            form="hsa",
            chunk=cfg.chunk,
            topk=topk,
            hsa_window=cfg.window,
            score=cfg.score,
            select=cfg.select,
            heads=cfg.heads,
            rerank=options["rerank"],
            sink=cfg.sink,
            fusion=cfg.fusion,
            nope=cfg.nope,
            landmarks=cfg.landmarks,
        )
    graph.lint()
    # every chunk is selected, whatever ``select`` is, and the parts fuse as one softmax
    every = topk < 0 and not cfg.sink  # every older chunk, each under plain softmax: dense when the fusion weighs by true LSEs
    program.signature["exact"] = every and (cfg.fusion == "joint" or (cfg.score == "exact" and cfg.fusion == "softmax"))
    return PassResult(
        matches=len(chosen), notes=[f"{len(chosen)} of {len(nodes)} layers: chunk {cfg.chunk}, top-{cfg.topk}, window {cfg.window}, {cfg.score} scores"]
    )
