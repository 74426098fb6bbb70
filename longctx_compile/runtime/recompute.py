"""Per-layer activation recomputation of a program graph, with optional offload of what it keeps (as ALST does).

The graph is split into one piece per decoder layer (nodes go with the layer their module path names; a node
outside every layer goes with the piece in progress, so pieces stay in program order) and each layer's piece
runs under ``torch.utils.checkpoint``: the backward keeps only each layer's inputs and recomputes the layer,
so a step holds L layer inputs and one layer's activations instead of every layer's. With ``offload`` the
kept inputs live in CPU memory until the backward needs them (on a CPU-only machine that changes nothing).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from ..snapshot import layer_of, module_path


class _Recomputed(torch.nn.Module):
    """One layer's piece: its forward's activations are dropped and recomputed in the backward."""

    def __init__(self, piece: torch.fx.GraphModule):
        super().__init__()
        self.piece = piece

    def forward(self, *args):
        return checkpoint(self.piece, *args, use_reentrant=False)


def pieces(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    """Each node's piece: 0 before the first layer, k + 1 for layer k; never decreasing in program order."""
    current, out = 0, {}
    for node in gm.graph.nodes:
        layer = layer_of(module_path(node))
        current = max(current, layer + 1) if layer is not None else current
        out[node] = current
    return out


def by_layer(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` as a graph of per-layer pieces (same inputs and outputs), each layer's piece recomputed in backward."""
    where = pieces(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        split = split_module(gm, gm, lambda node: where[node], keep_original_order=True)
    for name, child in list(split.named_children()):
        if int(name.removeprefix("submod_")) > 0:  # the embedding and what precedes the layers is cheap: kept
            setattr(split, name, _Recomputed(child))
    return split


def offloaded() -> contextlib.AbstractContextManager:
    """Saved tensors kept in CPU memory (pinned when a GPU is there) until the backward reads them."""
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
