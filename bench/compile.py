"""Compile cost: ``lcc`` convert (capture + canonicalize + lower) against ``torch.export`` alone.

A Llama-3-8B-shaped config (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256) is built on
the meta device at 8, 16 and 32 layers; each measurement runs in a fresh process so peak RSS is its own.
Weights are on the meta device, so no artifact is written (the .pt2 would hold no data).

    python bench/compile.py            # prints the table; paste it into bench/RESULTS.md
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

LAYERS = (8, 16, 32)


def build(layers: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=layers,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def measure(mode: str, layers: int) -> dict:
    """Run in a child process: build, then time export alone or the whole lcc compile."""
    from longctx_compile.capture import CaptureConfig, export
    from longctx_compile.compiler import compile_model

    model = build(layers)
    start = time.perf_counter()
    if mode == "export":
        export(model, CaptureConfig())
        sites = None
        capture = time.perf_counter() - start
    else:
        marks = {}
        sites = len(compile_model(model, progress=lambda step: marks.setdefault(step, time.perf_counter())).program.sites())
        capture = marks["canonicalizing attention"] - marks["capturing with torch.export"]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "capture": capture, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "sites": sites}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
        return
    results = {}
    with Progress() as progress:
        task = progress.add_task("compiling", total=2 * len(LAYERS))
        for layers in LAYERS:
            for mode in ("export", "lcc"):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(layers)], capture_output=True, text=True, check=True)
                results[(mode, layers)] = json.loads(out.stdout.strip().splitlines()[-1])
                progress.advance(task)
    table = Table(
        "layers",
        "export s",
        "lcc convert s",
        "ratio",
        "lcc passes s",
        "passes / own export",
        "export RSS MB",
        "lcc RSS MB",
        "sites",
        title="lcc convert --to dense vs torch.export (Llama-3-8B shape, meta)",
    )
    for layers in LAYERS:
        e, c = results[("export", layers)], results[("lcc", layers)]
        passes = c["seconds"] - c["capture"]
        table.add_row(
            str(layers),
            f"{e['seconds']:.2f}",
            f"{c['seconds']:.2f}",
            f"{c['seconds'] / e['seconds']:.2f}×",
            f"{passes:.2f}",
            f"{passes / c['capture']:.2f}",
            f"{e['peak_rss_mb']:.0f}",
            f"{c['peak_rss_mb']:.0f}",
            str(c["sites"]),
        )
    Console().print(table)
    per_layer = [results[("lcc", n)]["seconds"] / n for n in LAYERS]
    print("lcc seconds per layer: " + ", ".join(f"{n}: {s:.3f}" for n, s in zip(LAYERS, per_layer, strict=True)))


if __name__ == "__main__":
    main()
