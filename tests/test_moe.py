"""Mixture-of-experts decoders whose experts run through transformers' grouped_mm op: every form's artifact loads
and runs in a fresh process, which imports the modules that register the program's custom ops (``op_modules``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import longctx_compile as lcc

pytestmark = pytest.mark.slow  # the slow tier (artifacts run in a fresh interpreter): python -m pytest -m 'not slow' leaves it out

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512
)
FAMILIES = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
FORMS = {"dense": {}, "hsa": {"chunk": 4, "topk": "all", "score": "exact"}, "msa": {"pool": 2}, "evict": {"budget": 4096}, "ulysses": {}}
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])

RUN = """
import json, sys, torch
import longctx_compile as lcc
for path, form in json.loads(sys.argv[1]):
    model = lcc.load(path)  # no transformers import before it: the manifest's op_modules bring the op
    if form != "ulysses":  # a sequence-parallel program runs on its ranks; loading is what is checked here
        torch.save(model(torch.tensor(json.loads(sys.argv[2]))), path + "/fresh.pt")
print("ok")
"""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_form_of_a_grouped_mm_moe_loads_and_runs_in_a_fresh_process(family, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / family
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **SMALL, **FAMILIES[family]))
    model.save_pretrained(folder)
    here, jobs = {}, []
    for form, options in FORMS.items():
        compiled = lcc.compile(str(folder), to=form, **options)
        assert any(n.target.namespace == "transformers" for n in compiled.program.gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload))
        out = compiled.save(tmp_path / f"{form}.lcc")
        assert json.loads((out / "lcc.json").read_text())["op_modules"] == ["transformers.integrations.moe"]
        if form != "ulysses":
            here[form] = compiled(IDS)
        jobs.append((str(out), form))
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(jobs), json.dumps(IDS.tolist())], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    for form, logits in here.items():
        torch.testing.assert_close(torch.load(tmp_path / f"{form}.lcc" / "fresh.pt"), logits)
