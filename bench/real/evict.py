"""Eviction policies on a real model: passkey and continuation NLL after the prompt's cache is compacted to a budget.

An ``evict`` artifact (trained with ``lcc train-indexers`` or not) is run with each policy as a run-time override.
Each prompt is prefilled once per policy with nothing evicted; its cache is then copied and compacted to each
budget (a ratio of the prompt), so every budget of a policy sees the same prefill, and the uncompacted copy is
the dense row. The prompt's own tokens see everything, as SnapKV evaluates: eviction acts on what comes after.

- **passkey**: ``bench/real/passkey.py``'s prompts (English filler from Python's reference manual, the needle at
  10–90 % depth, the question at the end); the answer is generated greedily over the compacted cache and counts
  when its first number is the key.
- **NLL**: ``--texts`` windows of the same manual at spread-out offsets; the first L − ``--continuation`` tokens are
  the prompt, and the mean NLL of the continuation is read over the compacted cache (teacher-forced).

    lcc convert SMOLLM2 --to evict -o A --opt memory=off --opt max_len=8320
    cp -r A B && lcc train-indexers B --data TEXT --steps 160 --memory-steps 0 --length 1024
    python bench/real/evict.py B --untrained A --lengths 4096,8192 --budgets 0.25,0.1 --prompts 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time

import torch
from passkey import prompts  # this script's folder is on the path
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from longctx_compile.runtime.generate import Sampling, collect, token_steps


@dataclasses.dataclass
class Task:
    """One prompt: its ids, and what is scored after it (the asked key, or the continuation's ids)."""

    ids: list[int]
    key: str | None = None
    continuation: list[int] | None = None


def nll_tasks(tokenizer, length: int, count: int, continuation: int) -> list[Task]:
    """``count`` windows of ``length`` tokens of the reference manual, spread over it: prompt + continuation."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = (len(ids) - length) // max(1, count)
    windows = [ids[i * step : i * step + length] for i in range(count)]
    return [Task(w[:-continuation], continuation=w[-continuation:]) for w in windows]


def clone(cache):
    """A copy of an evicting cache that compaction and decoding can change without touching the original
    (what they write in place is the per-key buffers)."""
    sites = {i: dataclasses.replace(c, buffers={name: t.clone() for name, t in c.buffers.items()}) for i, c in cache.sites.items()}
    return dataclasses.replace(cache, sites=sites)


def score(model, cache, logits: torch.Tensor, task: Task, tokenizer, new: int) -> float:
    """Passkey hit (1/0), or the continuation's mean NLL, over ``cache`` (which this uses up)."""
    if task.key is not None:
        steps = token_steps(logits, lambda token: model.extend(cache, token[:, None], last=True)[:, -1], new, Sampling())  # greedy
        found = re.search(r"\d+", tokenizer.decode(collect(steps, 1)[0]))
        return float(bool(found and found.group() == task.key))
    rest = torch.tensor([task.continuation])
    start = int(cache.next_positions[0])
    more = model.forward(cache, rest, torch.ones_like(rest), torch.arange(start, start + rest.shape[1])[None])
    every = torch.cat([logits[:, None], more[:, :-1]], 1)[0].double()
    return float(torch.nn.functional.cross_entropy(every, rest[0]))


@torch.no_grad()
def run(args) -> dict:
    from longctx_compile.forms.evict.runtime import EvictModel
    from longctx_compile.loaded import load
    from longctx_compile.runtime.tokenizer import tokenizer_for

    loaded = load(args.artifact)
    tokenizer = tokenizer_for(loaded.manifest)
    if tokenizer is None:
        sys.exit(f"{args.artifact}: its source has no tokenizer; passkey prompts need one")
    runs = [(p, loaded) for p in args.policies]
    if args.untrained:
        runs.append(("learned, untrained", load(args.untrained)))
    tasks = {
        L: {"passkey": [Task(ids, key) for ids, key in prompts(tokenizer, L, args.prompts, 1)], "nll": nll_tasks(tokenizer, L, args.texts, args.continuation)}
        for L in args.lengths
    }
    # results[(setting, budget)][(length, metric)] = list of per-task values
    results: dict[tuple[str, str], dict[tuple[int, str], list[float]]] = {}
    kept: dict[tuple[str, str, int], int] = {}
    total = len(runs) * sum(len(t) for by in tasks.values() for t in by.values())
    start = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("prefills", total=total)
        for name, source in runs:
            model = EvictModel(source.program, source.signature, policy=name.split(",")[0], **{"memory": "off", **args.set})
            for L, by in tasks.items():
                for metric, batch in by.items():
                    for task in batch:
                        logits, full = model.prefill(torch.tensor([task.ids]), budget=10**9)
                        if name == args.policies[0]:  # every policy's prefill is the same program: dense once
                            value = score(model, clone(full), logits[:, -1], task, tokenizer, args.new)
                            results.setdefault(("dense", "—"), {}).setdefault((L, metric), []).append(value)
                        for budget in args.budgets:
                            cache = clone(full)
                            cache.budget = dataclasses.replace(model.policy, budget=budget).resolve(len(task.ids))
                            model.evict(cache)
                            if metric == "passkey":  # the prompt is L tokens long
                                kept[(name, str(budget), L)] = max(cache.lengths().values())
                            value = score(model, cache, logits[:, -1], task, tokenizer, args.new)
                            results.setdefault((name, str(budget)), {}).setdefault((L, metric), []).append(value)
                        progress.advance(bar)
    rows = []
    for (name, budget), by in results.items():
        row = dict(setting=name, budget=budget)
        for (L, metric), values in by.items():
            row[f"{metric}@{L}"] = sum(values) / len(values)
            if (name, budget, L) in kept:
                row[f"kept@{L}"] = kept[(name, budget, L)]
        rows.append(row)
    return dict(
        artifact=args.artifact,
        untrained=args.untrained,
        trained=loaded.signature["evict"].get("trained"),
        prompts=args.prompts,
        texts=args.texts,
        continuation=args.continuation,
        seconds=time.perf_counter() - start,
        rows=rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="an evict artifact whose source has a tokenizer (its 'learned' policy uses its indexers)")
    parser.add_argument("--untrained", help="the same model's evict artifact before train-indexers: its learned policy is a row too")
    parser.add_argument("--policies", type=lambda s: s.split(","), default=["streaming", "snapkv", "learned"])
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.1])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    parser.add_argument("--prompts", type=int, default=20, help="passkey prompts per length")
    parser.add_argument("--texts", type=int, default=4, help="NLL windows per length")
    parser.add_argument("--continuation", type=int, default=256, help="tokens scored after each NLL prompt")
    parser.add_argument("--new", type=int, default=12, help="tokens generated per passkey answer")
    parser.add_argument(
        "--set", type=lambda s: dict([s.split("=", 1)]), action="append", default=[], help="an eviction setting for every policy (e.g. window=256)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.set = {k: v for pair in args.set for k, v in pair.items()}
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    console = Console()
    table = Table(title=f"{args.artifact}: passkey ({args.prompts} prompts) and continuation NLL ({args.texts} × {args.continuation} tokens) after eviction")
    for column in ("policy", "budget", *(f"{m} {L:,}" for L in args.lengths for m in ("keys kept", "passkey", "NLL"))):
        table.add_column(column, justify="left" if column == "policy" else "right")
    dense = result["rows"][0]
    for row in result["rows"]:
        cells = []
        for L in args.lengths:
            change = "" if row is dense else f" ({row[f'nll@{L}'] / dense[f'nll@{L}'] - 1:+.1%})"
            cells += [str(row.get(f"kept@{L}", "all")), f"{row[f'passkey@{L}']:.2f}", f"{row[f'nll@{L}']:.3f}{change}"]
        table.add_row(row["setting"], row["budget"], *cells)
    console.print(table)
    console.print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
