"""lcc diff as people read it: the summary, every change filed under its layer, untruncated text, and the HTML page
rendered in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess

import lcc_cli
import pytest

import longctx_compile as lcc
from longctx_compile.inspect.diff import diff_snapshots
from longctx_compile.inspect.groups import groups, layer_range, overview
from longctx_compile.inspect.page import render_html


@pytest.fixture(scope="module")
def msa():
    return lcc.diff(lcc.compile("tiny-llama", to="msa"))


def test_what_a_form_adds_inside_a_layer_is_filed_under_that_layer(msa):
    """msa's router projections and their weights belong to the layer they route for, not to "global"."""
    added = [c for c in msa.changes if c.kind == "added"]
    assert len(added) == 10 and all(c.layer is not None for c in added)
    for layer in (0, 1):
        mine = {c.id for c in added if c.layer == layer}
        assert f"p_model_layers_{layer}_self_attn_router_q_proj_weight" in mine and f"p_model_layers_{layer}_self_attn_router_k_proj_weight" in mine
        assert all(c.module.startswith(f"model.layers.{layer}.self_attn") for c in added if c.layer == layer)


def test_identical_layers_fold_into_one_row(msa):
    rows = groups(msa)
    assert [g.name for g in rows] == ["outside layers", "layers 0–1"]
    layers = rows[1]
    assert layers.change.replaced == ("scaled_dot_product_attention → msa_attention",)
    assert layers.change.parameters == ("self_attn.router_k_proj.weight", "self_attn.router_q_proj.weight")
    assert layers.change.passes == ("canonicalize", "msa") and layers.describe().endswith("(×2)")
    assert overview(msa)["representative"] == 0
    by_pass = {p["pass"]: [g["change"] for g in p["groups"] if g["layers"]] for p in overview(msa)["by_pass"]}
    assert by_pass["canonicalize"][0].startswith("scaled_dot_product_attention → attention;")
    assert by_pass["msa"][0].startswith("attention → msa_attention; +self_attn.router_k_proj.weight")  # a retargeted node


def _node(node_id, target, layer, inputs=(), op="call_function", frm=()):
    module = f"model.layers.{layer}.self_attn" if layer is not None else "model"
    return {"id": node_id, "op": op, "target": target, "inputs": list(inputs), "module": module, "layer": layer, "from": list(frm)}


def test_a_layer_changed_unlike_its_kin_is_flagged_with_how_it_differs():
    """Four layers get the same replacement; layer 2 also gets an extra op: it is its own row, flagged against 0–1, 3."""
    before = {"nodes": [_node(f"sdpa_{i}", "aten.scaled_dot_product_attention", i) for i in range(4)]}
    after = [_node(f"attn_{i}", "longctx.hsa_attention", i, frm=[f"sdpa_{i}"]) for i in range(4)]
    after.append(_node("extra", "aten.clone", 2, inputs=["attn_2"]))
    history = [{"name": "hsa", "stage": "form", "changes": {"added": [n["id"] for n in after], "removed": [f"sdpa_{i}" for i in range(4)]}}]
    d = diff_snapshots({"capture": before, "form": {"nodes": after}}, history)
    rows = groups(d)
    assert [(g.name, g.differs_from) for g in rows] == [("layers 0–1, 3", None), ("layer 2", "0–1, 3")]
    assert rows[1].difference == "+added clone" and overview(d)["flagged"] == ["layer 2"]


def test_layer_ranges_read_as_runs():
    assert layer_range([5, 0, 1, 2, 7, 8]) == "0–2, 5, 7–8" and layer_range([3]) == "3"


def test_piped_text_is_never_cut_and_json_carries_the_same_summary():
    """Into a pipe rich would wrap at 80 columns and cut cells with an ellipsis: ids and op names come through whole."""
    text = lcc_cli.run("diff", "tiny-llama", "--form", "msa")
    assert text.returncode == 0, text.stderr
    assert "p_model_layers_0_self_attn_router_q_proj_weight" in text.stdout and "…" not in text.stdout
    assert "scaled_dot_product_attention → msa_attention" in text.stdout
    data = json.loads(lcc_cli.run("diff", "tiny-llama", "--form", "msa", "--format", "json").stdout)
    (layers,) = [g for g in data["overview"]["groups"] if g["layers"]]
    assert layers["name"] == "layers 0–1" and layers["change"] in text.stdout


