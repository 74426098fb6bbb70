"""Sequence parallelism on local gloo ranks: measured bytes against the formula, peak memory per rank.

A small Llama-shaped model (hidden 256, 8 heads / 4 KV heads, 2 layers, vocab 1024, fp32) is
converted with ``--to ulysses --opt degree=P`` for P = 1, 2, 4 and ``--to ring --opt degree=P``
for P = 2, 4; each runs one training step (forward, token-weighted loss, backward, gradient sum)
on one sequence of ``--seq`` tokens, one process per rank. The collectives count what they send;
the formula is ``passes.sequence_parallel.step_bytes`` (forward and backward).

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
    parser.add_argument("--forms", default="ulysses,ring")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import longctx_compile as lcc
    from longctx_compile.distributed import ranks
    from longctx_compile.distributed import Layout
    from longctx_compile.passes.sequence_parallel import step_bytes

    runs = [(form, P) for form in args.forms.split(",") for P in map(int, args.degrees.split(",")) if form != "ring" or P > 1]
    model = build(args.seq)
    ids = torch.randint(0, SIZES["vocab_size"], (1, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    with Progress(transient=True) as progress, tempfile.TemporaryDirectory() as tmp:
        task = progress.add_task("sp", total=len(runs))
        for form, P in runs:
            progress.update(task, description=f"{form} P={P}: converting")
            compiled = lcc.compile(model, to=form, degree=P, max_len=args.seq)
            path = compiled.save(Path(tmp) / f"{form}{P}.lcc")
            sites = compiled.program.sites()
            layout = Layout.of(compiled.program.signature)
            progress.update(task, description=f"{form} P={P}: training step on {P} ranks")
            result = ranks.profile(path, P, {"input_ids": ids})
            formula = sum(step_bytes(s, layout, args.seq) for s in sites)
            for r, info in enumerate(result["ranks"]):
                traffic = info["traffic"]
                calls = sum(traffic.get(c, [0, 0])[0] for c in ("all_to_all", "send_recv"))
                sent = sum(traffic.get(c, [0, 0])[1] for c in ("all_to_all", "send_recv"))
                rows.append(
                    dict(
                        form=form,
                        degree=P,
                        rank=r,
                        calls_per_layer=calls / len(sites),
                        bytes_per_layer=sent / len(sites),
                        formula_per_layer=formula / len(sites),
                        gather_bytes=info["traffic"].get("all_gather", [0, 0])[1],
                        peak_mib=info["peak_kib"] / 1024,
                        step_mib=max(0, info["peak_kib"] - info["base_kib"]) / 1024,
                    )
                )
            progress.advance(task)
    title = f"SP training step, {args.seq} tokens, 2 layers, 8/4 heads, fp32, gloo (CPU)"
    table = Table(
        "form", "P", "rank", "calls / layer", "sent / layer", "formula / layer", "measured / formula", "peak RSS", "step adds", title=title, title_justify="left"
    )
    for r in rows:
        ratio = r["bytes_per_layer"] / r["formula_per_layer"] if r["formula_per_layer"] else float("nan")
        table.add_row(
            r["form"],
            str(r["degree"]),
            str(r["rank"]),
            f"{r['calls_per_layer']:g}",
            f"{r['bytes_per_layer'] / 2**20:.2f} MiB",
            f"{r['formula_per_layer'] / 2**20:.2f} MiB",
            f"{ratio:.3f}" if r["formula_per_layer"] else "-",
            f"{r['peak_mib']:.0f} MiB",
            f"{r['step_mib']:.0f} MiB",
        )
    Console(width=120).print(table)
    print("calls per layer: ulysses 4 all-to-alls forward + 4 backward; ring P-1 K/V passes forward + P backward (dK/dV home).")
    print("The all-gather of key padding is counted apart (int64, tiny).")
    print("tile_loss (tiled LM head + cross-entropy) is not built yet; its memory column will come with it.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
