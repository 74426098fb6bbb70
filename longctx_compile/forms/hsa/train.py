"""HSA's retrieval loss: learned chunk scores taught to rank older chunks as the site's exact attention weighs them.

The top-K is a hard choice, so in the paper's form the scores learn only through the fusion weights of the chunks
they already chose. ``lcc train HSA.lcc --opt aux=W`` adds W × this loss at every site with ``score=learned``:
for each selection unit (a query, or a query chunk with ``select=block``), KL(p ‖ s) over its visible older chunks,
p the softmax of their true LSE summed over the unit's voters (what ``score=exact`` ranks by), divided by
``--opt temperature`` (below 1 it weighs the top chunks most), and s the softmax of its learned scores. DSA warms
its lightning indexer up the same way (KL to dense attention). The target takes no gradient; the learned scores
pass theirs to the projections and to the queries and keys they are made of, so a backbone that trains
(``--trainable all``) can learn keys whose chunk means rank as their chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import LccError
from ...ops.hsa import GROUP_ELEMENTS, _exact_scores, landmark_votes, plan, voted
from ...ops.schema import Call
from ...options import build, check_known


@dataclass
class HsaTrainOptions:
    """``lcc train --opt aux=W temperature=1`` on an hsa artifact: the retrieval loss's weight beside the objective (0:
    none), and the temperature of its target (below 1 sharpens it towards the exact top chunks, which selection keeps)."""

    aux: float = 0.0
    temperature: float = 1.0

    def check(self) -> None:
        if self.aux < 0 or self.temperature <= 0:
            raise LccError(f"invalid --opt aux={self.aux} temperature={self.temperature}: aux at least 0, temperature above 0")


def retrieval_loss(call: Call, temperature: float = 1.0) -> torch.Tensor | None:
    """The site's mean KL(exact ‖ learned) over the selection units with an older chunk to choose; None for a site
    that does not score by ``learned`` (nothing to teach) or has no such unit (a sequence within the local window)."""
    if call.mode != "learned" or call.topk < 0:
        return None
    q, k = call.q, call.k
    args = (call.key_padding, call.scale, call.chunk, call.topk, call.window)
    retrieval = (call.retrieval_q, call.retrieval_k, call.score_q, call.score_k, 0, call.get("retrieval_pool"))
    p = plan(q, k, call.v.detach(), *args, "learned", call.select, *retrieval)
    B, Hkv, C, G, S, D = p.qg.shape
    full, w = p.kc.shape[2], call.window
    if full == 0:
        return None
    T = q.shape[2]  # the query rows past T pad the last chunk, and padding queries answer nothing: neither is a unit
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if call.key_padding is None else call.key_padding != 0
    real = torch.nn.functional.pad(real, (0, C * S - T)).view(B, 1, C, S)
    real = real.any(-1, keepdim=True) if call.select == "block" else real
    step = max(1, GROUP_ELEMENTS // max(1, B * Hkv * G * S * full * S))  # query chunks per group of the exact scores
    total, count = q.new_zeros((), dtype=torch.float32), 0
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        visible = torch.arange(full, device=q.device)[None, :] < (torch.arange(c0, c1, device=q.device) - w)[:, None]  # [Cg, full]
        if not visible.any():
            continue
        with torch.no_grad():  # what exact selection ranks by: the true LSE summed over the unit's voters
            exact = voted(_exact_scores(p.qg[:, :, c0:c1], p.kc, p.rc), call.select)  # [B, Hkv, Cg, S|1, full]
        learned = landmark_votes(p.rows_q[:, :, c0:c1], p.landmarks, call.select)
        keep = visible[None, None, :, None] & torch.isfinite(exact)
        some = keep.any(-1) & real[:, :, c0:c1]  # real units with an older chunk to choose
        target = (exact / temperature).masked_fill(~keep, float("-inf")).masked_fill(~some[..., None], 0.0).log_softmax(-1)
        guess = learned.masked_fill(~keep, float("-inf")).masked_fill(~some[..., None], 0.0).log_softmax(-1)
        kl = torch.where(keep, target.exp() * (target - guess), 0.0).sum(-1)
        total = total + kl[some].sum()
        count += int(some.sum())
    return total / count if count else None


def site_loss(sites: list[dict[str, Any]], options: dict[str, Any]) -> tuple[float, Callable[[Call], torch.Tensor | None]]:
    """(weight, per-site loss) of ``lcc train --opt aux=W`` on an hsa program whose sites' facts are ``sites``;
    refused in one line where no site has learned scores to teach."""
    check_known(options, [HsaTrainOptions])
    opts = build(HsaTrainOptions, options)
    if opts.aux and not any(site.get("score") == "learned" and site.get("topk", -1) >= 0 for site in sites):
        scores = sorted({str(site.get("score")) for site in sites})
        raise LccError(f"--opt aux teaches learned retrieval scores; this artifact's hsa sites score by {', '.join(scores)} (convert with --opt score=learned)")
    return opts.aux, functools.partial(retrieval_loss, temperature=opts.temperature)
