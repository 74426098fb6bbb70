"""IndexMem (learned KV eviction with latent memory): the indexer, importance, the keep set and the memory.

- ``longctx::evict_indexer``: the lightning-indexer inputs of a layer from its pre-RoPE queries and
  its attention input x: Hi indexer queries RMSNorm(U_q·flatten(q_pre)), one shared indexer key
  RMSNorm(U_k·x) per token, and head weights G·x / √(Hi·Di).
- ``indexer_importance``: the score of key t for query s in group g is
  A[s, t] = Σ_{h in g} w[s, h] · ReLU(q[s, h] · k[g, t]) (causal; queries are the last T of S key
  positions), and a key's importance is the max over the queries that see it (-inf when none does).
  A group is the whole layer (eviction shared by the KV heads) or one KV head.
- ``teacher_importance``: the same max over queries (and a group's heads) of the true logits
  q·k·scale: what the indexer is distilled to.
- ``longctx::evict_importance``: the indexer importance as an op, which exported graphs (ONNX) return.
- ``importance_kl``: KL(softmax(teacher) ‖ softmax(student)) over the keys, sinks left out.
- ``keep_positions``: the first ``sinks`` real keys, the last ``window`` keys, and the most important
  of the rest up to ``budget`` in all, in ascending order (what compaction gathers).
- ``memory_write`` / ``memory_read``: the latent memory's fast state, M ← λM + η Σ φ(k)vᵀ and
  b ← λb + η Σ φ(k)², read as φ(q)ᵀM / (φ(q)²ᵀb + ε).
- ``longctx::evict_attention``: a layer's attention with those inputs beside it; over its own input
  it is the canonical attention (nothing is evicted yet), ``runtime.evict`` runs the eviction.

The importance references stream over tiles of at most BLOCK² (query, key) pairs with a running max,
so no [T, S] tensor exists: memory O(BLOCK² · heads). The max's gradient flows to the query that attains it
(:func:`student_importance`), also without a [T, S] tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LccError
from . import cache
from .attention import attention_backward, empty_sdpa_layout, sdpa_layout_forward

POLICIES = ("learned", "streaming", "snapkv", "oracle")  # what ranks the keys an evicting cache keeps
BLOCK = 512  # queries and keys per streamed tile
EPS = 1e-6


def indexer_ref(
    q_pre: torch.Tensor, hidden: torch.Tensor, q_proj: torch.Tensor, q_norm: torch.Tensor, k_proj: torch.Tensor, k_norm: torch.Tensor, gate_proj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indexer queries [B, Hi, T, Di], indexer keys [B, T, Di], head weights [B, Hi, T]) from q_pre [B, Hq, T, D] and
    the attention input ``hidden`` (any shape holding B·T rows of the hidden size)."""
    B, Hq, T, D = q_pre.shape
    Di = k_proj.shape[0]
    Hi = q_proj.shape[0] // Di
    x = hidden.reshape(B, T, -1)
    q = F.linear(q_pre.transpose(1, 2).reshape(B, T, Hq * D), q_proj).view(B, T, Hi, Di)
    q = F.rms_norm(q, (Di,), q_norm, EPS).transpose(1, 2)
    k = F.rms_norm(F.linear(x, k_proj), (Di,), k_norm, EPS)
    w = F.linear(x, gate_proj).transpose(1, 2) * (Hi * Di) ** -0.5
    return q, k, w


