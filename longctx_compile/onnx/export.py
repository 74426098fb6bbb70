"""``lcc export-onnx``: one program of an artifact as an ONNX model, with dynamic batch and sequence dimensions.

The program's longctx ops are replaced by their translations (``onnx.translate``), the graph goes
through ``torch.onnx.export`` (the torch.export-based exporter), the weights a step program takes as
``state`` become initializers, and the file is written atomically and checked with ``onnx.checker``.
An ``evict`` model also returns each evicting layer's indexer importance of every key, what a
runtime needs to choose the keys it keeps.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import artifact
from ..errors import LccError
from ..forms import get_form
from . import translate

OPSET = 18  # the default; from 23 the attention ops become ONNX's Attention operator
OPSETS = range(18, 24)


@dataclass
class Report:
    """What the export did: where it wrote, how each op was translated, and what the ONNX graph holds."""

    path: str
    program: str
    custom: bool
    ops: dict[str, dict[str, Any]] = field(default_factory=dict)  # longctx op -> {count, as, how}
    inputs: dict[str, list] = field(default_factory=dict)
    outputs: dict[str, list] = field(default_factory=dict)
    onnx_ops: dict[str, int] = field(default_factory=dict)
    opset: int = OPSET
    bytes: int = 0


def export_onnx(
    path: Path,
    out: Path,
    program: str = "model",
    custom: bool = False,
    force: bool = False,
    progress: Callable[[str], None] = lambda message: None,
    opset: int = OPSET,
) -> Report:
    """Write ``program`` of the artifact at ``path`` to ``out`` (an .onnx file); returns the :class:`Report`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecations, raised while (un)pickling programs
        return _export(Path(path), Path(out), program, custom, force, progress, opset)


def _export(path: Path, out: Path, program: str, custom: bool, force: bool, progress: Callable[[str], None], opset: int) -> Report:
    _require_onnx()
    if opset not in OPSETS:
        raise LccError(f"opset {opset} is not supported; choose one of {OPSETS.start}..{OPSETS.stop - 1}")
    manifest = artifact.read_manifest(path)
    program = artifact.resolve_program(manifest, program)  # its qualified name: model, kv_cache.decode, msa.query …
    _check_out(path, manifest, out, force)
    if program in artifact.program_files(manifest):
        progress(f"loading {program}")
        ep = artifact.read_program(path, manifest, program)
    else:  # a step program the runtime runs from model.pt2's graph: exported now, from it
        from ..forms import derive

        progress(f"exporting {program} from model.pt2")
        ep = derive(artifact.read_model_program(path, manifest), program)
    state_keys = _state_keys(ep)
    extra = []
    if program == "msa.encode":
        progress("binding the encode program to chunked inputs")
        ep, state_keys = _encode_in_chunks(ep, manifest, artifact.read_program(path, manifest, "model")), []
    form = get_form(manifest["form"])
    if program == "model" and form.onnx_model is not None:  # what the form adds to its model program (evict: importance)
        progress(f"adding the {form.name} outputs")
        ep, extra = form.onnx_model(ep, manifest)
    translate.check(ep)
    nodes = translate.longctx_nodes(ep)
    report = Report(str(out), program, custom, opset=opset)
    for target, count in Counter(n.target for n in nodes).items():
        tr = translate.translation(target)
        report.ops[target.name()] = {
            "count": count,
            "as": f"{translate.DOMAIN}::{tr.name}" if custom else "standard",
            "how": translate.how(target, custom, opset),
        }
    table = translate.decompositions({n.target for n in nodes}, custom, opset)
    progress("translating the longctx ops and exporting to ONNX")
    try:  # one re-trace: the exporter's own decomposition also runs the translations
        onnx_program = _torch_export(ep, opset, table)
    except LccError:  # an exporter without that hook, or a failure to place: translate first, then export as is
        progress("translating the longctx ops")
        try:
            ep = ep.run_decompositions(table)
        except Exception as e:  # torch's own re-trace failing is one line too
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            raise LccError(f"torch.export cannot re-trace the {program} program to translate its ops ({type(e).__name__}: {first[:200]})") from None
        progress("exporting to ONNX")
        onnx_program = _torch_export(ep, opset)
    model = onnx_program.model
    if state_keys:
        _bind_state(model, state_keys, artifact.read_program(path, manifest, "model"))
    _name_dims(model, program)
    names = output_names(manifest, program) + extra
    if len(names) == len(model.graph.outputs):
        for value, name in zip(model.graph.outputs, names, strict=True):
            value.name = name
    progress("writing and checking")
    _write(onnx_program, out, custom)
    report.inputs = {v.name: _dims(v) for v in model.graph.inputs}
    report.outputs = {v.name: _dims(v) for v in model.graph.outputs}
    report.onnx_ops = dict(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.all_nodes()).most_common())
    report.bytes = out.stat().st_size
    return report


