"""Sequence-parallel collectives as ``longctx`` ops. ``layout`` is a ``distributed.Layout`` as a list.

- ``seq_all_to_all(x, scatter_dim, gather_dim, layout)``: over this rank's Ulysses group of U ranks,
  split ``x`` into U chunks along ``scatter_dim``, send chunk i to rank i, and concatenate what
  arrives along ``gather_dim`` in rank order. Ulysses uses (heads → sequence) before attention and
  (sequence → heads) after it; the gradient of one is the other. The output has SDPA's memory
  layout ([B, T, H, D] in memory), so models' ``transpose(1, 2).view(...)`` after attention stays valid.
- ``seq_all_gather(x, dim, layout)``: every rank's shard of ``x`` put back in global token order
  (masks and positions, never differentiated).
- ``seq_head_slice(x, dim, layout)``: this rank's share of per-head weights (a form's own parameters, such as
  HSA's learned retrieval projections), for the heads its all-to-all gave it.
"""

from __future__ import annotations

import torch

from . import groups
from .attention import new_sdpa_layout
from .layout import Layout


def _chunked_shape(x: torch.Tensor, scatter_dim: int, gather_dim: int, degree: int) -> list[int]:
    shape = list(x.shape)
    shape[scatter_dim] //= degree
    shape[gather_dim] *= degree
    return shape


@torch.library.custom_op("longctx::seq_all_to_all", mutates_args=())
def seq_all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, layout: list[int]) -> torch.Tensor:
    """All-to-all over the Ulysses group: scatter ``scatter_dim``, gather ``gather_dim``."""
    lay = Layout.from_list(layout)
    group, _ = groups.subgroups(lay)
    U = lay.ulysses
    send = torch.stack(x.chunk(U, dim=scatter_dim))
    received = torch.empty_like(send)
    groups.all_to_all(received, send, group)
    groups.record("all_to_all", send[0].numel() * send.element_size() * (U - 1))  # chunk i stays when i is this rank
    out = new_sdpa_layout(x, _chunked_shape(x, scatter_dim, gather_dim, U))
    out.copy_(torch.cat(received.unbind(0), dim=gather_dim))
    return out


@seq_all_to_all.register_fake
def _(x, scatter_dim, gather_dim, layout):
    return new_sdpa_layout(x, _chunked_shape(x, scatter_dim, gather_dim, layout[0]))


def _a2a_backward(ctx, grad):
    return seq_all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.layout), None, None, None


def _a2a_setup(ctx, inputs, output):
    _, ctx.scatter_dim, ctx.gather_dim, ctx.layout = inputs


seq_all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


@torch.library.custom_op("longctx::seq_all_gather", mutates_args=())
def seq_all_gather(x: torch.Tensor, dim: int, layout: list[int]) -> torch.Tensor:
    """Every rank's shard of ``x`` along ``dim``, in global token order."""
    lay = Layout.from_list(layout)
    groups.check_degree(lay.degree)
    groups.record("all_gather", x.numel() * x.element_size() * (lay.degree - 1))
    return groups.gather(x, dim, lay)


@seq_all_gather.register_fake
def _(x, dim, layout):
    shape = list(x.shape)
    shape[dim] *= layout[0] * layout[1]
    return x.new_empty(shape)


@torch.library.custom_op("longctx::seq_head_slice", mutates_args=())
def seq_head_slice(x: torch.Tensor, dim: int, layout: list[int]) -> torch.Tensor:
    """This rank's 1/U of ``x`` along ``dim``: the per-head weights of the heads the rank's Ulysses all-to-all gave
    it. Its gradient is zero outside the slice, so the usual sum of gradients over the group assembles the whole."""
    lay = Layout.from_list(layout)
    group, _ = groups.subgroups(lay)
    n = x.shape[dim] // lay.ulysses
    return x.narrow(dim, groups.rank_of(group) * n, n).clone()


@seq_head_slice.register_fake
def _(x, dim, layout):
    shape = list(x.shape)
    shape[dim] //= layout[0]
    return x.new_empty(shape)


def _slice_backward(ctx, grad):
    lay = Layout.from_list(ctx.layout)
    group, _ = groups.subgroups(lay)
    whole = grad.new_zeros(ctx.shape)
    n = ctx.shape[ctx.dim] // lay.ulysses
    whole.narrow(ctx.dim, groups.rank_of(group) * n, n).copy_(grad)
    return whole, None, None


def _slice_setup(ctx, inputs, output):
    x, ctx.dim, ctx.layout = inputs
    ctx.shape = x.shape


seq_head_slice.register_autograd(_slice_backward, setup_context=_slice_setup)
