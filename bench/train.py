"""``lcc train`` at work: a sparse form's retrieval on a model trained here, before and after adapting it with lcc train.

The model and task are ``bench/hsa_quality.py``'s: a 2-layer Llama trained on multi-key associative recall (random
filler, key→value pairs spread over the sequence, every key asked again at the end). It is converted to HSA in
the paper's setting (``recipe=paper``: landmark-style scores, softmax fusion, a selection shared by each KV
head's query heads) with ``score=learned`` (the retrieval projections HSA-UltraLong learns, starting from the
identity, i.e. from landmark scores), K = 8 chunks of S = 64, window 4. That artifact is then adapted with
``lcc.train`` on fresh task sequences (a JSONL of token lists), distilling towards the dense source:

- ``new``: only the retrieval projections the form added train (the backbone frozen);
- ``all``: the whole model continues training in its form.

``--fusion joint`` converts with one softmax over the chosen keys instead (the learned scores then only select, and
train from the retrieval loss alone); ``--retrieval W`` adds HSA's retrieval loss (``lcc train --opt aux=W``: the learned
chunk scores taught the exact chunk ranking, ``forms/hsa/train.py``) to the adapted rows; ``--landmarks R`` summarises each
chunk by R attention-pooled landmarks instead of its mean key (``--opt landmarks=R``); ``--nope`` scores chunks with the
queries and keys before RoPE (``--opt nope=true``, the paper's "NoPE for long"); ``--exact-row`` adds selection by
each chunk's true LSE (``score=exact``), what a perfect summary would choose.

Accuracy is the share of asked keys whose value is the argmax at the query position, on the same fresh
sequences for every row; the table gives each row against dense, the steps and the CPU time of adaptation.

    python bench/train.py --save /tmp/recall          # trains the model (~7 min on 2 cores), then the rest
    python bench/train.py --model /tmp/recall         # reuses it
    python bench/train.py --smoke                     # seconds: checks the harness, numbers mean nothing

``--form msa``: the model and task are ``bench/msa_quality.py``'s instead (a 2-layer Llama answering
``[document ; ASK key] → value``), a bank of 64 such documents, each question routed over all of them with the
artifact's own positions. Converted with every layer routed and ``prefix=1`` (ASK does not route) at pool 16 and
64 (a 32-token document is 2 chunks, or 1), top-4, then adapted with ``lcc.train`` on fresh banks of
``--bank`` documents (a JSONL of documents/query/answer records): the backbone learns to read pooled memory
from the answer's loss and the routers learn from the router loss (``--opt aux``), the positive read in every
layer while they learn (``select=gold``); each step's banks are fresh ones. Accuracy is the share of the 64 questions answered right; the hit
rate the share whose document is in the top-4.

    python bench/train.py --form msa --save /tmp/docs  # trains the model (~2 min), then the rest
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

HERE = Path(__file__).parent


def _bench(name: str):
    """A sibling bench (``hsa_quality``, ``msa_quality``) as a module: the model, the task and the accuracy shared with it."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(args, train, console) -> tuple[Path, float]:
    """The folder of the trained task model: ``--model``, or trained now (and kept under ``--save``)."""
    if args.model:
        return Path(args.model), 0.0
    start = time.perf_counter()
    model = train()
    folder = Path(args.save) if args.save else args.tmp / "model"
    model.save_pretrained(folder)
    return folder, time.perf_counter() - start


