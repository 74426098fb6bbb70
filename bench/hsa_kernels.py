"""Triton HSA kernels on a GPU against dense flash attention (SDPA) and their own roofline.

Shapes: batch 1, 32 query heads / 2 KV heads (G = 16, the paper's ratio), head dim 128, bf16; HSA
S = 64, K = 16, w = 4, landmark scores, per-token and per-block selection; dense is
``scaled_dot_product_attention(is_causal=True)`` on its flash backend. Forward and forward+backward
milliseconds (``triton.testing.do_bench``, median), their ratio to dense, and the HSA forward's
share of its roofline: max(FLOPs / peak bf16, bytes / HBM bandwidth) of the target, where FLOPs
count the keys each query really reads (local window + K chunks, 4·D per key and head) and bytes
count q, k, v and out once (every re-read served by L2: the bound the kernel could reach).

    PYTHONPATH=. python bench/hsa_kernels.py            # on a GPU; record in bench/RESULTS.md
    python bench/hsa_kernels.py --smoke                 # CPU, Triton interpreter: checks the harness only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from rich.console import Console
from rich.table import Table

HSA = dict(chunk=64, topk=16, window=4)


def keys_read(T: int, shape: dict) -> float:
    """Mean keys a query reads: its local part (on average w + ½ chunks) plus K complete chunks once it has them."""
    S, K, w = shape["chunk"], shape["topk"], shape["window"]
    total = 0.0
    for t in range(0, T, S):  # one representative query per chunk, weighted by the chunk
        c = t // S
        total += S * ((min(c, w) + 0.5) * S + min(K, max(0, c - w)) * S)
    return total / T


def run(args) -> list[dict]:
    import longctx_compile  # noqa: F401
    from longctx_compile.targets import detect, get_target

    shape = dict(hq=32, hkv=2, d=128, **HSA) if not args.smoke else dict(hq=4, hkv=2, d=16, chunk=16, topk=2, window=1)
    target = detect() if not args.smoke else get_target("interpret")
    return [dict(measure(T, shape, args), target=target.name, roofline_ms=roofline_ms(T, shape, target)) for T in args.lengths]


def measure(T: int, shape: dict, args) -> dict:
    """Milliseconds of HSA (both selections) and dense SDPA at length T, forward and forward+backward, and the kernels' error."""
    from longctx_compile.ops.hsa import hsa_attention
    from longctx_compile.ops.hsa_flash import hsa_flash
    from longctx_compile.targets.tiles import hsa_tiles

    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, T, d, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(1, hkv, T, d, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(1, hq, T, d, generator=g).to(device, dtype)
    row = dict(T=T, ms={})
    for select in ("token", "block"):
        statics = (d**-0.5, shape["chunk"], shape["topk"], shape["window"], "landmark", select, False, "softmax", None, None, 0)
        tiles = hsa_tiles(shape["chunk"], hq // hkv, select)
        out = hsa_flash(q, k, v, None, None, None, *statics, tiles)[0]
        want = hsa_attention(*(t.detach().float() for t in (q, k, v)), None, None, None, *statics)
        row[f"max_abs_error_{select}"] = float((out.float() - want).abs().max())
        row["ms"][f"hsa-{select} fwd"] = bench(lambda statics=statics, tiles=tiles: hsa_flash(q, k, v, None, None, None, *statics, tiles)[0], args)
        row["ms"][f"hsa-{select} fwd+bwd"] = bench(
            lambda statics=statics, tiles=tiles: torch.autograd.grad(hsa_flash(q, k, v, None, None, None, *statics, tiles)[0], (q, k, v), grad), args
        )
    backend = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if device == "cuda" else contextlib.nullcontext()
    with backend:
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        row["ms"]["dense fwd"] = bench(dense, args)
        row["ms"]["dense fwd+bwd"] = bench(lambda: torch.autograd.grad(dense(), (q, k, v), grad), args)
    return row


def roofline_ms(T: int, shape: dict, target) -> float:
    """The HSA forward's bound on ``target``: max(FLOPs of the keys read / peak bf16, q, k, v, out once / bandwidth)."""
    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    flops = 4 * d * hq * T * keys_read(T, shape)
    moved = (2 * hq + 2 * hkv) * T * d * 2
    peak = (target.peak_tflops("bf16") or 0) * 1e12
    return 1e3 * max(flops / peak if peak else 0.0, moved / (target.bandwidth_gbs * 1e9) if target.bandwidth_gbs else 0.0)


def bench(fn, args) -> float:
    if args.smoke:
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 32768, 65536])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes under the Triton interpreter (CPU)")
    parser.add_argument("--json")
    args = parser.parse_args()
    console = Console(width=180)
    if args.smoke:
        args.lengths = [48]
    elif not torch.cuda.is_available():
        console.print("bench/hsa_kernels.py needs a CUDA GPU (or --smoke for the harness under the interpreter)")
        sys.exit(0)
    rows = run(args)
    table = Table("T", *rows[0]["ms"], "token fwd / dense", "block fwd / dense", "block fwd / roofline", title=f"HSA kernels on {rows[0]['target']} (ms)")
    for r in rows:
        ms = r["ms"]
        table.add_row(
            f"{r['T']:,}",
            *(f"{x:.2f}" for x in ms.values()),
            f"{ms['dense fwd'] / ms['hsa-token fwd']:.2f}× faster",
            f"{ms['dense fwd'] / ms['hsa-block fwd']:.2f}× faster",
            f"{r['roofline_ms'] / ms['hsa-block fwd']:.0%}" if r["roofline_ms"] else "-",
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
