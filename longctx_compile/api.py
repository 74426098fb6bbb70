"""The public Python API: ``compile``, ``load``, ``verify``, ``diff``, ``train``, ``targets``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import artifact
from .capture import CaptureConfig, load_model
from .compiler import Compiled, compile_model
from .errors import LccError
from .forms import get_form
from .inspect.diff import GraphDiff, diff_snapshots
from .loaded import LoadedModel
from .loaded import load as _load
from .options import build
from .runtime.quality import quality
from .runtime.tokenizer import tokenizer_for
from .runtime.verify import ATOL, FLOOR_FACTOR, LENGTHS, RTOL, Report, reference_and_floor
from .runtime.verify import verify as _verify
from .targets import TARGETS, Target


def compile(model: Any, to: str = "dense", target: str = "cpu", **options: Any) -> Compiled:
    """Capture ``model`` (nn.Module, preset, HF folder or ``file.py:factory``) and convert it to form ``to``.

    ``options`` are the same keys as ``lcc convert --opt`` (capture, canonicalize and form settings).
    Save with ``compiled.save(path)``.
    """
    return compile_model(model, to=to, target=target, options=options)


def load(path: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """Load an artifact folder (onto ``device``, e.g. ``"cuda"``); the result is callable like a causal LM and returns logits."""
    return _load(path, device)


def targets() -> dict[str, Target]:
    """The known targets by name."""
    return dict(TARGETS)


def is_artifact(path: Any) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / artifact.MANIFEST).is_file()


def source_model(manifest: dict[str, Any], dtype: str | None = None) -> torch.nn.Module:
    """Rebuild the model an artifact was converted from (preset, HF folder or factory file), in ``dtype`` (None: the artifact's)."""
    source = manifest["source"]
    if source["kind"] == "module":
        raise LccError("this artifact came from a Python object; verify it in Python with lcc.verify(model, artifact)")
    capture = build(CaptureConfig, {**manifest.get("capture", {}), **({"dtype": dtype} if dtype else {})})
    return load_model(source["spec"], capture)[0]


def _as_runnable(converted: Any) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    if isinstance(converted, (str, Path)):
        converted = load(converted)
    if isinstance(converted, Compiled):
        return (lambda **kw: converted(**kw)), converted.program.signature
    if isinstance(converted, LoadedModel):
        return (lambda **kw: converted(**kw)), converted.signature
    raise LccError(f"cannot run {type(converted).__name__}: expected a compiled program, a loaded artifact or a path")


def verify(
    model: Any,
    converted: Any = None,
    to: str = "dense",
    target: str = "cpu",
    lengths=LENGTHS,
    rtol: float = RTOL,
    atol: float = ATOL,
    **options: Any,
) -> Report:
    """Compare a converted model with its original on seeded batches.

    ``verify(artifact_path)`` rebuilds the original from the manifest; ``verify(model, to=...)`` compiles
    first; ``verify(model, converted)`` compares the two you give.
    """
    if converted is None and is_artifact(model):
        converted = load(model)
        original = source_model(converted.manifest, dtype="fp32")  # the checkpoint's weights, compared in fp32
        exact = get_form(converted.manifest["form"]).exact
    elif converted is None:
        converted = compile(model, to=to, target=target, **options)
        original = model if isinstance(model, torch.nn.Module) else converted.original
        exact = get_form(to).exact
    else:
        original = load_model(model)[0] if not isinstance(model, torch.nn.Module) else model
        converted = load(converted) if isinstance(converted, (str, Path)) else converted
        exact = True
    runnable, signature = _as_runnable(converted)
    exact = signature.get("exact", exact)  # a form whose exactness depends on its options records it
    form = get_form(converted.program.form if isinstance(converted, Compiled) else converted.manifest["form"])
    if lengths is LENGTHS and form.verify_lengths is not None:  # the default lengths, plus what the configuration needs
        lengths = configured_lengths(converted, signature, form)
    original, floor, against = reference_and_floor(original, signature, lengths)
    tolerance = atol if floor is None else atol + FLOOR_FACTOR * floor
    if form.verify is not None:  # the form's own check (msa: routed over an encoded bank; evict: a compacted prompt)
        ep = converted.program.ep if isinstance(converted, Compiled) else converted.program
        report = form.verify(original, ep, signature, lengths, rtol, tolerance)
    else:
        if form.verify_runnable is not None:  # the form's own way to run (sequence parallel: on its ranks)
            runnable, lengths = form.verify_runnable(converted, signature, lengths)
        report = _verify(original, runnable, signature, lengths, rtol, tolerance, exact)
        if not report.exact:  # an approximate form: what it costs on real text, when the source has a tokenizer
            tokenizer = tokenizer_for({"source": converted.program.source if isinstance(converted, Compiled) else converted.manifest["source"]})
            if tokenizer is not None:
                report.quality = quality(original, runnable, signature, tokenizer)
    report.dtype, report.floor, report.floor_against = signature.get("dtype", "fp32"), floor, against
    return report


def configured_lengths(converted: Compiled | LoadedModel, signature: dict[str, Any], form: Any) -> tuple[int, ...]:
    """:data:`LENGTHS` and the lengths the form's configuration needs (within the program's maximum)."""
    if isinstance(converted, Compiled):
        sites, config = converted.program.sites(), dataclasses.asdict(converted.form_config)
    else:
        sites, config = converted.manifest["sites"], converted.manifest.get("form_config", {})
    extra = {n for n in form.verify_lengths(signature, sites, config) if n <= signature["max_len"]}
    return tuple(sorted(set(LENGTHS) | extra))


def diff(converted: Any, from_stage: str = "capture", to_stage: str | None = None, layer: int | None = None) -> GraphDiff:
    """What the passes between two stages changed: nodes added, removed and rewired, grouped by layer."""
    if isinstance(converted, Compiled):
        snapshots, history = converted.program.snapshots, [vars(r) for r in converted.program.history]
    elif isinstance(converted, (str, Path, LoadedModel)):
        path = converted.path if isinstance(converted, LoadedModel) else Path(converted)
        manifest = artifact.read_manifest(Path(path))
        snapshots, history = artifact.read_graphs(Path(path)), manifest["history"]
    else:
        raise LccError(f"cannot diff {type(converted).__name__}: expected a compiled program or an artifact path")
    return diff_snapshots(snapshots, history, from_stage, to_stage, layer)


def _train_indexers(
    path: Path, data: str, out: Path, force: bool, checkpoint: Any, resume: bool, save_every: int, progress: Callable | None, options: dict[str, Any]
) -> dict[str, Any]:
    """``lcc train --objective indexers``: an evict artifact's two-stage indexer and memory training (what ``lcc
    train-indexers`` runs in place), written to a new artifact. ``steps``, ``length``, ``batch``, ``lr`` and ``seed``
    carry over; the memory stage takes as many steps and its own learning rate."""
    import time

    from .forms.evict.train import TrainConfig as IndexerConfig
    from .forms.evict.train import train_artifact

    if not is_artifact(path):
        raise LccError(f"'{path}' is not an lcc artifact (convert a model first: lcc convert MODEL --to FORM -o ARTIFACT)")
    artifact.check_destination(out, force, [path])
    manifest = artifact.read_manifest(path)
    if manifest.get("form") != "evict":
        raise LccError(f"--objective indexers trains an evict artifact's indexers and memories; this artifact's form is {manifest.get('form')}")
    carried = {k: v for k, v in options.items() if k in ("steps", "length", "batch", "lr", "seed")}
    cfg = IndexerConfig(**{"length": min(1024, manifest["signature"]["max_len"]), **carried})
    began, done = time.perf_counter(), [0]

    def report(stage: str, step: int, total: int, loss: float) -> None:
        done[0] += 1
        if progress is not None:
            progress({"step": done[0], "stage": stage, "loss": loss, "tokens_per_s": done[0] * cfg.batch * cfg.length / (time.perf_counter() - began)})

    program = artifact.read_program(path, manifest)
    checkpoint = Path(checkpoint) if checkpoint else out.parent / f"{out.name}.train.pt"
    summary = {"objective": "indexers", "trainable": "indexers and memories", "steps": cfg.steps, "data": data, "length": cfg.length}
    train_artifact(path, manifest, program, data, cfg, out, checkpoint, resume, save_every, report, note=summary)
    return summary


def train(
    path: str | Path,
    data: str,
    out: str | Path,
    force: bool = False,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    save_every: int = 50,
    metrics: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    nproc: int = 1,
    sp: str = "auto",
    ranks: str = "processes",
    form_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Adapt the artifact at ``path`` to its form and write the result to ``out`` (atomically; ``path`` is untouched).

    ``data``: ``synthetic`` (random tokens), ``passkey`` or ``kv-recall`` (retrieval tasks generated on the fly), a
    ``.jsonl`` of ``{"text"|"tokens"}`` lines, or a text file. ``options``:
    :class:`~.runtime.train.TrainConfig`'s fields (objective, trainable, steps, length, batch, accumulate, lr, clip,
    seed; ``length`` defaults to 1024 or the program's maximum). A checkpoint (default ``OUT.train.pt``) is written every ``save_every`` steps and removed at the end;
    ``resume`` continues it. ``nproc`` > 1 trains on that many local ranks, each on its shard of every window
    under the sequence-parallel layout ``sp`` (``ulysses``, ``ring`` or ``auto``; ``ranks="threads"`` runs them as
    threads of this process; an msa artifact shards each example's bank over them instead, Memory Parallel, on
    processes). ``form_options`` (``lcc train --opt``) configure a form that trains on its own
    examples (msa: documents, queries and answers; ``forms.msa.train``). Returns the summary recorded in the new
    artifact's signature under ``train``.
    """
    from .forms.sp.train import layout_for, train_ranks
    from .runtime.data import TASKS, data_stream
    from .runtime.interpret import attention_sites
    from .runtime.train import ProgramTrainer, TrainConfig, check_program, load_checkpoint, run

    path, out = Path(path), Path(out)
    if options.get("objective") == "indexers":
        return _train_indexers(path, data, out, force, checkpoint, resume, save_every, progress, options)
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise LccError(f"unknown training option '{sorted(unknown)[0]}'; known: {', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
    if not is_artifact(path):
        raise LccError(f"'{path}' is not an lcc artifact (convert a model first: lcc convert MODEL --to FORM -o ARTIFACT)")
    artifact.check_destination(out, force, [path])
    manifest = artifact.read_manifest(path)
    signature = manifest["signature"]
    cfg = TrainConfig(**{"length": min(1024, signature["max_len"]), **options})
    cfg.check()
    if cfg.length > signature["max_len"]:
        raise LccError(f"--seq-len {cfg.length} exceeds the program's maximum length {signature['max_len']}; convert with a larger max_len")
    form = get_form(manifest.get("form", "dense"))
    tokenizer = None if data in ("synthetic", *TASKS) else tokenizer_for(manifest)
    form_options = dict(form_options or {})
    if form.train is None:
        if form_options and form.site_loss is None:
            raise LccError(f"--opt configures a form's own training (msa's, hsa's); the {form.name} form trains on token windows and takes none")
        stream = data_stream(data, tokenizer, signature["vocab_size"], cfg.length, cfg.batch, cfg.seed, cfg.pack)
    elif nproc != 1 and ranks != "processes":
        raise LccError(f"the {form.name} form's training runs its ranks as processes (torch.distributed), not as threads")
    ep = artifact.read_model_program(path, manifest).ep  # with each site's facts: what --trainable layers= and sharding read
    layout, site_loss = None, None
    if form.train is not None:
        if nproc < 1:
            raise LccError(f"--nproc must be at least 1, got {nproc}")
        if sp != "auto":
            raise LccError(f"--sp {sp} lays out token windows; the {form.name} form shards each example's documents over the ranks instead")
        trainer, stream = form.train(ep, signature, cfg, data, tokenizer, form_options, nproc)  # what would fail on every rank fails here
    elif form_options:  # the form's site loss (hsa: --opt aux, its retrieval loss)
        if nproc != 1:
            raise LccError(f"--opt {next(iter(form_options))} (the {form.name} form's site loss) trains on one process; a rank holds part of each site")
        site_loss = form.site_loss([n.meta["lcc"] for n in attention_sites(ep)], form_options)
    elif nproc != 1:
        check_program(ep, signature, cfg, form.name)  # what fails on every rank fails here first, in one line
        layout = layout_for(ep, signature, nproc, sp, cfg.length)
        ep = None  # sharded by the check: the ranks read their own copies, and the trained weights go into a fresh one
    checkpoint = Path(checkpoint) if checkpoint else out.parent / f"{out.name}.train.pt"
    fingerprint = manifest["files"][artifact.PROGRAM] + json.dumps([dataclasses.asdict(cfg), form_options], sort_keys=True) + data + str(layout or "")
    state = load_checkpoint(checkpoint, resume, fingerprint, "another artifact, data or set of options")
    common = dict(checkpoint=checkpoint, resume=state, save_every=save_every, metrics=Path(metrics) if metrics else None, fingerprint=fingerprint)
    if form.train is not None and nproc > 1:
        result = train_ranks(path, nproc, dict(cfg=cfg, layout=None, data=data, options=form_options, **common), progress, ranks)
    elif form.train is not None:
        result = run(trainer, stream, progress=progress, **common)
    elif layout is None:
        result = run(ProgramTrainer(ep, signature, cfg, form.name, site_loss=site_loss), stream, progress=progress, **common)
    else:
        result = train_ranks(path, nproc, dict(cfg=cfg, layout=layout, data=data, **common), progress, ranks)
        ep = artifact.read_program(path, manifest)
    summary = {**result["summary"], "data": data, "length": cfg.length, "batch": cfg.batch, "accumulate": cfg.accumulate, "lr": cfg.lr, "seed": cfg.seed}
    if form_options:
        summary["options"] = form_options
    if layout is not None:
        summary["ranks"] = {"nproc": nproc, "ulysses": layout.ulysses, "ring": layout.ring}
    elif nproc > 1:
        summary["ranks"] = {"nproc": nproc}
    manifest["signature"]["train"] = [*manifest["signature"].get("train", []), summary]
    artifact.rewrite_weights(path, manifest, ep, result["trained"], out=out)
    checkpoint.unlink(missing_ok=True)
    return summary
