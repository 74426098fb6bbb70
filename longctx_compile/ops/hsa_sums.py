"""Chunk summaries kept per key for HSA decoding: what ``ops.hsa.chunk_summaries`` computes from a chunk's keys, as
running reductions over each key's chunk up to it, so the entry at a chunk's last key summarises the chunk. Pooled
landmarks (``pooled``) weigh a chunk's keys by a softmax over all of them, which no running reduction keeps: their
entry is the scoring key itself (the pre-RoPE one with NoPE scores, which the K cache does not hold) and the count.

The prefill computes them for every key of the prompt (:func:`landmark_sums`); a decode step extends them by one key
(:func:`extend_sums`, :func:`extend_reps`); :func:`summaries` turns the entries at chunks' last keys into what score
queries meet.
"""

from __future__ import annotations

import torch

from . import hsa
from .hsa import centre_and_radius, representatives


def landmark_sums(
    keys: torch.Tensor, key_padding: torch.Tensor | None, chunk: int, mode: str = "landmark", queries: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, Hkv, N, D+1]: at key j, the sum of the real keys of j's chunk up to j, and their count (fp32);
    for ``bound`` [B, Hkv, N, 2D+1]: their per-channel minimum and maximum (±inf before the first real key), and the count;
    for ``reps`` [B, Hkv, N, 2D+1]: the sum of the chunk's real ``queries`` up to j ([B, Hkv, N, D], scaled and summed
    over the group's heads), where j ends its chunk the mean of the chunk's representative keys (else zeros), and the count;
    for ``pooled`` [B, Hkv, N, D+1]: key j itself (zeros where padded) and the count."""
    B, H, N, D = keys.shape
    real = torch.ones(B, N, dtype=torch.float32, device=keys.device) if key_padding is None else (key_padding != 0).float()
    if mode in ("bound", "reps", "pooled"):
        count = _running(real[:, None, :, None].expand(B, H, N, 1).contiguous(), chunk, torch.add)
    if mode == "pooled":
        return torch.cat([keys.float() * real[:, None, :, None], count], dim=-1)
    if mode == "reps":
        qsum = _running((queries.float() * real[:, None, :, None]).contiguous(), chunk, torch.add)
        ends = (torch.arange(N, device=keys.device) % chunk == chunk - 1)[:, None]
        reps = _window_representatives(keys.float(), real, qsum, chunk).masked_fill(~ends, 0.0)
        return torch.cat([qsum, reps, count], dim=-1)
    if mode == "bound":
        dead = real[:, None, :, None] == 0
        ranges = torch.cat([keys.float().masked_fill(dead, float("inf")), keys.float().masked_fill(dead, float("-inf"))], dim=-1)
        low_high = _running(ranges, chunk, lambda a, b: torch.cat([torch.minimum(a[..., :D], b[..., :D]), torch.maximum(a[..., D:], b[..., D:])], -1))
        return torch.cat([low_high, count], dim=-1)
    per_key = torch.cat([keys.float() * real[:, None, :, None], real[:, None, :, None].expand(B, H, N, 1)], dim=-1)
    # the running sum over all keys less its value before the chunk's first key (in fp64, so no precision is lost
    # at any length; a reshape into chunks would make torch.export guard on the length)
    total = per_key.double().cumsum(2)
    before = torch.arange(N, device=keys.device) // chunk * chunk - 1  # the key before each key's chunk, -1 for the first
    start = total.index_select(2, before.clamp(min=0)) * (before >= 0)[:, None].double()
    return (total - start).float()


def _window_representatives(keys: torch.Tensor, real: torch.Tensor, qsum: torch.Tensor, chunk: int) -> torch.Tensor:
    """At each key j [B, H, N, D]: the mean of the representatives, by ``qsum`` at j, among the S keys ending at j (at a
    chunk's last key, that chunk). One offset of the window at a time, so no [N, S, D] tensor is made, and no unfold or
    reshape into chunks (which make torch.export guard on the length)."""
    N = keys.shape[2]
    padded = torch.nn.functional.pad(keys, (0, 0, chunk - 1, 0))  # key j - S + 1 + s of the window sits at j + s
    real_padded = torch.nn.functional.pad(real, (chunk - 1, 0)) > 0
    received = torch.stack([(qsum * padded[:, :, s : s + N]).sum(-1) for s in range(chunk)], dim=-1)  # [B, H, N, S]
    window_real = torch.stack([real_padded[:, s : s + N] for s in range(chunk)], dim=-1)[:, None].expand_as(received)
    received = received.masked_fill(~window_real, float("-inf"))
    picked = received.topk(min(hsa.REPS, chunk), dim=-1).indices  # [B, H, N, r]: offsets in the window
    keep = window_real.gather(-1, picked).to(keys.dtype)
    at = (torch.arange(N, device=keys.device)[:, None] + picked).flatten(2)  # their places in ``padded``
    chosen = padded.gather(2, at[..., None].expand(*at.shape, keys.shape[-1])).view(*picked.shape, -1)
    return (chosen * keep[..., None]).sum(-2) / keep.sum(-1).clamp(min=1)[..., None]


def _running(per_key: torch.Tensor, chunk: int, op) -> torch.Tensor:
    """Each key's inclusive running ``op`` over its chunk up to it, [B, H, N, E]: a Hillis–Steele scan of log2(S) steps,
    each combining a key with the one ``step`` back when that one is in the same chunk. No reshape into chunks, which
    would make torch.export guard on the length."""
    N = per_key.shape[2]
    within = (torch.arange(N, device=per_key.device) % chunk)[:, None]  # each key's place in its chunk
    step = 1
    while step < chunk:
        back = torch.nn.functional.pad(per_key, (0, 0, step, 0))[:, :, :N]  # key j - step (zeros where j < step)
        per_key = torch.where(within >= step, op(per_key, back), per_key)
        step *= 2
    return per_key


def extend_sums(previous: torch.Tensor, key: torch.Tensor, real: torch.Tensor, starts_chunk: torch.Tensor, mode: str = "landmark") -> torch.Tensor:
    """The sums entry [B, Hkv, 1, D+1] of a new key: the previous key's entry (nothing where the key starts a chunk)
    plus the key (``real`` [B] 0/1) and its count; for ``bound`` [B, Hkv, 1, 2D+1], the running minimum and maximum
    taking the key in; for ``pooled``, the key itself and the running count. ``starts_chunk`` [B] bool: the key's index
    is a multiple of S."""
    fresh = starts_chunk[:, None, None, None]
    real = real.float()[:, None, None, None]
    if mode == "pooled":
        return torch.cat([key.float() * real, previous[..., -1:].masked_fill(fresh, 0.0) + real], dim=-1)
    if mode == "bound":
        D, dead = key.shape[-1], real == 0
        low = torch.minimum(previous[..., :D].masked_fill(fresh, float("inf")), key.float().masked_fill(dead, float("inf")))
        high = torch.maximum(previous[..., D:-1].masked_fill(fresh, float("-inf")), key.float().masked_fill(dead, float("-inf")))
        return torch.cat([low, high, previous[..., -1:].masked_fill(fresh, 0.0) + real], dim=-1)
    entry = torch.cat([key.float() * real, real.expand(*key.shape[:-1], 1)], dim=-1)
    return previous.masked_fill(fresh, 0.0) + entry


def extend_reps(
    previous: torch.Tensor,
    query: torch.Tensor,
    real: torch.Tensor,
    starts_chunk: torch.Tensor,
    ends_chunk: torch.Tensor,
    window: torch.Tensor,
    window_real: torch.Tensor,
) -> torch.Tensor:
    """The ``reps`` entry [B, Hkv, 1, 2D+1] of a new key: the running query sum (``query`` [B, Hkv, 1, D], the new
    position's scaled queries summed over the group) and count, and where the key ends its chunk (``ends_chunk`` [B])
    the mean of the chunk's representatives among ``window`` [B, Hkv, S, D], the chunk's keys (``window_real`` [B, S])."""
    fresh = starts_chunk[:, None, None, None]
    real = real.float()[:, None, None, None]
    D = query.shape[-1]
    qsum = previous[..., :D].masked_fill(fresh, 0.0) + query.float() * real
    count = previous[..., -1:].masked_fill(fresh, 0.0) + real
    received = torch.einsum("bhd,bhsd->bhs", qsum[:, :, 0], window.float())
    reps = representatives(received, window.float(), window_real[:, None].expand_as(received))[:, :, None]
    return torch.cat([qsum, reps.masked_fill(~ends_chunk[:, None, None, None], 0.0), count], dim=-1)


def summaries(ends: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk summaries (:func:`.hsa.chunk_summaries`) from the sums entries at the chunks' last keys."""
    count = ends[..., -1]
    D = (ends.shape[-1] - 1) // 2
    if mode == "bound":
        return centre_and_radius(ends[..., :D], ends[..., D:-1], count), torch.log(count)
    if mode == "reps":
        return ends[..., D:-1], torch.log(count)
    return ends[..., :-1] / count.clamp(min=1)[..., None], torch.log(count)


def width(head_dim: int, mode: str) -> int:
    """Floats per key of a sums entry: D+1, or 2D+1 for ``bound`` and ``reps``."""
    return head_dim * (2 if mode in ("bound", "reps") else 1) + 1
