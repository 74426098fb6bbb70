"""``lcc verify`` of a sequence-parallel program: all its verify batches run on P local gloo ranks in one launch."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...distributed import Layout, ranks
from ...runtime.verify import batches


def on_ranks(converted: Any, signature: dict[str, Any], lengths) -> tuple[Callable[..., torch.Tensor], tuple[int, ...]]:
    """A runnable giving each verify batch's full logits from P ranks, and the lengths it covers: rounded down to
    what the layout splits evenly (P, or 2·ring·Ulysses when zigzag). ``converted``: a compiled program (saved to a
    temporary artifact first), a loaded artifact or an artifact path."""
    layout = Layout.of(signature)
    rounded = {max(1, n // layout.multiple) * layout.multiple for n in lengths}
    lengths = tuple(sorted(n for n in rounded if n <= signature["max_len"]))
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(converted, "save"):
            path = converted.save(Path(tmp) / "sp.lcc")
        else:
            path = getattr(converted, "path", converted)
        outputs = iter(ranks.forward(path, layout.degree, [inputs for inputs, _, _ in batches(signature, lengths)]))
    return (lambda **_: next(outputs)), lengths