def hsa_rows(args, console) -> tuple[list[dict], dict]:
    """Dense, HSA (paper setting) training-free, and after lcc train of the new projections or the whole model."""
    import longctx_compile as lcc

    quality = _bench("hsa_quality")
    model_args = argparse.Namespace(phases=[(128, 4000), (512, 400), (2048, 150)], batch=32, needles=4, lr=1e-3, eval_lens=args.eval_lens, seed=args.seed)
    chunk, window, topk = 64, 4, "8"
    if args.smoke:
        model_args.phases, model_args.batch = [(128, 3), (256, 1)], 2
        args.eval_lens, args.eval_seqs, args.steps, args.seq_len, args.docs = [320], 2, 2, 128, 4
        model_args.eval_lens, chunk, window = args.eval_lens, 16, 1
    folder, trained_s = _model(args, lambda: quality.train(model_args, console)[0], console)
    g = torch.Generator().manual_seed(args.seed + 1)
    evals = {T: [quality.batch(1, T, model_args.needles, g) for _ in range(args.eval_seqs)] for T in args.eval_lens}
    g = torch.Generator().manual_seed(args.seed + 2)
    data = args.tmp / "task.jsonl"
    data.write_text("\n".join(json.dumps({"tokens": quality.batch(1, args.seq_len, model_args.needles, g)[0][0].tolist()}) for _ in range(args.docs)))
    longest = max(args.eval_lens)
    hsa = dict(
        to="hsa",
        recipe="paper",
        score="learned",
        fusion=args.fusion,
        chunk=chunk,
        window=window,
        topk=topk,
        landmarks=args.landmarks,
        nope=args.nope,
        max_len=longest,
    )
    rows = []

    def score(name: str, compiled, steps: int = 0, seconds: float = 0.0) -> None:
        rows.append({"setting": name, **{str(T): quality.accuracy(compiled, evals[T]) for T in args.eval_lens}, "steps": steps, "seconds": seconds})
        console.print(f"{name}: " + ", ".join(f"{T}: {rows[-1][str(T)]:.2f}" for T in args.eval_lens))

    score("dense", lcc.compile(str(folder), to="dense", max_len=longest))
    source = lcc.compile(str(folder), **hsa).save(args.tmp / "hsa.lcc")
    form = (
        "hsa paper K=8"
        + (", joint fusion" if args.fusion == "joint" else "")
        + (f", {args.landmarks} pooled landmarks" if args.landmarks else "")
        + (", NoPE scores" if args.nope else "")
    )
    if args.exact_row:  # what a perfect chunk summary would select: each chunk by its true LSE
        score(
            "hsa K=8, every chunk scored by its true LSE (score=exact, joint fusion)",
            lcc.compile(str(folder), **{**hsa, "score": "exact", "fusion": "joint", "landmarks": 0, "nope": False}),
        )
    score(f"{form}, training-free", lcc.load(source))
    retrieval = {"aux": str(args.retrieval), "temperature": str(args.temperature)} if args.retrieval else {}
    for trainable in args.trainable:
        start = time.process_time()
        out = args.tmp / f"{trainable}.lcc"
        lcc.train(source, str(data), out, trainable=trainable, steps=args.steps, length=args.seq_len, lr=args.lr, seed=args.seed, form_options=retrieval)
        named = f"{form}, lcc train --trainable {trainable}" + (f" --opt aux={args.retrieval} temperature={args.temperature}" if retrieval else "")
        score(named, lcc.load(out), args.steps, time.process_time() - start)
    columns = [str(T) for T in args.eval_lens]
    title = f"asked-value accuracy, {model_args.needles} needles, {args.eval_seqs} sequences per length (S={chunk}, K={topk}, w={window})"
    note = f"adaptation: lcc train --objective distill --seq-len {args.seq_len} --lr {args.lr}, {args.docs} task sequences"
    return rows, dict(trained_s=trained_s, columns=columns, title=title, note=note)


