"""``evict``: IndexMem learned KV eviction — each layer gains an indexer and a latent memory (semantics in ``ops/evict.py``).

Per evicting layer the pass finds three anchors through the canonical attention: its pre-RoPE query
(``rope.pre_rope``; the query itself in models without RoPE), its attention input x (what the q
projection reads) and the attention output (the op's own result, before the output projection). It
inserts ``longctx::evict_indexer(q_pre, x, …)`` with new parameters and turns the attention into
``longctx::evict_attention``, which also takes the indexer outputs and the memory's weights. Over its
own input the op is the canonical attention, so the program is the dense model; ``runtime.evict``
runs it with a KV cache that it compacts to the budget.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import LccError
from ...fx import CASTS, COPIED_META, aten, fake_call, is_call, nearest_upstream, val
from ...ops.evict import POLICIES, parse_budget
from ...ops.schema import Call
from ...passes.refuse import plain_causal
from ...passes.rope import pre_rope
from ...pipeline import PassResult, Program, Stage, register
from ..hsa.rewrite import parse_layers

EVICT = torch.ops.longctx.evict_attention.default
INDEXER = torch.ops.longctx.evict_indexer.default
GATE_BIAS = -5.0  # the memory starts nearly closed (g ≈ 0.007): an untrained memory barely changes plain eviction
DECAY, STRENGTH = 0.99, 1e-3  # λ and η at the start (IndexMem's code defaults), stored as a logit and an inverse softplus


# why evict refuses a site (``passes.refuse.plain_causal``): a compacted cache is read by plain causal attention
REFUSALS = {
    "mask": "an arbitrary mask tensor cannot follow evicted keys; evict needs causal attention",
    "causal": "evict needs causal attention",
    "window": "the model's sliding window ({window}) already bounds its cache; evict refuses sliding-window layers rather than mix the two",
    "documents": "packed-document masks are not supported by evict; capture with attention_mask",
}


@dataclass
class EvictConfig:
    """``--opt budget=0.25|4096 sinks=4 window=128 interval=512 policy=learned|streaming|snapkv|oracle memory=on|off
    granularity=layer|kv_head observation=32 prefill_chunk=0 layers=all indexer_heads=0 indexer_dim=0 memory_dim=0``.

    ``budget``: kept keys per layer, a ratio of the prompt in [0, 1) (never below sinks + window) or a token
    count. ``observation``: SnapKV's window of last queries. ``prefill_chunk``: evict after every chunk of
    the prompt (0: once, at its end). Dimensions 0 mean the defaults Hq/2 heads, max(8, D/16), D.
    """

    budget: str = "0.25"
    sinks: int = 4
    window: int = 128
    interval: int = 512
    policy: Literal["learned", "streaming", "snapkv", "oracle"] = "learned"
    memory: Literal["on", "off"] = "on"
    granularity: Literal["layer", "kv_head"] = "layer"
    observation: int = 32
    prefill_chunk: int = 0
    layers: str = "all"
    indexer_heads: int = 0
    indexer_dim: int = 0
    memory_dim: int = 0

    def check(self) -> None:
        """The values that need no graph (``options.build`` calls this before the model loads)."""
        check_config(self)


def check_config(cfg: EvictConfig) -> float | int:
    """Validate the options that need no graph; returns the parsed budget."""
    for name in ("sinks", "window", "observation", "prefill_chunk", "indexer_heads", "indexer_dim", "memory_dim"):
        if getattr(cfg, name) < 0:
            raise LccError(f"invalid --opt {name}={getattr(cfg, name)}: expected 0 or more")
    if cfg.interval < 1:
        raise LccError(f"invalid --opt interval={cfg.interval}: evict every 1 or more decode steps")
    if cfg.policy not in POLICIES:
        raise LccError(f"unknown --opt policy={cfg.policy}; choose one of {', '.join(POLICIES)}")
    if cfg.policy == "snapkv" and not 1 <= cfg.observation <= cfg.window:
        raise LccError(f"--opt observation={cfg.observation}: SnapKV's observation queries must be the last 1..window ({cfg.window}) tokens, which are kept")
    return parse_budget(cfg.budget, cfg.sinks, cfg.window)


def attention_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input of the nearest projection upstream of ``node`` (breadth first): ``linear``'s or ``matmul``'s first argument, ``addmm``'s second."""
    found = nearest_upstream(node, lambda n: is_call(n, aten.linear.default, aten.matmul.default, aten.addmm.default))
    if found is None:
        return None
    return found.args[1] if found.target is aten.addmm.default else found.args[0]


