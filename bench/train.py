"""``lcc train`` at work: a sparse form's retrieval on a model trained here, before and after adapting it with lcc train.

The model and task are ``bench/hsa_quality.py``'s: a 2-layer Llama trained on multi-key associative recall (random
filler, key→value pairs spread over the sequence, every key asked again at the end). It is converted to HSA in
the paper's setting (``recipe=paper``: landmark-style scores, softmax fusion, a selection shared by each KV
head's query heads) with ``score=learned`` (the retrieval projections HSA-UltraLong learns, starting from the
identity, i.e. from landmark scores), K = 8 chunks of S = 64, window 4. That artifact is then adapted with
``lcc.train`` on fresh task sequences (a JSONL of token lists), distilling towards the dense source:

- ``new``: only the retrieval projections the form added train (the backbone frozen);
- ``all``: the whole model continues training in its form.

Accuracy is the share of asked keys whose value is the argmax at the query position, on the same fresh
sequences for every row; the table gives each row against dense, the steps and the CPU time of adaptation.

    python bench/train.py --save /tmp/recall          # trains the model (~7 min on 2 cores), then the rest
    python bench/train.py --model /tmp/recall         # reuses it
    python bench/train.py --smoke                     # seconds: checks the harness, numbers mean nothing
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


def _quality():
    """bench/hsa_quality.py as a module: the model, the task and the accuracy this bench shares with it."""
    spec = importlib.util.spec_from_file_location("hsa_quality", HERE / "hsa_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder saved by an earlier --save (skips training it)")
    parser.add_argument("--save", help="save the trained model here")
    parser.add_argument("--eval-lens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="lcc train steps per adapted row")
    parser.add_argument("--seq-len", type=int, default=2048, help="lcc train window")
    parser.add_argument("--docs", type=int, default=64, help="task sequences in the training file")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise the harness only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quality = _quality()
    model_args = argparse.Namespace(phases=[(128, 4000), (512, 400), (2048, 150)], batch=32, needles=4, lr=1e-3, eval_lens=args.eval_lens, seed=args.seed)
    chunk, window, topk = 64, 4, "8"
    if args.smoke:
        model_args.phases, model_args.batch = [(128, 3), (256, 1)], 2
        args.eval_lens, args.eval_seqs, args.steps, args.seq_len, args.docs = [320], 2, 2, 128, 4
        model_args.eval_lens, chunk, window = args.eval_lens, 16, 1
    import transformers

    import longctx_compile as lcc
    from longctx_compile.console import err, out

    transformers.utils.logging.disable_progress_bar()
    console = err if args.json else out
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.model) if args.model else tmp / "model"
        trained_s = 0.0
        if not args.model:
            start = time.perf_counter()
            model, _ = quality.train(model_args, console)
            trained_s = time.perf_counter() - start
            model.save_pretrained(folder)
            if args.save:
                model.save_pretrained(args.save)
        g = torch.Generator().manual_seed(args.seed + 1)
        evals = {T: [quality.batch(1, T, model_args.needles, g) for _ in range(args.eval_seqs)] for T in args.eval_lens}
        g = torch.Generator().manual_seed(args.seed + 2)
        data = tmp / "task.jsonl"
        data.write_text("\n".join(json.dumps({"tokens": quality.batch(1, args.seq_len, model_args.needles, g)[0][0].tolist()}) for _ in range(args.docs)))
        longest = max(args.eval_lens)
        hsa = dict(to="hsa", recipe="paper", score="learned", chunk=chunk, window=window, topk=topk, max_len=longest)
        rows = []

        def score(name: str, compiled, steps: int = 0, seconds: float = 0.0) -> None:
            rows.append({"setting": name, **{str(T): quality.accuracy(compiled, evals[T]) for T in args.eval_lens}, "steps": steps, "seconds": seconds})
            console.print(f"{name}: " + ", ".join(f"{T}: {rows[-1][str(T)]:.2f}" for T in args.eval_lens))

        score("dense", lcc.compile(str(folder), to="dense", max_len=longest))
        source = lcc.compile(str(folder), **hsa).save(tmp / "hsa.lcc")
        score("hsa paper K=8, training-free", lcc.load(source))
        for trainable in ("new", "all"):
            start = time.process_time()
            lcc.train(source, str(data), tmp / f"{trainable}.lcc", trainable=trainable, steps=args.steps, length=args.seq_len, lr=args.lr, seed=args.seed)
            score(f"hsa paper K=8, lcc train --trainable {trainable}", lcc.load(tmp / f"{trainable}.lcc"), args.steps, time.process_time() - start)
    result = dict(trained_s=trained_s, rows=rows, steps=args.steps, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"asked-value accuracy, {model_args.needles} needles, {args.eval_seqs} sequences per length (S={chunk}, K={topk}, w={window})")
    for column in ("setting", *(f"T={T:,}" for T in args.eval_lens), *(f"× dense {T:,}" for T in args.eval_lens), "steps", "CPU s"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    dense = rows[0]
    for r in rows:
        ratios = [f"{r[str(T)] / dense[str(T)]:.2f}" if dense[str(T)] else "-" for T in args.eval_lens]
        table.add_row(r["setting"], *(f"{r[str(T)]:.2f}" for T in args.eval_lens), *ratios, str(r["steps"]), f"{r['seconds']:.0f}")
    console.print(table)
    console.print(
        f"adaptation: lcc train --objective distill --seq-len {args.seq_len} --lr {args.lr}, {args.docs} task sequences; "
        f"CPU s is process time on {torch.get_num_threads()} threads" + (f"; the model trained in {trained_s:.0f} s" if trained_s else "")
    )


if __name__ == "__main__":
    main()
