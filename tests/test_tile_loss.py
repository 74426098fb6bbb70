"""tile_loss: the tiled LM head + cross-entropy equals the full-logits loss, alone and under sequence parallelism."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sp import check_equal, single_process

import longctx_compile as lcc
from longctx_compile.distributed import IGNORE
from longctx_compile.distributed.ranks import train_step
from longctx_compile.errors import LccError
from longctx_compile.ops.loss import lm_head_loss, lm_head_loss_ref
from longctx_compile.runtime.tile_loss import head_hidden


def shifted(ids):
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    return labels


@settings(max_examples=20, deadline=None)
@given(tile=st.integers(1, 20), bias=st.booleans(), seed=st.integers(0, 100))
def test_op_equals_reference(tile, bias, seed):
    """Loss and the gradients of hidden states, weight and bias equal cross_entropy(linear(...)) for any tile."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :3] = IGNORE
    leaves = [t for t in (hidden, weight, b) if t is not None]
    got = lm_head_loss(hidden, weight, b, labels, tile)
    want = lm_head_loss_ref(hidden, weight, b, labels)
    torch.testing.assert_close(got, want)
    for a, w in zip(torch.autograd.grad(got * 0.7, leaves), torch.autograd.grad(want * 0.7, leaves), strict=True):
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])  # untied head; head tied to the embedding
def test_model_loss_equals_full_logits(preset, tmp_path):
    compiled = lcc.compile(preset)
    body, weight, _ = head_hidden(compiled.module)
    heads = lambda gm: [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and n.args[1].target == weight]  # noqa: E731
    assert len(heads(compiled.module)) == 1 and not heads(body)  # the body stops before the head
    model = lcc.load(compiled.save(tmp_path / "m.lcc"))
    params = list(model.module.parameters())
    for p in params:
        p.requires_grad_(True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    total, count = model.loss(ids, shifted(ids), tile=5)
    full = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), shifted(ids).flatten(), ignore_index=IGNORE, reduction="sum")
    assert int(count) == 30
    torch.testing.assert_close(total, full)
    for a, w in zip(torch.autograd.grad(total, params), torch.autograd.grad(full, params), strict=True):
        torch.testing.assert_close(a, w)


def test_tiled_loss_under_ring_equals_single_process(tmp_path):
    """Each rank's tiled loss over its zigzag shard; the global mean and summed gradients equal one process."""
    compiled = lcc.compile("tiny-llama", to="ring", degree=2)
    path = compiled.save(tmp_path / "sp.lcc")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    result = train_step(path, 2, {"input_ids": ids, "tile": 3}, ranks="threads")
    logits, loss, grads = single_process(compiled.original, ids)
    assert result["logits"] is None
    check_equal(dict(result, logits=logits), logits, loss, grads)


def test_refuses_a_head_with_post_processing():
    class SoftCapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return torch.tanh(self.head(x))

    module = torch.export.export(SoftCapped(), (torch.randn(1, 3, 8),)).module()
    with pytest.raises(LccError, match="tile_loss needs logits straight from the LM head's linear layer, but they come from aten.tanh"):
        head_hidden(module)
    compiled = lcc.compile("tiny-llama")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(LccError, match="shift_labels must have the shape of input_ids"):
        compiled.loss(ids, ids[:, :2])
