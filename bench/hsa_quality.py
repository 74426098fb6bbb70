"""HSA retrieval quality on a model trained here: multi-key associative recall, dense vs HSA after conversion.

A tiny Llama (2 layers, hidden 128, 4/2 heads) is trained on CPU on synthetic sequences: random
filler tokens with ``--needles`` key→value pairs spread over the whole sequence, then every key
asked again at the end (the answer is the value that followed it; only those answers are trained).
Training runs in ``--phases`` of growing length: the induction circuit forms in the short first one
(after a few thousand steps), the longer ones at a lower learning rate make it hold over long
distances (dense attention throughout); the trained model is saved with ``save_pretrained`` and converted with
``lcc.compile(folder, to=...)``. Accuracy is the share of asked keys whose value is the argmax at
the query position, on fresh sequences of each ``--eval-lens``, for: the dense artifact, HSA
``landmark`` scores at K = 8 and 16 (the training-free retrofit), ``exact`` scores at the same K
(selection by each chunk's true LSE: what a perfect landmark would pick), and ``learned`` scores at
K = 8 after ``--tune-steps`` steps that train only the new retrieval projections (backbone frozen),
all with S = 64, w = 4.

    python bench/hsa_quality.py                   # ~20 minutes on 2 cores; paste into bench/RESULTS.md
    python bench/hsa_quality.py --smoke           # seconds: checks the harness, numbers mean nothing
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

KEYS, VALUES, FILLER = range(0, 64), range(64, 128), range(128, 256)


def batch(size: int, length: int, needles: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [size, length], mask of the positions whose next token is an asked value): needles spread over the sequence."""
    ids = torch.randint(FILLER.start, FILLER.stop, (size, length), generator=g)
    asked = torch.zeros(size, length, dtype=torch.bool)
    room = length - 2 * needles - 1  # the questions take the last 2·needles tokens
    for row in range(size):
        keys = torch.randperm(len(KEYS), generator=g)[:needles] + KEYS.start
        values = torch.randint(VALUES.start, VALUES.stop, (needles,), generator=g)
        stratum = room // needles
        for i in range(needles):  # one needle in each equal stretch of the sequence
            at = i * stratum + int(torch.randint(0, stratum - 1, (1,), generator=g))
            ids[row, at], ids[row, at + 1] = keys[i], values[i]
        order = torch.randperm(needles, generator=g)
        for j, i in enumerate(order.tolist()):
            at = length - 2 * needles + 2 * j
            ids[row, at], ids[row, at + 1] = keys[i], values[i]
            asked[row, at] = True
    return ids, asked


