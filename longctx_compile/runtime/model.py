"""Calling a compiled program with the inputs a user has: optional mask and positions get defaults."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LccError


def call_program(
    module: torch.nn.Module,
    signature: dict[str, Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, T, V] for ``input_ids`` [B, T]; a missing mask means no padding, missing positions 0..T-1."""
    if input_ids.dim() != 2:
        raise LccError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
    B, T = input_ids.shape
    if T < 1 or T > signature["max_len"]:
        raise LccError(f"sequence length {T} is outside the program's range 1..{signature['max_len']}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= signature["vocab_size"]:
        raise LccError(f"token ids must be in 0..{signature['vocab_size'] - 1}")
    names = signature["inputs"]
    kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if "attention_mask" in names:
        kwargs["attention_mask"] = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    elif attention_mask is not None and not bool(attention_mask.all()):
        raise LccError("this program was captured without an attention_mask input; it cannot take padding")
    if "position_ids" in names:
        kwargs["position_ids"] = default_positions(attention_mask, B, T, input_ids.device) if position_ids is None else position_ids
    elif position_ids is not None:
        raise LccError("this program was captured without a position_ids input")
    for name, tensor in kwargs.items():
        if tuple(tensor.shape) != (B, T):
            raise LccError(f"{name} must have shape {[B, T]}, got {list(tensor.shape)}")
    return module(**kwargs)


def default_positions(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """0..T-1, or with padding the count of real tokens before each one (left padding starts at 0)."""
    if attention_mask is None:
        return torch.arange(T, device=device).expand(B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def retie(module: torch.nn.Module, groups: list[list[str]]) -> None:
    """Make each group of tied parameters one Parameter again, so training updates them together."""
    for first, *others in groups:
        shared = module.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, shared)


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
            from .tile_loss import TiledLoss

            self._loss = TiledLoss(self.module, self.signature)
        return self._loss(input_ids, shift_labels, attention_mask, position_ids, tile)

    def generate(self, prompts, max_new_tokens: int = 32, pad_id: int = 0, stream=None, cache: str = "static", bank=None, **sampling: Any) -> list[list[int]]:
        """New tokens for each prompt (lists of ids); ``cache`` growing|static; sampling keys as :class:`runtime.generate.Sampling`.

        ``bank`` (an msa artifact's :class:`~.memory_bank.MemoryBank` or its folder): each prompt is an MSA query
        routed over the bank, then decoded over the context it assembled.
        """
        from .generate import generate

        if bank is not None:
            from .msa import generate_with_bank

            return generate_with_bank(self.program, self.signature, bank, prompts, max_new_tokens, pad_id, stream, **sampling)
        if "evict" in self.signature:  # the evicting cache is the runtime's own, not the step programs'
            from .evict import EvictModel

            return EvictModel(self.program, self.signature).generate(prompts, max_new_tokens, pad_id, stream, **sampling)
        if self._steps is None:
            from .interpret import step_state
            from .steps import bind

            if not self.manifest.get("cache"):
                raise LccError(f"artifact '{self.path}' has no KV cache: {self.manifest.get('cache_note', 're-convert it with this lcc')}")
            self._steps = bind(self.program, step_state(self.program))
        return generate(self._steps, self.signature, prompts, max_new_tokens, pad_id, stream, cache, **sampling)

    def __repr__(self) -> str:
        return f"LoadedModel({str(self.path)!r}, form={self.manifest['form']!r}, target={self.manifest['target']!r})"


def load(path, device: str | torch.device | None = None, progress=None) -> LoadedModel:
    """Load an artifact folder written by ``lcc convert``; ``device`` moves its weights and the devices its graph names;
    ``progress(message)`` hears each step (checksums, loading the program)."""
    from pathlib import Path

    from .. import artifact

    manifest = artifact.read_manifest(Path(path))
    return LoadedModel(Path(path), manifest, artifact.read_program(Path(path), manifest, "model", device, progress), device)
