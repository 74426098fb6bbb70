"""The ``evict`` form end to end: the pass on the zoo, the evicting cache against dense and brute force, and its invariants."""

from __future__ import annotations

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.forms.evict.runtime import EvictModel
from longctx_compile.ops import evict as ops
from longctx_compile.presets import PRESETS

WINDOWED = {"tiny-mistral", "tiny-mixtral"}
SMALL = dict(sinks="2", window="4", interval="4")


@pytest.fixture(scope="module")
def compiled():
    return lcc.compile("tiny-llama", to="evict", budget="64", **SMALL)


def model(compiled, **overrides) -> EvictModel:
    return EvictModel(compiled.program.ep, compiled.program.signature, **overrides)


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - WINDOWED))
def test_every_family_gets_an_indexer_and_memory_and_stays_dense_over_its_own_input(preset):
    c = lcc.compile(preset, to="evict", budget="16", **SMALL)
    ops_seen = [n.target for n in c.program.gm.graph.nodes if n.op == "call_function"]
    assert ops_seen.count(torch.ops.longctx.evict_indexer.default) == ops_seen.count(torch.ops.longctx.evict_attention.default) == 2
    names = c.program.signature["evict"]["params"]["0"]
    indexer = {f"indexer.{p}.weight" for p in ("q_proj", "q_norm", "k_proj", "k_norm", "gate_proj")}
    memory = {"memory.phi.weight", "memory.gate.weight", "memory.gate.bias", "memory.decay", "memory.strength"}
    assert set(names) == indexer | memory and all(full.endswith(short) and full in c.program.ep.state_dict for short, full in names.items())
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(c(ids), c.original(ids).logits)


@pytest.mark.parametrize("preset", sorted(WINDOWED))
def test_sliding_window_models_are_refused_in_one_line(preset):
    with pytest.raises(LccError, match="sliding window .* evict refuses"):
        lcc.compile(preset, to="evict")


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize("policy", ["learned", "streaming", "snapkv", "oracle"])
def test_a_budget_at_least_the_length_gives_the_dense_logits_and_tokens(compiled, granularity, policy):
    m = model(compiled, policy=policy, granularity=granularity, observation=2)
    ids = torch.randint(0, 256, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    dense = compiled.original(ids, attention_mask=mask, position_ids=positions).logits
    first, cache = m.prefill(ids[:, :24], mask[:, :24], last=False)
    rest = m.forward(cache, ids[:, 24:], mask[:, 24:], positions[:, 24:])
    out = torch.cat([first, rest], 1)
    torch.testing.assert_close(out[mask.bool()], dense[mask.bool()])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    assert m.generate(prompts, 20) == lcc.compile("tiny-llama").generate(prompts, 20)


def test_eviction_compacts_to_the_budget_keeping_sinks_window_and_the_top_keys(compiled):
    m = model(compiled, budget="12", policy="oracle")
    ids = torch.randint(0, 256, (1, 30))
    _, cache = m.prefill(ids)
    for site in cache.sites.values():
        assert site.k.shape[2] == site.v.shape[2] == site.pos.shape[2] == 12  # physically smaller
        kept = site.pos[0, 0].tolist()
        assert kept[:2] == [0, 1] and kept[-4:] == [26, 27, 28, 29]
    # the oracle keeps the keys of highest true max-logit: recompute it from a dense run's q and k
    captured = {}

    def hook(site, call):
        captured[site] = (call.q, call.k, call.scale)
        return call()

    from longctx_compile.runtime.interpret import flat_inputs, with_site_hooks

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(30)[None]}
    with torch.no_grad():
        with_site_hooks(compiled.program.gm, hook)(*flat_inputs(compiled.program.ep, m.names, m.state, inputs))
    for site, (q, k, scale) in captured.items():
        want = ops.keep_positions(ops.teacher_importance(q, k, scale)[:, 0], 2, 4, 12)
        assert cache.sites[site].pos[0, 0].tolist() == want[0].tolist()


