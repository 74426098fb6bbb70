"""MSA quality on a model trained here: answer from one of N documents, dense (right document only) vs MSA.

A tiny Llama (2 layers, hidden 128, 4/2 heads) is trained on CPU on ``[document ; ASK key] → value``:
a document is ``--doc-len`` filler tokens holding one key→value pair at a random place, and the
question asks for the value that followed the key (only the answer is trained). The trained model
is saved with ``save_pretrained`` and converted with ``lcc.compile(folder, to="msa", routed_layers="all")``
(with two layers, "upper" would leave layer 0 of the question blind to the document, which this
model was never trained for). A bank holds ``--docs`` documents with distinct keys; each question is
routed over all of them.

Reported per setting (pool P, top-k documents; the ASK token is the template prefix, ``prefix=1``,
so only the key routes), for three routers: ``router_init=k`` (both from k_proj: a token matches
itself), ``router_init=qk`` (copies of q_proj and k_proj, the default), and qk after
``--router-rounds`` × ``--router-steps`` of ``train_router`` (MSA's InfoNCE auxiliary loss, backbone
frozen) on fresh documents each round (never the evaluated ones):
- routing hit rate: the share of questions whose document is among the routed top-k in every layer;
- answer accuracy: the share whose value is the argmax after the question;
- "oracle bank": accuracy with a bank holding only the right document (what pooling alone costs).
The reference is the dense model given only the right document, ``[document ; question]``.
Question positions follow the document's length, as in training (not MSA's prefix + k).

    python bench/msa_quality.py            # ~5 minutes on 2 cores; paste into bench/RESULTS.md
    python bench/msa_quality.py --smoke    # seconds: checks the harness, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

KEYS, VALUES, FILLER, ASK = range(0, 64), range(64, 128), range(128, 250), 250


def documents(n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(documents [n, length], their keys [n], values [n]): distinct keys, each pair at a random place."""
    docs = torch.randint(FILLER.start, FILLER.stop, (n, length), generator=g)
    keys = torch.randperm(len(KEYS), generator=g)[:n] + KEYS.start
    values = torch.randint(VALUES.start, VALUES.stop, (n,), generator=g)
    at = torch.randint(0, length - 1, (n,), generator=g)
    docs[torch.arange(n), at], docs[torch.arange(n), at + 1] = keys, values
    return docs, keys, values


def train(args, console: Console):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.doc_len + 8,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    log = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=args.steps)
        for step in range(args.steps):
            docs, keys, values = documents(args.batch, args.doc_len, g)  # batch ≤ 64: keys distinct within it
            ids = torch.cat([docs, torch.full((args.batch, 1), ASK), keys[:, None]], dim=1)
            loss = torch.nn.functional.cross_entropy(model(ids).logits[:, -1], values)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                log.append(f"step {step}: loss {loss.item():.3f}")
            progress.advance(task)
    return model.eval(), log


def evaluate(model_dir: str, args) -> list[dict]:
    import longctx_compile as lcc
    from longctx_compile.forms.msa.router import train_router
    from longctx_compile.forms.msa.runtime import MsaModel

    g = torch.Generator().manual_seed(args.seed + 1)
    docs, keys, values = documents(args.docs, args.doc_len, g)
    questions = torch.stack([torch.full_like(keys, ASK), keys], dim=1)  # [n, 2]
    positions = torch.arange(args.doc_len, args.doc_len + 2)[None]
    dense = lcc.compile(model_dir)
    with torch.no_grad():
        right = dense(torch.cat([docs, questions], dim=1))[:, -1].argmax(-1)
    rows = [{"setting": "dense, right document only", "hit": None, "accuracy": (right == values).float().mean().item()}]

    def score(msa, n: int) -> tuple[float, float, float]:
        bank = msa.encode(docs.tolist(), batch_size=16)
        hits = correct = oracle = 0
        for i in range(n):
            result = msa.query(bank, questions[i : i + 1], position_ids=positions)
            hits += int(all(i in result.docs[layer][0].tolist() for layer in bank.layers))
            correct += int(result.logits[0, -1].argmax() == values[i])
            alone = msa.query(bank.subset([i]), questions[i : i + 1], position_ids=positions)
            oracle += int(alone.logits[0, -1].argmax() == values[i])
        return hits / n, correct / n, oracle / n

    for pool, topk in args.settings:
        options = dict(pool=pool, topk=str(topk), routed_layers="all", prefix=1)  # ASK is the template prefix: it does not route
        compiled = lcc.compile(model_dir, to="msa", router_init="k", **options)
        hit, accuracy, oracle = score(MsaModel(compiled.program.ep, compiled.program.signature), args.docs)
        rows.append({"setting": f"msa P={pool} top-{topk}, router_init=k", "hit": hit, "accuracy": accuracy, "oracle": oracle})
        compiled = lcc.compile(model_dir, to="msa", **options)
        msa = MsaModel(compiled.program.ep, compiled.program.signature)
        hit, accuracy, oracle = score(msa, args.docs)
        rows.append({"setting": f"msa P={pool} top-{topk}, router_init=qk", "hit": hit, "accuracy": accuracy, "oracle": oracle})
        log = []
        for _ in range(args.router_rounds):  # fresh documents each round: no shortcut through one set's filler tokens
            fit_docs, fit_keys, _ = documents(args.docs, args.doc_len, g)
            fit_questions = torch.stack([torch.full_like(fit_keys, ASK), fit_keys], dim=1)
            log += train_router(
                msa, fit_docs.tolist(), fit_questions.tolist(), list(range(args.docs)), steps=args.router_steps, lr=3e-3, positions=lambda i: positions
            )
        hit, accuracy, oracle = score(msa, args.docs)
        rows.append({"setting": f"msa P={pool} top-{topk}, qk + router trained", "hit": hit, "accuracy": accuracy, "oracle": oracle, "router_log": log})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--doc-len", type=int, default=32)
    parser.add_argument("--docs", type=int, default=64, help="documents in the bank (distinct keys: at most 64)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--router-steps", type=int, default=40, help="train_router steps per round")
    parser.add_argument("--router-rounds", type=int, default=8, help="rounds of router training, each on fresh documents")
    parser.add_argument("--model", help="a trained model folder to evaluate (skips training; saved by --save)")
    parser.add_argument("--save", help="keep the trained model in this folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.settings = [(1, 1), (4, 1), (4, 4), (8, 4)]
    if args.smoke:
        args.steps, args.batch, args.docs, args.settings, args.router_steps, args.router_rounds = 3, 8, 4, [(4, 1)], 2, 1
    console = Console(width=120)
    start = time.perf_counter()
    log, trained = [f"model from {args.model}"], 0.0
    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            folder = args.model
        else:
            model, log = train(args, console)
            trained = time.perf_counter() - start
            model.save_pretrained(args.save or folder)
            folder = args.save or folder
        rows = evaluate(folder, args)
    table = Table(
        "setting", "routing hit rate", "answer accuracy", "oracle bank accuracy", title=f"{args.docs} documents of {args.doc_len} tokens", title_justify="left"
    )
    for row in rows:
        table.add_row(
            row["setting"], "—" if row["hit"] is None else f"{row['hit']:.2f}", f"{row['accuracy']:.2f}", f"{row['oracle']:.2f}" if "oracle" in row else "—"
        )
    console.print("\n".join(log))
    console.print(f"trained {args.steps} steps in {trained:.0f} s")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "log": log, "train_seconds": trained}, f, indent=2)


if __name__ == "__main__":
    main()
