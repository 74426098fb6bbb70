"""Artifacts: save_pretrained round trip in a fresh process, atomic writes, corrupt inputs, diffs."""

import json
import subprocess
import sys

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.presets import build_preset


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    build_preset("tiny-qwen2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def artifact(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "qwen.lcc"
    lcc.compile(str(hf_folder)).save(out)
    return out


def test_save_pretrained_round_trip_in_fresh_process(hf_folder, artifact, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch, longctx_compile as lcc\n"
        f"x = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"m = lcc.load({str(artifact)!r})\n"
        f"torch.save(m(x['ids'], x['mask']), {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    got = torch.load(tmp_path / "out.pt")
    model = AutoModelForCausalLM.from_pretrained(hf_folder, attn_implementation="sdpa").eval()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])
    manifest = json.loads((artifact / "lcc.json").read_text())
    assert manifest["source"]["kind"] == "hf_folder" and manifest["form"] == "dense"
    assert [h["name"] for h in manifest["history"]] == ["canonicalize", "lower"]
    assert manifest["stages"] == ["capture", "canonicalize", "form", "lower"]
    assert all(s["kernel"] == "longctx.attention/reference" for s in manifest["sites"])


def test_verify_artifact_rebuilds_source(artifact):
    report = lcc.verify(str(artifact))
    assert report.passed and report.top1 == 1.0
    assert any(c.length == 1 for c in report.cases) and any(c.padded for c in report.cases)


def test_refuses_overwrite_and_input(hf_folder, artifact):
    compiled = lcc.compile("tiny-llama")
    before = (artifact / "lcc.json").read_text()
    with pytest.raises(LccError, match="already exists"):
        compiled.save(artifact)
    assert (artifact / "lcc.json").read_text() == before
    with pytest.raises(LccError, match="would overwrite the input"):
        lcc.compile(str(hf_folder)).save(hf_folder, force=True)
    assert (hf_folder / "config.json").is_file()


