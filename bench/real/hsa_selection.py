"""Which chunk selection keeps a real model's passkey: HSA with joint fusion, simulated for selection rules lcc may not have.

With ``fusion=joint`` HSA is one softmax over the local keys and the chosen chunks' keys: attention masked to
local window ∪ chosen chunks. This bench runs the model's own attention that way (an HF attention function),
so a selection rule can be measured before any kernel implements it:

- ``score``: ``exact`` (each chunk's true LSE: reads every key, the upper reference), ``bound`` (Quest's
  Σ_d max(q_d·min_d, q_d·max_d) over the chunk's key range; with ``sub=N`` the best of the bounds of its
  sub-blocks of N keys, a tighter bound) or ``landmark`` (q·mean key);
- ``rerank``: R > 0 makes ``score`` a first stage that keeps R·topk candidates, ranked again by their exact LSE
  (reading R·topk chunks' keys rather than all);
- ``heads``: ``group`` (a KV group's query heads share one selection by their summed scores, as lcc's
  default) or ``each`` (every query head its own);
- ``chunk``, ``topk``, ``window`` as ``--to hsa``'s options.

Each prompt is a passkey prompt of ``bench/real/passkey.py`` followed by the answer "The pass key of Alice is
<key>"; a prompt counts when every digit of the key is the model's argmax there (teacher-forced), and the
table gives the mean log-probability of the key's digits too. Only the last ``--rows`` query rows attend
sparsely (all rows with 0): the answer's retrieval is measured with the prompt's representations kept
dense. ``--check`` compares, on ``--length`` random tokens with every row sparse, the simulation against lcc's own
``--to hsa`` program for each setting lcc has (``sub`` unset): the simulator is lcc's semantics.

    python bench/real/hsa_selection.py SMOLLM2 --length 4096 --prompts 10 "score=bound" "score=bound,heads=each" \\
        "score=exact" "score=exact,heads=each" "score=bound,heads=each,sub=8" "chunk=16,topk=64,window=8,heads=each"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

DEFAULTS = dict(chunk=64, topk=16, window=2, score="bound", heads="group", sub=0, rerank=0)
ROWS_AT_ONCE = 256  # query rows simulated together (their [H, rows, T] logits bound the memory)


def parse(setting: str) -> dict:
    """``key=value,...`` over :data:`DEFAULTS` (``sub`` 0: the whole chunk)."""
    out = dict(DEFAULTS)
    for pair in filter(None, setting.split(",")):
        key, _, value = pair.partition("=")
        if key not in DEFAULTS:
            sys.exit(f"unknown key '{key}' in '{setting}'; known: {', '.join(DEFAULTS)}")
        out[key] = value if isinstance(DEFAULTS[key], str) else int(value)
    return out


def chunk_scores(q: torch.Tensor, k: torch.Tensor, complete: int, cfg: dict) -> torch.Tensor:
    """Per query head and row, each complete chunk's score [H, n, complete]; q [H, n, D] scaled, k [H, T, D]."""
    S = cfg["chunk"]
    kc = k[:, : complete * S].unflatten(1, (complete, S))
    if cfg["score"] == "exact":
        return torch.einsum("hnd,hcsd->hncs", q, kc).logsumexp(-1)
    if cfg["score"] == "landmark":
        return torch.einsum("hnd,hcd->hnc", q, kc.mean(2))
    sub = cfg["sub"] or S
    blocks = kc.unflatten(2, (S // sub, sub))
    low, high = blocks.amin(3), blocks.amax(3)
    bounds = torch.einsum("hnd,hcjd->hncj", q, (high + low) / 2) + torch.einsum("hnd,hcjd->hncj", q.abs(), (high - low) / 2)
    return bounds.amax(-1)


def choose(q: torch.Tensor, k: torch.Tensor, complete: int, allowed: torch.Tensor, topk: int, cfg: dict) -> torch.Tensor:
    """[H, n, complete]: the ``topk`` best of the ``allowed`` chunks per head and row (a KV group's summed scores with ``heads=group``);
    ``rerank`` widens the first stage (``score``) to R·topk."""
    H = q.shape[0]
    scores = chunk_scores(q, k, complete, cfg).masked_fill(~allowed, float("-inf"))
    if cfg["heads"] == "group":
        G = H // cfg["kv_heads"]
        scores = scores.unflatten(0, (-1, G)).sum(1).repeat_interleave(G, 0)
    chosen = torch.zeros(H, q.shape[1], complete, dtype=torch.bool)
    if complete:
        wide = topk * max(1, cfg["rerank"]) if cfg["score"] != "exact" else topk
        picked = scores.argsort(dim=-1, descending=True, stable=True)[..., : min(wide, complete)]  # ties: the older chunk
        chosen.scatter_(-1, picked, True)
    return chosen & allowed


def sparse_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, cfg: dict) -> torch.Tensor:
    """Rows first .. first+n-1 of joint-fusion HSA: q [H, n, D] (scaled), k/v [H, T, D] (KV heads repeated)."""
    S, w, H, n, T = cfg["chunk"], cfg["window"], q.shape[0], q.shape[1], k.shape[1]
    complete = T // S
    rows = torch.arange(first, first + n)
    candidate = torch.arange(complete)[None] < (rows // S - w)[:, None]  # [n, complete]: complete, older than the window
    chosen = choose(q, k, complete, candidate[None].expand(H, -1, -1), cfg["topk"], cfg)
    if cfg["rerank"]:  # the first stage's R·K candidates, ranked again by their exact LSE
        chosen = choose(q, k, complete, chosen, cfg["topk"], {**cfg, "score": "exact"})
    keys = torch.nn.functional.pad(chosen.repeat_interleave(S, -1), (0, T - complete * S))
    position = torch.arange(T)
    local = (position[None] >= ((rows // S - w) * S)[:, None]) & (position[None] <= rows[:, None])
    logits = torch.einsum("hnd,htd->hnt", q, k).masked_fill(~(keys | local), float("-inf"))
    return logits.softmax(-1) @ v


def simulated(cfg: dict | None, rows: int):
    """An HF attention function: SDPA, then the last ``rows`` rows (all with 0) replaced by joint-fusion HSA under ``cfg``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # [B, T, H, D]
        if cfg is None:
            return out, weights
        H, T = query.shape[1], query.shape[2]
        k, v = (t[0].repeat_interleave(H // key.shape[1], 0) for t in (key, value))
        q = query[0] * kwargs.get("scaling", 1 / math.sqrt(query.shape[-1]))
        for first in range(max(0, T - rows) if rows else 0, T, ROWS_AT_ONCE):
            last = min(T, first + ROWS_AT_ONCE)
            out[0, first:last] = sparse_rows(q[:, first:last], k, v, first, {**cfg, "kv_heads": key.shape[1]}).transpose(0, 1).to(out.dtype)
        return out, weights

    return attend


def passkey_prompts(tokenizer, length: int, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt + answer prefix ids, key ids) pairs from ``bench/real/passkey.py``'s prompts."""
    spec = importlib.util.spec_from_file_location("passkey", Path(__file__).with_name("passkey.py"))
    passkey = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(passkey)
    prefix = tokenizer.encode("The pass key of Alice is ", add_special_tokens=False)
    return [(ids + prefix, tokenizer.encode(key, add_special_tokens=False)) for ids, key in passkey.prompts(tokenizer, length, count, 1)]


def lcc_logits(model_path: str, cfg: dict, ids: list[int]) -> torch.Tensor:
    """lcc's own ``--to hsa`` program (joint fusion) on ``ids``: the logits [T, vocab]."""
    import longctx_compile as lcc

    options = {key: str(cfg[key]) for key in ("chunk", "topk", "window", "score", "heads", "rerank")}
    compiled = lcc.compile(model_path, to="hsa", max_len=str(len(ids)), fusion="joint", **options)
    x = torch.tensor([ids])
    return compiled(x, torch.ones_like(x), torch.arange(len(ids))[None])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face folder (or anything lcc loads) with a tokenizer")
    parser.add_argument("settings", nargs="*", help="key=value,... over chunk, topk, window, score, heads, sub, rerank (dense is run first)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--only", type=lambda s: [int(x) for x in s.split(",")], help="these prompts only (1-based, of --prompts)")
    parser.add_argument("--rows", type=int, default=96, help="query rows at the end that attend sparsely (0: all)")
    parser.add_argument("--check", action="store_true", help="compare the simulation with lcc's hsa program on the first prompt")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_intermixed_args()
    from transformers import AttentionInterface

    from longctx_compile.capture import load_model
    from longctx_compile.runtime.tokenizer import tokenizer_for

    torch.set_grad_enabled(False)
    console = Console(stderr=args.json)
    model, source = load_model(args.model)
    items = passkey_prompts(tokenizer_for({"source": source.to_json()}), args.length, args.prompts)
    items = [items[number - 1] for number in args.only] if args.only else items
    rows = []
    for setting in ["dense", *args.settings]:
        cfg = None if setting == "dense" else parse(setting)
        AttentionInterface.register("lcc_hsa_selection", simulated(cfg, args.rows))
        model.config._attn_implementation = "lcc_hsa_selection"
        hits, logp, start = [], 0.0, time.perf_counter()
        for ids, key in items:
            logits = model(torch.tensor([ids + key])).logits[0, len(ids) - 1 : -1].log_softmax(-1)
            hits.append(int((logits.argmax(-1) == torch.tensor(key)).all()))
            logp += float(logits.gather(-1, torch.tensor(key)[:, None]).sum())
        row = dict(setting=setting, accuracy=sum(hits) / len(items), key_logp=logp / len(items), seconds=time.perf_counter() - start, hits=hits)
        if args.check and cfg is not None and not cfg["sub"]:  # random tokens: the simulation and lcc, against dense
            ids = torch.randint(0, model.config.vocab_size, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
            AttentionInterface.register("lcc_hsa_selection", simulated(cfg, 0))
            sparse = model(torch.tensor([ids])).logits[0]
            AttentionInterface.register("lcc_hsa_selection", simulated(None, 0))
            row["check_max_abs"] = float((sparse - lcc_logits(args.model, cfg, ids)).abs().max())
            row["dense_max_abs"] = float((sparse - model(torch.tensor([ids])).logits[0]).abs().max())
        rows.append(row)
        console.print(f"{setting}: passkey {row['accuracy']:.2f} ({''.join(map(str, hits))}), key log-prob {row['key_logp']:.2f} ({row['seconds']:.0f} s)")
    if args.json:
        print(json.dumps(dict(model=args.model, length=args.length, prompts=args.prompts, rows_sparse=args.rows, results=rows)))
        return
    table = Table(title=f"{args.model}: teacher-forced passkey at {args.length:,} tokens, {args.prompts} prompts, last {args.rows or 'all'} rows sparse")
    for column in ("setting", "passkey", "key log-prob", "s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["setting"], f"{r['accuracy']:.2f}", f"{r['key_logp']:.2f}", f"{r['seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
