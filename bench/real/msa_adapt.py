"""MSA on a real model before and after ``lcc train``: reading pooled memory, measured as the answer's NLL.

The model is converted to msa (the retrofit recipe, every layer routed, the chat header the template prefix) and
adapted with ``lcc.train`` on records cut from English text that the evaluation does not use
(``/usr/share/common-licenses``): a bank of ``--bank`` documents of ``--doc-tokens`` tokens encoded after the chat
header, the query the header and a ``--query``-token span of one of them, the answer the ``--answer`` tokens after
the span. Objective ``distill`` (KL to the source model with the positive document in its prompt), the whole
model trainable, plus the router loss. Evaluated on such records cut from other text (Python's reference manual,
``pydoc_data``): the mean NLL per answer token of dense with the positive document in its prompt, and of msa routed
over the bank, before and after, with the routing hit rate. The trained artifact is kept (``--out``) for
``bench/real/msa_memory.py artifact:PATH`` (passkey from a bank of 20 documents).

    python bench/real/msa_adapt.py /tmp/smol/smollm2 --out /tmp/smol/msa16.trained.lcc --steps 200
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent


def _memory_bench():
    spec = importlib.util.spec_from_file_location("msa_memory", HERE / "msa_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(tokens: list[int], header: list[int], count: int, bank: int, length: int, query: int, answer: int, seed: int) -> list[dict]:
    """``count`` records: ``bank`` windows of ``length`` tokens from ``tokens``, one the positive, the query the header and a
    span of it, the answer the tokens after the span."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        docs = [tokens[s : s + length] for s in (rng.randrange(0, len(tokens) - length) for _ in range(bank))]
        positive = rng.randrange(bank)
        at = rng.randrange(0, length - query - answer)
        span = docs[positive][at : at + query + answer]
        out.append({"documents": docs, "prefix": header, "query": header + span[:query], "answer": span[query:], "positive": positive})
    return out


def answer_nll(model, held_out: list[dict]) -> tuple[float, float, float]:
    """(NLL of the model run dense with the positive in its prompt, NLL routed over the bank, routing hit) per answer token."""
    from longctx_compile.forms.msa.train import Example, answer_logits

    dense = routed = hits = layers = 0.0
    tokens = 0
    for r in held_out:
        e = Example(r["documents"], r["query"], r["answer"], [r["positive"]], r["prefix"])
        target = torch.tensor(e.answer)
        with torch.no_grad():
            logits = model.dense(e.dense_prompt(len(e.prefix)))[0, -len(e.answer) :]
            dense += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            bank = model.encode(e.documents, ids=[str(i) for i in range(len(e.documents))], prefix=e.prefix)
            logits, result = answer_logits(model, bank, e)
            routed += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        needle = bank.docs.index(str(r["positive"]))
        hits += sum(float((chosen[0] == needle).any()) for chosen in result.docs.values())
        layers += len(result.docs)
        tokens += len(e.answer)
    return dense / tokens, routed / tokens, hits / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face folder (with its tokenizer)")
    parser.add_argument("--out", help="keep the trained artifact here")
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--topk", default="2")
    parser.add_argument("--bank", type=int, default=4, help="documents per training and evaluation bank")
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--query", type=int, default=16)
    parser.add_argument("--answer", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--aux", type=float, default=1.0)
    parser.add_argument("--eval", type=int, default=20, help="held-out records")
    parser.add_argument("--corpus", default="/usr/share/common-licenses")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import longctx_compile as lcc
    from longctx_compile.capture import load_model
    from longctx_compile.forms.msa.runtime import MsaModel
    from longctx_compile.runtime.tokenizer import tokenizer_for

    memory = _memory_bench()
    console = Console(stderr=args.json, width=160)
    tokenizer = tokenizer_for({"source": load_model(args.model)[1].to_json()})
    header, _ = memory.chat_pieces(tokenizer)
    corpus = Path(args.corpus)
    text = "\n\n".join(f.read_text(errors="ignore") for f in sorted(corpus.iterdir()) if f.is_file()) if corpus.is_dir() else corpus.read_text()
    from pydoc_data.topics import topics

    train_tokens = tokenizer.encode(text, add_special_tokens=False)
    eval_tokens = tokenizer.encode("\n\n".join(topics[name] for name in sorted(topics)), add_special_tokens=False)
    shape = (args.bank, args.doc_tokens, args.query, args.answer)
    held_out = records(eval_tokens, header, args.eval, *shape, seed=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in records(train_tokens, header, args.steps, *shape, seed=0)))
        options = dict(pool=args.pool, topk=args.topk, routed_layers="all", prefix=len(header), max_len=str(8192))
        source = lcc.compile(args.model, to="msa", **options).save(tmp / "msa.lcc")
        loaded = lcc.load(source)
        rows.append(("training-free", *answer_nll(MsaModel(loaded.program, loaded.signature), held_out), 0, 0.0))
        console.print(f"training-free: dense NLL {rows[-1][1]:.3f}, msa NLL {rows[-1][2]:.3f}, routing hit {rows[-1][3]:.2f}")
        out = Path(args.out) if args.out else tmp / "trained.lcc"
        start = time.perf_counter()
        lcc.train(
            source, str(data), out, objective="distill", trainable="all", steps=args.steps, length=args.doc_tokens, lr=args.lr, force=True,
            form_options={"aux": args.aux}, progress=lambda row: console.print(f"step {row['step']}: loss {row['loss']:.3f}") if row["step"] % 20 == 0 else None,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        loaded = lcc.load(out)
        rows.append((f"after lcc train ({args.steps} steps)", *answer_nll(MsaModel(loaded.program, loaded.signature), held_out), args.steps, seconds))
        console.print(f"trained: dense NLL {rows[-1][1]:.3f}, msa NLL {rows[-1][2]:.3f}, routing hit {rows[-1][3]:.2f}")
    if args.json:
        print(json.dumps({"rows": rows, "args": {k: v for k, v in vars(args).items() if k != "json"}}))
        return
    title = f"{args.model}: msa P={args.pool} top-{args.topk}, answer NLL per token over {args.eval} held-out banks of {args.bank} documents"
    table = Table("setting", "its dense NLL", "msa NLL", "gap to the source's dense", "routing hit", "steps", "train s", title=title)
    source = rows[0][1]  # the source model, the positive document in its prompt
    for name, dense, routed, hit, steps, seconds in rows:
        table.add_row(name, f"{dense:.3f}", f"{routed:.3f}", f"{routed - source:+.3f}", f"{hit:.2f}", str(steps), f"{seconds:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
