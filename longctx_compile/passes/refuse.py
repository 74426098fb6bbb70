"""The one check every attention-rewriting form makes: a site is canonical attention of a kind the form takes."""

from __future__ import annotations

import torch

from ..errors import LccError
from ..ops.schema import Call

CANONICAL = torch.ops.longctx.attention.default
KINDS = ("mask", "causal", "documents", "window")  # the order kinds are checked in


def plain_causal(node: torch.fx.Node, where: str, form: str, reasons: dict[str, str]) -> None:
    """Refuse, in one line, a site that is not canonical attention, or that has a kind in ``reasons`` (an arbitrary
    ``mask`` tensor, non-``causal`` attention, packed ``documents``, a sliding ``window``), with the form's reason
    (``{window}`` in it becomes the window's size)."""
    if node.target is not CANONICAL:
        raise LccError(f"{where}: {form} rewrites canonical attention; this site is already {node.target.name()}")
    call = Call.of(node)
    found = {"mask": call.mask is not None, "causal": not call.causal, "documents": call.doc_ids is not None, "window": bool(call.window)}
    for kind in KINDS:
        if found[kind] and kind in reasons:
            raise LccError(f"{where}: " + reasons[kind].format(window=call.window))
