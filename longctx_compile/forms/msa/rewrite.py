"""``msa``: EverMind memory sparse attention — routed layers gain router projections (semantics in ``ops/msa.py``).

Each routed layer's canonical attention becomes ``longctx::msa_attention``, which also takes the
router query ``router_q_proj(h)`` and router key ``router_k_proj(h)`` of the layer's attention input
``h`` (the tensor its q and k projections read). The router weights are new parameters initialised
from the layer's own q/k projection weights (a training-free start), or loaded from the source folder
when it already holds MSA weights under those names. Over its own input the op is the canonical
attention, so the program is the dense model; ``runtime.msa`` runs it as the encode and query
programs (pool documents, route, attend over the selected memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ...errors import LccError
from ...fx import aten, fake_call, is_call, nearest_upstream, val
from ...ops.schema import Call
from ...passes.refuse import plain_causal
from ...pipeline import PassResult, Program, Stage, register
from ..hsa.rewrite import parse_layers, parse_topk

MSA = torch.ops.longctx.msa_attention.default


# why msa refuses a site (``passes.refuse.plain_causal``): documents are encoded with causal attention, so a site must be plain causal self-attention
REFUSALS = {
    "mask": "an arbitrary mask tensor cannot be extended over pooled memory; msa needs causal attention",
    "causal": "msa needs causal attention",
    "window": "the model's sliding window ({window}) has no meaning over pooled memory; msa needs full causal attention",
    "documents": "packed-document masks are not supported by msa; capture with attention_mask",
}


# what ``recipe`` sets when not given: routed_layers, score, router_init, positions, route
RECIPES = {
    "retrofit": ("all", "headwise", "k", "auto", "lower"),  # a model never trained on memory (measured on SmolLM2: bench/RESULTS.md)
    "paper": ("upper", "cosine", "qk", "global", "layer"),  # MSA as trained: upper layers, each routing for itself
}


@dataclass
class MsaConfig:
    """``--opt pool=64 topk=16|all recipe=retrofit|paper routed_layers=upper|all|18,19,... score=headwise|cosine|dot
    prefix=0 router_init=k|qk positions=auto|contiguous|global route=lower|layer|2,3,4``.

    ``recipe`` fills the options not given (:data:`RECIPES`): ``retrofit`` for a model never trained on memory,
    ``paper`` for MSA as its authors train it.

    ``router_init``: ``qk`` copies the layer's q and k projections (the attention's own query-key
    match); ``k`` gives both routers the k projection (each query head reads its KV head's rows),
    so a question token scores highest the chunks that hold the same token.

    ``score``: ``cosine`` / ``dot`` average the query heads per (token, chunk) pair, then take the best pair
    (the paper's); ``headwise`` takes each head's best cosine, then averages the heads (``ops.msa.route_headwise``).

    ``route``: ``layer``: each routed layer picks its own documents (the paper's); otherwise the layers named
    (``lower``: the lowest quarter of the routed layers) vote once, in a pass over the query alone, and their
    top-k serve every layer.

    ``positions`` (``doc_rope``): ``global`` is the paper's Global RoPE (the query from prefix + k), which an
    MSA-trained model expects; ``contiguous`` lays the selected documents out before the query as one dense
    prompt would hold them, which a model never trained on memory reads. ``auto``: ``global`` when the source
    folder holds MSA router weights or lcc cannot move the model's keys (its RoPE is not one it recognises),
    else ``contiguous``.
    """

    pool: int = 64
    topk: str = "16"
    recipe: Literal["retrofit", "paper"] = "retrofit"
    routed_layers: str | None = None
    score: Literal["headwise", "cosine", "dot"] | None = None
    prefix: int = 0
    router_init: Literal["k", "qk"] | None = None
    positions: Literal["auto", "contiguous", "global"] | None = None
    route: str | None = None

    def __post_init__(self) -> None:
        defaults = RECIPES[self.recipe]
        self.routed_layers = self.routed_layers or defaults[0]
        self.score = self.score or defaults[1]
        self.router_init = self.router_init or defaults[2]
        self.positions = self.positions or defaults[3]
        self.route = self.route or defaults[4]

    def check(self) -> None:
        """The values that need no graph (``options.build`` calls this before the model loads)."""
        if self.pool < 1:
            raise LccError(f"invalid --opt pool={self.pool}: a pooled chunk holds at least 1 token")
        if self.prefix < 0:
            raise LccError(f"invalid --opt prefix={self.prefix}: the template prefix is 0 or more tokens")
        parse_topk(self.topk)


def parse_route(text: str, count: int, routed: list[int]) -> list[int] | None:
    """The voting layers of shared routing (None: each layer routes itself); every one must be a routed layer."""
    if text == "layer":
        return None
    voters = routed[: -(-len(routed) // 4)] if text == "lower" else parse_layers(text, count, option="route", named="'layer', 'lower'")
    stray = [i for i in voters if i not in routed]
    if stray:
        raise LccError(f"invalid --opt route={text}: layer {stray[0]} votes but is not routed (it has no router); route it or vote with routed layers")
    return voters


def parse_routed(text: str, count: int) -> list[int]:
    """``upper`` (the upper half, as MSA-4B), ``all``, or comma-separated layer indices checked against ``count``."""
    if str(text).lower() == "upper":
        return list(range(count // 2, count))
    return parse_layers(text, count, option="routed_layers", named="'upper', 'all'")


def projection(node: torch.fx.Node) -> torch.fx.Node | None:
    """The nearest ``linear`` upstream of ``node`` (breadth first): the projection that q or k came from."""
    return nearest_upstream(node, lambda n: is_call(n, aten.linear))


@register("msa", Stage.FORM, MsaConfig)
def msa(program: Program, cfg: MsaConfig) -> PassResult:
    """Give the routed layers router projections and the ``msa_attention`` op."""
    cfg.check()
    topk = parse_topk(cfg.topk)
    if "position_ids" not in program.signature["inputs"]:
        raise LccError("msa needs position_ids as a program input (documents restart their positions); capture with --opt position_ids=true")
    nodes = program.attention_nodes()
    routed = parse_routed(cfg.routed_layers, len(nodes))
    voters = parse_route(cfg.route, len(nodes), routed)
    source = _source_router_weights(program)
    state = program.ep.graph_signature.inputs_to_parameters
    graph = program.gm.graph
    routers = {}  # routed site -> the state names of its (router_q_proj, router_k_proj) weights
    for i in routed:
        node = nodes[i]
        facts = node.meta["lcc"]
        where = f"layer {facts['layer']} ({facts['module']})"
        plain_causal(node, where, "msa", REFUSALS)
        call = Call.of(node)
        q, k = call.q, call.k
        q_proj, k_proj = projection(q), projection(k)
        if q_proj is None or k_proj is None or q_proj.args[0] is not k_proj.args[0]:
            raise LccError(
                f"{where}: msa needs separate q and k linear projections of one input to copy router projections from (fused qkv projections are not supported yet)"
            )
        hidden = q_proj.args[0]
        weights = {}
        routers[str(i)] = [f"{facts['module']}.router_{side}_proj.weight" for side in "qk"]
        for side, proj in (("q", q_proj), ("k", k_proj)):
            name = f"{facts['module']}.router_{side}_proj.weight"
            value = source.get(name)
            if value is None:
                value = _initial_router(program, state, q_proj if side == "q" and cfg.router_init == "qk" else k_proj, side, facts)
            weights[side] = program.add_parameter(name, value.to(val(proj.args[1]).dtype))
        with graph.inserting_before(node):
            router = [graph.call_function(aten.linear.default, (hidden, weights[side])) for side in "qk"]
        for r in router:
            r.meta["val"] = fake_call(aten.linear.default, hidden, weights["q" if r is router[0] else "k"])
        args = call.to(MSA, router_q=router[0], router_k=router[1]).args()
        node.target, node.args = MSA, args
        node.meta["val"] = fake_call(MSA, *args)
        facts.update(form="msa", routed=True, pool=cfg.pool, topk=topk, score=cfg.score, votes=voters is not None and i in voters, loaded_router=bool(source))
    graph.lint()
    program.signature["msa"] = {
        "pool": cfg.pool,
        "topk": topk,
        "score": cfg.score,
        "prefix": cfg.prefix,
        "positions": cfg.positions,  # doc_rope resolves auto
        "route": voters,
        "routed": routed,
        "routers": routers,
    }
    # unpooled memory in every layer reads a document's exact keys: the query then equals dense attention over it
    program.signature["exact"] = cfg.pool == 1 and len(routed) == len(nodes) and cfg.prefix == 0
    loaded = " (router weights from the source folder)" if source else ""
    return PassResult(
        matches=len(routed), notes=[f"{len(routed)} of {len(nodes)} layers routed: pool {cfg.pool}, top-{cfg.topk} documents, {cfg.score} scores{loaded}"]
    )


def _initial_router(program: Program, state: dict[str, str], proj: torch.fx.Node, side: str, facts: dict) -> torch.Tensor:
    """A copy of ``proj``'s weight; a router query made from the k projection repeats each KV head's rows for its G query heads."""
    weight = program.ep.state_dict[state[proj.args[1].name]].detach().clone()
    if side == "q" and weight.shape[0] != facts["hq"] * facts["head_dim"]:
        weight = weight.view(facts["hkv"], facts["head_dim"], -1).repeat_interleave(facts["hq"] // facts["hkv"], dim=0).reshape(-1, weight.shape[-1])
    return weight


def _source_router_weights(program: Program) -> dict[str, torch.Tensor]:
    """MSA router weights already in the source folder (``…router_q_proj[.0].weight``), by our parameter names."""
    if program.source.get("kind") != "hf_folder":
        return {}
    import safetensors

    found = {}
    for path in sorted(Path(program.source["spec"]).glob("*.safetensors")):
        with safetensors.safe_open(str(path), "pt") as f:
            for key in f.keys():
                if "router_q_proj" in key or "router_k_proj" in key:
                    found[key.replace(".0.weight", ".weight")] = f.get_tensor(key)
    return found
