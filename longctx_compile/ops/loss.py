"""``longctx::lm_head_loss``: the LM head and cross-entropy, a tile of rows at a time (ALST's tiled loss).

Full logits at 100K tokens and a 128K vocabulary are 51 GB in fp32; here only ``tile`` rows of
logits exist at once, in the forward and again in the backward, which recomputes each tile's
logits instead of saving them. Logits come out of the head in the model's dtype and the softmax
runs in fp32, as Hugging Face's loss does. Labels equal to ``ignore_index`` contribute nothing.
"""

from __future__ import annotations

import torch

IGNORE = -100  # label of a position without a target (Hugging Face's convention)


def lm_head_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """The definition: summed cross-entropy of ``linear(hidden, weight, bias)`` against ``labels`` (fp32)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def _tiles(hidden: torch.Tensor, labels: torch.Tensor, tile: int):
    rows, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    for start in range(0, rows.shape[0], tile):
        yield start, rows[start : start + tile], flat_labels[start : start + tile]


def _tile_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(h, weight, bias).float()


@torch.library.custom_op("longctx::lm_head_loss", mutates_args=())
def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, tile: int) -> torch.Tensor:
    """Summed cross-entropy of the LM head over ``hidden`` [..., H] against ``labels`` [...], ``tile`` rows at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for _, h, y in _tiles(hidden, labels, tile):
        logits = _tile_logits(h, weight, bias)
        valid = y != IGNORE
        target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
        total += torch.where(valid, torch.logsumexp(logits, dim=1) - target, 0.0).sum()
    return total


@lm_head_loss.register_fake
def _(hidden, weight, bias, labels, tile):
    return hidden.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ctx.tile = inputs
    ctx.save_for_backward(hidden, weight, bias, labels)


def _backward(ctx, grad):
    """d(loss)/d(logits) = softmax - one_hot(label) per valid row; each tile's logits are recomputed."""
    hidden, weight, bias, labels = ctx.saved_tensors
    d_hidden = torch.empty_like(hidden).reshape(-1, hidden.shape[-1])
    d_weight = torch.zeros_like(weight, dtype=torch.float32)
    d_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
    for start, h, y in _tiles(hidden, labels, ctx.tile):
        d_logits = torch.softmax(_tile_logits(h, weight, bias), dim=1)
        valid = y != IGNORE
        d_logits[torch.arange(len(y)), y.clamp(min=0)] -= 1.0
        d_logits = torch.where(valid[:, None], d_logits * grad, 0.0)
        d_hidden[start : start + len(y)] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        d_weight.addmm_(d_logits.t(), h.float())
        if d_bias is not None:
            d_bias += d_logits.sum(0)
    return (
        d_hidden.reshape(hidden.shape),
        d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
        None,
        None,
    )


lm_head_loss.register_autograd(_backward, setup_context=_setup_context)


def default_tile(vocab: int) -> int:
    """Rows per tile so one tile's fp32 logits take about 256 MiB (at least 128 rows)."""
    return max(128, (256 << 20) // (4 * vocab))
