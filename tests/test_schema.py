"""Named access to longctx op arguments (``ops.schema``) and the cache declarations (``ops.cache``)."""

import pytest
import torch

import longctx_compile  # noqa: F401  (registers the ops)
from longctx_compile.ops import ATTENTION_OPS
from longctx_compile.ops.cache import rule_of
from longctx_compile.ops.reference import attention_ref
from longctx_compile.ops.schema import Call, arg_names

ATTENTION = torch.ops.longctx.attention.default
MSA = torch.ops.longctx.msa_attention.default
HSA = torch.ops.longctx.hsa_attention.default


def qkv(T=5, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    return torch.randn(1, 4, T, 8, generator=g), torch.randn(1, 2, S, 8, generator=g), torch.randn(1, 2, S, 8, generator=g)


def test_arguments_are_read_by_their_schema_names():
    q, k, v = qkv()
    call = Call(MSA, (q, k, v, None, None, None, 0.5, True, 0, "rq", "rk"))
    assert call.router_q == "rq" and call["router_k"] == "rk" and call.scale == 0.5 and call.causal is True
    assert arg_names(MSA)[9:] == ("router_q", "router_k")
    with pytest.raises(AttributeError, match="no argument 'idx_q'"):
        _ = call.idx_q


def test_missing_arguments_take_their_schema_defaults():
    q, k, v = qkv()
    call = Call(HSA, (q, k, v, None, None, None, 0.5, 4, 2, 1, "landmark", "token", False))
    assert call.fusion == "softmax" and call.score_q is None and len(call.args()) == len(arg_names(HSA))


def test_replace_and_to_keep_every_other_argument():
    q, k, v = qkv()
    call = Call(MSA, (q, k, v, None, None, None, 0.5, True, 0, None, None))
    wider = call.replace(window=3)
    assert wider.window == 3 and call.window == 0 and wider.q is q
    canonical = call.to(ATTENTION)
    assert canonical.op is ATTENTION and canonical.args() == (q, k, v, None, None, None, 0.5, True, 0)
    with pytest.raises(TypeError, match="no argument"):
        call.replace(fwd_config=[1])
    torch.testing.assert_close(call.run(ATTENTION), attention_ref(q, k, v, scale=0.5, causal=True)[0])


def test_a_node_is_read_by_name_too():
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    node = graph.call_function(ATTENTION, (q, k, v, None, None, None, 0.25, False, 7))
    call = Call.of(node)
    assert call.k is k and call.window == 7 and call.causal is False


def test_every_attention_op_but_ring_declares_its_cache():
    declared = {op for op in ATTENTION_OPS if rule_of(op) is not None}
    assert declared == set(ATTENTION_OPS) - {torch.ops.longctx.ring_attention.default}
    assert type(rule_of(HSA)).__name__ == "HsaCache" and type(rule_of(MSA)).__name__ == "KeyValueCache"


@pytest.mark.parametrize("window", [0, 3])
def test_a_growing_and_a_static_step_equal_the_full_sequence(window):
    """The declared extension of one new token over cached keys equals the last row of attention over all keys."""
    q, k, v = qkv(T=7)
    full = attention_ref(q, k, v, scale=0.3, causal=True, window=window)[0]
    rule = rule_of(ATTENTION)
    step = Call(ATTENTION, (q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], None, None, None, 0.3, True, window))
    past = torch.ones(1, 6, dtype=torch.long)
    grown = rule.grow(step.replace(key_padding=torch.ones(1, 1, dtype=torch.long)), [k[:, :, :-1], v[:, :, :-1]], past)
    torch.testing.assert_close(grown(), full[:, :, -1:])
    slots = torch.tensor([6])
    garbage = [torch.cat([t[:, :, :-1], torch.full_like(t[:, :, -1:], 1e3)], 2) for t in (k, v)]  # the slot is overwritten
    written = rule.write(step, garbage, torch.cat([past, torch.zeros(1, 1, dtype=torch.long)], 1), slots)
    torch.testing.assert_close(written(), full[:, :, -1:])
    assert written.causal is False and written.window == 0
