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
