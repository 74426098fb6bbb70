"""An msa artifact's encode, query and decode programs (torch.export) equal the eager MSA runtime."""

from __future__ import annotations

import torch

import longctx_compile as lcc
from longctx_compile.artifact import read_model_program as artifact_program
from longctx_compile.forms import derive
from longctx_compile.forms.msa.bank import PARTS
from longctx_compile.forms.msa.programs import padded_table
from longctx_compile.forms.msa.runtime import MsaModel


def test_saved_programs_equal_the_eager_runtime(tmp_path):
    compiled = lcc.compile("tiny-llama", to="msa", pool=2, topk="2", routed_layers="all")
    path = compiled.save(tmp_path / "model.lcc")
    loaded = lcc.load(path)
    assert loaded.manifest["derived"]["msa"] == ["encode", "query", "decode"]
    model = MsaModel(loaded.program, loaded.signature)
    program = artifact_program(path, loaded.manifest)
    encode, query, decode = (derive(program, f"msa.{name}").module() for name in ("encode", "query", "decode"))
    g = torch.Generator().manual_seed(0)

    # encode: rows of other lengths (a multiple of the pool) and padding than the export example
    ids, real = torch.randint(0, 256, (3, 10), generator=g), torch.ones(3, 10, dtype=torch.long)
    real[1, 7:] = 0
    got = encode(model.state, ids, real)
    want = model.encode_rows(ids, real)
    flat = [t for site in model.layers for name in PARTS for t in want[name][site]]
    assert len(got) == len(flat) and all(torch.equal(a, b) for a, b in zip(got, flat, strict=True))

    # query over a bank of 3 documents (one chunk table wider than the example), then one decode step
    bank = model.encode([torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 8, 5)])
    question = torch.randint(0, 256, (2, 5), generator=g)
    mask, positions = torch.ones_like(question), torch.arange(5).expand(2, 5) + 2
    eager = model.query(bank, question, mask, positions)
    tensors = [[getattr(bank, name)[site] for site in bank.layers] for name in ("router_keys", "keys", "values")]
    out = query(model.state, question, mask, positions, *tensors, bank.chunk_doc, padded_table(bank.doc_chunks(), 2))
    n = len(model.layers)
    torch.testing.assert_close(out[0], eager.logits[:, -1:])
    for i, site in enumerate(model.layers):
        assert torch.equal(out[1 + 2 * i], eager.docs[site]) and torch.equal(out[2 + 2 * i], eager.scores[site])
    contexts = [list(out[1 + 2 * n + 3 * i : 4 + 2 * n + 3 * i]) for i in range(len(eager.context))]
    token = eager.logits[:, -1].argmax(-1, keepdim=True)
    stepped = decode(model.state, token, positions[:, -1:], contexts)
    torch.testing.assert_close(stepped[0], model.decode(eager, token))
