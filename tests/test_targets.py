"""Targets, tile-config choice, autotune caching, and the ``lower`` pass binding the Triton kernels."""

import itertools
import json

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.kernels import attention as kernel_module
from longctx_compile.ops.schema import Call
from longctx_compile.targets import TARGETS, autotune, configs, get_target, tiles
from longctx_compile.targets.configs import KINDS, Shape, choose
from longctx_compile.targets.tiles import MAX_REGISTERS, TileConfig, registers_per_thread, smem_bytes
from longctx_compile.testing import assert_equivalent

GPU_TARGETS = [name for name, t in TARGETS.items() if t.kernels == "triton"]
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 160, 192, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_chosen_configs_fit_the_targets_shared_memory(name):
    """For every supported head dim, dtype and GQA group the chosen tiles fit, by the kernels' formula."""
    target = get_target(name)
    for d, dtype, group in itertools.product(HEAD_DIMS, DTYPES, (1, 4, 8)):
        shape = Shape(d, d, dtype, group, 8 // group)
        chosen = choose(target, shape)
        for kind in KINDS:
            cfg = getattr(chosen, kind)
            need = smem_bytes(kind, cfg, d, d, dtype)
            assert need <= target.smem_per_block, f"{name} {kind} d={d} {dtype}: {cfg} needs {need} > {target.smem_per_block}"
            assert registers_per_thread(kind, cfg, d, d, dtype) <= MAX_REGISTERS
            if target.capability is not None:
                assert cfg.num_stages >= 2, f"{name} {kind} d={d} {dtype}: {cfg} does not pipeline"


def test_one_formula_for_chooser_and_launcher():
    assert configs.smem_bytes is tiles.smem_bytes and kernel_module.smem_bytes is tiles.smem_bytes


def test_large_head_dims_on_99kb_parts_get_smaller_tiles():
    """FlexAttention's default tiles overflow SM86/SM89 at head dim 192; ours shrink to fit."""
    small, big = get_target("rtx4090"), get_target("h100")
    for d in (192, 256):
        shape = Shape(d, d, torch.bfloat16, 4, 8)
        on_small, on_big = choose(small, shape).fwd, choose(big, shape).fwd
        assert on_small.block_m * on_small.block_n < on_big.block_m * on_big.block_n
        assert smem_bytes("fwd", on_small, d, d, torch.bfloat16) <= 99 * 1024


def test_vendor_figures():
    h100, a100, l40s, b200 = (get_target(n) for n in ("h100", "a100-40gb", "l40s", "b200"))
    assert (h100.arch, h100.sms, h100.smem_per_block, h100.tflops["bf16"], h100.bandwidth_gbs) == ("sm_90", 132, 232448, 989.4, 3350)
    assert (a100.arch, a100.smem_per_block, a100.memory_gb, "fp8" in a100.tflops) == ("sm_80", 166912, 40, False)
    assert (l40s.arch, l40s.smem_per_block, l40s.sms) == ("sm_89", 101376, 142)
    assert ("tma" in b200.features, b200.sms, "wgmma" in l40s.features) == (True, 148, False)
    assert {"a100-40gb", "a100-80gb", "a800", "h100", "h200", "l40s", "rtx4090", "b200", "cpu", "interpret"} <= set(TARGETS)


def test_unknown_target_and_aliases():
    assert get_target("A100").name == "a100-80gb" and get_target("4090").name == "rtx4090"
    with pytest.raises(LccError, match=r"unknown target 'h900'; known targets: cpu, interpret, a100-40gb"):
        get_target("h900")


def test_override_that_does_not_fit_says_the_numbers():
    target, shape = get_target("rtx4090"), Shape(128, 128, torch.bfloat16)
    base = choose(target, shape)
    # bf16: Q 128x128 + 3 stages of K,V 128x(128+128) + P 128x128 = 131072 elements = 262144 bytes
    with pytest.raises(LccError, match=r"fwd tile config 128x128 w8 s3 needs 262144 bytes of shared memory for head dim 128 bfloat16; rtx4090 allows 101376"):
        configs.override(base, target, shape, {"fwd": {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}})
    with pytest.raises(LccError, match="powers of two"):
        configs.override(base, target, shape, {"bwd": {"block_n": 48}})
    kept = configs.override(base, target, shape, {"fwd": {"block_m": 32}})
    assert kept.fwd == TileConfig(32, base.fwd.block_n, base.fwd.num_warps, base.fwd.num_stages) and kept.bwd == base.bwd and kept.source == "override"


def test_autotune_needs_a_matching_gpu(monkeypatch):
    assert "needs a GPU target" in autotune.unavailable(get_target("interpret"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in autotune.unavailable(get_target("h100"))


def test_autotune_times_candidates_and_caches_the_winner(tmp_path):
    target, shape = get_target("h100"), Shape(128, 128, torch.bfloat16, 4, 2)
    path, calls = tmp_path / "autotune.json", []

    def bench(kind, fwd, cfg):  # a stand-in timer: smaller tiles win, so the winner is not the heuristic pick
        calls.append((kind, cfg))
        return cfg.block_m * cfg.block_n + cfg.num_stages

    tuned, hit = autotune.tune(target, shape, "key", bench, path)
    ranked = {kind: configs.candidates(kind, target, shape)[: autotune.TOP_CANDIDATES] for kind in KINDS}
    assert not hit and tuned.source == "autotune"
    assert tuned.fwd == min(ranked["fwd"], key=lambda c: bench("fwd", None, c)) != choose(target, shape).fwd
    assert {c for k, c in calls if k == "bwd"} == set(ranked["bwd"])
    assert json.loads(path.read_text())["key"]["fwd"] == tuned.fwd.as_list()
    calls.clear()
    again, hit = autotune.tune(target, shape, "key", bench, path)
    assert hit and again == tuned and not calls


def test_lower_binds_flash_attention_with_configs_per_site():
    compiled = lcc.compile("tiny-llama", target="h100")
    ops = {n.target for n in compiled.program.gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.longctx.flash_attention.default in ops and torch.ops.longctx.attention.default not in ops
    expected = choose(get_target("h100"), Shape(16, 16, torch.float32, 2, 2, 512))
    for site in compiled.program.sites():
        assert site["kernel"] == "longctx.flash_attention/triton" and site["target"] == "h100"
        assert site["config"]["fwd"] == expected.fwd.as_list() and site["config"]["bwd"] == expected.bwd.as_list()
        assert site["config"]["smem"]["fwd"] == smem_bytes("fwd", expected.fwd, 16, 16, torch.float32)
    node = compiled.program.attention_nodes()[0]
    call = Call.of(node)
    assert call.fwd_config == expected.fwd.as_list() and call.bwd_config == expected.bwd.as_list()
    assert compiled.program.history[-1].config["target"] == "h100"
    diff = lcc.diff(compiled, "canonicalize", "lower", layer=0)
    added = {c.target: c for c in diff.changes if c.kind == "added"}
    (removed,) = [c for c in diff.changes if c.kind == "removed"]
    assert removed.target == "longctx.attention" and added["longctx.flash_attention"].replaces == [removed.id]


def test_lower_on_cpu_keeps_the_reference():
    compiled = lcc.compile("tiny-llama")
    assert all(s["kernel"] == "longctx.attention/reference" and "config" not in s for s in compiled.program.sites())


def test_lower_overrides_and_refusals():
    compiled = lcc.compile("tiny-llama", target="l40s", fwd_block_m=32, bwd_stages=1)
    config = compiled.program.sites()[0]["config"]
    assert config["fwd"][0] == 32 and config["bwd"][3] == 1 and config["source"] == "override"
    with pytest.raises(LccError, match=r"needs \d+ bytes of shared memory .* l40s allows 101376"):
        lcc.compile("tiny-llama", target="l40s", fwd_block_m=128, fwd_block_n=128, fwd_stages=4)
    with pytest.raises(LccError, match="--target"):
        lcc.api.compile_model("tiny-llama", options={"target": "h100"})


def test_lower_autotune_without_gpu_keeps_heuristic_with_a_note(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the no-GPU path, on any machine
    compiled = lcc.compile("tiny-llama", target="h100", autotune=True)
    assert compiled.program.sites()[0]["config"]["source"] == "heuristic"
    assert any("autotune skipped" in note for note in compiled.program.history[-1].notes)


class WideHeads(torch.nn.Module):
    """One causal attention layer with a head dim of 320, beyond the kernels' 256."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 640)
        self.qkv = torch.nn.Linear(640, 3 * 640)
        self.head = torch.nn.Linear(640, 64)

    def forward(self, input_ids):
        B, T = input_ids.shape
        q, k, v = (t.view(B, T, 2, 320).transpose(1, 2) for t in self.qkv(self.embed(input_ids)).split(640, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).reshape(B, T, 640))


def test_unsupported_head_dim_refused_unless_fallback_is_asked():
    model = WideHeads()
    with pytest.raises(LccError, match=r"layer 0 .*head dim 320 is larger than the Triton attention kernels support \(256\); pass --opt fallback=reference"):
        lcc.compile(model, target="h100", max_len=32)
    compiled = lcc.compile(model, target="h100", max_len=32, fallback="reference")
    site = compiled.program.sites()[0]
    assert site["kernel"] == "longctx.attention/reference" and "320" in site["fallback"]
    assert_equivalent(model, compiled, lengths=(1, 9))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral"])
def test_interpret_artifact_matches_the_original(preset, tmp_path):
    """A dense artifact lowered for ``interpret`` runs the Triton kernels and gives the original's logits."""
    compiled = lcc.compile(preset, target="interpret")
    path = compiled.save(tmp_path / "model.lcc")
    loaded = lcc.load(path)
    manifest = loaded.manifest
    assert manifest["target"] == "interpret" and all(s["kernel"] == "longctx.flash_attention/triton" for s in manifest["sites"])
    assert all(set(s["config"]) == {"fwd", "bwd", "smem", "source"} for s in manifest["sites"])
    report = lcc.verify(compiled.original, loaded, lengths=(1, 7, 33))
    assert report.passed, report.to_json()
    ids = torch.randint(0, 256, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        reference = lcc.compile(preset)(ids, attention_mask=mask)
        torch.testing.assert_close(loaded(ids, attention_mask=mask)[mask.bool()], reference[mask.bool()])


def test_load_onto_a_device_moves_weights_and_graph_devices(tmp_path):
    """``lcc.load(path, device=...)`` rewrites the device literals export baked in (checked on meta here)."""
    path = lcc.compile("tiny-llama", target="h100").save(tmp_path / "m.lcc")
    loaded = lcc.load(path, device="meta")
    assert {p.device.type for p in loaded.module.parameters()} == {"meta"}
    ids = torch.zeros(2, 9, dtype=torch.long, device="meta")
    out = loaded.module(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(9, device="meta").expand(2, 9))
    assert out.device.type == "meta" and tuple(out.shape) == (2, 9, 256)
