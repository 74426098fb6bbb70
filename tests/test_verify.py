"""``lcc verify``'s tolerance comes from the model's own rounding (its noise floor against fp64), and its lengths from
the artifact's configuration."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import longctx_compile as lcc
from longctx_compile.runtime.verify import ATOL, FLOOR_FACTOR


@pytest.fixture(scope="module")
def loud():
    """A 2-layer Llama whose logits are in the thousands: fp32 reordering alone moves them by ~1e-4, above a fixed
    atol of 1e-5 wherever a logit is near 0 (as a 30-layer pretrained model's noise is)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3000)
    return model


def test_an_exact_conversion_passes_within_the_models_own_noise(loud):
    converted = lcc.compile(loud, to="hsa", chunk=4, topk="all", score="exact", window=0)  # dense, summed in another order
    report = lcc.verify(loud, converted)
    assert report.floor_against == "fp64" and report.floor > ATOL  # the model's own fp32 error exceeds the old fixed atol
    assert report.atol == pytest.approx(ATOL + FLOOR_FACTOR * report.floor)
    assert report.max_abs > ATOL and report.passed


def test_a_wrong_conversion_still_fails(loud):
    wrong = copy.deepcopy(loud)
    with torch.no_grad():
        wrong.model.layers[1].self_attn.o_proj.weight.mul_(1.001)  # one layer's attention output 0.1 % off
    report = lcc.verify(loud, lcc.compile(wrong, to="hsa", chunk=4, topk="all", score="exact", window=0))
    assert not report.passed and report.max_abs > FLOOR_FACTOR * report.floor


def test_the_cli_prints_the_tolerance_and_where_it_comes_from(tmp_path):
    from tests.lcc_cli import run

    assert run("convert", "tiny-llama", "-o", tmp_path / "a.lcc").returncode == 0
    shown = run("verify", tmp_path / "a.lcc")
    assert shown.returncode == 0 and "is how far the original in fp32 is from itself in fp64" in " ".join(shown.stdout.split())


@pytest.mark.parametrize(
    ("form", "options", "needed"),
    [
        ("hsa", dict(chunk="4", topk="2", window="1"), {9, 47}),  # past the window; more older chunks than the 4·2 reranked candidates
        ("ulysses", {}, {2, 4, 10}),  # a one-token shard, and several per rank
        ("evict", dict(budget="0.25", sinks="2", window="4"), {45}),  # a prompt half beyond sinks + window
    ],
)
def test_lengths_come_from_the_configuration(form, options, needed):
    report = lcc.verify("tiny-llama", to=form, **options)
    assert needed <= {c.length for c in report.cases} and len({c.length for c in report.cases}) >= len(needed) + 3  # and the short ones


def test_an_approximate_form_reports_what_it_costs_on_real_text(hf_folder_with_tokenizer, tmp_path):
    """Instead of a bare DIVERGES: NLL of both models and next-token agreement on the built-in English sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx_compile.runtime.quality import english_sample
    from tests.lcc_cli import run

    folder, _ = hf_folder_with_tokenizer
    out = tmp_path / "h.lcc"
    assert run("convert", folder, "--to", "hsa", "--opt", "chunk=4", "--opt", "topk=1", "--opt", "window=0", "-o", out).returncode == 0
    report = lcc.verify(str(out))
    q = report.quality
    assert not report.exact and q["tokens"] == 512  # the sample, cut to the program's maximum length
    ids = torch.tensor([english_sample(AutoTokenizer.from_pretrained(folder), 512)])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder)(ids).logits[0, :-1]
    assert q["nll_original"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])), rel=1e-5)
    assert q["nll_converted"] != q["nll_original"] and 0 <= q["top1_agreement"] <= 1
    shown = " ".join(run("verify", out).stdout.split())
    assert "DIVERGES" in shown and "tokens of the built-in English sample: NLL" in shown
    assert lcc.verify(str(folder), to="hsa", chunk="4", topk="all", score="exact").quality is None  # exact: judged, not costed


def test_a_model_against_an_artifact_path(dense_artifact):
    """verify(model, "a.lcc") read the path's manifest as an attribute of the string and failed."""
    assert lcc.verify("tiny-llama", str(dense_artifact)).passed


def test_a_model_without_fp64_kernels_keeps_the_fixed_tolerance():
    """transformers' grouped-mm experts have no fp64 kernel: no floor, the fixed atol, and the report says why."""
    report = lcc.verify("tiny-mixtral")
    assert report.passed and report.floor is None and report.atol == ATOL
    assert report.floor_against.startswith("the original does not run in fp64")
