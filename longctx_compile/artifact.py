"""Artifact folders: ``model.pt2`` + ``graphs.json`` (stage snapshots) + ``lcc.json`` manifest, written atomically.

The folder is built under a temporary name beside the destination and renamed into place, so a
failure never leaves a half-written artifact, and an existing folder is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import LccError

# 2: programs in per-purpose namespaces (``kv_cache``, ``msa``): stored in a folder of that name, or ``derived`` from
# model.pt2 on demand (the runtime runs its steps from model.pt2's graph; only a portable export needs them as programs)
FORMAT_VERSION = 2
MANIFEST = "lcc.json"
PROGRAM = "model.pt2"
GRAPHS = "graphs.json"
ONNX = "model.onnx"  # the model program as ONNX (``lcc convert --onnx``; ``onnx.export``)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_destination(out: Path, force: bool, inputs: list[Path] = ()) -> None:
    """Refuse an existing destination without ``force``, and any destination that holds an input."""
    out = Path(out).resolve()
    for item in inputs:
        item = Path(item).resolve()
        if out == item or out in item.parents:
            raise LccError(f"output '{out}' would overwrite the input '{item}'; choose another -o")
    if out.exists() and not force:
        raise LccError(f"'{out}' already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LccError(f"'{out}' exists and is not a folder")


def manifest_of(compiled, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a compiled program (files are added by :func:`write`)."""
    program = compiled.program
    return {
        "format_version": FORMAT_VERSION,
        "lcc_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "source": program.source,
        "form": program.form,
        "form_config": dataclasses.asdict(compiled.form_config),
        "capture": dataclasses.asdict(compiled.capture_config),
        "target": program.target,
        "signature": program.signature,
        "parameters": parameter_stats(program.ep),
        "tied": tied_parameters(program.ep),
        "sites": program.sites(),
        "op_modules": op_modules(program.ep),
        "history": [dataclasses.asdict(r) for r in program.history],
        "stages": list(program.snapshots),
        "programs": {"model": PROGRAM},  # stored files; namespaced ones as {"kv_cache": {"decode": "kv_cache/decode.pt2"}}
        "equivalence": report,
        **compiled.derived(),  # the programs derived from model.pt2 on demand, and the KV-cache layout or why none
    }


