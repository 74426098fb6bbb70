"""Ulysses sequence parallelism on local gloo ranks: measured bytes against the formula, peak memory per rank.

A small Llama-shaped model (hidden 256, 8 heads / 4 KV heads, 2 layers, vocab 1024, fp32) is
converted with ``--to ulysses --opt degree=P`` for P = 1, 2, 4; each P runs one training step
(forward, token-weighted loss, backward, gradient sum) on one sequence of ``--seq`` tokens, one
process per rank. The collectives count what they send; the formula is ``passes.ulysses.comm_bytes``
(forward) doubled for the backward.

    python bench/sp.py                 # paste the table into bench/RESULTS.md
    python bench/sp.py --seq 256       # quick check of the harness
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2, vocab_size=1024)


def build(max_len: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", max_position_embeddings=max_len, **SIZES)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import longctx_compile as lcc
    from longctx_compile.distributed import ranks
    from longctx_compile.passes.ulysses import comm_bytes

    degrees = [int(p) for p in args.degrees.split(",")]
    model = build(args.seq)
    ids = torch.randint(0, SIZES["vocab_size"], (1, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    with Progress(transient=True) as progress, tempfile.TemporaryDirectory() as tmp:
        task = progress.add_task("ulysses", total=len(degrees))
        for P in degrees:
            progress.update(task, description=f"P={P}: converting")
            compiled = lcc.compile(model, to="ulysses", degree=P, max_len=args.seq)
            path = compiled.save(Path(tmp) / f"p{P}.lcc")
            sites = compiled.program.sites()
            progress.update(task, description=f"P={P}: training step on {P} ranks")
            result = ranks.profile(path, P, {"input_ids": ids})
            formula = 2 * sum(sum(comm_bytes(s, args.seq).values()) for s in sites)  # forward + backward
            for r, info in enumerate(result["ranks"]):
                calls, sent = info["traffic"].get("all_to_all", [0, 0])
                rows.append(
                    dict(
                        degree=P,
                        rank=r,
                        a2a_calls=calls,
                        a2a_calls_per_layer=calls / len(sites),
                        bytes_per_layer=sent / len(sites),
                        formula_per_layer=formula / len(sites),
                        gather_bytes=info["traffic"].get("all_gather", [0, 0])[1],
                        peak_mib=info["peak_kib"] / 1024,
                        step_mib=max(0, info["peak_kib"] - info["base_kib"]) / 1024,
                    )
                )
            progress.advance(task)
    title = f"Ulysses training step, {args.seq} tokens, 2 layers, 8/4 heads, fp32, gloo (CPU)"
    table = Table(
        "P", "rank", "a2a calls / layer", "sent / layer", "formula / layer", "measured / formula", "peak RSS", "step adds", title=title, title_justify="left"
    )
    for r in rows:
        ratio = r["bytes_per_layer"] / r["formula_per_layer"] if r["formula_per_layer"] else float("nan")
        table.add_row(
            str(r["degree"]),
            str(r["rank"]),
            f"{r['a2a_calls_per_layer']:g}",
            f"{r['bytes_per_layer'] / 2**20:.2f} MiB",
            f"{r['formula_per_layer'] / 2**20:.2f} MiB",
            f"{ratio:.3f}" if r["formula_per_layer"] else "-",
            f"{r['peak_mib']:.0f} MiB",
            f"{r['step_mib']:.0f} MiB",
        )
    Console(width=120).print(table)
    print("a2a calls per layer: 4 forward + 4 backward; the all-gather of key padding is counted apart (int64, tiny).")
    print("tile_loss (tiled LM head + cross-entropy) is not built yet; its memory column will come with it.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
