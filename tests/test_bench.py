"""The kernel benchmark runs everywhere: without a GPU it says so and exits 0; --smoke checks its harness."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longctx_compile as lcc

pytestmark = pytest.mark.slow  # the slow tier: python -m pytest -m 'not slow' leaves it out

BENCH = Path(__file__).parent.parent / "bench" / "attention_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_kernel_bench_without_gpu_exits_zero():
    result = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True)
    assert result.returncode == 0 and "needs a CUDA GPU" in result.stdout


def test_kernel_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["mask"] for r in rows] == ["causal", "window 32"]
    assert all(r["max_abs_error"] < 5e-2 and all(t > 0 for t in r["ms"].values()) for r in rows)


def test_generate_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    bench = BENCH.parent / "generate.py"
    result = subprocess.run([sys.executable, str(bench), "--smoke", "--repeats", "1", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["hf generate", "lcc growing", "lcc static"]
    assert all(r["same_tokens"] and r["tokens_per_s"] > 0 for r in rows)


def test_sp_bench_smoke(tmp_path):
    """Measured collective bytes equal the formula on every rank; the tiled loss equals the full one."""
    out = tmp_path / "rows.json"
    bench = BENCH.parent / "sp.py"
    command = [sys.executable, str(bench), "--seq", "64", "--degrees", "2", "--loss-seq", "64", "--loss-vocab", "512", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = report["sp"]
    assert [(r["form"], r["degree"], r["rank"]) for r in rows] == [("ulysses", 2, 0), ("ulysses", 2, 1), ("ring", 2, 0), ("ring", 2, 1)]
    assert [r["calls_per_layer"] for r in rows] == [8, 8, 3, 3]  # 4 all-to-alls each way; a ring of 2: 1 K/V pass forward, 2 backward
    assert all(r["bytes_per_layer"] == r["formula_per_layer"] > 0 for r in rows if r["degree"] == 2)
    full, tiled = report["tile_loss"]
    assert (full["variant"], tiled["variant"]) == ("full", "tiled") and abs(full["loss"] - tiled["loss"]) < 1e-5


def test_hsa_bench_smoke(tmp_path):
    """bench/hsa.py times both HSA selections and dense SDPA, each in its own process."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(BENCH.parent / "hsa.py"), "--lengths", "1024", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["op"] for r in rows] == ["hsa-token", "hsa-block", "dense"] and all(r["seconds"] > 0 for r in rows)