def output_names(manifest: dict[str, Any], program: str) -> list[str]:
    """The ONNX output names of an artifact's program, from what the program returns (``forms.msa.programs``, ``runtime.kv_cache``)."""
    sites = range(len(manifest.get("sites", [])))
    routed = manifest["signature"].get("msa", {}).get("routed", [])
    context = [f"context_{part}_{i}" for i in sites for part in ("keys", "values", "mask")]
    if program == "model":
        return list(manifest["signature"].get("outputs", ["logits"]))[:1]
    if program.startswith("kv_cache."):
        return ["logits", *(f"{part}_{i}" for i in sites for part in ("key", "value"))]
    if program == "msa.encode":
        return [f"{name}_{layer}" for layer in routed for part in ("keys", "values", "router_keys") for name in (part, f"{part}_count")]
    if program == "msa.query":
        return ["logits", *(f"{name}_{layer}" for layer in routed for name in ("docs", "scores")), *context]
    if program == "msa.decode":
        return ["logits", *context]
    if program == "evict.decode":
        from ..forms.evict.step import WRITTEN, parts

        evict = manifest["signature"]["evict"]
        evicting = [site["layer"] in evict["layers"] for site in manifest["sites"]]
        written = [f"{name}_{i}" for i, e in enumerate(evicting) for name in parts(evict["policy"], evict["memory"], e) if name in WRITTEN]
        return ["logits", *written, *(f"query_{i}" for i, e in enumerate(evicting) if e and evict["policy"] == "snapkv")]
    return []


DIM_NAMES = {
    ("msa.encode", "input_ids"): ("docs", "chunks"),
    "input_ids": ("batch", "sequence"),
    "inputs_input_ids": ("batch", "sequence"),
    "tokens": ("batch",),
    "chunk_doc": ("bank_chunks",),
    "table": ("docs", "doc_width"),
}


