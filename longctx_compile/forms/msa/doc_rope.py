"""``doc_rope``: MSA's document-wise positions.

The msa programs feed positions as ``position_ids``: each encoded document from 0 (Parallel RoPE) and
the template prefix from 0. The query then starts at ``prefix + k`` (``positions=global``, the paper's
Global RoPE), or after the selected documents laid out one after another (``positions=contiguous``:
the runtime moves each document's keys to its place by the model's own rotation, ``passes.rope``).
That only works if every routed layer's rotated q and k are computed from that input; a model that
makes its own positions (an ``arange`` inside the forward) would silently keep one global sequence.
This pass proves the dependency for each routed site (and, for contiguous, that its key rotation can
be cut out of the graph), refusing otherwise, and records the position scheme.
"""

from __future__ import annotations

from ...errors import LccError
from ...fx import aten, is_call
from ...ops.schema import Call
from ...passes.rope import rotation
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
    config = program.signature["msa"]
    routed = [n for n in program.attention_nodes() if n.target is MSA]
    movable = True  # every routed layer's key rotation can be cut out of the graph (positions=contiguous)
    for node in routed:
        facts = node.meta["lcc"]
        call = Call.of(node)
        for side, tensor in (("q", call.q), ("k", call.k)):
            if positions is None or not _reads(tensor, positions):
                raise LccError(
                    f"layer {facts['layer']} ({facts['module']}): its {side} does not depend on position_ids, so documents cannot "
                    "restart their positions (doc_rope); the model must take position_ids in its forward"
                )
        if rotation(program.ep, call.k, positions) is None:
            movable = False
            if config["positions"] == "contiguous":
                raise LccError(
                    f"layer {facts['layer']} ({facts['module']}): positions=contiguous moves each document's keys by the model's own "
                    "rotation, and this layer's RoPE is not one lcc can cut out of the graph; convert with --opt positions=global"
                )
        facts["doc_rope"] = True
    notes = []
    if config["positions"] == "auto":
        trained = any(n.meta["lcc"].get("loaded_router") for n in routed)
        config["positions"] = "contiguous" if movable and not trained else "global"
        why = "the source holds MSA router weights" if trained else "lcc cannot move this model's keys" if not movable else "a model not trained on memory"
        notes.append(f"positions={config['positions']} ({why})")
    return PassResult(matches=len(routed), notes=[f"documents from position 0; the query {query_start(config)}", *notes])


def query_start(config: dict) -> str:
    """Where an msa query's positions start, in words (``config``: the signature's ``msa`` entry)."""
    if config.get("positions", "global") == "contiguous":
        return "after the selected documents, laid out from the prefix on in routing order (positions=contiguous)"
    k = f"k = {config['topk']}" if config["topk"] > 0 else "the number of documents"
    return f"from prefix + {k} (positions=global)"