def test_force_replaces_atomically(tmp_path):
    out = tmp_path / "a.lcc"
    compiled = lcc.compile("tiny-gpt2")
    compiled.save(out)
    compiled.save(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lcc"]
    assert lcc.load(out)(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)


def test_corrupt_artifacts(tmp_path):
    out = tmp_path / "c.lcc"
    lcc.compile("tiny-gpt2").save(out)
    program = out / "model.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(LccError, match="does not match its checksum"):
        lcc.load(out)
    (out / "lcc.json").write_text("{not json")
    with pytest.raises(LccError, match="not valid JSON"):
        lcc.load(out)
    with pytest.raises(LccError, match="no such artifact"):
        lcc.load(tmp_path / "missing")


def test_loaded_model_input_errors(artifact):
    model = lcc.load(artifact)
    with pytest.raises(LccError, match="token ids must be in"):
        model(torch.tensor([[1, 999]]))
    with pytest.raises(LccError, match="outside the program's range"):
        model(torch.zeros(1, 600, dtype=torch.long))


def test_diff_associates_nodes_by_layer(artifact, tmp_path):
    d = lcc.diff(str(artifact), "capture", "canonicalize", layer=1)
    added = [c for c in d.changes if c.kind == "added"]
    assert len(added) == 1 and added[0].target == "longctx.attention" and added[0].layer == 1
    assert any(c.kind == "removed" and c.target == "aten.scaled_dot_product_attention" for c in d.changes)
    assert any(c.kind == "rewired" for c in d.changes)
    assert set(added[0].replaces) <= {c.id for c in d.changes if c.kind == "removed"}
    whole = lcc.diff(str(artifact))
    assert whole.count("added") == 2 and [p["name"] for p in whole.passes] == ["canonicalize", "lower"]
    from longctx_compile.inspect.page import render_html
    from longctx_compile.inspect.render import render_dot, render_json

    page = render_html(d)
    assert page.count("<svg") == 2 and "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained: no network
    assert json.loads(render_json(d))["summary"]["added"] == 1
    assert render_dot(d).startswith("digraph")


def test_an_artifact_of_another_format_version_is_refused_in_one_line(artifact, tmp_path):
    import shutil

    old = tmp_path / "old.lcc"
    shutil.copytree(artifact, old)
    manifest = json.loads((old / "lcc.json").read_text())
    for version, says in ((1, "an older lcc wrote it; re-convert"), (99, "a newer lcc wrote it")):
        manifest["format_version"] = version
        (old / "lcc.json").write_text(json.dumps(manifest))
        with pytest.raises(LccError, match=says):
            lcc.load(old)


def test_programs_live_in_namespaces_and_short_names_resolve_when_unique(artifact):
    from longctx_compile import artifact as art

    manifest = art.read_manifest(artifact)
    assert art.program_files(manifest) == {"model": "model.pt2"}  # stored; the KV-cache steps are derived from it
    assert art.program_names(manifest) == ["model", "kv_cache.prefill", "kv_cache.decode", "kv_cache.static"]
    assert art.resolve_program(manifest, "decode") == "kv_cache.decode"
    ambiguous = {**manifest, "programs": {**manifest["programs"], "msa": {"decode": "msa/decode.pt2"}}}
    with pytest.raises(LccError, match=r"several programs named 'decode': say which \(msa.decode, kv_cache.decode\)"):
        art.resolve_program(ambiguous, "decode")
    with pytest.raises(LccError, match="no program 'query'"):
        art.resolve_program(manifest, "query")


def test_inspect_shows_the_programs_and_the_kv_cache(artifact):
    import lcc_cli

    result = lcc_cli.run("inspect", str(artifact), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["programs"] == {"stored": ["model"], "derived": {"kv_cache": ["prefill", "decode", "static"]}}
    assert info["cache"] == {"stored": [["k", "v"], ["k", "v"]]} and info["cache_note"] is None
    text = lcc_cli.run("inspect", str(artifact)).stdout
    assert "KV cache: k+v per key at each of 2 sites" in " ".join(text.split())


PLAIN_TORCH = """
import sys
import torch
ep = torch.export.load(sys.argv[1])
inputs = torch.load(sys.argv[2])
torch.save(ep.module()(**inputs), sys.argv[3])
assert not any(name.startswith("longctx_compile") for name in sys.modules)
"""


@pytest.mark.parametrize("form,options", [("dense", {}), ("hsa", {"score": "exact", "topk": "all", "chunk": "4"}), ("hsa", {"chunk": "4", "topk": "1"})])
def test_a_portable_pt2_runs_in_plain_torch_and_equals_the_artifact(tmp_path, form, options):
    """``lcc export-pt2``: the model program with aten ops only, loaded by torch.export.load in an interpreter without lcc."""
    import lcc_cli

    path = lcc.compile("tiny-llama", to=form, **options).save(tmp_path / "m.lcc")
    result = lcc_cli.run("export-pt2", str(path), "-o", str(tmp_path / "m.pt2"))
    assert result.returncode == 0, result.stderr
    ids = torch.randint(0, 256, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    torch.save(inputs, tmp_path / "inputs.pt")
    command = [sys.executable, "-c", PLAIN_TORCH, str(tmp_path / "m.pt2"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got[mask.bool()], lcc.load(path)(**inputs)[mask.bool()])


def test_a_program_with_collectives_has_no_portable_form(tmp_path):
    import lcc_cli

    path = lcc.compile("tiny-llama", to="ring", degree=2).save(tmp_path / "r.lcc")
    result = lcc_cli.run("export-pt2", str(path), "-o", str(tmp_path / "r.pt2"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "cannot export to a portable program: longctx::seq_all_gather" in lines[0], result.stderr
    assert not (tmp_path / "r.pt2").exists()


def write_tiny_gguf(path):
    """A 2-layer Llama written as GGUF with the gguf package (tensor names and metadata as llama.cpp writes them)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    hidden, ffn, vocab, layers = 32, 64, 64, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(8)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"▁w{i}".encode() for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0)).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    add("output_norm.weight", hidden)
    add("output.weight", vocab, hidden)
    for i in range(layers):
        for name, shape in (
            ("attn_norm", (hidden,)),
            ("ffn_norm", (hidden,)),
            ("attn_q", (hidden, hidden)),
            ("attn_k", (16, hidden)),
            ("attn_v", (16, hidden)),
        ):
            add(f"blk.{i}.{name}.weight", *shape)
        for name, shape in (("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            add(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_converts_verifies_and_brings_its_tokenizer(tmp_path):
    import lcc_cli
    from transformers import AutoModelForCausalLM

    from longctx_compile.runtime.tokenizer import tokenizer_for

    for package in ("gguf", "accelerate"):
        pytest.importorskip(package, reason=f"reading GGUF files needs the {package} package (the [gguf] extra)")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    result = lcc_cli.run("convert", str(tmp_path / "tiny.gguf"), "-o", str(tmp_path / "g.lcc"), "--verify")
    assert result.returncode == 0 and "PASS" in result.stdout, result.stderr
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()  # transformers' own reading
    ids = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(lcc.load(tmp_path / "g.lcc")(input_ids=ids), reference(ids).logits)
    manifest = json.loads((tmp_path / "g.lcc" / "lcc.json").read_text())
    assert manifest["source"]["kind"] == "gguf"
    tokenizer = tokenizer_for(manifest)
    assert tokenizer.decode([5, 6]).strip() == "w5 w6"  # the file's own vocabulary
