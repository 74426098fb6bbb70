"""Sequence parallelism on local gloo ranks: measured bytes against the formula, peak memory per rank.

A small Llama-shaped model (hidden 256, 8 heads / 4 KV heads, 2 layers, vocab 1024, fp32) is
converted with ``--to ulysses --opt degree=P`` for P = 1, 2, 4 and ``--to ring --opt degree=P``
for P = 2, 4; each runs one training step (forward, token-weighted loss, backward, gradient sum)
on one sequence of ``--seq`` tokens, one process per rank. The collectives count what they send;
the formula is ``passes.sequence_parallel.step_bytes`` (forward and backward).

Then ``tile_loss``: one training step of a 1-layer model with a 128K vocabulary (Llama-3's 128,256)
on ``--loss-seq`` tokens, once with full logits and ``cross_entropy`` and once with ``model.loss``
(the LM head and loss in tiles), each in a fresh process so its peak resident memory is its own.
Every process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so large tensors are mmapped and freed
back at once; with glibc's default dynamic threshold, peak RSS also counts freed heap memory.

    python bench/sp.py                 # paste the table into bench/RESULTS.md
    python bench/sp.py --seq 256 --loss-seq 256 --loss-vocab 4096   # quick check of the harness
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    parser.add_argument("--loss-seq", type=int, default=4096)
    parser.add_argument("--loss-vocab", type=int, default=128256)
    parser.add_argument("--loss-variant", choices=["full", "tiled"], help=argparse.SUPPRESS)  # one measurement, in its own process
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.loss_variant:
        print(json.dumps(loss_step(args.loss_variant, args.loss_seq, args.loss_vocab)))
        return
    # a fixed mmap threshold for every process started from here: glibc's dynamic one moves freed large
    # tensors onto the heap, whose high-water mark then measures the allocator, not the step
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    rows = collectives(args)
    losses = [json.loads(subprocess.run(_loss_command(args, v), capture_output=True, text=True, check=True).stdout) for v in ("full", "tiled")]
    title = f"tile_loss: one training step, 1 layer, vocab {args.loss_vocab:,}, {args.loss_seq:,} tokens, fp32"
    table = Table("loss", "tile rows", "loss value", "peak RSS", "step adds", title=title, title_justify="left")
    for r in losses:
        table.add_row(r["variant"], str(r["tile"] or "-"), f"{r['loss']:.6f}", f"{r['peak_mib']:.0f} MiB", f"{r['step_mib']:.0f} MiB")
    Console(width=120).print(table)
    full, tiled = losses
    print(f"tiled / full step memory: {tiled['step_mib'] / full['step_mib']:.3f}" if full["step_mib"] else "step memory below RSS resolution")
    if args.json:
        args.json.write_text(json.dumps({"sp": rows, "tile_loss": losses}, indent=2))


def _loss_command(args, variant: str) -> list[str]:
    return [sys.executable, __file__, "--loss-variant", variant, "--loss-seq", str(args.loss_seq), "--loss-vocab", str(args.loss_vocab)]


def loss_step(variant: str, seq: int, vocab: int) -> dict:
    """Peak memory of one forward + backward with full logits or the tiled head, in this fresh process."""
    import resource

    from transformers import AutoConfig, AutoModelForCausalLM

    import longctx_compile as lcc
    from longctx_compile.distributed import IGNORE
    from longctx_compile.ops.loss import default_tile

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", max_position_embeddings=seq, **dict(SIZES, num_hidden_layers=1, vocab_size=vocab))
    compiled = lcc.compile(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval(), max_len=seq)
    for p in compiled.module.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "full":
        loss = torch.nn.functional.cross_entropy(compiled(ids).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    else:
        total, count = compiled.loss(ids, labels)
        loss = total / count
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tile = default_tile(vocab) if variant == "tiled" else None
    return dict(variant=variant, tile=tile, loss=float(loss), peak_mib=peak / 1024, step_mib=(peak - base) / 1024)


def collectives(args) -> list[dict]:
    """One SP training step per (form, P): collective calls and bytes per layer per rank, peak memory."""
    import longctx_compile as lcc
    from longctx_compile.distributed import Layout, ranks
    from longctx_compile.forms.sp.rewrite import step_bytes

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
        "form",
        "P",
        "rank",
        "calls / layer",
        "sent / layer",
        "formula / layer",
        "measured / formula",
        "peak RSS",
        "step adds",
        title=title,
        title_justify="left",
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
    return rows


if __name__ == "__main__":
    main()
