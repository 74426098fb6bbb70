"""ONNX export: onnxruntime on one exported file equals the PyTorch artifact at two sequence lengths, for the dense
form on zoo families and for every sparse form; onnx.checker passes; the file runs in a fresh process; bad input
gets one line."""

from __future__ import annotations

import json
import subprocess
import sys

import lcc_cli
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from test_custom import PrefixLM

import longctx_compile as lcc
from longctx_compile import artifact
from longctx_compile.artifact import read_model_program as artifact_program
from longctx_compile.errors import LccError
from longctx_compile.forms import derive
from longctx_compile.forms.evict.runtime import EvictModel
from longctx_compile.forms.evict.step import EvictStep
from longctx_compile.forms.msa.programs import padded_table
from longctx_compile.forms.msa.runtime import MsaModel
from longctx_compile.onnx import check
from longctx_compile.onnx import export as export_module
from longctx_compile.onnx.export import export_onnx

pytestmark = pytest.mark.slow  # the slow tier: python -m pytest -m 'not slow' leaves it out


def exported(tmp_path, model, name="m", custom=False, program="model", opset=18, **options):
    """(artifact folder, .onnx file, report) of ``model`` compiled with ``options`` and exported."""
    path = lcc.compile(model, **options).save(tmp_path / f"{name}.lcc")
    out = tmp_path / f"{name}.onnx"
    report = export_onnx(path, out, program=program, custom=custom, opset=opset)
    onnx.checker.check_model(str(out), full_check=not custom)
    return path, out, report


def assert_equal_at_two_lengths(path, out, lengths=None):
    rows = check.compare(path, out, lengths)
    assert len({r["length"] for r in rows}) == 2, rows
    assert all(r["ok"] for r in rows), rows
    return rows


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mistral", "tiny-gemma", "tiny-phi"])
def test_dense_zoo(tmp_path, preset):
    path, out, report = exported(tmp_path, preset)
    assert report.ops["longctx::attention"]["as"] == "standard"
    assert report.inputs["input_ids"] == ["batch", "sequence"] and report.outputs["logits"][:2] == ["batch", "sequence"]
    assert not any(op.startswith("longctx") for op in report.onnx_ops)
    lengths = (7, 19) if preset != "tiny-mistral" else (5, 23)  # mistral: past its sliding window of 8
    assert_equal_at_two_lengths(path, out, lengths)


def test_opset_23_uses_the_attention_operator(tmp_path):
    """From opset 23 the attention ops become ONNX's Attention under the visibility mask: a sliding window with
    padding (mistral) and an arbitrary prefix-LM mask still equal the artifact."""
    path, out, report = exported(tmp_path, "tiny-mistral", "mistral", opset=23)
    assert report.onnx_ops.get("Attention") == 2 and "MatMul" in report.onnx_ops  # the projections stay MatMul
    assert_equal_at_two_lengths(path, out, (5, 23))
    path, out, report = exported(tmp_path, PrefixLM().eval(), "prefix", opset=23, max_len=32)
    assert report.onnx_ops.get("Attention") == 1
    assert_equal_at_two_lengths(path, out, (4, 9))


def test_packed_documents_and_arbitrary_masks(tmp_path):
    path, out, report = exported(tmp_path, "tiny-llama", "docs", attention_mask=False)
    assert "longctx::doc_ids" in report.ops
    session = onnxruntime.InferenceSession(str(out))
    program = lcc.load(path)
    for positions in ([0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7]):
        pos = torch.tensor([positions])
        ids = torch.randint(0, 256, pos.shape)
        got = session.run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), program(ids, position_ids=pos))
    path, out, report = exported(tmp_path, PrefixLM().eval(), "prefix", max_len=32)
    assert_equal_at_two_lengths(path, out, (4, 9))


