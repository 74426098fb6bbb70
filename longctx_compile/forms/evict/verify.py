"""``lcc verify`` for evict artifacts: a prompt compacted to the budget, then the rest fed after it, against the dense model."""

from __future__ import annotations

from typing import Any

import torch

from ...capture import CausalLM
from ...runtime.verify import ATOL, LENGTHS, RTOL, Case, Report, batches, compare
from .runtime import EvictModel


def verify_evict(original: torch.nn.Module, ep: Any, signature: dict[str, Any], lengths=LENGTHS, rtol: float = RTOL, atol: float = ATOL) -> Report:
    """An evict program against the dense model: each seeded batch's first half is the prompt, compacted to the
    budget at its end (or after each prompt chunk), and the rest is fed after it; the second half's logits are
    compared with the original's at real tokens.

    With a token budget of at least every verified length nothing is evicted, so they must match; with a
    smaller budget or a ratio the divergence is reported, not judged.
    """
    model = EvictModel(ep, signature)
    lengths = [n for n in lengths if 2 <= n <= signature["max_len"]]
    budget = model.policy.budget
    exact = isinstance(budget, int) and budget >= max(lengths, default=0)
    reference = CausalLM(original, tuple(signature["inputs"])).eval()
    report = Report(rtol=rtol, atol=atol, exact=exact)
    with torch.no_grad():
        for inputs, real, padded in batches(signature, lengths):
            split = real.shape[1] // 2
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            _, cache = model.prefill(inputs["input_ids"][:, :split], mask[:, :split])
            out = model.forward(cache, inputs["input_ids"][:, split:], mask[:, split:], inputs["position_ids"][:, split:])
            ref = reference(**inputs)[:, split:]
            report.cases.append(Case(real.shape[0], real.shape[1], padded, *compare(ref, out, real[:, split:], rtol, atol)))
    return report
