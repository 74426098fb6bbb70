"""``tile_loss``: train on the summed cross-entropy without ever holding full-length logits.

The rewrite takes a runnable program, cuts it at the LM head — its output becomes the head's input,
the hidden states [B, T, H] — and :class:`TiledLoss` feeds them, the head's own weight (and bias)
and the labels to ``longctx::lm_head_loss``, which computes logits and cross-entropy a tile of rows
at a time in forward and backward. It works on any form's program, sequence-parallel ones included
(each rank's loss covers its shard). The artifact keeps logits as its output; the rewrite is applied
to the loaded module, sharing its parameters, so optimizers and gradient reductions see one set.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch

from ..errors import LccError
from ..fx import CASTS, CLONES, is_call
from ..ops.loss import IGNORE, default_tile, lm_head_loss

aten = torch.ops.aten


def head_hidden(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, str, str | None]:
    """A copy of ``gm`` (parameters shared) returning the LM head's input; the head's weight and bias names.

    The logits must be the output of a ``linear`` on parameters (attributes of a module, or the lifted
    parameter inputs of an exported program's graph), up to casts and copies; anything else after the head
    (soft-capping, scaling) is refused, since the tiled loss would skip it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation, raised while copying the codegen
        graph = copy.deepcopy(gm.graph)
    output = graph.output_node()
    flat = output.args[0]
    logits = flat[0] if isinstance(flat, (list, tuple)) else flat
    node = logits
    while is_call(node, *CASTS, *CLONES) and len(node.users) == 1:
        node = node.args[0]
    if not is_call(node, aten.linear) or not all(a is None or (isinstance(a, torch.fx.Node) and a.op in ("get_attr", "placeholder")) for a in node.args[1:3]):
        found = node.target if isinstance(node, torch.fx.Node) and node.op == "call_function" else getattr(node, "op", node)
        raise LccError(f"tile_loss needs logits straight from the LM head's linear layer, but they come from {found}")
    hidden, weight, bias = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    output.replace_input_with(logits, hidden)
    body = torch.fx.GraphModule(gm, graph)
    body.graph.eliminate_dead_code()  # the head's linear and what fed only it
    body.recompile()
    return body, weight.target, None if bias is None else bias.target


class TiledLoss:
    """``(summed cross-entropy, valid-token count)`` of a runnable program, the head and loss tiled."""

    def __init__(self, module: torch.nn.Module, signature: dict):
        self.module, self.signature = module, signature
        self.body, self.weight, self.bias = head_hidden(module)

    def __call__(
        self,
        input_ids: torch.Tensor,
        shift_labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        tile: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from ..runtime.model import call_program

        if tuple(shift_labels.shape) != tuple(input_ids.shape):
            raise LccError(f"shift_labels must have the shape of input_ids {list(input_ids.shape)}, got {list(shift_labels.shape)}")
        hidden = call_program(self.body, self.signature, input_ids, attention_mask, position_ids)
        weight = operator.attrgetter(self.weight)(self.module)
        bias = None if self.bias is None else operator.attrgetter(self.bias)(self.module)
        tile = tile or default_tile(weight.shape[0])
        if tile < 1:
            raise LccError(f"tile must be at least 1 row, got {tile}")
        return lm_head_loss(hidden, weight, bias, shift_labels, tile), (shift_labels != IGNORE).sum()
