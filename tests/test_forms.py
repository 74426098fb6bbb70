"""A sixth form touches no core module: defined here (a config, one registered pass, a Form), it compiles, saves,
verifies, inspects and generates through the same core as the built-in forms."""

from __future__ import annotations

from dataclasses import dataclass

import lcc_cli
import pytest
import torch

import longctx_compile as lcc
from longctx_compile.errors import LccError
from longctx_compile.forms import FORMS, Form, get_form, register_form
from longctx_compile.inspect.summary import form_detail
from longctx_compile.ops.schema import Call
from longctx_compile.pipeline import PassResult, Program, Stage, register


@dataclass
class WindowConfig:
    """``--opt span=4``: every attention sees the last ``span`` keys only."""

    span: int = 4


@register("toy_window", Stage.FORM, WindowConfig)
def toy_window(program: Program, cfg: WindowConfig) -> PassResult:
    """Give every canonical attention a sliding window of ``span`` keys."""
    for node in program.attention_nodes():
        node.args = Call.of(node).replace(window=cfg.span).args()
        node.meta["lcc"].update(form="toy", mask="causal+window")
    return PassResult(matches=len(program.attention_nodes()))


@pytest.fixture(scope="module", autouse=True)
def toy_form():
    register_form(Form("toy", WindowConfig, ["toy_window"], "a sliding window on every layer", exact=False, describe=lambda s: "toy window"))
    yield
    del FORMS["toy"]


def test_a_new_form_runs_through_the_core(tmp_path):
    compiled = lcc.compile("tiny-llama", to="toy", span=3)
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 1, 9]])
    assert get_form("toy").passes == ["toy_window"] and compiled.program.sites()[0]["form"] == "toy"
    # generation through the declared KV cache, from the saved artifact
    path = compiled.save(tmp_path / "toy.lcc")
    loaded = lcc.load(path)
    assert loaded.manifest["derived"] == {"kv_cache": ["prefill", "decode", "static"]}
    assert loaded.generate([[1, 2, 3, 4, 5, 6]], max_new_tokens=4) == compiled.generate([[1, 2, 3, 4, 5, 6]], max_new_tokens=4)
    # the window really applies: the last position's logits do not depend on keys older than the span
    changed = ids.clone()
    changed[0, 0] = 100
    torch.testing.assert_close(compiled(ids)[:, -1], compiled(changed)[:, -1])
    assert not torch.allclose(lcc.compile("tiny-llama")(ids)[:, -1], lcc.compile("tiny-llama")(changed)[:, -1])
    # verify reports (approximate form), inspect describes the site with the form's own words
    assert lcc.verify(str(path)).cases
    assert lcc_cli.run("inspect", str(path)).returncode == 0
    assert form_detail(loaded.manifest["sites"][0]) == "toy window"


def test_a_form_name_is_registered_once():
    with pytest.raises(LccError, match="exists already"):
        register_form(Form("toy", WindowConfig))