def test_streaming_keeps_the_sinks_and_the_most_recent_tokens(compiled):
    _, cache = model(compiled, budget="10", policy="streaming").prefill(torch.randint(0, 256, (1, 25)))
    assert cache.sites[0].pos[0, 0].tolist() == [0, 1, *range(17, 25)]


def test_snapkv_ranks_by_the_observation_windows_pooled_attention(compiled):
    m = model(compiled, budget="10", policy="snapkv", observation=3)
    ids = torch.randint(0, 256, (1, 25))
    _, cache = m.prefill(ids)
    site = m.prefill(ids, budget=10**6)[1].sites[1]  # the cache before any eviction
    B, Hkv, n, D = site.k.shape
    q = site.obs_q.view(1, Hkv, 2, 3, D)
    logits = torch.einsum("bhgod,bhnd->bhgon", q, site.k) * site.scale
    logits = logits.masked_fill(torch.arange(n)[None, :] > torch.arange(3)[:, None] + n - 3, float("-inf"))
    votes = logits.softmax(-1).mean(2).sum(2).mean(1, keepdim=True)
    pooled = torch.nn.functional.max_pool1d(votes, 7, stride=1, padding=3)
    assert cache.sites[1].pos[0, 0].tolist() == ops.keep_positions(pooled[:, 0], 2, 4, 10)[0].tolist()


def test_a_closed_gate_is_exactly_plain_eviction_and_the_memory_holds_the_evicted_entries(compiled):
    ids = torch.randint(0, 256, (2, 40))
    plain = model(compiled, budget="12", memory="off")
    logits_plain, _ = plain.prefill(ids[:, :30])
    more_plain = plain.forward(*_continue(plain, ids))
    closed = model(compiled, budget="12")
    closed.state = dict(closed.state)
    for site in closed.signature["evict"]["params"].values():
        closed.state[site["memory.gate.bias"]] = torch.full_like(closed.state[site["memory.gate.bias"]], float("-inf"))
    assert torch.equal(closed.forward(*_continue(closed, ids)), more_plain)
    # an open memory changes the continuation, and holds exactly the formula's M over the evicted entries
    opened = model(compiled, budget="12")
    opened.state = dict(opened.state)
    for site in opened.signature["evict"]["params"].values():
        opened.state[site["memory.gate.bias"]] = torch.zeros_like(opened.state[site["memory.gate.bias"]])
    cache, *rest = _continue(opened, ids)
    assert not torch.allclose(opened.forward(cache, *rest), more_plain)
    full = opened.prefill(ids[:, :30], budget=10**6)[1].sites[0]
    names = opened.signature["evict"]["params"]["0"]
    gone = [p for p in range(30) if p not in cache.sites[0].pos[0, 0].tolist()]
    phi_k = torch.nn.functional.linear(full.k[:1, :, gone], opened.state[names["memory.phi.weight"]])
    decay, strength = (torch.sigmoid(opened.state[names["memory.decay"]]), torch.nn.functional.softplus(opened.state[names["memory.strength"]]))
    M, b = ops.memory_write(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16), phi_k, full.v[:1, :, gone], decay, strength)
    torch.testing.assert_close(cache.sites[0].M[:1], M)
    torch.testing.assert_close(cache.sites[0].b[:1], b)


def _continue(m, ids):
    _, cache = m.prefill(ids[:, :30])
    return cache, ids[:, 30:], torch.ones_like(ids[:, 30:]), torch.arange(30, 40).expand(2, 10)


def test_peak_cache_memory_is_bounded_by_the_budget_not_the_length(compiled):
    peaks = {}
    for length in (96, 192):
        m = model(compiled, budget="24", prefill_chunk=8, interval=8)
        _, cache = m.prefill(torch.randint(0, 256, (1, length)))
        for token in torch.randint(0, 256, (40,)):
            m.extend(cache, token.view(1, 1), last=True)
            assert max(cache.lengths().values()) <= 24 + 8
        peaks[length] = cache.peak_bytes
    assert peaks[96] == peaks[192]  # the same bound at twice the length
    dense = model(compiled, budget="100000")
    _, cache = dense.prefill(torch.randint(0, 256, (1, 192)))
    assert cache.peak_bytes > 4 * peaks[192]


