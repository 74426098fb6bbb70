"""Sequence-parallel training helpers, and the user-facing names of the process group the ``longctx`` collectives use.

A sharded artifact's program is the per-rank program: it takes this rank's contiguous slice of the
sequence. Its collectives run on the group set with :func:`set_group` (default: the whole world), so
the same artifact runs inside any data-parallel layout the user builds around it. The group state
itself lives below the ops that read it (``ops/groups.py``); these are its public names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.groups import TRAFFIC, all_reduce, gather, group, set_group, shard  # noqa: F401  (the public names of the group state)
from ..ops.layout import Layout
from ..ops.loss import IGNORE


def init(backend: str | None = None) -> int:
    """Start torch.distributed for a sharded program (gloo on CPU, NCCL with CUDA; torchrun's environment) and return
    this rank. Use it instead of ``dist.init_process_group``, or import ``torch._dynamo`` before that call.

    ``lcc.load`` imports ``torch._dynamo`` (through ``torch.export.load``). When that import follows
    ``init_process_group``, the default group outlives ``destroy_process_group``, so its gloo threads are still
    running at interpreter exit, and about one run in eight aborts there (SIGABRT, "terminate called without an
    active exception"). Importing it first avoids this.
    """
    import torch._dynamo  # noqa: F401  (before the group exists: see above)

    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_rank()


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
    all_reduce(count, group())
    return loss_sum / count.clamp(min=1)


def reduce_gradients(module: torch.nn.Module) -> None:
    """Sum parameter gradients over the sequence-parallel group (each rank holds a share of the same tokens).

    Data-parallel replicas, if any, are averaged by the user's usual DP reduction after this.
    """
    for p in module.parameters():
        if p.grad is not None:
            all_reduce(p.grad, group())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the group (a copy; no gradient): for reporting the global loss."""
    x = x.detach().clone()
    all_reduce(x, group())
    return x