@pytest.mark.parametrize(
    "options",
    [
        dict(chunk=4, topk=2, window=1),  # landmark scores, per-token selection, softmax fusion
        dict(chunk=4, topk=1, window=0, score="learned", select="block", fusion="stick", sink=True, nope=True),
        dict(chunk=4, topk="all", window=1, score="exact"),  # equals dense
        dict(chunk=4, topk=1, window=1, heads="each", rerank=2),  # K/V repeated per query head: each head selects, reranked by true LSE
        dict(chunk=4, topk=1, window=1, score="learned", landmarks=3),  # learned scores over 3 attention-pooled landmarks per chunk
    ],
)
def test_hsa(tmp_path, options):
    path, out, report = exported(tmp_path, "tiny-llama", to="hsa", **options)
    assert report.ops["longctx::hsa_attention"]["count"] == 2
    assert "TopK" in report.onnx_ops or options["topk"] == "all"
    assert_equal_at_two_lengths(path, out)  # 6 and 19 tokens: the longer retrieves chunks past the local window


def test_hsa_kernel_artifact(tmp_path):
    """A GPU-target artifact holds the Triton-bound op (hsa_flash); it leaves as the HSA it implements."""
    path, out, report = exported(tmp_path, "tiny-llama", to="hsa", target="h100", chunk=16, topk=2, window=1)
    assert list(report.ops) == ["longctx::hsa_flash"]
    assert_equal_at_two_lengths(path, out, (9, 45))


def test_evict_returns_indexer_importance(tmp_path):
    path, out, report = exported(tmp_path, "tiny-llama", to="evict")
    assert {"longctx::evict_indexer", "longctx::evict_importance", "longctx::evict_attention"} <= set(report.ops)
    assert list(report.outputs) == ["logits", "importance_0", "importance_1"]
    assert report.outputs["importance_0"] == ["batch", 1, "sequence"]
    rows = assert_equal_at_two_lengths(path, out)
    assert {r["output"] for r in rows} == {"logits", "importance_0", "importance_1"}


def test_evict_decode_step(tmp_path):
    """The evict decode step program in onnxruntime equals the runtime's step over caches it compacted."""
    path = lcc.compile("tiny-llama", to="evict", budget="12", sinks="2", window="4", interval="4").save(tmp_path / "e.lcc")
    out = tmp_path / "decode.onnx"
    report = export_onnx(path, out, program="evict.decode")
    assert list(report.outputs)[:6] == ["logits", "k_0", "v_0", "real_0", "score_0", "idx_k_0"]
    loaded = lcc.load(path)
    model = EvictModel(loaded.program, loaded.signature)
    session = onnxruntime.InferenceSession(str(out))
    names = [i.name for i in session.get_inputs()]
    _, cache = model.prefill(torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0)))
    for token in range(3):  # the first step meets a cache compacted by the prefill; the others a growing one
        inputs, caches, slots = model.step_inputs(cache, torch.tensor([[token], [token + 7]]))
        functional = EvictStep(model.ep, model.names, model.policy.policy, model.policy.memory, model.groups)
        want = functional(model.state, inputs, [c.clone() for c in caches], slots)
        flat = [*inputs.values(), *caches, *slots]
        got = session.run(None, dict(zip(names, [t.contiguous().numpy() for t in flat], strict=True)))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(torch.from_numpy(a), b)
        model.extend(cache, inputs["input_ids"])


@pytest.mark.parametrize("score", ["cosine", "headwise"])
def test_msa_model_and_query_time_routing(tmp_path, score):
    """The query program with the paper's routing op (cosine, per layer) and with the retrofit's (headwise scores in
    plain ops, the lower layers' shared vote, contiguous positions: the documents moved by the model's own RoPE)."""
    route = "layer" if score == "cosine" else "lower"
    path, out, report = exported(tmp_path, "tiny-llama", to="msa", pool=2, topk="2", routed_layers="all", score=score, route=route)
    assert_equal_at_two_lengths(path, out)
    query_onnx = tmp_path / "query.onnx"
    report = export_onnx(path, query_onnx, program="query")
    onnx.checker.check_model(str(query_onnx), full_check=True)
    assert ({"longctx::msa_route", "longctx::attention"} if score == "cosine" else {"longctx::attention"}) <= set(report.ops)
    assert list(report.outputs)[:3] == ["logits", "docs_0", "scores_0"]
    loaded = lcc.load(path)
    model = MsaModel(loaded.program, loaded.signature)
    query = derive(artifact_program(path, loaded.manifest), "msa.query").module()
    session = onnxruntime.InferenceSession(str(query_onnx))
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(0)
    for docs, T in (((3, 8, 5), 5), ((4, 2, 9, 6, 3), 11)):  # two banks and two question lengths, one file
        bank = model.encode([torch.randint(0, 256, (n,), generator=g).tolist() for n in docs])
        question = torch.randint(0, 256, (2, T), generator=g)
        mask, positions = torch.ones_like(question), torch.arange(T).expand(2, T) + 2
        tensors = [[getattr(bank, name)[site] for site in bank.layers] for name in ("router_keys", "keys", "values")]
        table = padded_table(bank.doc_chunks(), 2)
        want = query(model.state, question, mask, positions, *tensors, bank.chunk_doc, table)
        flat = [question, mask, positions, *[t for group in tensors for t in group], bank.chunk_doc, table]
        got = session.run(None, dict(zip(names, [t.numpy() for t in flat], strict=True)))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(torch.from_numpy(a), b)


