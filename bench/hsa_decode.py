"""HSA decode: one step's attention from cached chunk landmarks (``longctx::hsa_decode``) against the same rows
computed by the reference over every cached key (the decode path before the landmark cache) and against dense
attention of one query over all keys; then whole-model greedy decode, dense against hsa, through lcc's steps.

    python bench/hsa_decode.py            # the table in bench/RESULTS.md
    python bench/hsa_decode.py --smoke    # small sizes: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_row(n: int, args, g: torch.Generator) -> dict:
    """One step's attention over ``n`` cached keys: the landmark cache, the reference and dense SDPA."""
    from longctx_compile.ops.hsa import hsa_ref
    from longctx_compile.ops.hsa_decode import hsa_decode_ref
    from longctx_compile.ops.hsa_sums import landmark_sums

    q = torch.randn(1, args.heads, 1, args.dim, generator=g)
    k, v = (torch.randn(1, args.kv_heads, n, args.dim, generator=g) for _ in range(2))
    sums = landmark_sums(k, None, args.chunk)
    hsa = (args.dim**-0.5, args.chunk, args.topk, args.window, "landmark")

    def cached():
        return hsa_decode_ref(q, k, v, None, sums, None, None, *hsa, False, "softmax", None)

    def reference():
        return hsa_ref(q, k, v, None, *hsa)

    kr, vr = (t.repeat_interleave(args.heads // args.kv_heads, 1) for t in (k, v))
    dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr), args.repeats)
    same = torch.allclose(cached(), reference(), atol=1e-5)
    return dict(
        keys=n, landmark_cache_ms=timed(cached, args.repeats) * 1e3, reference_ms=timed(reference, args.repeats) * 1e3, dense_ms=dense * 1e3, equal=same
    )


def op_rows(lengths: list[int], args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [op_row(n, args, g) for n in lengths]


def decode_timing(compiled, prompt: list[int], new: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of one greedy generation, timed by the tokens it streams."""
    stamps: list[float] = []
    start = time.perf_counter()
    compiled.generate([prompt], new + 1, stream=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - start, new / (stamps[-1] - stamps[0])


def model_rows(args) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import longctx_compile as lcc

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.dim,
        vocab_size=1024,
        max_position_embeddings=args.prompt + args.new + 1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 1024, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    forms = {"dense": {}, "hsa": dict(chunk=str(args.chunk), topk=str(args.topk), window=str(args.window), score="landmark")}
    for name, options in forms.items():
        compiled = lcc.compile(model, to=name, max_len=str(args.prompt + args.new + 1), **options)
        compiled.generate([prompt[:64]], 2)  # builds the steps
        prefill, speed = decode_timing(compiled, prompt, args.new)
        rows.append(dict(form=name, prefill_s=prefill, decode_tokens_per_s=speed))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=16384, help="whole-model decode: prompt tokens")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.repeats, args.prompt, args.new, args.layers, args.hidden, args.chunk, args.topk = "512,2048", 3, 256, 4, 2, 64, 16, 2
    console = Console(stderr=args.json)
    ops = op_rows([int(n) for n in args.lengths.split(",")], args)
    models = model_rows(args)
    if args.json:
        print(json.dumps(dict(args=vars(args), ops=ops, models=models)))
        return
    table = Table(
        title=f"one decode step's attention: {args.heads}/{args.kv_heads} heads of {args.dim}, chunk {args.chunk}, top-{args.topk}, window {args.window}"
    )
    for column in ("keys", "landmark cache ms", "reference over all keys ms", "dense SDPA ms", "speed-up × reference", "× dense", "same rows"):
        table.add_column(column, justify="right")
    for r in ops:
        table.add_row(
            f"{r['keys']:,}",
            f"{r['landmark_cache_ms']:.2f}",
            f"{r['reference_ms']:.2f}",
            f"{r['dense_ms']:.2f}",
            f"{r['reference_ms'] / r['landmark_cache_ms']:.1f}×",
            f"{r['dense_ms'] / r['landmark_cache_ms']:.2f}×",
            "yes" if r["equal"] else "NO",
        )
    console.print(table)
    table = Table(title=f"greedy decode after a {args.prompt:,}-token prompt, {args.new} new tokens ({args.layers} layers, hidden {args.hidden})")
    for column in ("form", "prefill s", "decode tok/s", "× dense"):
        table.add_column(column, justify="right")
    for r in models:
        table.add_row(
            r["form"], f"{r['prefill_s']:.2f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / models[0]['decode_tokens_per_s']:.2f}×"
        )
    console.print(table)
    console.print(f"fp32, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
