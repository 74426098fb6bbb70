"""A loaded artifact: callable like a causal LM, with loss and generation (the form's own, or the KV-cache steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import artifact
from .errors import LccError
from .forms import get_form
from .runtime.model import call_program, retie


def form_generate(
    form: str, ep, signature: dict[str, Any], prompts, max_new_tokens: int, pad_id: int, stream, bank, sampling: dict, positions: str | None = None
) -> list[list[int]] | None:
    """The form's own generation (evict: its evicting cache; msa with a bank: routed queries, ``positions`` overriding
    the artifact's contiguous | global), or None for the KV-cache steps."""
    if positions is not None and bank is None:
        raise LccError("positions= places the documents of a memory bank: give a bank too (msa artifacts)")
    hook = get_form(form).generate
    extra = {} if positions is None else {"positions": positions}
    tokens = None if hook is None else hook(ep, signature, prompts, max_new_tokens, pad_id, stream, bank=bank, **extra, **sampling)
    if tokens is None and bank is not None:
        raise LccError(f"a bank is routed over by msa programs; this is a {form} program")
    return tokens


class LoadedModel:
    """A loaded artifact: call it like a causal LM (input_ids[, attention_mask][, position_ids]) -> logits."""

    def __init__(self, path, manifest: dict[str, Any], ep: torch.export.ExportedProgram, device: str | torch.device | None = None):
        self.path = path
        self.device = device
        self._steps: dict | None = None
        self._loss = None
        self.manifest = manifest
        self.program = ep
        self.signature = manifest["signature"]
        self.module = ep.module()
        retie(self.module, manifest.get("tied", []))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return call_program(self.module, self.signature, input_ids, attention_mask, position_ids)

    def loss(self, input_ids: torch.Tensor, shift_labels: torch.Tensor, attention_mask=None, position_ids=None, tile: int | None = None):
        """(summed cross-entropy, valid-token count), the LM head and loss computed ``tile`` rows at a time (``tile_loss``)."""
        if self._loss is None:
            from .runtime.tile_loss import TiledLoss

            self._loss = TiledLoss(self.module, self.signature)
        return self._loss(input_ids, shift_labels, attention_mask, position_ids, tile)

    def generate(
        self, prompts, max_new_tokens: int = 32, pad_id: int = 0, stream=None, cache: str = "static", bank=None, positions: str | None = None, **sampling: Any
    ) -> list[list[int]]:
        """New tokens for each prompt (lists of ids); ``cache`` growing|static; sampling keys as :class:`runtime.generate.Sampling`.

        ``bank`` (an msa artifact's :class:`~.forms.msa.bank.MemoryBank` or its folder): each prompt is an MSA query
        routed over the bank, then decoded over the context it assembled; ``positions`` (contiguous | global)
        overrides where the artifact places the selected documents.
        """
        from .runtime.generate import generate

        tokens = form_generate(self.manifest["form"], self.program, self.signature, prompts, max_new_tokens, pad_id, stream, bank, sampling, positions)
        if tokens is not None:
            return tokens
        if self._steps is None:
            from .runtime.interpret import step_state
            from .runtime.steps import bind

            if not self.manifest.get("cache"):
                raise LccError(f"artifact '{self.path}' has no KV cache: {self.manifest.get('cache_note', 're-convert it with this lcc')}")
            self._steps = bind(self.program, step_state(self.program))
        return generate(self._steps, self.signature, prompts, max_new_tokens, pad_id, stream, cache, **sampling)

    def __repr__(self) -> str:
        return f"LoadedModel({str(self.path)!r}, form={self.manifest['form']!r}, target={self.manifest['target']!r})"


def load(path, device: str | torch.device | None = None) -> LoadedModel:
    """Load an artifact folder written by ``lcc convert``; ``device`` moves its weights and the devices its graph names."""
    manifest = artifact.read_manifest(Path(path))
    return LoadedModel(Path(path), manifest, artifact.read_program(Path(path), manifest, "model", device), device)
