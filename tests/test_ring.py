"""Ring attention and the ``sp`` form on local ranks: logits, loss and gradients equal one process.

The ranks are threads of this process (``ranks="threads"``); the ring and the hybrid each run once on gloo
processes, and the traffic profile needs processes (one per rank).
"""

import json

import lcc_cli
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sp import Trainable, check_equal, odd_heads_model, single_process

import longctx_compile as lcc
from longctx_compile.distributed import Layout
from longctx_compile.distributed.ranks import profile, train_step
from longctx_compile.errors import LccError
from longctx_compile.ops.reference import attention_ref
from longctx_compile.ops.ring import merge

RING = torch.ops.longctx.ring_attention.default
A2A = torch.ops.longctx.seq_all_to_all.default


@pytest.mark.parametrize(
    "preset,form,options,ranks",
    [
        ("tiny-llama", "ring", dict(degree=2), "processes"),  # GQA, zigzag; on gloo processes
        ("tiny-llama", "ring", dict(degree=4), "threads"),  # GQA with more ranks than KV heads: the ring needs no replication
        ("tiny-gpt2", "ring", dict(degree=2, zigzag=False), "threads"),  # MHA, contiguous shards
        ("tiny-mistral", "ring", dict(degree=2), "threads"),  # sliding window across chunk borders
        ("tiny-llama", "sp", dict(hybrid="2x2"), "processes"),  # Ulysses over 2 ranks inside a ring of 2 (subgroups of gloo)
        ("tiny-llama", "sp", dict(hybrid="2x2"), "threads"),
    ],
)
def test_ring_equals_single_process(tmp_path, preset, form, options, ranks):
    compiled = lcc.compile(preset, to=form, **options)
    path = compiled.save(tmp_path / "sp.lcc")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    result = train_step(path, Layout.of(compiled.program.signature).degree, {"input_ids": ids}, ranks=ranks)
    check_equal(result, *single_process(compiled.original, ids))


def test_ring_with_packed_documents_and_padding(tmp_path):
    """Documents cross zigzag chunks and ranks; left padding is gathered in token order."""
    compiled = lcc.compile("tiny-llama", to="ring", degree=2, attention_mask=False)
    dense = lcc.compile(compiled.original, attention_mask=False)
    path = compiled.save(tmp_path / "sp.lcc")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(3), torch.arange(9), torch.arange(4)])[None]  # chunks are 4 tokens: every border is crossed
    result = train_step(path, 2, {"input_ids": ids, "position_ids": positions}, ranks="threads")
    check_equal(result, *single_process(Trainable(dense), ids, position_ids=positions, prefix="inner.model."))

    compiled = lcc.compile("tiny-qwen2", to="ring", degree=2)
    path = compiled.save(tmp_path / "pad.lcc")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    result = train_step(path, 2, {"input_ids": ids, "attention_mask": mask}, ranks="threads")
    logits, loss, grads = single_process(compiled.original, ids, mask, positions)
    check_equal(result, logits, loss, grads, valid=mask.bool())


def test_send_recv_per_layer(tmp_path):
    """Per layer: R-1 K/V passes forward, R backward (the last returns dK/dV home), as the design says."""
    compiled = lcc.compile("tiny-llama", to="ring", degree=4)
    layers = len(compiled.program.sites())
    nodes = compiled.program.attention_nodes()
    assert all(n.target is RING and n.meta["lcc"]["collectives"]["send_recv"] == 3 for n in nodes)
    assert [n.meta["lcc"]["collectives"]["all_gather"] for n in nodes] == [1] + [0] * (layers - 1)  # the key padding, once
    path = compiled.save(tmp_path / "sp.lcc")
    result = profile(path, 4, {"input_ids": torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))})
    from longctx_compile.forms.sp.rewrite import step_bytes

    site = compiled.program.sites()[0]
    for info in result["ranks"]:
        calls, sent = info["traffic"]["send_recv"]
        assert calls == layers * (3 + 4)
        assert sent == layers * step_bytes(site, Layout(ring=4, zigzag=True), 32)


def test_zigzag_balances_causal_work():
    """Zigzag gives every ring position the same number of visible (query, key) chunk pairs; contiguous does not."""
    from longctx_compile.ops.ring import SKIP, _pair_mask

    def work(layout):
        return [
            sum(
                _pair_mask(qc, kc, 4, True, 0, None, None, "cpu") is not SKIP for qc in layout.ring_chunks(me) for j in range(4) for kc in layout.ring_chunks(j)
            )
            for me in range(4)
        ]

    assert len(set(work(Layout(ring=4, zigzag=True)))) == 1
    assert work(Layout(ring=4, zigzag=False)) == [1, 2, 3, 4]


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(1, 2, False), (1, 2, True), (1, 4, True), (2, 2, True), (2, 1, False), (4, 1, False)]), st.integers(1, 3))
def test_layout_shards_and_unshards(spec, repeat):
    layout = Layout(*spec)
    length = layout.multiple * repeat
    x = torch.arange(length)[None]
    shards = [layout.shard(x, r) for r in range(layout.degree)]
    assert sorted(torch.cat(shards, 1)[0].tolist()) == list(range(length))
    torch.testing.assert_close(layout.unshard(torch.cat(shards, 1)), x)
    if layout.zigzag:
        first = torch.cat(shards[: layout.ulysses], 1)[0]  # ring position 0: the first and the last chunk
        assert first[0] == 0 and first[-1] == length - 1


