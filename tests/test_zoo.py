"""Every zoo family, with sdpa and eager attention: one canonical node per layer, no [T, T] left, same logits."""

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.presets import PRESETS

EXPECTED_MASK = {"tiny-mistral": "causal+window(8)+padding", "tiny-mixtral": "causal+window(8)+padding"}


def square_nodes(program):
    """Nodes (outside the canonical attention) whose value has two sequence-length dimensions."""
    seq = str(program.gm.graph.find_nodes(op="placeholder", target="input_ids")[0].meta["val"].shape[1])
    return [n.name for n in program.gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and sum(str(s) == seq for s in n.meta["val"].shape) >= 2]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_family(preset, attn):
    compiled = lcc.compile(preset, attn=attn)
    program = compiled.program
    layers = compiled.original.config.num_hidden_layers
    sites = program.sites()
    assert len(sites) == layers
    assert sorted(s["layer"] for s in sites) == list(range(layers))
    assert all(s["matched"] == attn for s in sites)
    assert {s["mask"] for s in sites} == {EXPECTED_MASK.get(preset, "causal+padding")}
    assert square_nodes(program) == []
    leftover = [n.name for n in program.gm.graph.nodes if ("scaled_dot_product" in str(n.target) or "softmax" in str(n.target)) and n.meta["val"].dim() == 4]
    assert leftover == []
    report = lcc.verify(compiled.original, compiled, lengths=(1, 7, 16))
    assert report.passed, report.to_json()