BUILTIN_NAMESPACES = {"aten", "prims", "longctx", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"}


def op_modules(ep: torch.export.ExportedProgram) -> list[str]:
    """The Python modules that register the program's custom ops from outside torch and lcc (transformers'
    ``grouped_mm_fallback`` for mixture-of-experts layers): a fresh process imports them before loading.
    Ops defined in a script or a ``file.py:factory`` have no importable module: their user imports them first."""
    from torch._library.custom_ops import OPDEFS

    modules = set()
    for node in ep.graph_module.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace in BUILTIN_NAMESPACES:
            continue
        opdef = OPDEFS.get(f"{target.namespace}::{target._opname}")
        module = getattr(getattr(opdef, "_init_fn", None), "__module__", None)
        if module and module != "__main__" and not module.startswith("_lcc_factory_"):
            modules.add(module)
    return sorted(modules)


def import_op_modules(path: Path, manifest: dict[str, Any]) -> None:
    """Register the custom ops an artifact's program needs (``op_modules``) before it is deserialized."""
    for module in manifest.get("op_modules", []):
        try:
            importlib.import_module(module)
        except Exception as e:
            raise LccError(f"'{path}' needs the ops of the module {module}, which cannot be imported here: {type(e).__name__}: {e}") from None


def tied_parameters(ep: torch.export.ExportedProgram) -> list[list[str]]:
    """Groups of state-dict names that are one tensor (tied embeddings): saving unties them, loading re-ties."""
    groups: dict[int, list[str]] = {}
    for name, tensor in ep.state_dict.items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def parameter_stats(ep: torch.export.ExportedProgram) -> dict[str, int]:
    tensors = list({id(t): t for t in ep.state_dict.values()}.values())  # tied weights once
    return {"count": sum(t.numel() for t in tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors)}


def write(compiled, out: Path, force: bool = False, report: dict[str, Any] | None = None) -> Path:
    """Write the artifact of ``compiled`` to ``out`` atomically; returns the folder."""
    out = Path(out)
    inputs = [Path(compiled.program.source["spec"])] if compiled.program.source["kind"] in ("hf_folder", "gguf") else []
    check_destination(out, force, inputs)
    with atomic_folder(out) as tmp:
        torch.export.save(compiled.program.ep, tmp / PROGRAM)
        (tmp / GRAPHS).write_text(json.dumps(compiled.program.snapshots))
        manifest = manifest_of(compiled, report)
        manifest["files"] = {name: sha256(tmp / name) for name in (PROGRAM, GRAPHS, *program_files(manifest).values())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Remove the temporary folders of earlier writes of ``out`` whose writer is gone (killed before it could clean up)."""
    swept = []
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
            swept.append(stale)
    return swept


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill; on success it replaces ``out`` by renames, on failure (an exception,
    or an interrupt the CLI turns into one) it is removed. Its name holds the writer's pid, so a later write of the
    same ``out`` removes what a killed writer left (:func:`sweep_stale`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def write_lock(path: Path, timeout: float = 600.0, waiting=None) -> Iterator[None]:
    """Hold the lock of ``path`` (``.NAME.lock`` beside it) while reading, changing and replacing it, so that two
    writers of one folder run one after the other instead of the second overwriting the first's work. The lock is
    the OS's (``flock``): a killed holder releases it. ``waiting(pid)`` is told once when another process holds it."""
    import fcntl
    import time

    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a+") as handle:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                if time.monotonic() > deadline:
                    raise LccError(f"'{path}' is being written by another process (pid {holder}); waited {timeout:.0f} s, try again later") from None
                if waiting is not None and not told:
                    waiting(holder)
                    told = True
                time.sleep(0.1)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


_LOADING = threading.Lock()  # torch.export.load keeps its deserializer in a global: one load at a time (ranks as threads)


def rewrite_weights(path: Path, manifest: dict[str, Any], ep: torch.export.ExportedProgram, values: dict[str, torch.Tensor], out: Path | None = None) -> None:
    """Put ``values`` into the artifact's model program and write it with ``manifest``, atomically: a copy of the
    folder with the new ``model.pt2`` replaces it, or becomes ``out`` (the other files are copied as they are)."""
    path = Path(path)
    for name, value in values.items():
        old = ep.state_dict[name]
        ep.state_dict[name] = torch.nn.Parameter(value.detach().to(old.dtype).clone(), requires_grad=old.requires_grad)
    with atomic_folder(Path(out or path)) as tmp:
        for item in path.iterdir():
            if item.name in (PROGRAM, MANIFEST):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        torch.export.save(ep, tmp / PROGRAM)
        manifest["files"] = {name: sha256(tmp / name) for name in manifest["files"]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def record_file(path: Path, name: str, key: str, info: dict[str, Any]) -> None:
    """Enter a file written into the artifact after it (``model.onnx``) in its manifest: ``info`` under ``key`` and
    the file's checksum; the manifest is replaced atomically."""
    path = Path(path)
    manifest = read_manifest(path)
    manifest[key] = info
    manifest.setdefault("files", {})[name] = sha256(path / name)
    tmp = path / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path / MANIFEST)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an artifact folder, validated, or a one-line error."""
    path = Path(path)
    if not path.exists():
        raise LccError(f"no such artifact: '{path}'")
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise LccError(f"'{path}' is not an lcc artifact (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LccError(f"corrupt artifact '{path}': {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest or "signature" not in manifest:
        raise LccError(f"corrupt artifact '{path}': {MANIFEST} lacks format_version or signature")
    if manifest["format_version"] != FORMAT_VERSION:
        older = isinstance(manifest["format_version"], int) and manifest["format_version"] < FORMAT_VERSION
        why = "an older lcc wrote it; re-convert the model with this lcc" if older else "a newer lcc wrote it; upgrade lcc"
        raise LccError(f"artifact '{path}' has format version {manifest['format_version']} and this lcc reads {FORMAT_VERSION}: {why}")
    return manifest


def program_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Every program of an artifact by qualified name (``model``, ``kv_cache.decode``, ``msa.query``) → its file."""
    files = {}
    for key, value in manifest["programs"].items():
        if isinstance(value, dict):
            files.update({f"{key}.{name}": file for name, file in value.items()})
        else:
            files[key] = value
    return files


def program_names(manifest: dict[str, Any]) -> list[str]:
    """Every program an artifact offers by qualified name: those stored, then those derived from model.pt2 on demand."""
    derived = [f"{namespace}.{name}" for namespace, names in manifest.get("derived", {}).items() for name in names]
    return [*program_files(manifest), *(name for name in derived if name not in program_files(manifest))]


def resolve_program(manifest: dict[str, Any], name: str) -> str:
    """The qualified name of program ``name``: itself, or the one namespace holding a program of that short name."""
    files = program_names(manifest)
    if name in files:
        return name
    matches = [qualified for qualified in files if qualified.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise LccError(f"the artifact has several programs named '{name}': say which ({', '.join(matches)})")
    raise LccError(f"the artifact has no program '{name}' (it has: {', '.join(files)})")


def verify_files(path: Path, manifest: dict[str, Any], only: str | None = None) -> None:
    """Check the artifact's files (or just ``only``) against the manifest's checksums."""
    for name, digest in manifest.get("files", {}).items():
        if only is not None and name != only:
            continue
        file = Path(path) / name
        if not file.is_file():
            raise LccError(f"corrupt artifact '{path}': {name} is missing")
        if sha256(file) != digest:
            raise LccError(f"corrupt artifact '{path}': {name} does not match its checksum")


def read_program(path: Path, manifest: dict[str, Any], name: str = "model", device: Any = None, progress=None) -> torch.export.ExportedProgram:
    """One program of the artifact (a qualified name, or a short one that names a single program), checksums checked
    first; ``device`` moves weights and graph device literals."""
    from torch.export.passes import move_to_device_pass

    from . import ops  # noqa: F401  (the longctx ops must be registered before deserializing)

    relative = program_files(manifest)[resolve_program(manifest, name)]
    if progress is not None:
        progress(f"checking {relative}")
    verify_files(path, manifest, only=relative)
    import_op_modules(path, manifest)
    file = Path(path) / relative
    if progress is not None:
        progress(f"loading {relative}")
    try:
        with _LOADING:
            ep = torch.export.load(file)
    except Exception as e:
        raise LccError(f"corrupt artifact '{path}': cannot load {file.name}: {str(e).splitlines()[0][:200]}") from None
    return move_to_device_pass(ep, torch.device(device)) if device is not None else ep


def read_graphs(path: Path) -> dict[str, Any]:
    file = Path(path) / GRAPHS
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LccError(f"corrupt artifact '{path}': cannot read {GRAPHS} ({e})") from None


def read_model_program(path: Path, manifest: dict[str, Any]):
    """An artifact's model program as a :class:`Program`, each attention site's facts restored from the manifest
    (a saved program keeps the graph, not the facts the passes recorded on its nodes)."""
    from .pipeline import Program

    ep = read_program(path, manifest, "model")
    program = Program(ep, manifest["signature"], manifest["source"], form=manifest["form"], target=manifest["target"])
    nodes = program.attention_nodes()
    if len(nodes) != len(manifest["sites"]):
        raise LccError(f"corrupt artifact '{path}': {len(nodes)} attention sites in model.pt2, {len(manifest['sites'])} in its manifest")
    for node, facts in zip(nodes, manifest["sites"], strict=True):
        node.meta["lcc"] = {k: v for k, v in facts.items() if k != "node"}
    return program
