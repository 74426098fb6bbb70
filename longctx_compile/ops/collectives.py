"""Sequence-parallel collectives as ``longctx`` ops, run on ``distributed.group()``.

- ``seq_all_to_all(x, scatter_dim, gather_dim, degree)``: split ``x`` into ``degree`` chunks along
  ``scatter_dim``, send chunk i to rank i, and concatenate what arrives along ``gather_dim`` in rank
  order. Ulysses uses (heads → sequence) before attention and (sequence → heads) after it; the
  gradient of one is the other. The output has SDPA's memory layout ([B, T, H, D] in memory), so
  models' ``transpose(1, 2).view(...)`` after attention stays valid.
- ``seq_all_gather(x, dim, degree)``: every rank's ``x`` concatenated along ``dim`` (masks and
  positions, never differentiated).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import distributed
from .attention import new_sdpa_layout


def _chunked_shape(x: torch.Tensor, scatter_dim: int, gather_dim: int, degree: int) -> list[int]:
    shape = list(x.shape)
    shape[scatter_dim] //= degree
    shape[gather_dim] *= degree
    return shape


@torch.library.custom_op("longctx::seq_all_to_all", mutates_args=())
def seq_all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, degree: int) -> torch.Tensor:
    """All-to-all over the sequence-parallel group: scatter ``scatter_dim``, gather ``gather_dim``."""
    distributed.check_degree(degree)
    send = torch.stack(x.chunk(degree, dim=scatter_dim))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=distributed.group())
    distributed.record("all_to_all", send[0].numel() * send.element_size() * (degree - 1))  # chunk i stays when i is this rank
    out = new_sdpa_layout(x, _chunked_shape(x, scatter_dim, gather_dim, degree))
    out.copy_(torch.cat(received.unbind(0), dim=gather_dim))
    return out


@seq_all_to_all.register_fake
def _(x, scatter_dim, gather_dim, degree):
    return new_sdpa_layout(x, _chunked_shape(x, scatter_dim, gather_dim, degree))


def _a2a_backward(ctx, grad):
    return seq_all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.degree), None, None, None


def _a2a_setup(ctx, inputs, output):
    _, ctx.scatter_dim, ctx.gather_dim, ctx.degree = inputs


seq_all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


@torch.library.custom_op("longctx::seq_all_gather", mutates_args=())
def seq_all_gather(x: torch.Tensor, dim: int, degree: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order."""
    distributed.check_degree(degree)
    distributed.record("all_gather", x.numel() * x.element_size() * (degree - 1))
    return distributed.gather(x, dim)


@seq_all_gather.register_fake
def _(x, dim, degree):
    shape = list(x.shape)
    shape[dim] *= degree
    return x.new_empty(shape)
