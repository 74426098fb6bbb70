"""The training loop's parts every trainer shares: the learning-rate schedule and atomic checkpoints."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch


def schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first tenth, then cosine to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a temporary file renamed over the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