def msa_rows(args, console) -> tuple[list[dict], dict]:
    """Dense on the right document; per pool, msa training-free and after lcc train on documents and queries."""
    import longctx_compile as lcc
    from longctx_compile.forms.msa.runtime import MsaModel

    quality = _bench("msa_quality")
    model_args = argparse.Namespace(steps=3000, batch=64, doc_len=32, lr=2e-3, seed=args.seed)
    docs, pools, topk = 64, args.pools, 4
    if args.smoke:
        model_args.steps, model_args.batch, docs, pools, args.steps = 3, 8, 8, [16], 2
    records = args.steps * args.batch  # every bank fresh: with fewer, the routers learn the banks' filler (512 banks: hit 0.45, not 0.72)
    folder, trained_s = _model(args, lambda: quality.train(model_args, console)[0], console)
    g = torch.Generator().manual_seed(args.seed + 1)
    bank_docs, keys, values = quality.documents(docs, model_args.doc_len, g)
    questions = torch.stack([torch.full_like(keys, quality.ASK), keys], dim=1)
    dense = lcc.compile(str(folder))
    with torch.no_grad():
        right = dense(torch.cat([bank_docs, questions], dim=1))[:, -1].argmax(-1)
    rows = [{"setting": "dense, the right document only", "accuracy": (right == values).float().mean().item(), "hit": None, "steps": 0, "seconds": 0.0}]
    console.print(f"dense: {rows[0]['accuracy']:.2f}")
    g = torch.Generator().manual_seed(args.seed + 2)
    data = args.tmp / "banks.jsonl"
    with data.open("w") as f:
        for _ in range(records):  # fresh banks, never the evaluated one
            d, k, v = quality.documents(args.bank, model_args.doc_len, g)
            answer = int(torch.randint(0, args.bank, (1,), generator=g))
            f.write(json.dumps({"documents": d.tolist(), "query": [quality.ASK, int(k[answer])], "answer": [int(v[answer])], "positive": answer}) + "\n")

    def score(name: str, compiled, steps: int = 0, seconds: float = 0.0) -> None:
        model = MsaModel(compiled.program, compiled.signature)  # a loaded artifact
        bank = model.encode(bank_docs.tolist(), batch_size=16)
        hits = correct = 0
        for i in range(docs):
            result = model.query(bank, questions[i : i + 1])
            hits += int(all(i in chosen[0].tolist() for chosen in result.docs.values()))
            correct += int(result.logits[0, -1].argmax() == values[i])
        rows.append({"setting": name, "accuracy": correct / docs, "hit": hits / docs, "steps": steps, "seconds": seconds})
        console.print(f"{name}: accuracy {correct / docs:.2f}, hit {hits / docs:.2f}")

    for pool in pools:
        options = dict(to="msa", pool=pool, topk=str(topk), routed_layers="all", prefix=1)
        source = lcc.compile(str(folder), **options).save(args.tmp / f"msa{pool}.lcc")
        score(f"msa P={pool} top-{topk}, training-free", lcc.load(source))
        out = args.tmp / f"msa{pool}.trained.lcc"
        start = time.process_time()
        lcc.train(
            source,
            str(data),
            out,
            objective="lm",
            trainable="all",
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            form_options={"aux": args.aux},
        )
        score(f"msa P={pool} top-{topk}, lcc train --trainable all", lcc.load(out), args.steps, time.process_time() - start)
    title = f"answer accuracy over a bank of {docs} documents of {model_args.doc_len} tokens (routing hit: the right document in every layer's top-{topk})"
    note = f"adaptation: lcc train --objective lm --trainable all --batch {args.batch} --lr {args.lr} --opt aux={args.aux}, {records} banks of {args.bank} documents"
    return rows, dict(trained_s=trained_s, columns=["accuracy", "hit"], title=title, note=note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--form", choices=("hsa", "msa"), default="hsa")
    parser.add_argument("--model", help="a model folder saved by an earlier --save (skips training it)")
    parser.add_argument("--save", help="save the trained model here")
    parser.add_argument("--eval-lens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192], help="hsa: evaluated lengths")
    parser.add_argument("--eval-seqs", type=int, default=64, help="hsa: evaluated sequences per length (4 asked values each)")
    parser.add_argument("--steps", type=int, default=200, help="lcc train steps per adapted row")
    parser.add_argument("--seq-len", type=int, default=2048, help="hsa: lcc train window")
    parser.add_argument("--trainable", type=lambda s: s.split(","), default=["new", "all"], help="hsa: the adapted rows (lcc train --trainable)")
    parser.add_argument("--docs", type=int, default=64, help="hsa: task sequences in the training file")
    parser.add_argument(
        "--fusion",
        choices=("softmax", "joint"),
        default="softmax",
        help="hsa: softmax (the paper's) or joint (learned scores then train from --retrieval only)",
    )
    parser.add_argument("--landmarks", type=int, default=0, help="hsa: pooled landmarks per chunk (--opt landmarks; 0: the mean key)")
    parser.add_argument("--nope", action="store_true", help="hsa: score chunks with the q and k before RoPE (--opt nope=true, the paper's)")
    parser.add_argument("--exact-row", action="store_true", help="hsa: add selection by each chunk's true LSE (the ceiling of any summary)")
    parser.add_argument("--retrieval", type=float, default=0.0, help="hsa: the retrieval loss's weight in the adapted rows (--opt aux; 0: none)")
    parser.add_argument("--temperature", type=float, default=1.0, help="hsa: the retrieval loss's target temperature (--opt temperature)")
    parser.add_argument("--pools", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64], help="msa: pool sizes")
    parser.add_argument("--bank", type=int, default=16, help="msa: documents in each training bank")
    parser.add_argument("--aux", type=float, default=10.0, help="msa: the router loss's weight")
    parser.add_argument("--batch", type=int, default=8, help="msa: banks per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise the harness only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import transformers

    from longctx_compile.console import err, out

    transformers.utils.logging.disable_progress_bar()
    console = err if args.json else out
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        rows, meta = (hsa_rows if args.form == "hsa" else msa_rows)(args, console)
    result = dict(trained_s=meta["trained_s"], rows=rows, steps=args.steps)
    if args.json:
        print(json.dumps(result))
        return
    columns = meta["columns"]
    table = Table(title=meta["title"])
    for column in ("setting", *columns, *(f"× dense {c}" for c in columns if c != "hit"), "steps", "CPU s"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    dense = rows[0]
    for r in rows:
        shown = [("—" if r[c] is None else f"{r[c]:.2f}") for c in columns]
        ratios = [f"{r[c] / dense[c]:.2f}" if dense[c] else "-" for c in columns if c != "hit"]
        table.add_row(r["setting"], *shown, *ratios, str(r["steps"]), f"{r['seconds']:.0f}")
    console.print(table)
    trained = f"; the model trained in {meta['trained_s']:.0f} s" if meta["trained_s"] else ""
    console.print(f"{meta['note']}; CPU s is process time on {torch.get_num_threads()} threads{trained}")


if __name__ == "__main__":
    main()
