"""Dtypes: a checkpoint keeps its own (bf16 stays bf16), ``--dtype`` casts, verify compares in fp32 against
the original and judges a low-precision artifact by the original's own error in that dtype."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.capture import dtype_of
from longctx_compile.presets import build_preset
from tests.lcc_cli import run


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16") / "hf"
    build_preset("tiny-llama").to(torch.bfloat16).save_pretrained(folder)
    return folder


def weights_dtype(artifact) -> torch.dtype:
    return dtype_of(lcc.load(artifact).program.module())


def test_a_bf16_checkpoint_converts_to_a_bf16_artifact_and_verifies_in_fp32(bf16_folder, tmp_path):
    out = tmp_path / "a.lcc"
    assert run("convert", bf16_folder, "-o", out).returncode == 0
    manifest = json.loads((out / "lcc.json").read_text())
    assert manifest["signature"]["dtype"] == "bf16"
    assert weights_dtype(out) == torch.bfloat16
    assert lcc.load(out)(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    assert "bf16" in run("inspect", out).stdout

    shown = run("verify", out)
    assert shown.returncode == 0, shown.stdout
    assert "PASS" in shown.stdout and "is how far the original in bf16 is from itself in fp32" in " ".join(shown.stdout.split())
    report = json.loads(run("verify", out, "--json").stdout)
    assert report["dtype"] == "bf16" and report["passed"]
    assert 1e-4 < report["floor"] < 0.1  # bf16's own error on these logits: real, and small
    assert report["atol"] == pytest.approx(1e-5 + 2 * report["floor"])


def test_the_dtype_option_casts_either_way(bf16_folder, tmp_path):
    assert run("convert", bf16_folder, "-o", tmp_path / "up.lcc", "--dtype", "fp32").returncode == 0
    assert weights_dtype(tmp_path / "up.lcc") == torch.float32
    assert run("convert", "tiny-llama", "-o", tmp_path / "half.lcc", "--opt", "dtype=fp16").returncode == 0
    assert weights_dtype(tmp_path / "half.lcc") == torch.float16
    assert json.loads(run("verify", tmp_path / "half.lcc", "--json").stdout)["passed"]


@pytest.mark.parametrize("args", [("--dtype", "fp8"), ("--dtype", "float32"), ("--opt", "dtype=int8"), ("--dtype", "bf16", "--opt", "dtype=bf16")])
def test_a_bad_dtype_is_one_line_before_the_model_loads(args, tmp_path):
    shown = run("convert", "no-such-folder", *args, "-o", tmp_path / "x.lcc")
    assert shown.returncode == 2
    assert len(shown.stderr.strip().splitlines()) == 1 and "no such model" not in shown.stderr, shown.stderr


def test_the_callers_module_is_copied_not_cast():
    model = build_preset("tiny-llama")
    compiled = lcc.compile(model, dtype="bf16")
    assert dtype_of(model) == torch.float32
    assert compiled.program.signature["dtype"] == "bf16"
    assert compiled(torch.tensor([[5, 6, 7]])).dtype == torch.bfloat16


def test_a_bf16_verify_passes_the_model_and_fails_a_perturbed_one():
    model = build_preset("tiny-llama")
    assert lcc.verify(model, lcc.compile(model, dtype="bf16")).passed
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.model.layers[0].self_attn.o_proj.weight.mul_(1.03)  # one layer's output 3 % off: beyond bf16's own error
    report = lcc.verify(model, lcc.compile(wrong, dtype="bf16"))
    assert not report.passed and report.floor is not None


@pytest.mark.parametrize(("form", "options"), [("hsa", {"chunk": 4, "topk": "all", "score": "exact"}), ("evict", {"budget": 4096})])
def test_exact_forms_verify_in_bf16(form, options):
    report = lcc.verify(build_preset("tiny-llama"), to=form, dtype="bf16", **options)
    assert report.exact and report.passed and report.dtype == "bf16"


def test_msa_encodes_and_generates_in_bf16(tmp_path):
    from longctx_compile.forms.msa import bank

    out = tmp_path / "m.lcc"
    assert run("convert", "tiny-llama", "--to", "msa", "--opt", "pool=2", "--opt", "topk=1", "--dtype", "bf16", "-o", out).returncode == 0
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "tokens": [5, 6, 7, 8, 9, 10]}\n{"id": "b", "tokens": [15, 16, 17, 18]}\n')
    assert run("memory", "encode", out, "--docs", tmp_path / "docs.jsonl", "-o", tmp_path / "bank").returncode == 0
    assert {v.dtype for v in bank.load(tmp_path / "bank").keys.values()} == {torch.bfloat16}
    shown = run("generate", out, "--bank", tmp_path / "bank", "--prompt-ids", "20,21,22", "-n", "3", "--json")
    assert shown.returncode == 0 and len(json.loads(shown.stdout)[0]["new_ids"]) == 3
