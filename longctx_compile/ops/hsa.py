"""``longctx::hsa_attention``: hierarchical sparse attention over chunks of S keys (causal self-attention).

For query t in chunk c = t // S:
- the *local* part is the keys of chunks max(0, c-w) .. c up to t (causal), one softmax with its LSE;
- the *candidates* are the older complete chunks 0 .. c-w-1, each scored per query head:
  ``exact`` — the chunk's true LSE; ``landmark`` — q·mean(k over the chunk)·scale + log S;
- the query heads of a KV group share one selection: the top-K candidates by the group's summed score,
  per query (``select="token"``) or, summed over the chunk's queries too, per query chunk (``"block"``:
  the chunk's queries then read the same K chunks, which makes the work dense-like and fast);
- each selected chunk gets its own softmax and LSE, and the parts fuse linearly with weights
  softmax(local LSE, selected chunks' scores). In ``exact`` mode with K ≥ the candidates this is
  dense causal attention exactly.
Padded keys (``key_padding`` 0) take part nowhere; a chunk with no real key is never selected.

The reference below is the definition and the backward (autograd through it; the selection gets no
gradient, the scores do through the fusion weights). It runs one query chunk at a time, so its
memory is O(S·(K+w+1)·S) per chunk — only ``exact`` scoring reads every older key.
"""

from __future__ import annotations

import math

import torch

from .attention import empty_sdpa_layout

MODES = ("exact", "landmark")


def _softmax(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, lse) of one softmax over the last dim where ``keep``; a row with no key: 0, -inf."""
    scores = scores.masked_fill(~keep, float("-inf"))
    dead = ~keep.any(-1)
    lse = torch.logsumexp(scores.masked_fill(dead[..., None], 0.0), -1).masked_fill(dead, float("-inf"))
    return torch.exp(scores - lse.masked_fill(dead, 0.0)[..., None]), lse


def hsa_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    select: str = "token",
) -> torch.Tensor:
    """out [B, Hq, T, Dv] (fp32) of HSA over q [B, Hq, T, D], k/v [B, Hkv, T, D]; ``topk`` < 0 means all."""
    B, Hq, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, S = Hq // Hkv, chunk
    qg = q.float().view(B, Hkv, G, T, D)
    kf, vf = k.float(), v.float()
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding is None else key_padding != 0
    full = T // S  # complete chunks
    kc = kf[:, :, : full * S].reshape(B, Hkv, full, S, D)
    vc = vf[:, :, : full * S].reshape(B, Hkv, full, S, Dv)
    rc = real[:, : full * S].reshape(B, 1, full, S)
    landmarks = _landmarks(kc, rc) if mode == "landmark" else None
    outs = []
    for c in range(math.ceil(T / S)):
        start, stop = c * S, min(T, (c + 1) * S)
        rows = qg[:, :, :, start:stop]  # [B, Hkv, G, n, D]
        first = max(0, c - window) * S
        # local part: chunks c-w .. c, causal
        qpos = torch.arange(start, stop, device=q.device)
        kpos = torch.arange(first, stop, device=q.device)
        keep = (qpos[:, None] >= kpos[None, :])[None, None, None] & real[:, None, None, None, first:stop]
        probs, local_lse = _softmax(torch.einsum("bhgnd,bhld->bhgnl", rows, kf[:, :, first:stop]) * scale, keep)
        parts_out = [torch.einsum("bhgnl,bhld->bhgnd", probs, vf[:, :, first:stop])[..., None, :]]
        parts_score = [local_lse[..., None]]
        older = max(0, c - window)  # candidate chunks 0 .. older-1, all complete
        if older and topk != 0:
            if landmarks is None:
                score = _exact_scores(rows, kc[:, :, :older], rc[:, :, :older], scale)  # [B, Hkv, G, n, older]
            else:
                mean, log_count = (t[:, :, :older] for t in landmarks)
                score = torch.einsum("bhgnd,bhcd->bhgnc", rows, mean) * scale + log_count[:, :, None, None]
            group = score.sum(2)  # [B, Hkv, n, older]: one selection per KV group …
            if select == "block":
                group = group.sum(2, keepdim=True)  # … and per query chunk
            idx = group.topk(min(older, topk) if topk > 0 else older, dim=-1).indices  # [B, Hkv, n|1, K]
            chosen = torch.gather(score, -1, idx[:, :, None].expand(B, Hkv, G, rows.shape[3], idx.shape[-1]))
            # gather each query's chunks as rows of the flattened [B·Hkv·chunks, S, ·] tensors (index_select is fast)
            flat = (torch.arange(B * Hkv, device=q.device).view(B, Hkv, 1, 1) * full + idx).flatten()
            ks = kc.reshape(-1, S, D).index_select(0, flat).view(*idx.shape, S, D)
            vs = vc.reshape(-1, S, Dv).index_select(0, flat).view(*idx.shape, S, Dv)
            per = "" if select == "block" else "n"  # a chunk's shared selection has no query axis: one matmul for all its queries
            if per == "":
                ks, vs = ks[:, :, 0], vs[:, :, 0]
            scores = torch.einsum(f"bhgnd,bh{per}ksd->bhgnks", rows, ks) * scale
            if key_padding is None:  # every key of a chunk is real
                probs = torch.softmax(scores, dim=-1)
            else:
                rs = rc.expand(B, Hkv, full, S).reshape(-1, S).index_select(0, flat).view(*idx.shape, S)
                probs, _ = _softmax(scores, rs[:, :, None])
            parts_out.append(torch.einsum(f"bhgnks,bh{per}ksd->bhgnkd", probs, vs))
            parts_score.append(chosen)
        outs.append(_fuse(parts_out, parts_score))
    return torch.cat(outs, dim=3).reshape(B, Hq, T, Dv)


def _exact_scores(rows: torch.Tensor, kc: torch.Tensor, rc: torch.Tensor, scale: float) -> torch.Tensor:
    """Each chunk's true LSE per query head [B, Hkv, G, n, chunks]; -inf for a chunk with no real key."""
    empty = (rc.sum(-1) == 0)[:, :, None, None]
    scores = torch.einsum("bhgnd,bhcsd->bhgncs", rows, kc) * scale
    scores = scores.masked_fill(~rc[:, :, None, None], float("-inf")).masked_fill(empty[..., None], 0.0)
    return scores.logsumexp(-1).masked_fill(empty, float("-inf"))


