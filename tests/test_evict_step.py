"""evict decodes through one step program (``forms/evict/step.py``): it equals the per-site Python path token by token,
caches included, through compactions and memory writes, and its exported form equals the runtime's."""

from __future__ import annotations

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.forms import derive
from longctx_compile.forms.evict.runtime import EvictModel
from longctx_compile.forms.evict.step import EvictStep

SMALL = dict(sinks="2", window="4", interval="4")


@pytest.fixture(scope="module")
def compiled():
    return lcc.compile("tiny-llama", to="evict", budget="12", **SMALL)


def hooks_extend(m: EvictModel, cache, token: torch.Tensor) -> torch.Tensor:
    """One token through the per-site Python hooks (the path a decode took before the step program)."""
    logits = m.forward(cache, token, torch.ones_like(token), cache.next_positions[:, None], last=True)
    cache.since += 1
    if cache.since >= m.policy.interval:
        m.evict(cache)
    return logits


def prompt():
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("memory", ["on", "off"])
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize("policy", ["learned", "oracle", "snapkv", "streaming"])
def test_the_step_equals_the_hooks_token_by_token_through_compactions(compiled, policy, granularity, memory):
    m = EvictModel(compiled.program.ep, compiled.program.signature, policy=policy, granularity=granularity, memory=memory, observation=3)
    ids, mask = prompt()
    (_, by_step), (_, by_hooks) = m.prefill(ids, mask), m.prefill(ids, mask)
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    for t in range(tokens.shape[1]):
        token = tokens[:, t : t + 1]
        torch.testing.assert_close(m.extend(by_step, token, last=True), hooks_extend(m, by_hooks, token))
    assert by_step.lengths() == by_hooks.lengths() and max(by_step.lengths().values()) > 12  # evicting layers compacted
    for site, c in by_hooks.sites.items():
        s = by_step.sites[site]
        for name in ("k", "v", "real", "pos", "score", "idx_k"):
            if c.part(name) is not None:
                torch.testing.assert_close(s.part(name), c.part(name), msg=f"site {site} {name}")
        if memory == "on" and site in m.evicting:
            torch.testing.assert_close((s.M, s.b), (c.M, c.b))
            assert c.M.abs().sum() > 0  # evicted keys were written
    assert not any(t.requires_grad for cache in (by_step, by_hooks) for c in cache.sites.values() for t in c.tensors())  # no graph kept


def test_generation_runs_through_the_step_not_the_hooks(compiled, monkeypatch):
    m = EvictModel(compiled.program.ep, compiled.program.signature)
    calls = {"step": 0}
    step = m.step.forward

    def counted(*args):
        calls["step"] += 1
        return step(*args)

    monkeypatch.setattr(m.step, "forward", counted)
    new = m.generate([[5, 6, 7, 8, 9, 10]], 6)
    assert len(new[0]) == 6 and calls["step"] == 5  # the first token comes from the prefill


@pytest.mark.parametrize("policy", ["learned", "snapkv"])
def test_the_exported_decode_program_equals_the_runtime_step(compiled, policy):
    m = EvictModel(compiled.program.ep, compiled.program.signature, policy=policy)
    ep = derive(compiled.program, "evict.decode") if policy == "learned" else None
    if ep is None:
        from longctx_compile.forms.evict.step import export_decode

        ep = export_decode(m)
    ids, mask = prompt()
    _, cache = m.prefill(ids, mask)
    for token in (3, 4, 5):  # past the interval: the program meets compacted caches too
        inputs, caches, slots = m.step_inputs(cache, torch.tensor([[token], [token + 1]]))
        functional = EvictStep(m.ep, m.names, m.policy.policy, m.policy.memory, m.groups)
        want = functional(m.state, inputs, [c.clone() for c in caches], slots)
        got = ep.module()(m.state, inputs, [c.clone() for c in caches], slots)
        torch.testing.assert_close(list(got), list(want))
        m.extend(cache, inputs["input_ids"])