def train(args, console: Console) -> tuple[torch.nn.Module, list[str]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(args.eval_lens),
        rope_theta=1e5,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    log = []
    tokens = args.batch * args.phases[0][0]  # every step sees the same number of tokens
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=sum(steps for _, steps in args.phases))
        for phase, (length, steps) in enumerate(args.phases):
            size = max(1, tokens // length)
            for group in optimizer.param_groups:  # each longer phase adapts what the first one learned, more gently
                group["lr"] = args.lr / (1 + 2 * phase)
            for step in range(steps):
                ids, asked = batch(size, length, args.needles, g)
                logits = model(ids).logits[:, :-1]
                targets = ids[:, 1:]
                # only the asked values are trained: the filler is noise, and predicting it would drown the task
                loss = torch.nn.functional.cross_entropy(logits[asked[:, :-1]], targets[asked[:, :-1]])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                if step % max(1, steps // 5) == 0 or step == steps - 1:
                    with torch.no_grad():
                        acc = (logits.argmax(-1)[asked[:, :-1]] == targets[asked[:, :-1]]).float().mean().item()
                    log.append(f"T={length} step {step}: loss {loss.item():.3f}, asked-value accuracy {acc:.2f}")
                progress.advance(task)
    return model.eval(), log


def tune_retrieval(compiled, args, progress) -> list[str]:
    """Train only the learned-score retrieval projections (the backbone frozen) on the task at ``--tune-len``."""
    params = [p for name, p in compiled.module.named_parameters() if "hsa_retrieval" in name]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.tune_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    task = progress.add_task("tuning retrieval", total=args.tune_steps)
    log = []
    for step in range(args.tune_steps):
        ids, asked = batch(1, args.tune_len, args.needles, g)
        logits = compiled(ids)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[asked[:, :-1]], ids[:, 1:][asked[:, :-1]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.tune_steps // 4) == 0 or step == args.tune_steps - 1:
            log.append(f"learned retrieval, T={args.tune_len} step {step}: loss {loss.item():.3f}")
        progress.advance(task)
    for p in params:
        p.requires_grad_(False)
    return log


def accuracy(compiled, batches) -> float:
    hits = total = 0
    with torch.no_grad():
        for ids, asked in batches:
            logits = compiled(ids)
            predicted = logits[:, :-1].argmax(-1)[asked[:, :-1]]
            hits += int((predicted == ids[:, 1:][asked[:, :-1]]).sum())
            total += int(asked.sum())
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phases",
        type=lambda s: [tuple(int(x) for x in part.split(":")) for part in s.split(",")],
        default=[(128, 4000), (512, 400), (2048, 150)],
        help="training phases LENGTH:STEPS, in order",
    )
    parser.add_argument("--batch", type=int, default=32, help="sequences per step in the first phase (later phases keep its token count)")
    parser.add_argument("--needles", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-lens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--tune-steps", type=int, default=100, help="steps that train the learned mode's retrieval projections (0: no learned row)")
    parser.add_argument("--tune-len", type=int, default=2048)
    parser.add_argument("--tune-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise the harness only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.phases, args.batch = [(128, 3), (256, 1)], 2
        args.eval_lens, args.eval_seqs, args.tune_steps, args.tune_len = [320], 2, 2, 128
    console = Console(stderr=args.json)
    import transformers

    import longctx_compile as lcc

    transformers.utils.logging.disable_progress_bar()

    start = time.perf_counter()
    model, log = train(args, console)
    trained_s = time.perf_counter() - start
    chunk, window = (64, 4) if not args.smoke else (16, 1)
    contenders = [("dense", dict(to="dense"))]
    for mode in ("landmark", "exact"):
        for topk in (8, 16):
            contenders.append((f"hsa {mode} K={topk}", dict(to="hsa", chunk=chunk, window=window, topk=str(topk), score=mode)))
    if args.tune_steps:
        contenders.append((f"hsa learned K=8, {args.tune_steps} steps", dict(to="hsa", chunk=chunk, window=window, topk="8", score="learned")))
    rows = {}
    with tempfile.TemporaryDirectory() as folder, Progress(console=console, transient=True) as progress:
        model.save_pretrained(folder)
        task = progress.add_task("evaluating", total=len(contenders) * len(args.eval_lens))
        g = torch.Generator().manual_seed(args.seed + 1)
        data = {T: [batch(1, T, args.needles, g) for _ in range(args.eval_seqs)] for T in args.eval_lens}
        for name, options in contenders:
            compiled = lcc.compile(folder, max_len=max(args.eval_lens), **options)
            if options.get("score") == "learned":
                log.extend(tune_retrieval(compiled, args, progress))
            for T in args.eval_lens:
                rows.setdefault(name, {})[T] = accuracy(compiled, data[T])
                progress.advance(task)
    result = dict(args=vars(args), trained_s=trained_s, training=log, accuracy={n: {str(t): a for t, a in r.items()} for n, r in rows.items()})
    if args.json:
        print(json.dumps(result))
        return
    for line in log:
        console.print(line)
    table = Table(title=f"asked-value accuracy, {args.needles} needles, {args.eval_seqs} sequences per length (S={chunk}, w={window})")
    table.add_column("model")
    for T in args.eval_lens:
        table.add_column(f"T={T:,}", justify="right")
    for name, accs in rows.items():
        table.add_row(name, *(f"{accs[T]:.2f}" for T in args.eval_lens))
    console.print(table)
    console.print(f"training: {trained_s:.0f} s on {torch.get_num_threads()} threads; chance = 1/64 per asked value")


if __name__ == "__main__":
    main()