def test_merge_equals_attention_over_all_keys():
    """Attention over keys split in two, merged by log-sum-exp, is attention over all of them (rows with no key stay 0)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    keep = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    keep[0, 0, 2] = False  # a query that sees nothing
    full, full_lse = attention_ref(q, k, v, mask=keep, causal=False)
    a = attention_ref(q, k[:, :, :4], v[:, :, :4], mask=keep[..., :4], causal=False)
    b = attention_ref(q, k[:, :, 4:], v[:, :, 4:], mask=keep[..., 4:], causal=False)
    out, lse = merge(*a, *b)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)


def test_sp_chooses_by_heads_and_bytes():
    """(g+1)/P decides: MHA at P=2 ties (Ulysses), GQA g=2 at P=2 is ring, at P=4 the hybrid sends least."""
    layouts = {}
    for preset, degree in [("tiny-gpt2", 2), ("tiny-llama", 2), ("tiny-llama", 4)]:
        program = lcc.compile(preset, to="sp", degree=degree).program
        layouts[preset, degree] = Layout.of(program.signature)
    assert layouts["tiny-gpt2", 2] == Layout(2, 1, False)
    assert layouts["tiny-llama", 2] == Layout(1, 2, True)
    assert layouts["tiny-llama", 4] == Layout(2, 2, True)
    # counting the backward too (inverse all-to-alls; the ring's fp32 dK/dV), Ulysses wins at P=2
    program = lcc.compile("tiny-llama", to="sp", degree=2, objective="step").program
    assert Layout.of(program.signature) == Layout(2, 1, False) and "training-step bytes" in program.signature["sequence_parallel"]["why"]
    program = lcc.compile(odd_heads_model(), to="sp", degree=2).program  # 6/3 heads: Ulysses cannot split 3 KV heads over 2
    assert Layout.of(program.signature) == Layout(1, 2, True) and "ulysses" not in program.signature["sequence_parallel"]["why"]
    assert {n.target for n in program.attention_nodes()} == {RING}


def test_bad_options_and_lengths(tmp_path):
    with pytest.raises(LccError, match="hybrid=2x2 makes 4 ranks, but degree=2"):
        lcc.compile("tiny-llama", to="sp", hybrid="2x2", degree=2)
    with pytest.raises(LccError, match="invalid --opt hybrid=2by2"):
        lcc.compile("tiny-llama", to="sp", hybrid="2by2")
    with pytest.raises(LccError, match="4 query heads are not divisible by the sequence-parallel degree 3"):
        lcc.compile("tiny-llama", to="sp", hybrid="3x1")
    with pytest.raises(LccError, match="ring degree must be at least 2"):
        lcc.compile("tiny-llama", to="ring", degree=1)
    with pytest.raises(LccError, match=r"sequence length 12 is not divisible by 8 \(2 × ring degree 4 × Ulysses degree 1\)"):
        Layout(ring=4, zigzag=True).shard(torch.zeros(1, 12), 0)
    path = lcc.compile("tiny-llama", to="ring", degree=2).save(tmp_path / "sp.lcc")
    with pytest.raises(Exception, match="converted for sequence-parallel degree 2, but the group has 1 ranks"):
        train_step(path, 1, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, ranks="threads")


def test_cli_verify_and_inspect_a_ring_artifact(tmp_path):
    path = tmp_path / "sp.lcc"
    result = lcc_cli.run("convert", "tiny-llama", "--to", "sp", "--opt", "degree=2", "-o", path)
    assert result.returncode == 0, result.stderr
    result = lcc_cli.run("verify", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and all(c["length"] % 4 == 0 for c in report["cases"])
    result = lcc_cli.run("inspect", path, "--seq-len", "4096", env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert "sequence parallel: ring: Hq=4, Hkv=2 (g=2), P=2" in result.stdout and "ring kv" in result.stdout and "ring (reference)" in result.stdout
    result = lcc_cli.run("inspect", path, "--seq-len", "4096", "--json")
    site = json.loads(result.stdout)["communication"]["sites"][0]
    d = 16  # tiny-llama: head dim 16, 2 KV heads, fp32; one pass of the other rank's half: 2048 tokens · 2 heads · (d + d)
    assert site["bytes_forward"] == {"kv": 1 * 2048 * 2 * (d + d) * 4}


def test_diff_shows_collectives_per_layer():
    """lcc diff counts what the sp pass inserted: four all-to-alls and one ring attention per layer, one shared gather."""
    compiled = lcc.compile("tiny-llama", to="sp", hybrid="2x2")
    ring = "ring attention (K/V send/recv)"
    per_layer = {"all-to-all": 4, ring: 1}
    assert lcc.diff(compiled, "canonicalize", "form").collectives() == {"global": {"all-gather": 1}, "layer 0": per_layer, "layer 1": per_layer}
    result = lcc_cli.run("diff", "tiny-llama", "--form", "ring", "--opt", "degree=2", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["collectives"]["layer 1"] == {ring: 1}
