"""``longctx::hsa_flash``: ``longctx::hsa_attention`` bound to the Triton HSA kernels (``kernels/hsa.py``).

``lower`` swaps the reference op for this one on Triton targets. Retrieval inputs are small and made
here in torch: the score queries (q·scale, through the learned projection), each complete chunk's
landmark (mean real key, projected; or its key range for ``bound``) and its log real-key count. The kernels select, attend and fuse;
the backward takes the kernels' gradients of the score queries and landmarks back through those
torch steps to q, k and the projections. Returns (out, lse, score, indices): the last three are
what the backward needs; their last dim is ``topk`` slots (or every chunk for ``topk=all``) plus
the local part, so their shapes follow T symbolically.
"""

from __future__ import annotations

import torch

from . import cache
from .attention import empty_sdpa_layout
from .hsa import chunk_summaries, rerank_top, score_queries
from .hsa_decode import HsaCache


def _slots(T, chunk: int, topk: int):
    """Selection slots per unit: ``topk``, or every chunk (ceil(T / chunk)) for ``topk=all``; unused slots hold -1."""
    return topk if topk >= 0 else (T + chunk - 1) // chunk


def retrieval_inputs(q, k, key_padding, scale: float, chunk: int, mode: str, retrieval_q, retrieval_k):
    """(score queries [B, Hq, T, R], landmarks [B, Hkv, chunks, R], log real-key counts [B, chunks]) in fp32, differentiable
    (R = D, or 2D for ``bound``: :func:`.hsa.score_queries`).

    ``q`` and ``k`` are what scores the chunks: the attention's, or the NoPE ``score_q`` / ``score_k``.
    """
    B, Hq, T, D = q.shape
    Hkv, full = k.shape[1], T // chunk
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding is None else key_padding != 0
    kc = k.float()[:, :, : full * chunk].reshape(B, Hkv, full, chunk, D)
    qsum = None
    if mode == "reps":  # each complete chunk's scaled queries, summed over its real positions and the group's heads
        qsum = (q.float() * scale * real[:, None, :, None])[:, :, : full * chunk].view(B, Hkv, Hq // Hkv, full, chunk, D).sum((2, 4))
    mean, log_count = chunk_summaries(kc, real[:, : full * chunk].reshape(B, 1, full, chunk), mode, qsum)
    sq = score_queries(q.float() * scale, mode)
    if mode == "learned":
        sq = torch.einsum("bhgtd,hde->bhgte", sq.view(B, Hkv, Hq // Hkv, T, D), retrieval_q.float()).reshape(B, Hq, T, -1)
        mean = torch.einsum("bhcd,hde->bhce", mean, retrieval_k.float())
    return sq, mean, log_count[:, 0]


def _kernel_landmarks(lk, lb):
    """Landmarks as the kernels read them: with no complete chunk yet, one placeholder (never selected: its bias is -inf)."""
    if lk.shape[2]:
        return lk, lb
    return lk.new_zeros(*lk.shape[:2], 1, lk.shape[3]), lb.new_full((lb.shape[0], 1), float("-inf"))


def _select(q, k, key_padding, sq, lk, lb, scale: float, chunk: int, topk: int, window: int, select: str, rerank: int = 0) -> torch.Tensor:
    """Indices [B, Hkv, units, slots] (int32, -1 empty, most recent first): every older chunk for exact scores, else the
    kernel's top-K (with ``rerank`` R: its top R·K, of which the K with the largest summed true LSE, ``kernels.rerank``)."""
    from ..kernels import hsa as kernels

    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    unit = 1 if select == "token" else chunk
    n_units, slots = (T + unit - 1) // unit, _slots(T, chunk, topk)
    if sq is None:  # topk=all: slot j of a unit in chunk c is chunk c - w - 1 - j
        first = torch.arange(n_units, device=q.device) * unit // chunk - window - 1
        idx = first[:, None] - torch.arange(slots, device=q.device)[None, :]
        return idx.clamp(min=-1).to(torch.int32).expand(B, Hkv, n_units, slots)
    if slots == 0:
        return torch.empty(B, Hkv, n_units, 0, dtype=torch.int32, device=q.device)
    G = Hq // Hkv
    su = sq.view(B, Hkv, G, T, -1).sum(2)  # the group's heads share one selection …
    if select == "block":  # … and so do a chunk's queries (zeros past T, as in the reference)
        su = torch.nn.functional.pad(su, (0, 0, 0, n_units * chunk - T)).view(B, Hkv, n_units, chunk, -1).sum(3)
    if not rerank or topk < 0:
        return kernels.select(su, lk, lb, unit, chunk, window, G * unit, slots)
    candidates = kernels.select(su, lk, lb, unit, chunk, window, G * unit, rerank * slots)
    true = kernels.rerank(q, k, key_padding, candidates, scale, chunk, unit)
    idx, at = rerank_top(candidates, true, slots)
    return idx.masked_fill(~torch.isfinite(true.gather(-1, at)), -1).sort(dim=-1, descending=True).values  # empty slots last


@torch.library.custom_op("longctx::hsa_flash", mutates_args=())
def hsa_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    retrieval_q: torch.Tensor | None,
    retrieval_k: torch.Tensor | None,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    select: str,
    sink: bool,
    fusion: str,
    score_q: torch.Tensor | None,
    score_k: torch.Tensor | None,
    rerank: int,
    tiles: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HSA with the semantics of ``longctx::hsa_attention``: (out [B, Hq, T, Dv], lse, score [B, Hq, T, 1 + slots], indices)."""
    from ..kernels import hsa as kernels

    exact = mode == "exact"
    scoring = (q if score_q is None else score_q, k if score_k is None else score_k)
    sq, lk, lb = (None, None, None) if exact else retrieval_inputs(*scoring, key_padding, scale, chunk, mode, retrieval_q, retrieval_k)
    idx = _select(q, k, key_padding, sq, lk, lb, scale, chunk, topk, window, select, rerank)
    unit = 1 if select == "token" else chunk
    if not exact:
        lk, lb = _kernel_landmarks(lk, lb)
    out, lse, score = kernels.hsa_fwd(q, k, v, key_padding, sq, lk, lb, idx, scale, chunk, window, unit, tiles, sink, fusion == "stick", fusion == "joint")
    return out, lse, score, idx.contiguous()


@hsa_flash.register_fake
def _(q, k, v, key_padding, retrieval_q, retrieval_k, scale, chunk, topk, window, mode, select, sink, fusion, score_q, score_k, rerank, tiles):
    B, Hq, T, _ = q.shape
    slots = _slots(T, chunk, topk)
    unit = 1 if select == "token" else chunk
    parts = q.new_empty((B, Hq, T, slots + 1), dtype=torch.float32)
    return empty_sdpa_layout(q, v), parts, torch.empty_like(parts), q.new_empty((B, k.shape[1], (T + unit - 1) // unit, slots), dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], *inputs[14:16], *output)
    ctx.statics = (*inputs[6:14], inputs[17])


def _backward(ctx, grad_out, *_unused):
    from ..kernels import hsa as kernels

    q, k, v, key_padding, retrieval_q, retrieval_k, score_q, score_k, out, lse, score, idx = ctx.saved_tensors
    scale, chunk, topk, window, mode, select, sink, fusion, tiles = ctx.statics
    unit = 1 if select == "token" else chunk
    nope = score_q is not None
    # what the scores were made from: the attention's q and k, or the NoPE score_q and score_k
    leaves = [None if t is None else t.detach().requires_grad_() for t in ((score_q, score_k) if nope else (q, k)) + (retrieval_q, retrieval_k)]
    sq = lk = read = None
    scored = mode != "exact" and fusion != "joint"  # whether the fusion weights, so the gradients, reach the scores
    if mode != "exact":
        with torch.enable_grad():
            sq, lk, lb = retrieval_inputs(leaves[0], leaves[1], key_padding, scale, chunk, mode, leaves[2], leaves[3])
        read = _kernel_landmarks(lk.detach(), lb)[0]
    dq, dk, dv, dsq, dlk = kernels.hsa_bwd(
        grad_out, q, k, v, key_padding, sq, read, idx, out, lse, score, scale, chunk, window, unit, tiles, sink, fusion == "stick", fusion == "joint"
    )
    if dlk is not None:
        dlk = dlk[:, :, : lk.shape[2]]  # without the placeholder
    dwq = dwk = dscore_q = dscore_k = None
    if scored:  # the score queries and landmarks lead back to q, k (or score_q, score_k) and the learned projections
        grads = iter(torch.autograd.grad((sq, lk), [t for t in leaves if t is not None], (dsq, dlk)))
        gq, gk = next(grads), next(grads)
        if nope:
            dscore_q, dscore_k = gq, gk
        else:
            dq, dk = dq + gq.to(dq.dtype), dk + gk.to(dk.dtype)
        if retrieval_q is not None:
            dwq, dwk = next(grads), next(grads)
    return dq, dk, dv, None, dwq, dwk, *(None,) * 8, dscore_q, dscore_k, None, None


hsa_flash.register_autograd(_backward, setup_context=_setup_context)
cache.declare(hsa_flash._opoverload, HsaCache(flash=True))  # decode steps run hsa_decode over the cached keys and landmarks
