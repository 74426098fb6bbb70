"""Equivalence checks: original and converted model on the same seeded batches, compared at real tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .capture import CausalLM, example_inputs
from .runtime.model import default_positions

# torch.testing.assert_close's fp32 defaults
RTOL, ATOL = 1.3e-6, 1e-5
LENGTHS = (1, 2, 7, 16, 33)


@dataclass
class Case:
    batch: int
    length: int
    padded: bool
    max_abs: float
    max_rel: float
    top1: float
    kl: float
    ok: bool
    hit: float | None = None  # msa: the share of queries whose document was routed


@dataclass
class Report:
    """Per-case and overall errors; ``passed`` is the exact-mode verdict under (rtol, atol)."""

    cases: list[Case] = field(default_factory=list)
    rtol: float = RTOL
    atol: float = ATOL
    exact: bool = True

    @property
    def max_abs(self) -> float:
        return max(c.max_abs for c in self.cases)

    @property
    def max_rel(self) -> float:
        return max(c.max_rel for c in self.cases)

    @property
    def top1(self) -> float:
        return min(c.top1 for c in self.cases)

    @property
    def kl(self) -> float:
        return max(c.kl for c in self.cases)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.cases)

    def to_json(self) -> dict[str, Any]:
        summary = {"max_abs": self.max_abs, "max_rel": self.max_rel, "top1": self.top1, "kl": self.kl, "passed": self.passed}
        return {**summary, "rtol": self.rtol, "atol": self.atol, "exact": self.exact, "cases": [asdict(c) for c in self.cases]}


def batches(signature: dict[str, Any], lengths=LENGTHS, batch: int = 3, seed: int = 0):
    """Seeded (inputs, real-token mask) pairs: each length unpadded, and padded when the program takes a mask."""
    names = tuple(signature["inputs"])
    for length in lengths:
        if length > signature["max_len"]:
            continue
        for padded in (False, True) if "attention_mask" in names and length >= 4 else (False,):
            inputs = example_inputs(names, signature["vocab_size"], batch, length)
            g = torch.Generator().manual_seed(seed * 1000 + length)
            inputs["input_ids"] = torch.randint(0, signature["vocab_size"], (batch, length), generator=g)
            real = torch.ones(batch, length, dtype=torch.long)
            if padded:
                real[1, : length // 3] = 0  # left padding
                real[-1, length - length // 4 :] = 0  # right padding
                inputs["attention_mask"] = real
                if "position_ids" in names:
                    inputs["position_ids"] = default_positions(real, batch, length, "cpu")
            yield inputs, real.bool(), padded


def compare(ref: torch.Tensor, out: torch.Tensor, real: torch.Tensor, rtol: float, atol: float) -> tuple[float, float, float, float, bool]:
    r, o = ref[real].double(), out[real].double()
    diff = (r - o).abs()
    max_abs = float(diff.max())
    max_rel = float(max_abs / r.abs().max().clamp_min(1e-30))
    top1 = float((r.argmax(-1) == o.argmax(-1)).double().mean())
    kl = float(torch.nn.functional.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1).max())
    ok = bool(torch.isfinite(o).all()) and bool((diff <= atol + rtol * r.abs()).all())
    return max_abs, max_rel, top1, kl, ok


def verify(
    original: torch.nn.Module,
    converted: Callable[..., torch.Tensor],
    signature: dict[str, Any],
    lengths=LENGTHS,
    rtol: float = RTOL,
    atol: float = ATOL,
    exact: bool = True,
) -> Report:
    """Run both models on seeded batches and report errors at real tokens (padded queries are never read)."""
    reference = CausalLM(original, tuple(signature["inputs"])).eval()
    report = Report(rtol=rtol, atol=atol, exact=exact)
    with torch.no_grad():
        for inputs, real, padded in batches(signature, lengths):
            ref = reference(**inputs)
            out = converted(**inputs)
            report.cases.append(Case(real.shape[0], real.shape[1], padded, *compare(ref, out, real, rtol, atol)))
    return report


def verify_msa(original: torch.nn.Module, ep: Any, signature: dict[str, Any], lengths=LENGTHS, rtol: float = RTOL, atol: float = ATOL) -> Report:
    """An msa program against the dense model on [document ; query]: each seeded row's first half is
    encoded as a document, the rest is the query (positions contiguous), and the query's logits are
    compared with the original's at those positions.

    Exactness-configured (pool 1, every layer routed) each row's bank is its own document alone: the
    logits must match. Otherwise the bank holds every row's document plus distractors, and the
    report gives the routing hit rate and the divergence (not judged).
    """
    from .runtime.msa import MsaModel

    msa = MsaModel(ep, signature)
    exact = bool(signature.get("exact"))
    reference = CausalLM(original, tuple(signature["inputs"])).eval()
    report = Report(rtol=rtol, atol=atol, exact=exact)
    vocab, batch = signature["vocab_size"], 3
    with torch.no_grad():
        for length in lengths:
            if length < 2 or length > signature["max_len"]:
                continue
            g = torch.Generator().manual_seed(length)
            ids = torch.randint(0, vocab, (batch, length), generator=g)
            split = length // 2
            docs = [row[:split].tolist() for row in ids]
            full = {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if "attention_mask" in signature["inputs"] else {})}
            if "position_ids" in signature["inputs"]:
                full["position_ids"] = torch.arange(length).expand(batch, length)
            ref = reference(**full)[:, split:]
            positions = torch.arange(split, length)[None]
            outs, hits = [], []
            shared = None if exact else msa.encode(docs + [torch.randint(0, vocab, (split,), generator=g).tolist() for _ in range(5)])
            for b in range(batch):
                bank = msa.encode([docs[b]]) if exact else shared
                result = msa.query(bank, ids[b : b + 1, split:], position_ids=positions)
                outs.append(result.logits)
                want = 0 if exact else b
                hits.append(float(all(want in result.docs[layer][0].tolist() for layer in result.docs)))
            real = torch.ones(batch, length - split, dtype=torch.bool)
            report.cases.append(Case(batch, length, False, *compare(ref, torch.cat(outs), real, rtol, atol), hit=sum(hits) / batch))
    return report


def verify_evict(original: torch.nn.Module, ep: Any, signature: dict[str, Any], lengths=LENGTHS, rtol: float = RTOL, atol: float = ATOL) -> Report:
    """An evict program against the dense model: each seeded batch's first half is the prompt, compacted to the
    budget at its end (or after each prompt chunk), and the rest is fed after it; the second half's logits are
    compared with the original's at real tokens.

    With a token budget of at least every verified length nothing is evicted, so they must match; with a
    smaller budget or a ratio the divergence is reported, not judged.
    """
    from .runtime.evict import EvictModel

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
