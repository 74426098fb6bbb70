"""Eviction quality on a model trained here: multi-needle recall after the context is compacted, per policy and budget.

The model is ``bench/hsa_quality.py``'s: a tiny Llama (2 layers, hidden 128, 4/2 heads) trained on CPU on
random filler holding ``--needles`` key→value pairs (one per stretch of the sequence), every key asked
again at the end (or loaded with ``--model``; ``--save`` keeps it). It is converted with
``lcc convert FOLDER --to evict`` (4 sinks, window 64, budget 0.25) and trained with
``lcc train-indexers`` on fresh task sequences (``--steps`` indexer steps, ``--memory-steps`` memory
steps). Each evaluated sequence's context (everything before the questions) is prefilled in chunks of
``--prefill-chunk`` tokens and compacted to the budget after each — question-agnostic, as kvpress
evaluates — and the questions are then fed over the compacted cache. (With ``--prefill-chunk 0`` the
context is prefilled whole and compacted once: every context token's layer-0 state has then seen
every needle, and in a 2-layer model that summary alone answers much of the task, whatever is evicted.) Accuracy is the share of asked values that are the argmax, at
50 / 75 / 90 % eviction (budget 0.5 / 0.25 / 0.1 of the context), for StreamingLLM (sinks + the most
recent), SnapKV (observation window 32), the learned indexer with and without its latent memory,
the untrained indexer, and the exact-attention oracle (the true max logit over the context's queries),
beside the dense model (nothing evicted) and the dense model with every needle key and value masked
out of every layer's cache before the questions (what the answers owe to the needle tokens
themselves). Also reported: the share of needle value tokens the last layer keeps, and the KL from
the dense model's answer distribution.

    python bench/evict_quality.py --save /tmp/evq_model     # ~15 minutes on 2 cores; paste into bench/RESULTS.md
    python bench/evict_quality.py --model /tmp/evq_model    # reuse the trained model
    python bench/evict_quality.py --smoke                   # seconds: checks the harness, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hsa_quality import FILLER, VALUES, batch, train
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

EVICTION = (0.5, 0.75, 0.9)


def score(model, data, needles: int, reference: list[torch.Tensor] | None = None, hide_needles: bool = False) -> dict:
    """Each context compacted, then the questions read: asked-value accuracy, the share of the needles' value tokens
    still in the last layer's cache, the asked positions' log-probabilities, and their KL from ``reference``'s.
    ``hide_needles`` masks every needle key and value out of every layer's cache before the questions."""
    hits = total = kept = values = 0
    logprobs, kl = [], []
    for n, (ids, asked) in enumerate(data):
        T = ids.shape[1]
        context = T - 2 * needles
        _, cache = model.prefill(ids[:, :context])
        if hide_needles:
            for site in cache.sites.values():  # a masked key is read by no query, as if evicted
                site.real.copy_(site.real & (ids[:, :context].gather(1, site.pos[:, 0]) >= FILLER.start))
        positions = torch.arange(context, T).expand(ids.shape[0], -1)
        logits = model.forward(cache, ids[:, context:], torch.ones_like(ids[:, context:]), positions)
        where = asked[:, context:-1]
        hits += int((logits[:, :-1].argmax(-1)[where] == ids[:, context + 1 :][where]).sum())
        total += int(where.sum())
        logprobs.append(logits[:, :-1][where].log_softmax(-1))
        if reference is not None:
            kl.append(torch.nn.functional.kl_div(logprobs[-1], reference[n], log_target=True, reduction="batchmean"))
        last = cache.sites[max(cache.sites)].pos[:, 0]  # [B, kept + questions] positions (one keep set per layer)
        is_value = (ids[:, :context] >= VALUES.start) & (ids[:, :context] < VALUES.stop)
        kept += int((is_value.gather(1, last.clamp(max=context - 1)) & (last < context)).sum())
        values += int(is_value.sum())
    return dict(accuracy=hits / total, kept=kept / values, logprobs=logprobs, kl=float(torch.stack(kl).mean()) if kl else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model folder (skips training)")
    parser.add_argument("--save", help="keep the trained model in this folder")
    parser.add_argument(
        "--phases", type=lambda s: [tuple(int(x) for x in part.split(":")) for part in s.split(",")], default=[(128, 4000), (512, 600), (2048, 1200)]
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--needles", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-lens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096])
    parser.add_argument("--eval-seqs", type=int, default=64)
    parser.add_argument("--train-len", type=int, default=2048, help="length of the train-indexers sequences")
    parser.add_argument("--train-seqs", type=int, default=64, help="task sequences written for train-indexers")
    parser.add_argument("--steps", type=int, default=300, help="indexer steps")
    parser.add_argument("--memory-steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=128, help="compact after every chunk of the context (0: once, after all of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise the harness only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.phases, args.batch, args.eval_lens, args.eval_seqs = [(128, 3)], 2, [256], 16
        args.train_len, args.train_seqs, args.steps, args.memory_steps, args.window = 256, 2, 2, 2, 16
    args.max_len = max(args.eval_lens)
    console = Console(stderr=args.json)
    import transformers

    import longctx_compile as lcc
    from longctx_compile.forms.evict.runtime import EvictModel

    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    log: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model or args.save or Path(tmp) / "model")
        if not args.model:
            model, log = train(args, console)
            model.save_pretrained(folder)
        trained_s = time.perf_counter() - start
        artifact = Path(tmp) / "model.evict.lcc"
        convert = ["convert", str(folder), "--to", "evict", "--opt", "sinks=4", "--opt", f"window={args.window}", "--opt", "budget=0.25"]
        subprocess.run(
            [sys.executable, "-m", "longctx_compile", *convert, "--opt", f"max_len={args.max_len}", "-o", str(artifact)], check=True, capture_output=True
        )
        untrained = lcc.load(artifact)
        g = torch.Generator().manual_seed(args.seed + 7)
        docs = Path(tmp) / "train.jsonl"
        docs.write_text("".join(json.dumps({"tokens": batch(1, args.train_len, args.needles, g)[0][0].tolist()}) + "\n" for _ in range(args.train_seqs)))
        fit = ["train-indexers", str(artifact), "--data", str(docs), "--length", str(args.train_len), "--steps", str(args.steps)]
        fit += ["--memory-steps", str(args.memory_steps), "--lr", "1e-2"]
        begin = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "longctx_compile", *fit], check=True, capture_output=True, text=True)
        fit_s = time.perf_counter() - begin
        log.append(result.stdout)
        trained = lcc.load(artifact)
        g = torch.Generator().manual_seed(args.seed + 1)
        data = {T: [batch(16, T, args.needles, g) for _ in range(max(1, args.eval_seqs // 16))] for T in args.eval_lens}
        contenders = [
            ("StreamingLLM", untrained, dict(policy="streaming", memory="off")),
            ("SnapKV", untrained, dict(policy="snapkv", memory="off")),
            ("indexer, untrained", untrained, dict(policy="learned", memory="off")),
            ("learned indexer", trained, dict(policy="learned", memory="off")),
            ("learned indexer + memory", trained, dict(policy="learned", memory="on")),
            ("oracle (exact attention)", untrained, dict(policy="oracle", memory="off")),
        ]
        rows: dict[str, dict[str, float]] = {}
        kept: dict[str, dict[str, float]] = {}
        divergence: dict[str, dict[str, float]] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("evaluating", total=len(args.eval_lens) * (1 + len(contenders) * len(EVICTION)))
            for T in args.eval_lens:
                dense = EvictModel(untrained.program, untrained.signature, budget=str(10**9), prefill_chunk=args.prefill_chunk)
                reference = score(dense, data[T], args.needles)
                rows.setdefault("dense (nothing evicted)", {})[f"{T}"] = reference["accuracy"]
                rows.setdefault("dense, needle tokens masked", {})[f"{T}"] = score(dense, data[T], args.needles, hide_needles=True)["accuracy"]
                progress.advance(task)
                for name, loaded, options in contenders:
                    for evicted in EVICTION:
                        budget = str(round(1 - evicted, 2))
                        m = EvictModel(loaded.program, loaded.signature, budget=budget, prefill_chunk=args.prefill_chunk, **options)
                        got = score(m, data[T], args.needles, reference["logprobs"])
                        rows.setdefault(name, {})[f"{T}@{evicted}"] = got["accuracy"]
                        kept.setdefault(name, {})[f"{T}@{evicted}"] = got["kept"]
                        divergence.setdefault(name, {})[f"{T}@{evicted}"] = got["kl"]
                        progress.advance(task)
    result = dict(args=vars(args), trained_s=trained_s, fit_s=fit_s, log=log, accuracy=rows, values_kept=kept, kl_to_dense=divergence)
    if args.json:
        print(json.dumps(result))
        return
    for line in log:
        console.print(line)
    chunks = f"prefill chunks of {args.prefill_chunk}" if args.prefill_chunk else "whole-context prefill"
    table = Table(title=f"asked-value accuracy, {args.needles} needles, {args.eval_seqs} sequences per length (4 sinks, window {args.window}, {chunks})")
    table.add_column("policy")
    for T in args.eval_lens:
        for evicted in EVICTION:
            table.add_column(f"T={T:,} {evicted:.0%}", justify="right")
    for name, accs in rows.items():
        cells = [f"{accs[f'{T}']:.2f}" if f"{T}" in accs else f"{accs[f'{T}@{e}']:.2f}" for T in args.eval_lens for e in EVICTION]
        table.add_row(name, *cells)
    console.print(table)
    for title, values, fmt in (
        ("share of the needles' value tokens in the last layer's cache after the context", kept, "{:.2f}"),
        ("KL(dense ‖ evicted) of the answer distributions, nats per asked value", divergence, "{:.3f}"),
    ):
        table = Table(title=title)
        table.add_column("policy")
        for T in args.eval_lens:
            for evicted in EVICTION:
                table.add_column(f"T={T:,} {evicted:.0%}", justify="right")
        for name, by in values.items():
            table.add_row(name, *(fmt.format(by[f"{T}@{e}"]) for T in args.eval_lens for e in EVICTION))
        console.print(table)
    console.print(f"model training {trained_s:.0f} s, train-indexers {fit_s:.0f} s on {torch.get_num_threads()} threads; chance = 1/64 per asked value")


if __name__ == "__main__":
    main()