def test_msa_encode(tmp_path):
    """The encode program, exported with [docs, chunks, pool] inputs, pools as the saved program does."""
    path = lcc.compile("tiny-llama", to="msa", pool=2, topk="2", routed_layers="all").save(tmp_path / "m.lcc")
    out = tmp_path / "encode.onnx"
    report = export_onnx(path, out, program="encode")
    onnx.checker.check_model(str(out), full_check=True)
    assert report.inputs["input_ids"] == ["docs", "chunks", 2] and list(report.outputs)[:2] == ["keys_0", "keys_count_0"]
    loaded = lcc.load(path)
    encode = derive(artifact_program(path, loaded.manifest), "msa.encode").module()
    state = MsaModel(loaded.program, loaded.signature).state
    session = onnxruntime.InferenceSession(str(out))
    for docs, chunks in ((3, 5), (1, 2)):
        ids, real = torch.randint(0, 256, (docs, chunks, 2)), torch.ones(docs, chunks, 2, dtype=torch.long)
        real[0, -1, 1] = 0  # a partial last chunk
        want = encode(state, ids.flatten(1), real.flatten(1))
        got = session.run(None, {"input_ids": ids.numpy(), "real": real.numpy()})
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(torch.from_numpy(a), b)


def test_custom_domain_nodes(tmp_path):
    path, out, report = exported(tmp_path, "tiny-llama", to="hsa", custom=True, chunk=4, topk=2, window=1)
    assert report.ops["longctx::hsa_attention"]["as"] == "longctx::hsa_attention"
    model = onnx.load(str(out))
    assert {(o.domain, o.version) for o in model.opset_import} >= {("longctx", 1)}
    nodes = [n for n in model.graph.node if n.domain == "longctx"]
    assert [n.op_type for n in nodes] == ["hsa_attention", "hsa_attention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["chunk"] == 4 and attrs["topk"] == 2 and attrs["window"] == 1 and attrs["mode"] == b"bound" and attrs["fusion"] == b"joint"
    assert len(nodes[0].input) == 4 and nodes[0].input[3] == "attention_mask"  # q, k, v, key padding
    assert not any(n.op_type in ("TopK", "Softmax") for n in model.graph.node)  # no standard translation beside them


def test_runs_in_a_fresh_process(tmp_path):
    """The file alone (no lcc import, a new interpreter) runs in onnxruntime and gives the artifact's logits."""
    path, out, _ = exported(tmp_path, "tiny-qwen2")
    program = lcc.load(path)
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1])\n"
        "for n in (5, 12):\n"
        "    ids = (np.arange(2 * n).reshape(2, n) * 7 % 256).astype(np.int64)\n"
        "    feed = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'position_ids': np.tile(np.arange(n), (2, 1))}\n"
        "    np.save(sys.argv[2] + f'/{n}.npy', s.run(None, feed)[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "longctx_compile" not in done.stderr
    for n in (5, 12):
        ids = torch.arange(2 * n).reshape(2, n) * 7 % 256
        want = program(ids, torch.ones_like(ids), torch.arange(n).expand(2, n))
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / f"{n}.npy")), want)


