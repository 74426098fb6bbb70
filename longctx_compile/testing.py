"""A pytest helper for users' own suites: assert a converted model equals its original."""

from __future__ import annotations

from typing import Any

import torch

from .runtime.verify import ATOL, LENGTHS, RTOL, verify


def assert_equivalent(original: torch.nn.Module, converted: Any, lengths=LENGTHS, rtol: float = RTOL, atol: float = ATOL):
    """Raise AssertionError unless ``converted`` (compiled, loaded artifact or path) matches ``original``.

    Compares logits at every real token on seeded batches of several lengths, padded where the program
    takes a mask; returns the :class:`~longctx_compile.runtime.verify.Report` on success.
    """
    from .api import _as_runnable

    runnable, signature = _as_runnable(converted)
    report = verify(original, runnable, signature, lengths, rtol, atol)
    if not report.passed:
        bad = [c for c in report.cases if not c.ok]
        lines = [f"B={c.batch} T={c.length}{' padded' if c.padded else ''}: max_abs={c.max_abs:.3g} top1={c.top1:.3f}" for c in bad]
        raise AssertionError(f"converted model differs from the original (rtol={rtol}, atol={atol}):\n" + "\n".join(lines))
    return report