def test_hsa_kernel_bench_smoke(tmp_path):
    """bench/hsa_kernels.py runs its harness under the interpreter: both selections and dense, kernel output equal to the reference."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(BENCH.parent / "hsa_kernels.py"), "--smoke", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert sorted(row["ms"]) == sorted(f"{op} {p}" for op in ("hsa-token", "hsa-block", "dense") for p in ("fwd", "fwd+bwd"))
    assert row["max_abs_error_token"] < 1e-4 and row["max_abs_error_block"] < 1e-4


def test_hsa_quality_bench_smoke():
    """bench/hsa_quality.py trains, saves, converts and scores every contender (tiny sizes; the numbers mean nothing)."""
    result = subprocess.run([sys.executable, str(BENCH.parent / "hsa_quality.py"), "--smoke", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["accuracy"]) == sorted(["dense", *(f"hsa {m} K={k}" for m in ("landmark", "exact") for k in (8, 16)), "hsa learned K=8, 2 steps"])
    assert all(0 <= a <= 1 for accs in report["accuracy"].values() for a in accs.values())


def test_train_bench_smoke():
    """bench/train.py trains the recall model, converts it to HSA and adapts it twice with lcc.train (tiny sizes), with
    joint fusion, pooled landmarks of NoPE keys and the retrieval loss, beside the exact-selection row."""
    options = ["--fusion", "joint", "--retrieval", "1", "--temperature", "0.5", "--landmarks", "2", "--nope", "--exact-row"]
    command = [sys.executable, str(BENCH.parent / "train.py"), "--smoke", "--json", *options]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["steps"] for r in rows] == [0, 0, 0, 2, 2] and all(0 <= r["320"] <= 1 for r in rows)
    assert "score=exact" in rows[1]["setting"] and rows[3]["setting"].endswith(
        "2 pooled landmarks, NoPE scores, lcc train --trainable new --opt aux=1.0 temperature=0.5"
    )


def test_train_bench_msa_smoke():
    """bench/train.py --form msa trains the documents model, converts it to msa and adapts it with lcc.train (tiny sizes)."""
    result = subprocess.run([sys.executable, str(BENCH.parent / "train.py"), "--form", "msa", "--smoke", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["steps"] for r in rows] == [0, 0, 2] and all(0 <= r["accuracy"] <= 1 for r in rows) and rows[2]["hit"] is not None


def test_train_memory_bench_smoke(tmp_path):
    """bench/train_memory.py measures each setting in its own process and on 2 gloo ranks (a tiny artifact); a length the
    ranks cannot split is one line, and a rank whose step fails ends its launch."""
    lcc.compile("tiny-llama").save(tmp_path / "d.lcc")
    command = [
        sys.executable,
        str(BENCH.parent / "train_memory.py"),
        str(tmp_path / "d.lcc"),
        "--tokens",
        "64",
        "--tile",
        "16",
        "--probe",
        "32",
        "--nproc",
        "2",
    ]
    result = subprocess.run([*command, "--settings", "plain,both"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "both · ulysses ×2" in result.stdout and "plain · ulysses ×2" in result.stdout
    refused = subprocess.run([*command[:-1], "3"], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.strip() == "sequence length 64 is not divisible by 3 (the sequence-parallel degree 3)"
    # a rank whose step fails exits (its memory sampler stopped) rather than keeping the launch alive
    failing = subprocess.run([*command[:-1], "3", "--sp", "ring", "--one", "plain"], capture_output=True, text=True, timeout=300)
    assert failing.returncode != 0 and "sequence length 64 is not divisible by 6" in failing.stderr


def test_msa_bench_smoke(tmp_path):
    """A bf16 bank costs 3·Hkv·d·2/P bytes per token per routed layer; encode and routing report positive times."""
    out = tmp_path / "msa.json"
    result = subprocess.run([sys.executable, str(BENCH.parent / "msa.py"), "--smoke", "--repeats", "1", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["memory"]["bytes_per_token_per_layer"] == report["memory"]["formula"] == 96
    assert report["encode"]["tokens_per_s"] > 0 and [r["tokens"] for r in report["routing"]] == [65536, 262144]
    assert all(r["seconds"] > 0 for r in report["routing"])


def test_msa_quality_bench_smoke(tmp_path):
    out = tmp_path / "quality.json"
    result = subprocess.run([sys.executable, str(BENCH.parent / "msa_quality.py"), "--smoke", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == [
        "dense, right document only",
        "msa P=4 top-1, router_init=k",
        "msa P=4 top-1, router_init=qk",
        "msa P=4 top-1, qk + router trained",
    ]
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and 0 <= rows[1]["hit"] <= 1


def test_evict_bench_smoke():
    """bench/evict.py: every budget keeps what it says, K/V shrink with the budget, and both dense baselines report a speed."""
    result = subprocess.run([sys.executable, str(BENCH.parent / "evict.py"), "--smoke", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {r["budget"]: r for r in report["rows"]}
    assert rows["200"]["kept"] == 200 and rows["0.25"]["kept"] == 132  # a quarter of 512 is below sinks + window = 4 + 128
    assert rows["0.25"]["kv_after_prompt"] * 3.5 < rows["dense"]["kv_after_prompt"] and rows["dense"]["peak"] > rows["200"]["peak"]
    assert report["dense_step_programs_tokens_per_s"] > 0 and all(r["tokens_per_s"] > 0 for r in rows.values())


def test_evict_quality_bench_smoke():
    """bench/evict_quality.py trains, converts, runs lcc train-indexers and scores every policy (tiny sizes; the numbers mean nothing)."""
    result = subprocess.run([sys.executable, str(BENCH.parent / "evict_quality.py"), "--smoke", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["accuracy"]) == 8 and set(report["values_kept"]) == set(report["kl_to_dense"]) == set(report["accuracy"]) - {
        "dense (nothing evicted)",
        "dense, needle tokens masked",
    }
    assert all(0 <= a <= 1 for accs in report["accuracy"].values() for a in accs.values())
    assert all(kl >= -1e-6 for by in report["kl_to_dense"].values() for kl in by.values())


def test_onnx_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    bench = BENCH.parent / "onnx_export.py"
    result = subprocess.run([sys.executable, str(bench), "--smoke", "--forms", "dense", "--opsets", "18", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["form"], r["length"]) for r in rows] == [("dense", 96), ("dense", 200)]
    assert all(r["max_abs_diff"] < 1e-4 and r["onnx_ms"] > 0 and r["torch_ms"] > 0 for r in rows)


def test_artifact_bench_smoke():
    """bench/artifact.py on a 1-layer model: every ratio is measured and the artifact holds the weights about once."""
    bench = BENCH.parent / "artifact.py"
    result = subprocess.run([sys.executable, str(bench), "--layers", "1", "--forms", "dense", "--json"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["form"] == "dense" and row["convert_s"] > 0 and row["baseline_s"] > 0 and row["first_token_s"] >= row["load_s"] > 0
    assert 1.0 <= row["size_ratio"] < 1.5  # model.pt2 holds the weights; nothing holds them twice


def test_hsa_decode_bench_smoke():
    """bench/hsa_decode.py: the landmark-cache step gives the reference's rows at every length, and both forms decode."""
    result = subprocess.run([sys.executable, str(BENCH.parent / "hsa_decode.py"), "--smoke", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["keys"] for r in report["ops"]] == [512, 2048] and all(r["equal"] for r in report["ops"])
    assert [r["form"] for r in report["models"]] == ["dense", "hsa"] and all(r["decode_tokens_per_s"] > 0 for r in report["models"])


def test_real_model_nll_bench_smoke(hf_folder_with_tokenizer):
    """bench/real/nll.py runs dense and a converted setting on a folder with a tokenizer (tiny; the numbers mean nothing)."""
    folder, _ = hf_folder_with_tokenizer
    script = BENCH.parent / "real" / "nll.py"
    result = subprocess.run(
        [sys.executable, str(script), str(folder), "hsa:chunk=4,topk=all,fusion=joint", "--tokens", "64", "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["setting"] for r in rows] == ["dense", "hsa:chunk=4,topk=all,fusion=joint"]
    assert abs(rows[1]["change"]) < 1e-5 and rows[1]["agreement"] == 1.0  # joint over every chunk is the dense model


def test_real_model_passkey_bench_smoke(hf_folder_with_tokenizer):
    """bench/real/passkey.py builds prompts with the asked key inside, generates, scores and measures every setting
    (a tiny random model: the accuracies mean nothing)."""
    folder, _ = hf_folder_with_tokenizer
    script = BENCH.parent / "real" / "passkey.py"
    command = [sys.executable, str(script), str(folder), "hsa:chunk=8,topk=2", "--lengths", "96", "--prompts", "2", "--keys", "2", "--new", "3", "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)["results"]
    assert [r["setting"] for r in results] == ["dense", "hsa:chunk=8,topk=2"]
    assert all(r["peak_mib"] > 0 and r["rows"][0]["length"] == 96 and 0 <= r["rows"][0]["accuracy"] <= 1 for r in results)


def test_real_model_msa_memory_bench_smoke(hf_folder_with_tokenizer):
    """bench/real/msa_memory.py builds the documents and the needle, encodes a bank, routes, generates and scores
    (a tiny random model: the accuracies mean nothing)."""
    folder, _ = hf_folder_with_tokenizer
    script = BENCH.parent / "real" / "msa_memory.py"
    command = [sys.executable, str(script), str(folder), "msa:pool=1,topk=2", "--docs", "3", "--doc-tokens", "40", "--prompts", "2", "--new", "3", "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)["results"]
    assert [r["setting"] for r in results] == ["dense", "msa:pool=1,topk=2"] and results[1]["positions"] == "contiguous"
    assert all(0 <= r["accuracy"] <= 1 and r["peak_mib"] > 0 for r in results) and 0 <= results[1]["routing_hit"] <= 1


def test_real_model_hsa_selection_bench_smoke(hf_folder_with_tokenizer):
    """bench/real/hsa_selection.py: its simulated joint-fusion HSA (attention masked to the local window and the chosen
    chunks) gives lcc's own hsa program's logits for shared and per-head selection, by bound and exact scores, reranked."""
    folder, _ = hf_folder_with_tokenizer
    script = BENCH.parent / "real" / "hsa_selection.py"
    settings = ["chunk=8,topk=2,window=1", "chunk=8,topk=2,window=1,heads=each", "chunk=8,topk=1,window=0,score=exact", "chunk=8,topk=2,window=1,sub=4"]
    settings.append("chunk=8,topk=1,window=0,rerank=99")  # every chunk a candidate: the exact LSE picks
    settings.append("chunk=8,topk=1,window=0,rerank=2,heads=each")  # 2 candidates by the bound, the one with the larger true LSE
    command = [sys.executable, str(script), str(folder), *settings, "--length", "96", "--prompts", "3", "--only", "3,1", "--check", "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [r["setting"] for r in rows] == ["dense", *settings] and all(len(r["hits"]) == 2 for r in rows)
    assert all(r["check_max_abs"] < 1e-5 < r["dense_max_abs"] for r in rows[1:4] + rows[5:]) and "check_max_abs" not in rows[4]
    assert all(0 <= r["accuracy"] <= 1 and r["key_logp"] <= 0 for r in rows)
    assert rows[5]["key_logp"] == pytest.approx(rows[3]["key_logp"], abs=1e-4)


def test_real_model_evict_bench_smoke(hf_folder_with_tokenizer, tmp_path):
    """bench/real/evict.py prefills, compacts a copy of the cache per budget and scores over it: a budget that keeps
    every key gives the dense row's NLL and answers, a real one keeps its share of the keys (tiny random model)."""
    from typer.testing import CliRunner

    from longctx_compile.cli.app import app

    folder, _ = hf_folder_with_tokenizer
    artifact = tmp_path / "a.evict.lcc"
    options = ["--opt", "sinks=2", "--opt", "window=4", "--opt", "memory=off"]
    assert CliRunner().invoke(app, ["convert", str(folder), "--to", "evict", "-o", str(artifact), *options]).exit_code == 0
    script = BENCH.parent / "real" / "evict.py"
    command = [sys.executable, str(script), str(artifact), "--untrained", str(artifact), "--lengths", "96", "--budgets", "0.5,0.999"]
    result = subprocess.run([*command, "--prompts", "2", "--texts", "2", "--continuation", "16", "--new", "3", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {(r["setting"], r["budget"]): r for r in json.loads(result.stdout)["rows"]}
    assert set(rows) == {("dense", "—")} | {(p, b) for p in ("streaming", "snapkv", "learned", "learned, untrained") for b in ("0.5", "0.999")}
    dense = rows[("dense", "—")]
    for policy in ("streaming", "snapkv", "learned"):
        assert rows[(policy, "0.999")]["nll@96"] == pytest.approx(dense["nll@96"], abs=1e-9)
        assert rows[(policy, "0.999")]["passkey@96"] == dense["passkey@96"]
        assert rows[(policy, "0.5")]["kept@96"] < rows[(policy, "0.999")]["kept@96"] and rows[(policy, "0.5")]["nll@96"] != dense["nll@96"]