def test_cli_export_and_convert(tmp_path):
    done = lcc_cli.run("convert", "tiny-llama", "--to", "dense", "-o", str(tmp_path / "a.lcc"), "--onnx")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "a.lcc" / "lcc.json").read_text())
    assert manifest["onnx"]["file"] == "model.onnx" and "model.onnx" in manifest["files"]
    artifact.verify_files(tmp_path / "a.lcc", manifest)  # the checksum entered matches the file
    done = lcc_cli.run("export-onnx", str(tmp_path / "a.lcc"), "-o", str(tmp_path / "a.onnx"), "--verify", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["ops"]["longctx::attention"]["count"] == 2 and all(r["ok"] for r in info["verify"])


def test_bad_input_gets_one_line(tmp_path, dense_artifact):
    sp = lcc.compile("tiny-llama", to="ulysses", degree=2).save(tmp_path / "sp.lcc")
    dense = dense_artifact
    (tmp_path / "taken.onnx").write_text("keep me")
    broken = tmp_path / "broken.lcc"
    broken.mkdir()
    for item in dense.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.pt2").write_bytes(b"not a program")
    cases = [
        ((str(sp), "-o", str(tmp_path / "x.onnx")), "seq_all_to_all at"),
        ((str(broken), "-o", str(tmp_path / "x.onnx")), "corrupt artifact"),
        ((str(tmp_path / "missing.lcc"), "-o", str(tmp_path / "x.onnx")), "no such artifact"),
        ((str(dense), "-o", str(tmp_path / "taken.onnx")), "already exists"),
        ((str(dense), "-o", str(dense / "model.pt2"), "--force"), "would overwrite"),
        ((str(dense), "-o", str(tmp_path / "x.onnx"), "--program", "query"), "no program 'query'"),
        ((str(dense), "-o", str(tmp_path / "x.onnx"), "--custom-ops", "--verify"), "custom-domain"),
    ]
    for args, message in cases:
        done = lcc_cli.run("export-onnx", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "taken.onnx").read_text() == "keep me" and not (tmp_path / "x.onnx").exists()


def test_hsa_ties_go_to_the_older_chunk(tmp_path):
    """Equal chunk scores (a zero scoring query: every landmark score is the log count) select the same chunks in
    onnxruntime as in the reference; a random-weight model at 1K tokens had such a tie in fp32."""
    from longctx_compile.ops import portable
    from longctx_compile.ops.hsa import hsa_ref

    class Ties(torch.nn.Module):
        def forward(self, q, k, v):
            return portable.hsa(q, k, v, None, None, None, 0.35, 4, 2, 0, "landmark", "token", False, "stick", torch.zeros_like(q), k)

    T = torch.export.Dim.DYNAMIC  # the padded-chunk views add guards sympy cannot prove (true for every length)
    example = (torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8))
    ep = torch.export.export(Ties(), example, dynamic_shapes=({2: T}, {2: T}, {2: T}))
    torch.onnx.export(ep, (), dynamo=True, opset_version=18).save(tmp_path / "ties.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "ties.onnx"))
    for length in (23, 40):
        q, k, v = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        want = hsa_ref(q, k, v, None, 0.35, 4, 2, 0, "landmark", "token", None, None, False, "stick", torch.zeros_like(q), k)
        torch.testing.assert_close(torch.from_numpy(got), want)


def test_one_retrace_and_the_fallback(tmp_path, monkeypatch):
    """The longctx translations run inside the exporter's own decomposition (one re-trace of the program); where an
    exporter does not build its table from torch's, the program is translated first, and the file is the same."""
    path = lcc.compile("tiny-llama").save(tmp_path / "d.lcc")  # its longctx::attention is translated
    traces = []
    run = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", lambda ep, *a, **k: traces.append(1) or run(ep, *a, **k))
    export_onnx(path, tmp_path / "one.onnx")
    assert len(traces) == 1
    exporter = export_module._torch_export

    def without_the_hook(ep, opset, table=None):  # an exporter that leaves the longctx ops untranslated fails on them
        if table:
            raise LccError("the ONNX exporter failed: no translation for longctx::attention")
        return exporter(ep, opset)

    monkeypatch.setattr(export_module, "_torch_export", without_the_hook)
    traces.clear()
    export_onnx(path, tmp_path / "two.onnx")
    assert len(traces) == 2  # ours, then the exporter's
    assert_equal_at_two_lengths(path, tmp_path / "two.onnx")  # (every other export test checks the one-pass files)
