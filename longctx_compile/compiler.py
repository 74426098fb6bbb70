"""The compile driver: load → capture → canonicalize → form passes → lower, with history and snapshots."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from . import ops, passes  # noqa: F401  (registers the ops and the passes)
from .capture import CaptureConfig, export, load_model
from .errors import LccError
from .forms import get_form
from .ops.schema import Call
from .options import build, check_known
from .passes.canonicalize import CanonicalizeConfig
from .passes.lower import LowerConfig
from .pipeline import Program, Stage, run_stage
from .targets import get_target


@dataclasses.dataclass
class Compiled:
    """A compiled program plus the module it came from (kept for verification, never serialized)."""

    program: Program
    original: torch.nn.Module
    form_config: Any
    capture_config: CaptureConfig

    @functools.cached_property
    def module(self) -> torch.nn.Module:
        """The runnable module of the program, built once."""
        return self.program.ep.module()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        from .runtime.model import call_program

        return call_program(self.module, self.program.signature, input_ids, attention_mask, position_ids)

    @functools.cached_property
    def _tiled_loss(self) -> Any:
        from .runtime.tile_loss import TiledLoss

        return TiledLoss(self.module, self.program.signature)

    def loss(self, input_ids: torch.Tensor, shift_labels: torch.Tensor, attention_mask=None, position_ids=None, tile: int | None = None):
        """(summed cross-entropy, valid-token count), the LM head and loss computed ``tile`` rows at a time (``tile_loss``)."""
        return self._tiled_loss(input_ids, shift_labels, attention_mask, position_ids, tile)

    @functools.cached_property
    def steps(self) -> Any:
        """The prefill and decode programs exported with explicit KV caches (portable), and their cache layout."""
        from .runtime.kv_cache import export_steps

        return export_steps(self.program)

    @functools.cached_property
    def _step_programs(self) -> dict[str, Any]:
        from .runtime.interpret import step_state
        from .runtime.steps import bind

        check_cache(self.program)
        return bind(self.program.ep, step_state(self.program.ep))

    def derived(self) -> dict[str, Any]:
        """What the artifact's manifest says of the programs derived from model.pt2 (:func:`derived_entries`)."""
        return derived_entries(self.program)

    def generate(
        self, prompts, max_new_tokens: int = 32, pad_id: int = 0, stream=None, cache: str = "static", bank=None, positions: str | None = None, **sampling: Any
    ) -> list[list[int]]:
        """New tokens for each prompt (lists of ids); ``cache`` growing|static; sampling keys as :class:`runtime.generate.Sampling`;
        ``bank`` (msa): route each prompt over a memory bank first, its documents placed as ``positions`` says (default: the artifact's)."""
        from .loaded import form_generate
        from .runtime.generate import generate

        tokens = form_generate(self.program.form, self.program.ep, self.program.signature, prompts, max_new_tokens, pad_id, stream, bank, sampling, positions)
        if tokens is not None:
            return tokens
        return generate(self._step_programs, self.program.signature, prompts, max_new_tokens, pad_id, stream, cache, **sampling)

    def save(self, out: str | Path, force: bool = False, report: Any = None) -> Path:
        """Write the artifact folder (atomically; an existing folder only with ``force``)."""
        from . import artifact

        return artifact.write(self, Path(out), force, report.to_json() if report else None)


def option_classes(form: str) -> list[type]:
    return [CaptureConfig, CanonicalizeConfig, get_form(form).config_cls, LowerConfig]


def compile_model(model: Any, to: str = "dense", target: str = "cpu", options: dict[str, Any] | None = None, progress=None) -> Compiled:
    """Compile ``model`` (spec or nn.Module) into form ``to`` for ``target``; ``options`` are ``--opt`` keys."""
    options = dict(options or {})
    form = get_form(to)
    target = get_target(target).name
    if "target" in options:
        raise LccError("the target is chosen with --target (target= in Python), not --opt target=")
    check_known(options, option_classes(to))
    capture_cfg = build(CaptureConfig, options)
    canon_cfg = build(CanonicalizeConfig, options)
    form_cfg = build(form.config_cls, options)
    lower_cfg = dataclasses.replace(build(LowerConfig, options), target=target)

    def step(message: str) -> None:
        if progress is not None:
            progress(message)

    step("loading model")
    module, source = load_model(model, capture_cfg)
    check_model = getattr(form_cfg, "check_model", None)
    if callable(check_model) and getattr(module, "config", None) is not None:  # what the config decides, before capture
        check_model(module.config)
    step("capturing with torch.export")
    ep, signature = export(module, capture_cfg)
    program = Program(ep, signature, source.to_json(), getattr(module, "config", None), form=to)
    run_stage(program, Stage.CAPTURE, [])
    step("canonicalizing attention")
    run_stage(program, Stage.CANONICALIZE, [("canonicalize", canon_cfg)])
    if source.kind in ("hf_folder", "gguf"):
        refuse_encoder(program, source.spec)
    step(f"rewriting into {to}")
    run_stage(program, Stage.FORM, [(name, form_cfg) for name in form.passes])
    step(f"lowering for {target}")
    run_stage(program, Stage.LOWER, [("lower", lower_cfg)])
    return Compiled(program, module, form_cfg, capture_cfg)


def refuse_encoder(program: Program, spec: str) -> None:
    """A checkpoint whose every attention sees the whole sequence (no causal mask, no mask tensor) is an encoder
    (BERT and kin load as a causal-LM class with their heads): lcc converts decoder language models."""
    calls = [Call.of(n) for n in program.attention_nodes()]
    if calls and not any(c.causal or c.mask is not None for c in calls):
        masks = sorted({n.meta["lcc"]["mask"] for n in program.attention_nodes()})
        raise LccError(f"'{spec}': every attention sees the whole sequence ({', '.join(masks)}): an encoder, not a decoder language model")


def check_cache(program: Program) -> None:
    """Refuse, in one line, a program that cannot be continued token by token: its form has no cache, or a site
    cannot be cached (``runtime.kv_cache.check_generatable``)."""
    from .runtime.kv_cache import check_generatable

    note = get_form(program.form).cache_note
    if note:
        raise LccError(note)
    check_generatable(program)


def derived_entries(program: Program) -> dict[str, Any]:
    """The manifest entries of the programs derived from ``model.pt2`` on demand (not stored): ``derived``, by
    namespace, and the KV-cache layout (``cache``, or None and ``cache_note`` saying why there is none)."""
    from .runtime.kv_cache import layout

    entries: dict[str, Any] = {"derived": {}}
    form = get_form(program.form)
    try:
        check_cache(program)
        entries["cache"] = layout(program).to_json()
        entries["derived"]["kv_cache"] = ["prefill", "decode", "static"]
    except LccError as e:
        entries.update(cache=None, cache_note=str(e))
    if form.program_names:
        entries["derived"][form.name] = list(form.program_names)
    return entries
