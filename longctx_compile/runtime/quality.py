"""What an approximate form costs on real text: next-token NLL and top-1 agreement of the converted model against its
original on the built-in English sample (Python's own documentation, which every CPython install carries)."""

from __future__ import annotations

from typing import Any

import torch

from ..capture import CausalLM
from ..errors import LccError

SAMPLE_TOKENS = 2048


def english_sample(tokenizer: Any, tokens: int) -> list[int]:
    """The first ``tokens`` ids of the sample: the Python reference manual's topics (``pydoc_data``), in name order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise LccError("no built-in English sample here: this Python lacks its pydoc_data documentation") from None
    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tokenizer.encode(text[: tokens * 8], add_special_tokens=False)[:tokens]


def quality(original: torch.nn.Module, converted: Any, signature: dict[str, Any], tokenizer: Any, tokens: int = SAMPLE_TOKENS) -> dict[str, Any]:
    """NLL of each model on the sample, its relative change, and how often the two agree on the next token."""
    ids = torch.tensor([english_sample(tokenizer, min(tokens, int(signature["max_len"])))])
    inputs = {"input_ids": ids}
    if "attention_mask" in signature["inputs"]:
        inputs["attention_mask"] = torch.ones_like(ids)
    if "position_ids" in signature["inputs"]:
        inputs["position_ids"] = torch.arange(ids.shape[1])[None]
    reference = CausalLM(original, tuple(signature["inputs"])).eval()
    with torch.no_grad():
        ref, out = reference(**inputs)[0, :-1].double(), converted(**inputs)[0, :-1].double()
    target = ids[0, 1:]
    nll_original = float(torch.nn.functional.cross_entropy(ref, target))
    nll_converted = float(torch.nn.functional.cross_entropy(out, target))
    return {
        "tokens": int(ids.shape[1]),
        "nll_original": nll_original,
        "nll_converted": nll_converted,
        "nll_change": nll_converted / nll_original - 1,
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean()),
    }
