"""Decode speed and KV memory of the evicting cache at each budget, against dense, in one run.

A random-weight Llama (``--layers`` layers, hidden ``--hidden``, ``--heads``/``--kv-heads`` heads)
is converted to ``evict`` (learned policy, 4 sinks, window 128, memory on); a ``--prompt``-token prompt
is prefilled in chunks of ``--chunk`` tokens, the cache compacted after each, then ``--new`` tokens
are decoded greedily, evicting every ``--interval`` steps. For each budget the table gives the keys
kept per layer, the K/V bytes after the prompt, the peak bytes of the whole cache over the run (K, V
and the eviction state: indexer keys, positions, scores, memory), the prefill time and decode tokens
per second (the median of ``--repeats`` interleaved runs). "dense" is the same runtime with nothing evicted;
"dense (step programs)" is lcc's exported KV-cache decode of the dense conversion (``lcc generate``).

    python bench/evict.py                 # ~2 minutes on 2 cores; paste into bench/RESULTS.md
    python bench/evict.py --smoke         # seconds: checks the harness
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new + 1,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def decode(model, prompt: torch.Tensor, new: int) -> tuple[dict, float]:
    """(the cache after decoding, decode tokens per second) for greedy decoding after the prompt."""
    start = time.perf_counter()
    logits, cache = model.prefill(prompt)
    prefill_s = time.perf_counter() - start
    after_prompt = cache.kv_bytes()
    token = logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new):
        token = model.extend(cache, token, last=True)[:, -1].argmax(-1, keepdim=True)
    seconds = time.perf_counter() - start
    kept = max(cache.lengths().values())
    return dict(kv_after_prompt=after_prompt, peak=cache.peak_bytes, kept=kept, prefill_s=prefill_s), new / seconds


def decode_seconds(compiled, prompt: torch.Tensor, new: int) -> float:
    """Seconds of ``new`` decode steps of lcc's step programs, timed between the tokens they stream (the prefill,
    before the first token, is left out; timing it apart and subtracting went negative on a busy machine)."""
    stamps: list[float] = []
    compiled.generate([prompt[0].tolist()], new + 1, stream=lambda _: stamps.append(time.perf_counter()))
    return stamps[-1] - stamps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk: the cache is compacted after each")
    parser.add_argument("--budgets", default="0.5,0.25,0.1,512")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; decode speeds are their median")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.prompt, args.new, args.interval, args.budgets, args.layers, args.hidden, args.chunk, args.repeats = 512, 8, 4, "0.25,200", 2, 64, 128, 1
    console = Console(stderr=args.json)
    import longctx_compile as lcc
    from longctx_compile.forms.evict.runtime import EvictModel

    original = build(args)
    compiled = lcc.compile(original, to="evict", window="128", interval=str(args.interval), max_len=str(args.prompt + args.new + 1))
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    budgets = ["dense", *args.budgets.split(",")]
    models = {
        b: EvictModel(compiled.program.ep, compiled.program.signature, budget=str(10**9) if b == "dense" else b, prefill_chunk=args.chunk) for b in budgets
    }
    dense_steps = lcc.compile(original, max_len=str(args.prompt + args.new + 1))
    dense_steps.generate([prompt[0].tolist()], 2)  # builds and binds the steps (warm-up)
    runs: dict[str, list] = {b: [] for b in [*budgets, "steps"]}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every row alike
        for budget in budgets:
            runs[budget].append(decode(models[budget], prompt, args.new))
        runs["steps"].append(args.new / decode_seconds(dense_steps, prompt, args.new))
    rows = [dict(budget=b, tokens_per_s=statistics.median(speed for _, speed in runs[b]), **runs[b][-1][0]) for b in budgets]
    steps_speed = statistics.median(runs["steps"])
    if args.json:
        print(json.dumps(dict(args=vars(args), rows=rows, dense_step_programs_tokens_per_s=steps_speed)))
        return
    dense = rows[0]
    table = Table(title=f"evicting decode: {args.prompt:,}-token prompt, {args.new} new tokens, prefill chunks of {args.chunk}, evict every {args.interval}")
    for column in ("budget", "keys kept / layer", "K/V after prompt", "K/V ÷ dense", "peak cache", "prefill s", "decode tok/s", "speed × dense"):
        table.add_column(column, justify="left" if column == "budget" else "right")
    for row in rows:
        table.add_row(
            row["budget"],
            f"{row['kept']:,}",
            f"{row['kv_after_prompt'] / 2**20:.2f} MiB",
            f"{row['kv_after_prompt'] / dense['kv_after_prompt']:.3f}",
            f"{row['peak'] / 2**20:.2f} MiB",
            f"{row['prefill_s']:.2f}",
            f"{row['tokens_per_s']:.1f}",
            f"{row['tokens_per_s'] / dense['tokens_per_s']:.2f}×",
        )
    table.add_row("dense (step programs)", "", "", "", "", "", f"{steps_speed:.1f}", f"{steps_speed / dense['tokens_per_s']:.2f}×")
    console.print(table)
    console.print(f"{args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, fp32, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