def _landmarks(kc: torch.Tensor, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean key [B, Hkv, chunks, D], log of the real-key count [B, 1, chunks], -inf when empty) of every chunk."""
    count = rc.sum(-1)
    mean = (kc * rc[..., None]).sum(-2) / count.clamp(min=1)[..., None]
    return mean, torch.log(count.float())


def _fuse(outs: list[torch.Tensor], scores: list[torch.Tensor]) -> torch.Tensor:
    """Σ_parts softmax(scores)·out; ``outs`` [..., parts_i, Dv], ``scores`` [..., parts_i]; no finite score: 0."""
    out, score = torch.cat(outs, dim=-2), torch.cat(scores, dim=-1)
    dead = ~torch.isfinite(score).any(-1, keepdim=True)
    weights = torch.softmax(score.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return (weights[..., None] * out).sum(-2)


@torch.library.custom_op("longctx::hsa_attention", mutates_args=())
def hsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    scale: float,
    chunk: int,
    topk: int,
    window: int,
    mode: str,
    select: str,
) -> torch.Tensor:
    """HSA as defined by :func:`hsa_ref`; output [B, Hq, T, Dv] in SDPA's memory layout."""
    result = empty_sdpa_layout(q, v)
    result.copy_(hsa_ref(q, k, v, key_padding, scale, chunk, topk, window, mode, select))
    return result


@hsa_attention.register_fake
def _(q, k, v, key_padding, scale, chunk, topk, window, mode, select):
    return empty_sdpa_layout(q, v)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.statics = inputs[4:]


def _backward(ctx, grad_out):
    q, k, v, key_padding = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = hsa_ref(*leaves, key_padding, *ctx.statics)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    return dq, dk, dv, None, None, None, None, None, None, None


hsa_attention.register_autograd(_backward, setup_context=_setup_context)
