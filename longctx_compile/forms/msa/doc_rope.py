"""``doc_rope``: MSA's document-wise positions (Parallel RoPE for documents, Global RoPE for the query).

The msa programs feed positions as ``position_ids``: each encoded document from 0, the template
prefix from 0 and the query from ``prefix + k`` (``runtime.msa``). That only works if every routed
layer's rotated q and k are computed from that input; a model that makes its own positions (an
``arange`` inside the forward) would silently keep one global sequence. This pass proves the
dependency for each routed site (refusing otherwise) and records the position scheme.
"""

from __future__ import annotations

from ...errors import LccError
from ...fx import aten, is_call
from ...ops.schema import Call
from ...pipeline import PassResult, Program, Stage, register
from .rewrite import MSA, MsaConfig


def _reads(node, target) -> bool:
    """Whether ``node``'s value is computed from ``target``'s values (shape-only uses, ``sym_size``, do not count)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if current in seen or is_call(current, aten.sym_size):
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


@register("doc_rope", Stage.FORM, MsaConfig)
def doc_rope(program: Program, cfg: MsaConfig) -> PassResult:
    """Check that each routed layer's q and k are rotated by the position_ids input, and record the document-wise scheme."""
    positions = next((n for n in program.gm.graph.nodes if n.op == "placeholder" and n.name == "position_ids"), None)
    routed = [n for n in program.attention_nodes() if n.target is MSA]
    for node in routed:
        facts = node.meta["lcc"]
        call = Call.of(node)
        for side, tensor in (("q", call.q), ("k", call.k)):
            if positions is None or not _reads(tensor, positions):
                raise LccError(
                    f"layer {facts['layer']} ({facts['module']}): its {side} does not depend on position_ids, so documents cannot "
                    "restart their positions (doc_rope); the model must take position_ids in its forward"
                )
        facts["doc_rope"] = True
    topk = program.signature["msa"]["topk"]
    query_start = f"prefix + k = {cfg.prefix} + {topk}" if topk > 0 else f"prefix + number of documents ({cfg.prefix} + n_docs)"
    program.signature["msa"]["positions"] = {"documents": "0.. in each document", "prefix": "0..", "query": query_start}
    return PassResult(matches=len(routed), notes=[f"documents from position 0, the query from {query_start}"])