# The page's own checks, run in the browser after it draws: each is a fact a reader relies on.
CHECKS = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
const logged = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); logged(...a); };
window.addEventListener('load', () => setTimeout(() => {
  const out = {errors: window.__errors, height: window.innerHeight};
  out.summary_bottom = document.getElementById('summary').getBoundingClientRect().bottom;
  out.summary_text = document.getElementById('summary').innerText;
  out.layers = {};
  for (const b of document.querySelectorAll('nav#model button')) {
    b.click();
    const added = [...document.querySelectorAll('#pane-after g.node[data-status=added]')];
    const removed = [...document.querySelectorAll('#pane-before g.node[data-status=removed]')];
    out.layers[b.dataset.key] = {
      shown: document.getElementById('view').dataset.layer,
      added: added.map(g => g.dataset.id), removed: removed.map(g => g.dataset.id),
      added_layers: [...new Set(added.map(g => g.dataset.layer))],
      before_nodes: document.querySelectorAll('#pane-before g.node').length,
    };
  }
  document.querySelector('nav#model button[data-key="0"]').click();
  const node = [...document.querySelectorAll('#pane-after g.node')].find(g => !g.dataset.status);
  node.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  out.details = document.getElementById('details').innerText;
  const [a, b] = document.querySelectorAll('.pane');
  setTimeout(() => {  // after the layer's own scroll to its first change has settled
    a.scrollTop = 37;
    a.dispatchEvent(new Event('scroll'));  // a headless browser under virtual time sends no scroll events of its own
    setTimeout(() => {
      out.scrolled = [a.scrollTop, b.scrollTop];
      const pre = document.createElement('pre');
      pre.id = 'lcc-checks';
      pre.textContent = JSON.stringify(out);
      document.body.appendChild(pre);
    }, 200);
  }, 200);
}, 50));
</script>
"""


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _in_browser(page: str, tmp_path) -> dict:
    """Load ``page`` with the checks in a headless browser at 1280×800 and return what they found."""
    path = tmp_path / "diff.html"
    path.write_text(page.replace("<head>", "<head>" + CHECKS, 1))
    command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800", "--virtual-time-budget=5000", "--dump-dom", path.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    assert 'id="lcc-checks"' in dom, dom[-2000:]
    return json.loads(dom.split('id="lcc-checks">', 1)[1].split("</pre>", 1)[0].replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


@pytest.mark.skipif(_browser() is None, reason="no Chromium: apt-get install chromium (.ci/run does)")
@pytest.mark.parametrize("form", ["msa", "hsa"])
def test_the_page_in_a_browser(form, tmp_path):
    """Summary in view without scrolling, each layer's added nodes drawn in that layer, details on click, panes
    scrolling together, no script errors."""
    d = lcc.diff(lcc.compile("tiny-llama", to=form))
    seen = _in_browser(render_html(d), tmp_path)
    assert seen["errors"] == []
    assert seen["summary_bottom"] <= seen["height"], "the summary must be readable without scrolling"
    assert "layers 0–1" in seen["summary_text"] and f"scaled_dot_product_attention → {form}_attention" in seen["summary_text"]
    assert set(seen["layers"]) == {"outside", "0", "1"}
    for key, layer in seen["layers"].items():
        number = None if key == "outside" else int(key)
        drawn_here = {c.id for c in d.changes if c.kind == "added" and c.layer == number and not c.target.startswith("sym_size")}
        assert layer["shown"] == key and set(layer["added"]) == drawn_here
        assert layer["added_layers"] in ([], [key])
        assert layer["before_nodes"] > 0
    assert seen["layers"]["0"]["removed"], "the removed attention plumbing shows on the before side"
    assert "modeling_llama.py" in seen["details"] and "float32" in seen["details"]
    assert seen["scrolled"] == [37, 37]