@torch.library.custom_op("longctx::evict_indexer", mutates_args=())
def evict_indexer(
    q_pre: torch.Tensor, hidden: torch.Tensor, q_proj: torch.Tensor, q_norm: torch.Tensor, k_proj: torch.Tensor, k_norm: torch.Tensor, gate_proj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The indexer of one layer, as :func:`indexer_ref` (training runs the reference itself, for its gradients)."""
    return tuple(t.contiguous() for t in indexer_ref(q_pre, hidden, q_proj, q_norm, k_proj, k_norm, gate_proj))


@evict_indexer.register_fake
def _(q_pre, hidden, q_proj, q_norm, k_proj, k_norm, gate_proj):
    B, _, T, _ = q_pre.shape
    Di = k_proj.shape[0]
    Hi = q_proj.shape[0] // Di
    return q_pre.new_empty(B, Hi, T, Di), q_pre.new_empty(B, T, Di), q_pre.new_empty(B, Hi, T)


@torch.library.custom_op("longctx::evict_attention", mutates_args=())
def evict_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    idx_q: torch.Tensor,
    idx_k: torch.Tensor,
    idx_w: torch.Tensor,
    phi: torch.Tensor | None,
    gate_w: torch.Tensor | None,
    gate_b: torch.Tensor | None,
    decay: torch.Tensor | None,
    strength: torch.Tensor | None,
) -> torch.Tensor:
    """An evicting layer's attention: over its own input the canonical attention (the indexer outputs and the
    memory's weights take no part while nothing has been evicted); ``runtime.evict`` reads them."""
    return sdpa_layout_forward(q, k, v, key_padding, doc_ids, mask, scale, causal, window)


@evict_attention.register_fake
def _(q, k, v, key_padding, doc_ids, mask, scale, causal, window, *extras):
    return empty_sdpa_layout(q, v)


def _evict_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.statics = inputs[6:9]


def _evict_backward(ctx, grad_out):
    """The canonical attention's backward; the indexer and memory learn from their own losses (``train-indexers``)."""
    return (*attention_backward(ctx, grad_out), *[None] * 8)


evict_attention.register_autograd(_evict_backward, setup_context=_evict_setup)
cache.declare(evict_attention._opoverload, cache.KeyValueCache())  # decodes from cached K and V (``ops.cache``)


def _seen(T: int, S: int, causal: bool, q0: int, q1: int, k0: int, k1: int, query_real, device) -> torch.Tensor:
    """[B or 1, q1-q0, k1-k0] bool: which keys of the tile the tile's real queries see (query i sits at key S - T + i)."""
    if causal and q0 + S - T >= k1 - 1:  # the tile's first query already sees all its keys
        seen = torch.ones(1, q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    elif causal:
        qpos = torch.arange(q0, q1, device=device) + (S - T)
        seen = (torch.arange(k0, k1, device=device)[None, :] <= qpos[:, None])[None]
    else:
        seen = torch.ones(1, q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    return seen if query_real is None else seen & query_real[:, q0:q1, None].bool()


def _stream_max(
    score_tile, B: int, G: int, T: int, S: int, causal: bool, query_real, device, need_arg: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(max over queries of ``score_tile(q0, q1, k0, k1)`` [B, G, q1-q0, k1-k0], the query attaining it or None): [B, G, S] each."""
    if not need_arg and query_real is None and (T == 1 or not causal) and T * S <= BLOCK * BLOCK:  # one tile, every score seen: a decode step
        return score_tile(0, T, 0, S).amax(2), None
    best = torch.full((B, G, S), float("-inf"), device=device)
    arg = torch.zeros(B, G, S, dtype=torch.long, device=device) if need_arg else None
    for q0 in range(0, T, BLOCK):
        q1 = min(T, q0 + BLOCK)
        keys = BLOCK * BLOCK // (q1 - q0)  # tiles of at most BLOCK² scores: a decode step's one query takes them all at once
        for k0 in range(0, S, keys):
            k1 = min(S, k0 + keys)
            seen = _seen(T, S, causal, q0, q1, k0, k1, query_real, device)
            if not bool(seen.any()):
                continue
            tile = score_tile(q0, q1, k0, k1).masked_fill(~seen[:, None], float("-inf"))
            if not need_arg:
                best[..., k0:k1] = torch.maximum(best[..., k0:k1], tile.amax(2))
                continue
            top = tile.max(2)
            better = top.values > best[..., k0:k1]
            best[..., k0:k1] = torch.where(better, top.values, best[..., k0:k1])
            arg[..., k0:k1] = torch.where(better, top.indices + q0, arg[..., k0:k1])
    return best, arg


def _grouped(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, groups: int):
    """fp32 views: queries [B, G, Hi/G, T, Di], keys [B, G, S, Di] (one shared key broadcast when given [B, S, Di]), weights [B, G, Hi/G, T]."""
    B, Hi, T, Di = q_idx.shape
    k = k_idx.float() if k_idx.dim() == 4 else k_idx.float()[:, None].expand(B, groups, *k_idx.shape[1:])
    return q_idx.float().view(B, groups, Hi // groups, T, Di), k, weights.float().view(B, groups, Hi // groups, T)


def indexer_importance(
    q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, groups: int = 1, causal: bool = True, query_real=None, need_arg: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(importance [B, groups, S] fp32, the query attaining it, or None without ``need_arg``) of each key: max over
    queries of Σ_h w·ReLU(q·k).

    q_idx [B, Hi, T, Di], k_idx [B, S, Di] (or [B, groups, S, Di]), weights [B, Hi, T]; ``query_real`` [B, T]
    leaves padded queries out."""
    q, k, w = _grouped(q_idx, k_idx, weights, groups)
    B, G, _, T, _ = q.shape

    def tile(q0, q1, k0, k1):
        z = torch.relu(torch.einsum("bgrsd,bgtd->bgrst", q[..., q0:q1, :], k[:, :, k0:k1]))
        return torch.einsum("bgrs,bgrst->bgst", w[..., q0:q1], z)

    return _stream_max(tile, B, G, T, k.shape[2], causal, query_real, q_idx.device, need_arg)


def student_importance(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """:func:`indexer_importance` with a gradient: the max is found without one, then recomputed at the winning
    query of each key (the max's gradient reaches only it), in O(S · Hi · Di) memory."""
    with torch.no_grad():
        best, arg = indexer_importance(q_idx, k_idx, weights, groups)
    q, k, w = _grouped(q_idx, k_idx, weights, groups)
    B, G, r, _, Di = q.shape
    S = k.shape[2]
    q_at = q.gather(3, arg[:, :, None, :, None].expand(B, G, r, S, Di))  # [B, G, r, S, Di]: each key's winning query
    w_at = w.gather(3, arg[:, :, None, :].expand(B, G, r, S))
    value = (w_at * torch.relu((q_at * k[:, :, None]).sum(-1))).sum(2)
    return value.masked_fill(torch.isinf(best), float("-inf"))


def teacher_importance(q: torch.Tensor, k: torch.Tensor, scale: float, groups: int = 1, causal: bool = True, query_real=None) -> torch.Tensor:
    """Importance [B, groups, S] fp32 from the true logits: max over a group's query heads and the queries of q·k·scale.

    q [B, Hq, T, D], k [B, Hkv, S, D]; ``groups`` is 1 (all heads) or Hkv (each KV head and its query heads)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, T, D)
    kf = k.float()

    def tile(q0, q1, k0, k1):
        logits = torch.einsum("bhgsd,bhtd->bhgst", qg[..., q0:q1, :], kf[:, :, k0:k1]) * scale
        return logits.reshape(B, groups, -1, q1 - q0, k1 - k0).amax(2)

    return _stream_max(tile, B, groups, T, S, causal, query_real, q.device, need_arg=False)[0]


@torch.library.custom_op("longctx::evict_importance", mutates_args=())
def evict_importance(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, query_real: torch.Tensor | None, groups: int) -> torch.Tensor:
    """The indexer's importance [B, groups, S] of each key over causal queries, as :func:`indexer_importance`: a node that
    an exported graph (``lcc export-onnx``) returns, so a runtime outside this process can choose what to evict."""
    return indexer_importance(q_idx, k_idx, weights, groups, query_real=query_real, need_arg=False)[0]


@evict_importance.register_fake
def _(q_idx, k_idx, weights, query_real, groups):
    return q_idx.new_empty(q_idx.shape[0], groups, k_idx.shape[-2], dtype=torch.float32)


@torch.library.custom_op("longctx::evict_teacher_importance", mutates_args=())
def evict_teacher_importance(q: torch.Tensor, k: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """The true logits' importance [B, groups, S] of each key over causal queries, as :func:`teacher_importance` (the
    ``oracle`` policy's ranking): one node in an exported decode step."""
    return teacher_importance(q, k, scale, groups)


@evict_teacher_importance.register_fake
def _(q, k, scale, groups):
    return q.new_empty(q.shape[0], groups, k.shape[2], dtype=torch.float32)


def importance_kl(teacher: torch.Tensor, student: torch.Tensor, sinks: int) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student)) over keys sinks.. (keys no query saw, -inf in both, drop out)."""
    t, s = teacher[..., sinks:], student[..., sinks:]
    seen = torch.isfinite(t)
    log_p = torch.log_softmax(t.masked_fill(~seen, float("-inf")), -1)
    log_q = torch.log_softmax(s.masked_fill(~seen, float("-inf")), -1)
    return (log_p.exp() * (log_p - log_q)).masked_fill(~seen, 0.0).sum(-1).mean()


def keep_positions(importance: torch.Tensor, sinks: int, window: int, budget: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """[N, min(budget, S)] key indices to keep, ascending: the first ``sinks`` real keys, the last ``window`` keys, then the
    most important of the rest; padding (``real`` 0) leaves first, then keys no query saw (-inf)."""
    N, S = importance.shape
    if budget >= S:
        return torch.arange(S, device=importance.device).expand(N, S)
    if budget < sinks + window:
        raise ValueError(f"budget {budget} must be at least sinks + window = {sinks + window}")
    real = torch.ones(N, S, dtype=torch.bool, device=importance.device) if real is None else real.bool()
    lowest = torch.finfo(torch.float32).min
    score = torch.where(real, importance.float().nan_to_num(neginf=lowest), float("-inf"))
    pinned = real & (real.long().cumsum(-1) <= sinks)
    pinned[:, S - window :] = True
    score = score.masked_fill(pinned, float("inf"))
    return score.topk(budget, dim=-1).indices.sort(dim=-1).values


def dropped_positions(keep: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n - k] the key indices of 0..n-1 that ``keep`` [..., k] (ascending, per row) leaves out, ascending: what eviction writes to memory."""
    dropped = torch.ones(*keep.shape[:-1], n, dtype=torch.bool, device=keep.device).scatter(-1, keep, False)
    return dropped.float().argsort(dim=-1, descending=True, stable=True)[..., : n - keep.shape[-1]].sort(dim=-1).values


def memory_write(M: torch.Tensor, b: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, decay, strength) -> tuple[torch.Tensor, torch.Tensor]:
    """(M', b') after writing evicted entries: M [..., m, dv], b [..., m], φ(k) [..., E, m], v [..., E, dv]."""
    M = decay * M + strength * torch.einsum("...em,...ed->...md", phi_k.float(), v.float())
    b = decay * b + strength * (phi_k.float() ** 2).sum(-2)
    return M, b


def memory_read(M: torch.Tensor, b: torch.Tensor, phi_q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Readout [..., T, dv] = φ(q)ᵀM / (φ(q)²ᵀb + ε) for φ(q) [..., T, m]."""
    phi = phi_q.float()
    return torch.einsum("...tm,...md->...td", phi, M) / (torch.einsum("...tm,...m->...t", phi**2, b) + eps)[..., None]


def memory_gate(q: torch.Tensor, gate_w: torch.Tensor, gate_b: torch.Tensor) -> torch.Tensor:
    """g(q) [B, Hq, T] = sigmoid(q_h · w_h + b_h) per query head (b = -inf closes it exactly)."""
    return torch.sigmoid(torch.einsum("bhtd,hd->bht", q.float(), gate_w.float()) + gate_b.float()[None, :, None])


def memory_readout(q: torch.Tensor, M: torch.Tensor, b: torch.Tensor, phi: torch.Tensor, gate_w: torch.Tensor, gate_b: torch.Tensor) -> torch.Tensor:
    """The gated residual g(q)·m(q) [B, Hq, T, Dv] fp32: query head h reads its KV head's memory M [B, Hkv, m, Dv], b [B, Hkv, m]."""
    B, Hq, T, D = q.shape
    Hkv = M.shape[1]
    phi_q = F.linear(q.float(), phi.float()).reshape(B, Hkv, (Hq // Hkv) * T, -1)
    read = memory_read(M, b, phi_q).view(B, Hq, T, -1)
    return memory_gate(q, gate_w, gate_b)[..., None] * read


def parse_budget(text: str, sinks: int, window: int) -> float | int:
    """A ratio in [0, 1) (a float; ``0``: the pinned keys only) or a token count above sinks + window (an int), else one clear error."""
    text = str(text).strip()
    try:
        number = float(text)
    except ValueError:
        raise LccError(f"invalid --opt budget={text}: expected a ratio of the prompt in [0, 1) like 0.25, or a token count like 4096") from None
    if text.isdigit() and int(text) > 0:
        if int(text) <= sinks + window:
            raise LccError(f"--opt budget={text} keeps no key beyond the pinned ones: it must exceed sinks + window = {sinks + window}")
        return int(text)
    if not 0 <= number < 1:
        raise LccError(f"invalid --opt budget={text}: a ratio lies in [0, 1); give a token count as a whole number")
    return number
