"""``ulysses``: the per-rank program of Ulysses sequence parallelism (degree P).

Each rank holds a contiguous 1/P of the sequence everywhere except inside attention. Around every
canonical attention: an all-to-all per q, k, v scatters heads and gathers the sequence, attention
runs on Hq/P heads over the whole sequence (so causality and windows need no offsets), and the
inverse all-to-all restores the rank's shard. KV heads are scattered as they are (Hkv % P == 0) or,
when P > Hkv and P % Hkv == 0, each is first repeated P/Hkv times so every rank receives the one its
query heads read; GQA heads are never repeated beyond that. Key padding and the positions that
define documents are all-gathered, since every rank's attention sees all keys. RoPE needs no change
because the per-rank program takes global position ids (``distributed.shard`` slices them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LccError
from ..pipeline import PassResult, Program, Stage, register
from .graph import fake_call, is_call, val

A2A = torch.ops.longctx.seq_all_to_all.default
GATHER = torch.ops.longctx.seq_all_gather.default
HEADS, SEQ = 1, 2  # dims of [B, H, T, D]


@dataclass
class UlyssesConfig:
    """``--opt degree=P``: the number of ranks that share one sequence."""

    degree: int = 2


def check_heads(hq: int, hkv: int, degree: int, where: str) -> None:
    """Refuse, in one line naming the numbers, a degree that does not fit the heads."""
    if degree < 1:
        raise LccError(f"sequence-parallel degree must be at least 1, got {degree}")
    if hq % degree:
        raise LccError(f"{where}: {hq} query heads are not divisible by the sequence-parallel degree {degree}")
    if hkv % degree and degree % hkv:
        raise LccError(f"{where}: {hkv} KV heads and degree {degree}: neither divides the other")


def comm_bytes(facts: dict[str, Any], tokens: int, batch: int = 1) -> dict[str, int]:
    """Bytes each rank sends per layer in the forward, by tensor, for a global length ``tokens``.

    An all-to-all keeps 1/P of its input and sends the rest: (P-1)/P · (tokens/P) · heads · dim.
    The backward sends the same again (the gradient of each all-to-all is the inverse one).
    """
    degree = facts["degree"]
    local = batch * tokens // degree
    share = lambda heads, dim: (degree - 1) * local * heads * dim * facts["dtype_bytes"] // degree  # noqa: E731
    kv_heads = max(facts["hkv"], degree)
    d, dv = facts["head_dim"], facts.get("v_dim", facts["head_dim"])
    return {"q": share(facts["hq"], d), "k": share(kv_heads, d), "v": share(kv_heads, dv), "out": share(facts["hq"], dv)}


@register("ulysses", Stage.FORM, UlyssesConfig)
def ulysses(program: Program, cfg: UlyssesConfig) -> PassResult:
    """Wrap each attention in all-to-alls (heads ↔ sequence) and gather its key padding and documents."""
    P = cfg.degree
    graph = program.gm.graph
    nodes = program.attention_nodes()
    for node in nodes:
        facts = node.meta["lcc"]
        check_heads(facts["hq"], facts["hkv"], P, f"layer {facts['layer']} ({facts['module']})")
        if node.args[5] is not None:
            raise LccError(f"layer {facts['layer']} ({facts['module']}): an arbitrary mask tensor cannot be sharded over the sequence")
    gathered: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        facts = node.meta["lcc"]
        q, k, v, key_padding, doc_ids = node.args[:5]
        before = len(gathered)
        with graph.inserting_before(node):
            if facts["hkv"] < P:
                k, v = (_call(graph, torch.ops.aten.repeat_interleave.self_int, x, P // facts["hkv"], HEADS) for x in (k, v))
            q, k, v = (_call(graph, A2A, x, HEADS, SEQ, P) for x in (q, k, v))
            if key_padding is not None and key_padding not in gathered:
                gathered[key_padding] = _call(graph, GATHER, key_padding, 1, P)
            if doc_ids is not None and doc_ids not in gathered:
                gathered[doc_ids] = _gather_documents(graph, doc_ids, P)
        key_padding, doc_ids = gathered.get(key_padding), gathered.get(doc_ids)
        node.args = (q, k, v, key_padding, doc_ids, *node.args[5:])
        node.meta["val"] = fake_call(node.target, *node.args)
        with graph.inserting_after(node):
            back = _call(graph, A2A, node, SEQ, HEADS, P)
        node.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
        facts.update(
            v_dim=int(val(v).shape[-1]),
            dtype_bytes=val(q).element_size(),
            form="ulysses",
            degree=P,
            kv_replicated=P // facts["hkv"] if facts["hkv"] < P else 1,
            # gathers are shared by every site that reads the same padding or documents: counted where inserted
            collectives={"all_to_all": 4, "all_gather": len(gathered) - before},
        )
    program.signature["sequence_parallel"] = {"form": "ulysses", "degree": P}
    return PassResult(matches=len(nodes), notes=[f"{len(nodes)} sites: 4 all-to-alls each at degree {P}"])


def _call(graph: torch.fx.Graph, op, *args) -> torch.fx.Node:
    node = graph.call_function(op, args)
    node.meta["val"] = fake_call(op, *args)
    return node


def _gather_documents(graph: torch.fx.Graph, doc_ids: torch.fx.Node, degree: int) -> torch.fx.Node:
    """Documents come from position resets over the whole sequence: gather the positions, then number them."""
    if not is_call(doc_ids, torch.ops.longctx.doc_ids):
        raise LccError("packed-document masks under sequence parallelism need document ids computed from position_ids")
    positions = _call(graph, GATHER, doc_ids.args[0], 1, degree)
    return _call(graph, torch.ops.longctx.doc_ids.default, positions)