@register("evict", Stage.FORM, EvictConfig)
def evict(program: Program, cfg: EvictConfig) -> PassResult:
    """Give each chosen layer an eviction indexer and a latent memory, and the ``evict_attention`` op."""
    budget = check_config(cfg)
    if "position_ids" not in program.signature["inputs"]:
        raise LccError(
            "evict needs position_ids as a program input (a compacted cache feeds later tokens at their true positions); capture with --opt position_ids=true"
        )
    nodes = program.attention_nodes()
    chosen = parse_layers(cfg.layers, len(nodes))
    graph = program.gm.graph
    params, notes = {}, []
    for i in chosen:
        node = nodes[i]
        facts = node.meta["lcc"]
        where = f"layer {facts['layer']} ({facts['module']})"
        plain_causal(node, where, "evict", REFUSALS)
        call = Call.of(node)
        q = call.q
        hq, hkv, d = facts["hq"], facts["hkv"], facts["head_dim"]
        q_pre = pre_rope(_uncast(q))
        if q_pre is None or val(q_pre).shape != val(q).shape:
            q_pre = q
            notes.append(f"{where}: no rotary embedding on q; the indexer reads q as the attention does")
        hidden = attention_input(q)
        if hidden is None:
            raise LccError(f"{where}: found no projection that made q, so no attention input for the indexer's keys")
        width = val(hidden).shape[-1]
        heads = cfg.indexer_heads or (max(1, hq // 2) if cfg.granularity == "layer" else hkv * max(1, hq // 2 // hkv))
        if cfg.granularity == "kv_head" and heads % hkv:
            raise LccError(f"--opt indexer_heads={heads}: per-KV-head eviction splits the indexer heads evenly over the {hkv} KV heads")
        dim = cfg.indexer_dim or max(8, d // 16)
        g = torch.Generator().manual_seed(1000 + i)  # seeded: converting twice gives the same untrained indexer
        dtype = val(q).dtype
        names = {}

        def new(name: str, value: torch.Tensor, names=names, facts=facts, dtype=dtype) -> torch.fx.Node:
            names[name] = f"{facts['module']}.{name}"
            return program.add_parameter(names[name], value.to(dtype))

        weights = (
            new("indexer.q_proj.weight", torch.randn(heads * dim, hq * d, generator=g) / math.sqrt(hq * d)),
            new("indexer.q_norm.weight", torch.ones(dim)),
            new("indexer.k_proj.weight", torch.randn(dim, width, generator=g) / math.sqrt(width)),
            new("indexer.k_norm.weight", torch.ones(dim)),
            new("indexer.gate_proj.weight", torch.randn(heads, width, generator=g) / math.sqrt(width)),
        )
        memory = (None,) * 5
        if cfg.memory == "on":
            m = cfg.memory_dim or d
            memory = (
                new("memory.phi.weight", torch.randn(m, d, generator=g) / math.sqrt(d)),
                new("memory.gate.weight", torch.zeros(hq, d)),
                new("memory.gate.bias", torch.full((hq,), GATE_BIAS)),
                new("memory.decay", torch.tensor(math.log(DECAY / (1 - DECAY)))),
                new("memory.strength", torch.tensor(math.log(math.expm1(STRENGTH)))),
            )
        with graph.inserting_before(node):
            indexer = graph.call_function(INDEXER, (q_pre, hidden, *weights))
            outs = [graph.call_function(operator.getitem, (indexer, j)) for j in range(3)]
        indexer.meta["val"] = fake_call(INDEXER, q_pre, hidden, *weights)
        for j, out in enumerate(outs):
            out.meta["val"] = indexer.meta["val"][j]
        for new_node in (indexer, *outs):  # the indexer belongs to the layer it serves
            new_node.meta.update({key: node.meta[key] for key in COPIED_META if key in node.meta})
        parts = dict(zip(("idx_q", "idx_k", "idx_w", "phi", "gate_w", "gate_b", "decay", "strength"), (*outs, *memory), strict=True))
        args = call.to(EVICT, **parts).args()
        node.target, node.args = EVICT, args
        node.meta["val"] = fake_call(EVICT, *args)
        facts.update(form="evict", budget=cfg.budget, policy=cfg.policy, indexer_heads=heads, indexer_dim=dim, memory=cfg.memory == "on")
        params[str(i)] = names
    graph.lint()
    program.signature["evict"] = {
        "budget": budget,
        "sinks": cfg.sinks,
        "window": cfg.window,
        "interval": cfg.interval,
        "policy": cfg.policy,
        "memory": cfg.memory == "on",
        "granularity": cfg.granularity,
        "observation": cfg.observation,
        "prefill_chunk": cfg.prefill_chunk,
        "layers": chosen,
        "params": params,
        "trained": {},
    }
    program.signature["exact"] = False  # equal to dense only while nothing is evicted (verify checks that case)
    untrained = " (indexers untrained: run lcc train-indexers)" if cfg.policy == "learned" else ""
    summary = f"{len(chosen)} of {len(nodes)} layers evict to {cfg.budget}: {cfg.sinks} sinks, window {cfg.window}, every {cfg.interval} steps, {cfg.policy} policy{untrained}"
    return PassResult(matches=len(chosen), notes=[summary, *notes])


def _uncast(node: torch.fx.Node) -> torch.fx.Node:
    """``node`` with dtype casts peeled off (olmo2 rotates in fp32 and casts back)."""
    while is_call(node, *CASTS):
        node = node.args[0]
    return node
