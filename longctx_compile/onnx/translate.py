"""How each longctx op reaches ONNX: a table of translations, applied as ``ExportedProgram.run_decompositions``.

A translation has two forms. *standard*: the op's portable form (``ops.portable``), which the
exporter turns into standard ONNX operators. *custom*: one node ``longctx::<name>`` (domain
``longctx``, version 1) with the op's tensors as inputs and its other arguments as attributes, for
a runtime that brings fused kernels. The kernels ``lower`` binds (flash_attention, hsa_flash) leave
as the op they implement. Ops with no ONNX meaning (collectives, backward kernels) are refused.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops  # noqa: F401  (registers every longctx op)
from ..errors import LccError
from ..ops import portable
from ..ops.evict import indexer_ref
from ..ops.msa import pool_ref
from ..ops.reference import doc_ids_from_positions

L = torch.ops.longctx
DOMAIN = "longctx"


def _q_shaped(q, k, v, *rest):
    return [((*q.shape[:3], v.shape[-1]), q.dtype)]


@dataclass(frozen=True)
class Translation:
    """``portable`` computes the op's outputs from standard ops; ``outputs`` gives the custom node's (shape, dtype) list."""

    name: str  # the custom node's op type
    portable: Callable
    outputs: Callable[..., list]
    how: str  # one line for the report
    arity: int | None = None  # leading arguments the semantics read (the rest are kernel configs or unread inputs)
    fused: Callable | None = None  # the form with ONNX's Attention operator, used from opset 23 on
    fused_how: str = ""


ATTENTION = "masked softmax attention: MatMul, Where, ReduceMax/Exp/ReduceSum, MatMul (GQA by broadcast)"
FUSED = dict(
    fused=portable.attention_op, fused_how="ONNX Attention (opset 23, GQA native) under a bool/additive visibility mask, Where for rows that see nothing"
)
TRANSLATIONS: dict[object, Translation] = {
    L.attention.default: Translation("attention", portable.attention, _q_shaped, ATTENTION, **FUSED),
    L.msa_attention.default: Translation("attention", portable.attention, _q_shaped, ATTENTION + " (the router inputs take no part)", 9, **FUSED),
    L.evict_attention.default: Translation("attention", portable.attention, _q_shaped, ATTENTION + " (the indexer inputs take no part)", 9, **FUSED),
    L.hsa_attention.default: Translation(
        "hsa_attention", portable.hsa, _q_shaped, "chunked HSA: local window softmax, TopK chunk selection, Gather, per-chunk softmax, fusion weights"
    ),
    L.doc_ids.default: Translation(
        "doc_ids", doc_ids_from_positions, lambda p: [(p.shape, torch.int64)], "documents from position resets: Concat, Equal, CumSum"
    ),
    L.msa_pool.default: Translation(
        "msa_pool",
        pool_ref,
        lambda x, real, pool: [((*x.shape[:2], x.shape[2] // pool, x.shape[3]), torch.float32), ((x.shape[0], x.shape[2] // pool), torch.float32)],
        "chunk means over real tokens: Reshape, Mul, ReduceSum, Div",
    ),
    L.msa_route.default: Translation(
        "msa_route",
        portable.msa_route,
        lambda rq, qm, rk, cd, table, cosine: [((rq.shape[0], table.shape[0]), torch.float32)],
        "document scores: MatMul over the bank, ReduceMax over tokens, ScatterElements(max) per document",
    ),
    L.evict_indexer.default: Translation(
        "evict_indexer",
        indexer_ref,
        lambda q_pre, hidden, qp, qn, kp, kn, gp: [
            ((q_pre.shape[0], qp.shape[0] // kp.shape[0], q_pre.shape[2], kp.shape[0]), q_pre.dtype),
            ((q_pre.shape[0], q_pre.shape[2], kp.shape[0]), q_pre.dtype),
            ((q_pre.shape[0], qp.shape[0] // kp.shape[0], q_pre.shape[2]), q_pre.dtype),
        ],
        "indexer projections: MatMul, RMS normalisation",
    ),
    L.evict_importance.default: Translation(
        "evict_importance",
        lambda q, k, w, real, groups: portable.indexer_importance(q, k, w, groups, real),
        lambda q, k, w, real, groups: [((q.shape[0], groups, k.shape[-2]), torch.float32)],
        "indexer scoring: MatMul, Relu, weighted ReduceSum over heads, causal Where, ReduceMax over queries",
    ),
    L.lm_head_loss.default: Translation(
        "lm_head_loss", portable.lm_head_loss, lambda hidden, *rest: [((), torch.float32)], "LM head and cross-entropy: MatMul, ReduceLogSumExp, GatherElements"
    ),
}
# the kernels ``lower`` binds: the op they implement (and its arguments), and stand-ins for the state they save
# for their backward, which an inference graph never reads (``check``) and dead-code elimination drops
KERNELS = {
    L.flash_attention.default: (L.attention.default, 9, lambda B, H, T: [((B, H, T), torch.float32)]),
    L.hsa_flash.default: (
        L.hsa_attention.default,
        17,
        lambda B, H, T: [((B, H, T), torch.float32), ((B, H, T, 0), torch.float32), ((B, H, 0, 0), torch.int32)],
    ),
}

REFUSED = {
    L.seq_all_to_all.default: "a sequence-parallel collective, which a one-process runtime has not; export the dense artifact of the model",
    L.seq_all_gather.default: "a sequence-parallel collective, which a one-process runtime has not; export the dense artifact of the model",
    L.ring_attention.default: "ring attention exchanges KV blocks between ranks; export the dense artifact of the model",
    L.flash_attention_backward.default: "a backward kernel: exported graphs are inference graphs",
}


def translation(target) -> Translation:
    """The translation of ``target`` (a kernel's is its op's)."""
    return TRANSLATIONS[KERNELS[target][0] if target in KERNELS else target]


def longctx_nodes(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "longctx"]


def check(ep: torch.export.ExportedProgram, into: str = "ONNX") -> None:
    """Refuse, in one line, a program holding an op with no translation (or reading a kernel's saved state)."""
    for node in longctx_nodes(ep):
        what = f"cannot export to {into}: {node.target.name()} at {node.name}"
        if node.target in REFUSED:
            raise LccError(f"{what} has no portable form ({REFUSED[node.target]})")
        if node.target not in TRANSLATIONS and node.target not in KERNELS:
            raise LccError(f"{what} has no portable form")
        if node.target in KERNELS:
            state = [u for u in node.users if u.target is not operator.getitem or (u.args[1] != 0 and u.users)]
            if state:
                raise LccError(f"{what}: {state[0].name} reads the kernel's saved state (a training graph); export an inference program")


def how(target, custom: bool, opset: int) -> str:
    """One line for the report: what ``target`` becomes."""
    tr = translation(target)
    return tr.fused_how if tr.fused and opset >= 23 and not custom else tr.how


def decompositions(targets, custom: bool, opset: int) -> dict[object, Callable]:
    """The ``run_decompositions`` table for ``targets``: portable forms (ONNX Attention from opset 23), or custom-domain nodes."""
    table = {}
    for target in targets:
        op, arity, state = KERNELS.get(target, (target, None, None))
        run = _custom(op) if custom else _standard(TRANSLATIONS[op], opset)
        table[target] = _kernel(run, arity, state) if state else run
    return table


def _standard(tr: Translation, opset: int) -> Callable:
    form = tr.fused if tr.fused and opset >= 23 else tr.portable
    return (lambda *args: form(*args[: tr.arity])) if tr.arity else form


def _kernel(run: Callable, arity: int, state: Callable) -> Callable:
    def kernel(*args):
        B, H, T, _ = args[0].shape
        return run(*args[:arity]), *(args[0].new_empty(shape, dtype=dtype) for shape, dtype in state(B, H, T))

    return kernel


def _custom(target) -> Callable:
    """One ``longctx::<name>`` node: tensors (None: an absent optional input) as inputs, the rest as attributes."""
    tr = TRANSLATIONS[target]
    schema = target._schema.arguments[: tr.arity]

    def run(*args):
        args = (args + tuple(a.default_value for a in schema[len(args) :]))[: len(schema)]
        tensors, attrs = [], {}
        for arg, value in zip(schema, args, strict=True):
            if "Tensor" in str(arg.type):
                tensors.append(value)
            elif value is not None:
                attrs[arg.name] = value
        specs = tr.outputs(*args)
        if len(specs) == 1:
            ((shape, dtype),) = specs
            return torch.onnx.ops.symbolic(f"{DOMAIN}::{tr.name}", tensors, attrs, dtype=dtype, shape=shape, version=1)
        out = torch.onnx.ops.symbolic_multi_out(f"{DOMAIN}::{tr.name}", tensors, attrs, dtypes=[d for _, d in specs], shapes=[s for s, _ in specs], version=1)
        return tuple(out)

    return run
