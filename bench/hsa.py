"""HSA reference op against dense causal SDPA on the CPU: wall time and peak memory of one forward.

Shapes: batch 1, 8 query heads / 2 KV heads, head dim 64, fp32; HSA with chunk S=64, top-K=16,
window w=4, landmark scores, selecting per query (``token``, the paper's default) and per query
chunk (``block``). Each (op, T) runs in two fresh processes, each a small warm-up call and then one
measured call: one gives the time (the default allocator), the other the memory
(``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave RSS at once: "adds" is peak RSS after the
call minus RSS before it; that setting makes every large allocation fault in fresh pages, which
slowed HSA's many per-group tensors by about 1.8× and dense hardly at all, so it is not used for
time). The goal in issue #6: ≥ 4× faster than dense at 32K and memory linear in T.

    python bench/hsa.py                      # T = 8K, 16K, 32K, 64K; paste into bench/RESULTS.md
    python bench/hsa.py --lengths 1024,2048  # quick check of the harness
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

SHAPE = dict(heads=8, kv_heads=2, dim=64)
HSA = dict(chunk=64, topk=16, window=4, mode="landmark")


def measure(op: str, T: int) -> dict:
    """One forward of ``op`` ("hsa-token", "hsa-block" or "dense") at length ``T`` in this process: seconds and RSS added."""
    import resource

    import torch.nn.functional as F

    from longctx_compile.ops.hsa import hsa_attention

    def run(length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, SHAPE["heads"], length, SHAPE["dim"], generator=g)
        k, v = (torch.randn(1, SHAPE["kv_heads"], length, SHAPE["dim"], generator=g) for _ in range(2))
        start = time.perf_counter()
        if op.startswith("hsa"):
            hsa_attention(
                q, k, v, None, None, None, SHAPE["dim"] ** -0.5, HSA["chunk"], HSA["topk"], HSA["window"], HSA["mode"], op.removeprefix("hsa-"), False
            )
        else:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return time.perf_counter() - start

    with torch.no_grad():
        run(min(T, 2 * HSA["chunk"] * (HSA["topk"] + HSA["window"])))  # warm-up, past the point where retrieval starts
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = run(T)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(op=op, T=T, seconds=seconds, adds_mib=max(0, peak - base) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768,65536")
    parser.add_argument("--one", nargs=2, metavar=("OP", "T"), help=argparse.SUPPRESS)  # a single measurement, in its own process
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    timing, memory = dict(os.environ), dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16))
    timing.pop("MALLOC_MMAP_THRESHOLD_", None)
    lengths = [int(t) for t in args.lengths.split(",")]
    ops = ("hsa-token", "hsa-block", "dense")
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("hsa", total=len(ops) * len(lengths))
        for T in lengths:
            for op in ops:
                progress.update(task, description=f"{op} at T={T}")
                timed, sized = (
                    json.loads(subprocess.run([sys.executable, __file__, "--one", op, str(T)], capture_output=True, text=True, env=env, check=True).stdout)
                    for env in (timing, memory)
                )
                rows.append(dict(timed, adds_mib=sized["adds_mib"]))
                progress.advance(task)
    title = f"one forward, CPU, fp32, {SHAPE['heads']}/{SHAPE['kv_heads']} heads, D={SHAPE['dim']}; HSA S={HSA['chunk']} K={HSA['topk']} w={HSA['window']} {HSA['mode']}"
    table = Table("T", *(f"{op} s" for op in ops), "dense / token", "dense / block", *(f"{op} adds" for op in ops), title=title, title_justify="left")
    for T in lengths:
        token, block, dense = (next(r for r in rows if r["op"] == op and r["T"] == T) for op in ops)
        table.add_row(
            f"{T:,}",
            *(f"{r['seconds']:.2f}" for r in (token, block, dense)),
            f"{dense['seconds'] / token['seconds']:.2f}×",
            f"{dense['seconds'] / block['seconds']:.2f}×",
            *(f"{r['adds_mib']:.0f} MiB" for r in (token, block, dense)),
        )
    Console(width=160).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
