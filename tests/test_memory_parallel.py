"""Memory Parallel on local gloo ranks: the same global top-k documents and logits as one process."""

from __future__ import annotations

import pytest
import torch

import longctx_compile as lcc
from longctx_compile.forms.msa.parallel import msa_query
from longctx_compile.forms.msa.runtime import MsaModel


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mp")
    compiled = lcc.compile("tiny-llama", to="msa", pool=2, routed_layers="all", topk="3", score="dot")
    compiled.save(folder / "model.lcc")
    model = MsaModel(compiled.program.ep, compiled.program.signature)
    g = torch.Generator().manual_seed(0)
    lengths = [1, 12, 3, 7, 2, 9, 4]  # uneven: shards differ in document counts
    docs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    bank = model.encode(docs, ids=[f"d{i}" for i in range(len(docs))])
    bank.save(folder / "bank")
    batches = [torch.randint(0, 256, (2, 5), generator=g) for _ in range(4)]
    return folder, model, bank, batches


@pytest.mark.parametrize("world", [2, 4])
def test_memory_parallel_equals_one_rank(setup, world):
    folder, model, bank, batches = setup
    results = msa_query(folder / "model.lcc", folder / "bank", batches[:world])
    owned = [r["owned"] for r in results]
    assert sorted(d for o in owned for d in o) == list(range(7)) and len({len(o) for o in owned}) > 1
    for batch, got in zip(batches[:world], results, strict=True):
        want = model.query(bank, batch)
        for layer in bank.layers:
            assert got["docs"][layer].tolist() == want.docs[layer].tolist()
        torch.testing.assert_close(got["logits"], want.logits)
        assert got["sent_bytes"] > 0


def test_example_under_torchrun_answers_as_one_process(setup):
    """examples/msa_parallel.py under torchrun (``lcc launch``): two ranks, two different questions, each answered
    and routed as one process answers it alone."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    folder, model, bank, batches = setup
    questions = [batches[0][0].tolist(), batches[1][1].tolist()]
    script = Path(__file__).parent.parent / "examples" / "msa_parallel.py"
    command = [sys.executable, "-m", "longctx_compile", "launch", "--nproc", "2", str(script), str(folder / "model.lcc"), str(folder / "bank"), "-n", "4"]
    for q in questions:
        command += ["--question-ids", ",".join(map(str, q))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks_out = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(r["documents"] for r in ranks_out) == len(bank.docs)
    for q, got in zip(questions, ranks_out, strict=True):
        tokens, alone = model.generate(bank, torch.tensor([q]), 4)
        assert got["answer_ids"] == tokens[0]
        assert got["routed"] == {str(k): [bank.docs[d] for d in v[0].tolist()] for k, v in alone.docs.items()}
