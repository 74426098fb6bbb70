"""``lcc memory``: encode, add, remove, info and query from the command line, and its one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import lcc_cli
import pytest


def lcc(*args):
    result = lcc_cli.run(*args)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("msa")
    result = lcc("convert", "tiny-llama", "--to", "msa", "--opt", "pool=2", "--opt", "topk=2", "-o", str(folder / "model.lcc"))
    assert result.returncode == 0, result.stderr
    return folder


def write_docs(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def test_encode_add_remove_info_query(artifact, tmp_path):
    model, bank = str(artifact / "model.lcc"), str(tmp_path / "bank")
    docs = write_docs(tmp_path / "docs.jsonl", [{"id": "a", "tokens": [1, 2, 3, 4, 5]}, {"id": "b", "tokens": [6, 7]}])
    assert lcc("memory", "encode", model, "--docs", docs, "-o", bank).returncode == 0
    more = write_docs(tmp_path / "more.jsonl", [{"id": "c", "tokens": [8, 9, 10]}])
    result = lcc("memory", "add", model, bank, "--docs", more)
    assert result.returncode == 0 and "1 documents added, 3 in all" in result.stdout
    info = json.loads(lcc("memory", "info", bank, "--json").stdout)
    assert (info["documents"], info["tokens"], info["chunks"]) == (3, 10, 6)  # chunks of 2: 3 + 1 + 2
    result = lcc("memory", "query", model, "--bank", bank, "--question-ids", "3,4", "-n", "4", "--json")
    answer = json.loads(result.stdout)
    assert len(answer["routed"]["1"]) == 2 and set(answer["routed"]["1"]) <= {"a", "b", "c"} and len(answer["answer_ids"]) == 4
    parallel = json.loads(lcc("memory", "query", model, "--bank", bank, "--question-ids", "3,4", "-n", "4", "--json", "--nproc", "2").stdout)
    assert parallel == answer  # Memory Parallel over 2 ranks: same routing, same answer
    result = lcc("memory", "remove", bank, "--ids", "a", "-o", str(tmp_path / "smaller"))
    assert result.returncode == 0 and json.loads(lcc("memory", "info", str(tmp_path / "smaller"), "--json").stdout)["documents"] == 2
    assert json.loads(lcc("memory", "info", bank, "--json").stdout)["documents"] == 3  # -o leaves the input alone


def test_inspect_shows_each_routed_layer(artifact):
    result = lcc_cli.run("inspect", artifact / "model.lcc", env={"COLUMNS": "250"})
    assert result.returncode == 0 and "msa P=2 top-2 docs headwise (votes)" in result.stdout and "msa (reference)" in result.stdout


def test_refusals_are_one_line(artifact, tmp_path):
    model, bank = str(artifact / "model.lcc"), str(tmp_path / "bank")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "tokens": [1, 2]}\nnot json\n')
    cases = [
        (("memory", "encode", model, "--docs", str(bad), "-o", bank), "bad.jsonl:2: not a JSON object"),
        (("memory", "encode", model, "--docs", write_docs(tmp_path / "t.jsonl", [{"text": "hi"}]), "-o", bank), "has no tokenizer saved"),
        (("memory", "info", str(tmp_path)), "is not a memory bank"),
        (("memory", "query", model, "--bank", bank, "--question-ids", "1", "--prefix-ids", "4"), "--opt prefix=0"),
    ]
    for args, message in cases:
        result = lcc(*args)
        assert result.returncode != 0 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    other = tmp_path / "other.lcc"
    assert lcc("convert", "tiny-llama", "--to", "msa", "--opt", "pool=4", "-o", str(other)).returncode == 0
    docs = write_docs(tmp_path / "d.jsonl", [{"tokens": [1, 2, 3]}])
    assert lcc("memory", "encode", str(other), "--docs", docs, "-o", bank).returncode == 0
    result = lcc("memory", "query", model, "--bank", bank, "--question-ids", "1")
    assert result.returncode == 2 and "encoded with pool=4, but this model has pool=2" in result.stderr


def test_text_documents_and_questions_with_the_saved_tokenizer_and_source_router_weights(tmp_path, hf_folder_with_tokenizer):
    """An HF folder with a tokenizer and MSA router weights (under the released names, ``….router_q_proj.0.weight``):
    convert loads the routers instead of copying q/k_proj, and encode/query take text."""
    import safetensors.torch
    import torch

    folder, words = hf_folder_with_tokenizer
    g = torch.Generator().manual_seed(0)
    routers = {
        "model.layers.1.self_attn.router_q_proj.0.weight": torch.randn(64, 64, generator=g),
        "model.layers.1.self_attn.router_k_proj.0.weight": torch.randn(32, 64, generator=g),
    }
    safetensors.torch.save_file(routers, str(folder / "msa_router.safetensors"))
    model = tmp_path / "m.lcc"
    assert lcc("convert", str(folder), "--to", "msa", "--opt", "pool=2", "--opt", "topk=1", "-o", str(model)).returncode == 0
    import longctx_compile as lcc_api

    loaded = lcc_api.load(model)
    assert loaded.signature["msa"]["positions"] == "global"  # trained routers: the paper's positions, which such a model expects
    state = loaded.program.state_dict
    for name, value in routers.items():
        torch.testing.assert_close(state[name.replace(".0.weight", ".weight")], value)
    docs = write_docs(tmp_path / "docs.jsonl", [{"id": "x", "text": "w5 w6 w7"}, {"id": "y", "text": "w8 w9"}])
    assert lcc("memory", "encode", str(model), "--docs", docs, "-o", str(tmp_path / "bank")).returncode == 0
    result = lcc("memory", "query", str(model), "--bank", str(tmp_path / "bank"), "--question", "w6 w7", "-n", "3", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["routed"]["1"][0] in {"x", "y"} and answer["answer"].split() == [words[i] for i in answer["answer_ids"]]


def test_an_msa_artifact_generates_with_and_without_a_bank(artifact, tmp_path):
    """Without a bank an msa program is the dense model (its own input is its whole context); with one, each prompt is
    a query routed over the bank and decoded over what it assembled, as ``MsaModel.generate`` does."""
    import torch

    import longctx_compile as lcc_api
    from longctx_compile.errors import LccError
    from longctx_compile.forms.msa import bank as memory_bank
    from longctx_compile.forms.msa.runtime import MsaModel

    model = str(artifact / "model.lcc")
    loaded = lcc_api.load(model)
    assert loaded.manifest["derived"] == {"kv_cache": ["prefill", "decode", "static"], "msa": ["encode", "query", "decode"]}  # both have a decode
    dense = lcc_api.compile("tiny-llama").generate([[1, 2, 3]], max_new_tokens=5)[0]
    plain = lcc("generate", model, "--prompt-ids", "1,2,3", "-n", "5")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == ",".join(map(str, dense))

    bank = str(tmp_path / "bank")
    docs = write_docs(tmp_path / "docs.jsonl", [{"id": "a", "tokens": [11, 12, 13, 14, 15]}, {"id": "b", "tokens": [16, 17]}, {"id": "c", "tokens": [18]}])
    assert lcc("memory", "encode", model, "--docs", docs, "-o", bank).returncode == 0
    msa = MsaModel(loaded.program, loaded.signature)
    want, _ = msa.generate(memory_bank.load(bank, model=msa.facts), torch.tensor([[1, 2, 3]]), 5)
    assert loaded.generate([[1, 2, 3]], max_new_tokens=5, bank=bank) == want
    routed = lcc("generate", model, "--bank", bank, "--prompt-ids", "1,2,3", "-n", "5", "--json")
    assert routed.returncode == 0, routed.stderr
    assert json.loads(routed.stdout)[0]["new_ids"] == want[0]
    # the documents' positions: the artifact's (contiguous, for routers copied from q/k) unless overridden
    assert loaded.signature["msa"]["positions"] == "contiguous"
    glob, _ = MsaModel(loaded.program, loaded.signature, positions="global").generate(memory_bank.load(bank, model=msa.facts), torch.tensor([[1, 2, 3]]), 5)
    assert loaded.generate([[1, 2, 3]], max_new_tokens=5, bank=bank, positions="global") == glob
    routed = lcc("generate", model, "--bank", bank, "--prompt-ids", "1,2,3", "-n", "5", "--json", "--positions", "global")
    assert json.loads(routed.stdout)[0]["new_ids"] == glob[0]
    asked = lcc("memory", "query", model, "--bank", bank, "--question-ids", "1,2,3", "-n", "5", "--json", "--positions", "global")
    assert json.loads(asked.stdout)["answer_ids"] == glob[0]
    # a bank encoded after the queries' prefix (this artifact's prefix is 0 tokens: any prefix is refused in one line)
    refused = lcc("memory", "encode", model, "--docs", docs, "-o", str(tmp_path / "after"), "--prefix-ids", "1,2")
    assert refused.returncode == 2 and "a prefix of 2 tokens to encode after, but the artifact was converted with --opt prefix=0" in refused.stderr
    wrong = lcc("generate", model, "--bank", bank, "--prompt-ids", "1,2,3", "--positions", "dense")
    assert wrong.returncode == 2 and wrong.stderr.strip() == "error: invalid positions='dense': expected contiguous or global"
    with pytest.raises(LccError, match="positions= places the documents of a memory bank: give a bank too"):
        loaded.generate([[1, 2, 3]], max_new_tokens=2, positions="global")
    # prompts of different lengths are left-padded into one batch of queries
    both = loaded.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, bank=bank)
    assert both[0] == want[0][:4] and len(both[1]) == 4


def test_generate_refuses_a_bank_for_other_forms(tmp_path):
    dense = tmp_path / "dense.lcc"
    assert lcc("convert", "tiny-llama", "-o", str(dense)).returncode == 0
    result = lcc("generate", str(dense), "--bank", str(tmp_path), "--prompt-ids", "1,2")
    assert result.returncode == 2 and "not msa" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_concurrent_adds_to_one_bank_both_land(artifact, tmp_path):
    """Two ``lcc memory add`` processes on one bank: the second waits for the first, so no acknowledged document is lost
    (each used to read the same bank and the last write won)."""
    model, bank = str(artifact / "model.lcc"), str(tmp_path / "bank")
    assert lcc("memory", "encode", model, "--docs", write_docs(tmp_path / "d.jsonl", [{"id": "base", "tokens": [1, 2, 3]}]), "-o", bank).returncode == 0
    batches = [
        [{"id": f"{side}{i}", "tokens": [(i + j) % 200 + 1 for j in range(96)]} for i in range(150)] for side in "xy"
    ]  # seconds of encoding: the two overlap
    command = [sys.executable, "-c", "from longctx_compile.cli.app import main; main()", "memory", "add", model, bank, "--docs"]
    procs = [
        subprocess.Popen([*command, write_docs(tmp_path / f"{i}.jsonl", b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, b in enumerate(batches)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert all("150 documents added" in stdout for stdout, _ in results)
    info = json.loads(lcc("memory", "info", bank, "--json").stdout)
    assert info["documents"] == 301  # 1 + 150 + 150


def test_a_held_write_lock_times_out_in_one_line(tmp_path):
    import os

    from longctx_compile.artifact import write_lock
    from longctx_compile.errors import LccError

    (tmp_path / "bank").mkdir()
    told = []
    with write_lock(tmp_path / "bank"):
        with pytest.raises(LccError, match=rf"being written by another process \(pid {os.getpid()}\); waited 0 s"):
            with write_lock(tmp_path / "bank", timeout=0.3, waiting=told.append):
                pass
    assert told == [str(os.getpid())]
    with write_lock(tmp_path / "bank", timeout=0.3):  # released: the next writer gets it at once
        pass
