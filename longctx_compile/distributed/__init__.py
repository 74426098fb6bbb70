"""Sequence-parallel runtime: the process group the ``longctx`` collectives use, and sharding helpers.

A sharded artifact's program is the per-rank program: it takes this rank's contiguous slice of the
sequence. Its collectives run on the group set here (default: the whole world), so the same
artifact runs inside any data-parallel layout the user builds around it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import LccError
from .layout import Layout

_GROUP: dist.ProcessGroup | None = None
# (ulysses, ring) subgroups of a hybrid layout: given with set_group, or made once per layout from the world
_SUBGROUPS: dict[tuple[int, int], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}
# what this process's collectives sent: calls and bytes per collective (for benchmarks and inspection)
TRAFFIC: dict[str, list[int]] = {}


def record(collective: str, sent_bytes: int) -> None:
    calls = TRAFFIC.setdefault(collective, [0, 0])
    calls[0] += 1
    calls[1] += sent_bytes


def set_group(group: dist.ProcessGroup | None, *, ulysses: dist.ProcessGroup | None = None, ring: dist.ProcessGroup | None = None) -> None:
    """Use ``group`` for sequence parallelism (None: the whole world).

    A hybrid (Ulysses × ring) program inside a custom group also needs this rank's Ulysses group
    (the U ranks j·U..j·U+U-1 of ``group``) and ring group (ranks u, u+U, … of ``group``).
    """
    global _GROUP
    _GROUP = group
    _SUBGROUPS.clear()
    if ulysses is not None and ring is not None:
        _SUBGROUPS[dist.get_world_size(ulysses), dist.get_world_size(ring)] = (ulysses, ring)


def subgroups(layout: Layout) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(Ulysses group, ring group) of this rank for ``layout``; pure forms use the whole group for their part."""
    whole = group()
    check_degree(layout.degree)
    if layout.ring == 1 or layout.ulysses == 1:
        return whole, whole
    key = (layout.ulysses, layout.ring)
    if key not in _SUBGROUPS:
        if whole is not dist.group.WORLD:
            raise LccError("a Ulysses × ring program in a custom group needs its subgroups: distributed.set_group(group, ulysses=..., ring=...)")
        U, W = layout.ulysses, layout.degree
        mine_u, _ = dist.new_subgroups_by_enumeration([list(range(j, j + U)) for j in range(0, W, U)])
        mine_r, _ = dist.new_subgroups_by_enumeration([list(range(u, W, U)) for u in range(U)])
        _SUBGROUPS[key] = (mine_u, mine_r)
    return _SUBGROUPS[key]


def group() -> dist.ProcessGroup:
    """The sequence-parallel group; one clear error when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise LccError("this program is sequence-parallel: start it on P ranks (torchrun, or lcc verify) and init torch.distributed first")
    return _GROUP if _GROUP is not None else dist.group.WORLD


def degree() -> int:
    return dist.get_world_size(group())


def rank() -> int:
    return dist.get_rank(group())


def check_degree(expected: int) -> None:
    """Refuse a group whose size differs from the degree the program was converted for."""
    size = degree()
    if size != expected:
        raise LccError(f"this program was converted for sequence-parallel degree {expected}, but the group has {size} ranks")


def as_layout(layout: Layout | int) -> Layout:
    """A degree alone means contiguous shards (Ulysses)."""
    return layout if isinstance(layout, Layout) else Layout(ulysses=layout)


def shard(x: torch.Tensor, layout: Layout | int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of the full-length ``x`` along ``dim`` under ``layout`` (a degree: contiguous)."""
    return as_layout(layout).shard(x, rank, dim)


def gather(x: torch.Tensor, dim: int = 1, layout: Layout | int | None = None) -> torch.Tensor:
    """The full tensor, in token order, from every rank's shard along ``dim`` (no gradient; for outputs and checks)."""
    parts = [torch.empty_like(x) for _ in range(degree())]
    dist.all_gather(parts, x.contiguous(), group=group())
    full = torch.cat(parts, dim=dim)
    return full if layout is None else as_layout(layout).unshard(full, dim)


IGNORE = -100  # label of a position without a target (Hugging Face's convention)


def shard_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    layout: Layout | int,
    rank: int,
) -> dict[str, torch.Tensor]:
    """This rank's shard of a batch, with global position ids and labels shifted *before* slicing.

    ``layout`` is the program's :class:`Layout` (``Layout.of(model.signature)``) or, for contiguous
    shards, just the degree P. ``labels`` are the unshifted targets (usually ``input_ids``); shifting after slicing would lose the
    target of each shard's last token, which lives on the next rank.
    """
    if position_ids is None:
        from ..runtime.model import default_positions

        position_ids = default_positions(attention_mask, *input_ids.shape, input_ids.device)
    out = {"input_ids": input_ids, "position_ids": position_ids}
    if attention_mask is not None:
        out["attention_mask"] = attention_mask
    if labels is not None:
        shifted = torch.full_like(labels, IGNORE)
        shifted[:, :-1] = labels[:, 1:]
        if attention_mask is not None:
            shifted[:, :-1] = shifted[:, :-1].masked_fill(attention_mask[:, 1:] == 0, IGNORE)
        out["shift_labels"] = shifted
    return {name: shard(t, layout, rank) for name, t in out.items()}


def token_loss(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """This rank's part of the global mean cross-entropy: its summed loss over *all* ranks' valid tokens.

    Summing this over ranks gives the token-weighted global mean, and each rank's backward gives its
    share of the gradient, so :func:`reduce_gradients` sums. A rank with no valid token contributes 0
    (not NaN), and the divisor is taken without a gradient.
    """
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return global_mean(total, (shift_labels != IGNORE).sum())


def global_mean(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's ``loss_sum`` over the valid tokens of the whole group (``model.loss(...)`` gives both)."""
    count = count.detach().clone()
    dist.all_reduce(count, group=group())
    return loss_sum / count.clamp(min=1)


def reduce_gradients(module: torch.nn.Module) -> None:
    """Sum parameter gradients over the sequence-parallel group (each rank holds a share of the same tokens).

    Data-parallel replicas, if any, are averaged by the user's usual DP reduction after this.
    """
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the group (a copy; no gradient): for reporting the global loss."""
    x = x.detach().clone()
    dist.all_reduce(x, group=group())
    return x
