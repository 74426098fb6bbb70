"""Ulysses sequence parallelism on local ranks: logits, loss and gradients equal the single-process model.

The ranks are threads of this process (``ranks="threads"``: the same program and collectives over an in-process
world); one case runs on gloo processes, as ``lcc verify`` and users' launchers do.
"""

import lcc_cli
import pytest
import torch
import torch.nn.functional as F

import longctx_compile as lcc
from longctx_compile.distributed import IGNORE
from longctx_compile.distributed.ranks import train_step
from longctx_compile.errors import LccError

A2A = torch.ops.longctx.seq_all_to_all.default
GATHER = torch.ops.longctx.seq_all_gather.default


def single_process(model, ids, attention_mask=None, position_ids=None, prefix=""):
    """The reference: the original Hugging Face model (or a dense program), its loss over the same shifted labels, its gradients."""
    model.zero_grad()
    logits = model(ids, attention_mask=attention_mask, position_ids=position_ids)
    logits = getattr(logits, "logits", logits)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1] = labels[:, :-1].masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    loss.backward()
    return logits.detach(), loss.detach(), {name.removeprefix(prefix): p.grad for name, p in model.named_parameters()}


def check_equal(result, logits, loss, grads, valid=None):
    got = result["logits"] if valid is None else result["logits"][valid]
    torch.testing.assert_close(got, logits if valid is None else logits[valid])
    torch.testing.assert_close(result["loss"], loss)
    assert len(result["grads"]) == len(grads)
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, grads[name.removeprefix("model.")], msg=name)


@pytest.mark.parametrize(
    "preset,degree,ranks",
    [
        ("tiny-llama", 2, "processes"),  # GQA, Hkv == P: KV heads scattered; on gloo processes
        ("tiny-llama", 4, "threads"),  # GQA, Hkv < P: each KV head replicated P / Hkv times
        ("tiny-gpt2", 2, "threads"),  # MHA
    ],
)
def test_ulysses_equals_single_process(tmp_path, preset, degree, ranks):
    compiled = lcc.compile(preset, to="ulysses", degree=degree)
    path = compiled.save(tmp_path / "sp.lcc")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    result = train_step(path, degree, {"input_ids": ids}, ranks=ranks)
    check_equal(result, *single_process(compiled.original, ids))


def test_ulysses_with_padding(tmp_path):
    """Left padding: key padding is gathered, positions count real tokens, padded targets are ignored."""
    compiled = lcc.compile("tiny-qwen2", to="ulysses", degree=2)
    path = compiled.save(tmp_path / "sp.lcc")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    result = train_step(path, 2, {"input_ids": ids, "attention_mask": mask}, ranks="threads")
    logits, loss, grads = single_process(compiled.original, ids, mask, positions)
    check_equal(result, logits, loss, grads, valid=mask.bool())


def test_ulysses_with_packed_documents(tmp_path):
    """Position resets mark documents: positions are gathered so documents that cross shards stay whole.

    The reference is the dense program (HF's eager SDPA without a mask lets documents see each
    other; the traced semantics, checked against running each document alone in test_custom, do not).
    """
    compiled = lcc.compile("tiny-llama", to="ulysses", degree=2, attention_mask=False)
    dense = lcc.compile(compiled.original, attention_mask=False)
    assert compiled.program.sites()[0]["mask"] == "causal+documents"
    path = compiled.save(tmp_path / "sp.lcc")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(5), torch.arange(11)])[None]  # the second document crosses the shard border
    result = train_step(path, 2, {"input_ids": ids, "position_ids": positions}, ranks="threads")
    check_equal(result, *single_process(Trainable(dense), ids, position_ids=positions, prefix="inner.model."))