def test_ratio_budgets_follow_the_prompt_and_never_drop_the_pinned_keys(compiled):
    m = model(compiled, budget="0.25")
    _, cache = m.prefill(torch.randint(0, 256, (1, 80)))
    assert cache.budget == 20 and max(cache.lengths().values()) == 20
    assert model(compiled, budget="0").prefill(torch.randint(0, 256, (1, 80)))[1].budget == 6  # sinks + window


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(budget="6"), "must exceed sinks \\+ window = 6"),
        (dict(budget="1.5"), "a ratio lies in \\[0, 1\\)"),
        (dict(budget="lots"), "invalid --opt budget=lots"),
        (dict(policy="snapkv", observation="9"), "observation=9"),
        (dict(interval="0"), "interval=0"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(LccError, match=message):
        lcc.compile("tiny-llama", to="evict", **{**SMALL, **options})


def test_verify_judges_a_budget_at_least_the_length_and_reports_a_smaller_one():
    """Lengths come from the configuration too: with sinks 2 and window 4 verify adds a 45-token batch."""
    exact = lcc.verify("tiny-llama", to="evict", budget="64", **SMALL)
    assert exact.exact and exact.passed
    small = lcc.verify("tiny-llama", to="evict", budget="8", **SMALL)
    assert not small.exact and small.max_abs > 1e-3  # 16- and 33-token prompts lose keys: it really evicts


def test_an_hf_folder_converts(tmp_path):
    from longctx_compile.presets import build_preset

    build_preset("tiny-qwen3").save_pretrained(tmp_path / "hf")
    c = lcc.compile(str(tmp_path / "hf"), to="evict", budget="16", **SMALL)
    assert c.program.source["kind"] == "hf_folder" and len(c.generate([[1, 2, 3]], 4)[0]) == 4


def test_run_time_settings_are_parsed_as_convert_options():
    """EvictModel(prefill_chunk="256") was accepted and then failed in prefill with a TypeError."""
    compiled = lcc.compile("tiny-llama", to="evict", budget="0.25", **SMALL)
    model = EvictModel(compiled.program.ep, compiled.program.signature, prefill_chunk="8", memory="off", interval="3")
    assert (model.policy.prefill_chunk, model.policy.memory, model.policy.interval) == (8, False, 3)
    logits, _ = model.prefill(torch.randint(0, 256, (1, 20)))
    assert logits.shape[-1] == 256
    for bad, message in [({"prefill_chunk": "x"}, "expected an integer"), ({"sinks": "-1"}, "0 or more"), ({"memory": "maybe"}, "true or false")]:
        with pytest.raises(LccError, match=message):
            EvictModel(compiled.program.ep, compiled.program.signature, **bad)


def test_a_ratio_that_keeps_only_sinks_and_window_says_so(tmp_path):
    """budget=0.1 of a 64-token prompt is 7 keys, not above sinks + window = 10, which are kept: one warning line, not silence."""
    from longctx_compile.errors import LccWarning
    from tests.lcc_cli import run

    compiled = lcc.compile("tiny-llama", to="evict", budget="0.1", sinks="2", window="8", interval="4")
    model = EvictModel(compiled.program.ep, compiled.program.signature)
    with pytest.warns(LccWarning, match="not more than sinks \\+ window = 10: 10 are kept.*StreamingLLM"):
        model.prefill(torch.randint(0, 256, (1, 64)))
    compiled.save(tmp_path / "e.lcc")
    shown = run("generate", tmp_path / "e.lcc", "--prompt-ids", ",".join(["5"] * 64), "-n", "2")
    lines = [line for line in shown.stderr.splitlines() if "warning" in line]
    assert shown.returncode == 0 and len(lines) == 1 and lines[0].startswith("warning: budget 0.1 of a 64-token prompt"), shown.stderr
