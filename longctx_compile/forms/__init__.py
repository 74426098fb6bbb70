"""Forms as slices over the core: each ``forms/<form>/`` holds its rewrite passes, runtime, verification, CLI
additions and a :class:`Form` that the core (api, artifact, verify, onnx, inspect, cli) calls instead of asking
which form it holds. The ops the forms emit live in ``ops/`` (registered before any program loads) and their
kernels in ``kernels/``. Adding a form is a new folder and one line in :func:`_load`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LccError


@dataclass
class Form:
    """What the core needs to know of a form; every hook is optional (None: the core's generic behaviour).

    - ``programs(program) -> {name: ExportedProgram}``: the form's own portable step programs, derived from the
      model program on demand (listed in the manifest under the form's name, ``program_names``);
    - ``generate(ep, signature, prompts, max_new_tokens, pad_id, stream, bank=None, **sampling)``: the new tokens,
      or None to use the KV-cache steps;
    - ``verify(original, ep, signature, lengths, rtol, atol) -> Report``: how ``lcc verify`` checks the form;
    - ``verify_runnable(converted, signature, lengths) -> (runnable, lengths)``: how the generic check runs it;
    - ``verify_lengths(signature, sites, config) -> lengths``: the lengths that exercise the configuration (several
      chunks, shards, windows or budgets), which ``lcc verify`` adds to its short ones;
    - ``cache_note``: why the form has no KV cache at all;
    - ``onnx_model(ep, manifest) -> (ep, extra output names)``: what the model program exports as;
    - ``train(ep, signature, cfg, data, tokenizer, options, nproc) -> (trainer, stream)``: the form's own training in
      place of token windows (msa: documents and queries); ``options``: ``lcc train --opt``; ``nproc``: the ranks the
      trainer runs on (each builds its own; msa shards its banks over them);
    - ``site_loss(sites, options) -> (weight, loss(call))``: an auxiliary loss at each site that the token-window
      trainer adds ``weight`` × the mean of (hsa: its retrieval loss), from ``lcc train --opt``; ``sites``: their facts;
    - ``describe(site facts) -> str``: a site's settings in ``lcc inspect``;
    - ``cli(app)``: adds the form's commands to ``lcc``.
    """

    name: str
    config_cls: type
    passes: list[str] = field(default_factory=list)
    doc: str = ""
    exact: bool = True  # whether the form (as configured) must equal the dense model
    programs: Callable[[Any], dict[str, Any]] | None = None
    program_names: tuple[str, ...] = ()
    generate: Callable[..., list[list[int]] | None] | None = None
    verify: Callable[..., Any] | None = None
    verify_runnable: Callable[..., Any] | None = None
    verify_lengths: Callable[..., tuple[int, ...]] | None = None
    cache_note: str | None = None
    onnx_model: Callable[..., Any] | None = None
    train: Callable[..., Any] | None = None
    site_loss: Callable[..., Any] | None = None
    describe: Callable[[dict[str, Any]], str] | None = None
    cli: Callable[[Any], None] | None = None


def _load() -> dict[str, Form]:
    from . import dense, evict, hsa, msa, sp

    return {form.name: form for module in (dense, sp, hsa, msa, evict) for form in module.FORMS}


FORMS: dict[str, Form] = _load()


def register_form(form: Form) -> None:
    """Make ``form`` known (its passes registered with ``pipeline.register`` first); a form outside this package,
    or in it, needs nothing else from the core."""
    if form.name in FORMS:
        raise LccError(f"a form named '{form.name}' exists already")
    FORMS[form.name] = form


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise LccError(f"unknown form '{name}'; known forms: {', '.join(FORMS)}")
    return FORMS[name]


def derive(program: Any, name: str) -> Any:
    """Export derived program ``name`` (``kv_cache.decode``, ``msa.query`` …) of ``program``, weights taken as ``state``."""
    namespace, _, short = name.partition(".")
    if namespace == "kv_cache":
        from ..runtime.kv_cache import export_steps

        return getattr(export_steps(program), short)
    form = get_form(program.form)
    if namespace != form.name or short not in form.program_names:
        raise LccError(f"no derived program '{name}' for a {program.form} program")
    return form.programs(program)[short]
