"""An artifact's model program as a plain ``.pt2``: every longctx op replaced by its portable form (``ops.portable``,
the same translations the ONNX export uses), so ``torch.export.load`` reads and runs it without lcc installed.

Only the model program: the step programs take their weights as an input (``state``) that only lcc's runtime
binds. Ops with no portable form (collectives, ring attention) are refused in one line.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import artifact
from ..errors import LccError
from . import translate
from .export import _check_out


def export_portable(path: str | Path, out: str | Path, force: bool = False, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Write the model program of the artifact at ``path`` to ``out`` with aten ops only; returns what was replaced."""
    path, out = Path(path), Path(out)
    manifest = artifact.read_manifest(path)
    _check_out(path, manifest, out, force)
    progress("loading the model program")
    ep = artifact.read_program(path, manifest, "model")
    translate.check(ep, into="a portable program")
    nodes = translate.longctx_nodes(ep)
    replaced = {target.name(): sum(n.target is target for n in nodes) for target in {n.target for n in nodes}}
    progress("replacing the longctx ops by their portable forms")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            ep = ep.run_decompositions(translate.decompositions({n.target for n in nodes}, custom=False, opset=18))
        except Exception as e:
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            raise LccError(f"torch.export cannot re-trace the model program to replace its ops ({type(e).__name__}: {first[:200]})") from None
    left = translate.longctx_nodes(ep)
    if left:
        raise LccError(f"{left[0].target.name()} is still in the program after translation: it cannot be made portable")
    progress("writing")
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.pt2")  # torch.export.save wants the .pt2 ending
    torch.export.save(ep, tmp)
    tmp.replace(out)
    return replaced
