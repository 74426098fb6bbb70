"""Equivalence checks: original and converted model on the same seeded batches, compared at real tokens."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..capture import DTYPES, CausalLM, dtype_of, example_inputs
from .model import default_positions

# torch.testing.assert_close's fp32 defaults
RTOL, ATOL = 1.3e-6, 1e-5
LENGTHS = (1, 2, 7, 16, 33)
LONG = 64  # longer verify batches (the configuration's own lengths) hold two rows, one of them padded
# an artifact passes when its logits are within atol + this many times the original's own error in its dtype
# (``reference_and_floor``; rtol applies on top)
FLOOR_FACTOR = 2.0


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
    dtype: str = "fp32"  # the artifact's; every comparison is against the original run in fp32
    floor: float | None = None  # the original's own max abs error in that dtype (:func:`reference_and_floor`)
    floor_against: str | None = None  # what the floor was measured against (fp64, or fp32 below it), or why there is none
    quality: dict[str, Any] | None = None  # approximate forms: NLL and top-1 agreement on real text (``runtime.quality``)

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
        return {
            **summary,
            "rtol": self.rtol,
            "atol": self.atol,
            "exact": self.exact,
            "dtype": self.dtype,
            "floor": self.floor,
            "floor_against": self.floor_against,
            "quality": self.quality,
            "cases": [asdict(c) for c in self.cases],
        }


def batches(signature: dict[str, Any], lengths=LENGTHS, batch: int = 3, seed: int = 0):
    """Seeded (inputs, real-token mask) pairs: each length unpadded, and padded when the program takes a mask (past
    :data:`LONG` tokens, one batch with an unpadded and a padded row)."""
    names = tuple(signature["inputs"])
    for length in lengths:
        if length > signature["max_len"]:
            continue
        variants = (False, True) if "attention_mask" in names and length >= 4 else (False,)
        rows = batch
        if length > LONG and variants == (False, True):  # one batch of two: an unpadded row and a left+right padded one
            variants, rows = (True,), 2
        for padded in variants:
            inputs = example_inputs(names, signature["vocab_size"], rows, length)
            g = torch.Generator().manual_seed(seed * 1000 + length)
            inputs["input_ids"] = torch.randint(0, signature["vocab_size"], (rows, length), generator=g)
            real = torch.ones(rows, length, dtype=torch.long)
            if padded:
                real[1, : length // 3] = 0  # left padding
                real[-1, length - length // 4 :] = 0  # right padding
                inputs["attention_mask"] = real
                if "position_ids" in names:
                    inputs["position_ids"] = default_positions(real, rows, length, "cpu")
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


def reference_and_floor(original: torch.nn.Module, signature: dict[str, Any], lengths=LENGTHS) -> tuple[torch.nn.Module, float | None, str]:
    """(the original in fp32, the noise floor, the precision it was measured against — or why there is none).

    The floor is the original's own arithmetic error in the artifact's dtype: the largest logit difference, at
    real tokens over the verify batches, between the original run in that dtype and in the next precision up
    (fp64 for an fp32 artifact, fp32 for bf16/fp16). A correct conversion is about as far from that higher
    precision as the original is, so artifact and original lie within about twice the floor of each other
    (:data:`FLOOR_FACTOR`); the floor grows with the model's depth and width as its rounding does. A model
    with an op that has no fp64 kernel (transformers' grouped-mm experts) has no floor: the fixed atol applies."""
    dtype = DTYPES[signature.get("dtype", "fp32")]
    reference = original if dtype_of(original) == torch.float32 else copy.deepcopy(original).float()
    if dtype == torch.float32:
        lowered, higher, against = reference, copy.deepcopy(reference).double(), "fp64"
    else:
        lowered = original if dtype_of(original) == dtype else copy.deepcopy(reference).to(dtype)
        higher, against = reference, "fp32"
    names = tuple(signature["inputs"])
    low, high = CausalLM(lowered, names).eval(), CausalLM(higher, names).eval()
    floor = 0.0
    with torch.no_grad():
        for inputs, real, _ in batches(signature, lengths):
            try:
                higher_logits = high(**inputs)
            except (RuntimeError, NotImplementedError) as e:
                return reference, None, f"the original does not run in {against} ({str(e).splitlines()[0][:120]})"
            floor = max(floor, float((higher_logits[real].double() - low(**inputs)[real].double()).abs().max()))
    return reference, floor, against


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
