"""``dense``: canonicalize and lower only, the proof that capture is lossless."""

from __future__ import annotations

from dataclasses import dataclass

from . import Form


@dataclass
class DenseConfig:
    """The dense form has no options: canonical attention, lowered as is."""


FORMS = [Form("dense", DenseConfig, [], "canonicalize and lower only: the proof that capture is lossless")]