class Trainable(torch.nn.Module):
    """A compiled dense program called like a Hugging Face model, with trainable parameters."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled, self.inner = compiled, compiled.module
        for p in self.inner.parameters():
            p.requires_grad_(True)

    def forward(self, ids, attention_mask=None, position_ids=None):
        return self.compiled(ids, attention_mask=attention_mask, position_ids=position_ids)


def test_collectives_per_layer():
    """Four all-to-alls per attention (q, k, v in, output back); the key padding is gathered once."""
    program = lcc.compile("tiny-llama", to="ulysses", degree=2).program
    sites = program.attention_nodes()
    for node in sites:
        assert all(a.target is A2A for a in node.args[:3]) and node.args[3].target is GATHER
        (back,) = node.users
        assert back.target is A2A and back.args[1:] == (2, 1, [2, 1, 0])  # sequence → heads over a Ulysses group of 2
        assert node.meta["lcc"]["collectives"]["all_to_all"] == 4
    assert [n.meta["lcc"]["collectives"]["all_gather"] for n in sites] == [1] + [0] * (len(sites) - 1)
    calls = [n.target for n in program.gm.graph.nodes if n.op == "call_function"]
    assert calls.count(A2A) == 4 * len(sites) and calls.count(GATHER) == 1


def test_replicated_kv_heads_in_graph():
    program = lcc.compile("tiny-llama", to="ulysses", degree=4).program
    node = program.attention_nodes()[0]
    k_in = node.args[1].args[0]
    assert k_in.target is torch.ops.aten.repeat_interleave.self_int and k_in.args[1:] == (2, 1)
    assert node.meta["lcc"]["kv_replicated"] == 2 and tuple(node.args[1].meta["val"].shape[:2])[1] == 1


def odd_heads_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=1, vocab_size=64
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_bad_degrees_and_lengths(tmp_path):
    with pytest.raises(LccError, match="4 query heads are not divisible by the sequence-parallel degree 3"):
        lcc.compile("tiny-llama", to="ulysses", degree=3)
    with pytest.raises(LccError, match="3 KV heads and degree 2: neither divides the other"):
        lcc.compile(odd_heads_model(), to="ulysses", degree=2)
    compiled = lcc.compile("tiny-llama", to="ulysses", degree=2)
    with pytest.raises(LccError, match="no KV cache"):
        compiled.generate([[1, 2]], max_new_tokens=2)
    from longctx_compile.distributed import shard

    with pytest.raises(LccError, match=r"sequence length 15 is not divisible by 2 \(the sequence-parallel degree 2\)"):
        shard(torch.zeros(1, 15), 2, 0)
    path = compiled.save(tmp_path / "sp.lcc")
    with pytest.raises(Exception, match="converted for sequence-parallel degree 2, but the group has 1 ranks"):
        train_step(path, 1, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, ranks="threads")


def test_verify_and_inspect_a_ulysses_artifact(tmp_path):
    """lcc verify starts the P ranks itself; lcc inspect reports the collectives and their bytes."""
    import json

    path = lcc.compile("tiny-qwen2", to="ulysses", degree=2).save(tmp_path / "sp.lcc")
    result = lcc_cli.run("verify", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and all(c["length"] % 2 == 0 for c in report["cases"]) and any(c["padded"] for c in report["cases"])
    result = lcc_cli.run("inspect", path, "--seq-len", "4096", "--json")
    comm = json.loads(result.stdout)["communication"]
    assert comm["tokens"] == 4096 and len(comm["sites"]) == 2
    hq, hkv, d = 4, 2, 16  # tiny-qwen2: 4 query heads, 2 KV heads, head dim 16, fp32
    share = (2 - 1) * (4096 // 2) * d * 4 // 2  # an all-to-all keeps 1/P of its input and sends the rest
    assert comm["sites"][0]["bytes_forward"] == {"q": hq * share, "k": hkv * share, "v": hkv * share, "out": hq * share}


def test_example_training_script_under_torchrun(tmp_path):
    """``lcc launch`` runs examples/train_sp.py under torchrun on a zigzag-ring artifact with the tiled loss; the loss falls."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    path = lcc.compile("tiny-llama", to="ring", degree=2).save(tmp_path / "sp.lcc")
    script = Path(__file__).parent.parent / "examples" / "train_sp.py"
    command = [sys.executable, "-m", "longctx_compile", "launch", "--nproc", "2", str(script), str(path), "--steps", "6", "--tile", "16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, result.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5


GROUP_AFTER_DESTROY = """
import os, sys
import torch.distributed as dist
import longctx_compile as lcc
from longctx_compile import distributed as sp

sp.init("gloo")
lcc.load(sys.argv[1])  # imports torch._dynamo (torch.export.load)
dist.destroy_process_group()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sum(name.startswith(("gloo", "pt_gloo")) for name in threads))
"""


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="reads the process's threads from /proc (Linux)")
def test_the_process_group_ends_with_destroy_after_a_load(dense_artifact):
    """After ``sp.init`` and ``lcc.load``, ``destroy_process_group`` stops gloo's threads: none is left to abort the exit."""
    import os
    import subprocess
    import sys

    from longctx_compile.distributed.ranks import _free_port

    path = dense_artifact
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    result = subprocess.run([sys.executable, "-c", GROUP_AFTER_DESTROY, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "0"