def _name_dims(model, program: str) -> None:
    """Give the symbolic dims (s43 …) names from the first input axis that carries each: batch, sequence, bank_chunks …"""
    import re

    import onnx_ir as ir

    names: dict[str, str] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in names:
                known = DIM_NAMES.get((program, value.name)) or DIM_NAMES.get(value.name, ())
                names[dim.value] = known[axis] if axis < len(known) else f"{value.name}_dim{axis}"
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def rename(value) -> None:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value for d in value.shape):
            dims = [ir.SymbolicDim(pattern.sub(lambda m: names[m.group(1)], d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape]
            value.shape = ir.Shape(dims)

    for value in (*model.graph.inputs, *model.graph.initializers.values()):
        rename(value)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            rename(value)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise LccError("ONNX export needs the onnx and onnxscript packages: pip install 'longctx-compile[onnx]'") from None
    if not hasattr(torch.onnx, "ops"):
        raise LccError(f"ONNX export needs torch >= 2.8 (torch.onnx.ops); this is torch {torch.__version__}")


def _check_out(path: Path, manifest: dict[str, Any], out: Path, force: bool) -> None:
    names = {artifact.MANIFEST, artifact.GRAPHS, *artifact.program_files(manifest).values(), *manifest.get("files", {})} - {artifact.ONNX}
    files = {(path / name).resolve() for name in names}
    if out.resolve() == path.resolve() or out.resolve() in files:
        raise LccError(f"output '{out}' would overwrite the artifact's own files; choose another -o")
    if out.is_dir():
        raise LccError(f"'{out}' is a folder; give the .onnx file to write")
    if out.exists() and not force:
        raise LccError(f"'{out}' already exists; pass --force to replace it")
    writable(out)


def writable(out: Path) -> None:
    """Refuse, before any work, an output whose folder cannot be made or written (by trying: root passes os.access)."""
    import tempfile

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe-"):
            pass
    except OSError as e:
        raise LccError(f"cannot write '{out}': {e.strerror or type(e).__name__}") from None


def _state_keys(ep: torch.export.ExportedProgram) -> list[str]:
    """The weight names of a step program's ``state`` (its first argument, a dict), in input order; [] for a model program."""
    args = _children(_children(ep.call_spec.in_spec)[0])
    return list(args[0].context) if args and args[0].type is dict else []


def _children(spec) -> list:
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)  # torch < 2.10: children_specs


def _encode_in_chunks(ep: torch.export.ExportedProgram, manifest: dict[str, Any], model: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The msa encode program re-exported to take ``input_ids`` / ``real`` as [docs, chunks, pool] with the model's
    weights bound: torch cannot re-trace the saved one, whose length dims are the expression pool · chunks."""
    from ..runtime.interpret import step_state

    state, pool = step_state(model), int(manifest["signature"]["msa"]["pool"])
    encode = ep.module()

    class EncodeChunks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, value in enumerate(state.values()):
                self.register_buffer(f"w{i}", value)

        def forward(self, input_ids, real):
            N, C, P = input_ids.shape
            weights = {name: getattr(self, f"w{i}") for i, name in enumerate(state)}
            return encode(weights, input_ids.reshape(N, C * P), real.reshape(N, C * P))

    dims = {0: torch.export.Dim("docs", max=4096), 1: torch.export.Dim("chunks", max=4096)}
    example = torch.zeros(2, 3, pool, dtype=torch.long)
    with torch.no_grad():
        return torch.export.export(EncodeChunks(), (example, torch.ones_like(example)), dynamic_shapes=(dims, dims), strict=False)


@contextlib.contextmanager
def _in_torch_decompositions(table: dict[object, Callable]) -> Iterator[None]:
    """``table`` added to torch's global decomposition table for the block: the ONNX exporter builds the table of its
    own ``run_decompositions`` from it, so the longctx ops are translated in the exporter's re-trace, not in one more."""
    from torch._decomp import decomposition_table as registry

    saved = {op: registry[op] for op in table if op in registry}
    registry.update(table)
    try:
        yield
    finally:
        for op in table:
            registry.pop(op, None)
        registry.update(saved)


def _torch_export(ep: torch.export.ExportedProgram, opset: int, table: dict[object, Callable] | None = None):
    """``torch.onnx.export`` of ``ep``, translating the ops in ``table`` on the way; its failure is one line."""
    import logging
    import warnings

    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it warns about every optional package (torchvision) it does not find
    with warnings.catch_warnings(), _in_torch_decompositions(table or {}):
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=True, verbose=False)
        except Exception as e:  # the exporter's error is pages long: its first line names the op
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise LccError(f"the ONNX exporter failed: {first[:300]}") from None
        finally:
            exporter_log.setLevel(level)


def _bind_state(model, keys: list[str], weights_ep: torch.export.ExportedProgram) -> None:
    """Make a step program's first ``len(keys)`` graph inputs (its ``state``) initializers holding the model's weights."""
    from onnx_ir.tensor_adapters import TorchTensor

    from ..runtime.interpret import step_state

    state = step_state(weights_ep)
    inputs = list(model.graph.inputs)
    for value, key in zip(inputs[: len(keys)], keys, strict=True):
        model.graph.inputs.remove(value)
        if value.uses():  # a weight the program never reads (a router key projection at query time) is left out
            value.const_value = TorchTensor(state[key].detach().contiguous(), name=value.name)
            model.graph.register_initializer(value)


def _write(onnx_program, out: Path, custom: bool) -> None:
    """Save beside ``out``, check with ``onnx.checker``, then rename into place: a failing model replaces nothing."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        onnx_program.save(tmp)
        try:  # custom-domain nodes have no schema to infer shapes from, so only the full check is skipped for them
            onnx.checker.check_model(str(tmp), full_check=not custom)
        except Exception as e:
            raise LccError(f"the exported model fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _dims(value) -> list:
    return [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
