"""Generation speed: ``lcc`` generate (growing and static cache) against Hugging Face ``generate``.

One ~100M-parameter Llama-shaped model with random weights (hidden 768, 12 layers, 12 heads / 4 KV
heads, MLP 2048, vocab 16384), fp32 on the CPU; prompt 512, 128 new tokens, greedy, batch 1 by
default. After a short warm-up each contender runs ``--repeats`` times (3), in interleaved rounds,
and its median run is reported; all generate exactly the same number of tokens (no stop ids), and
the table says whether their tokens agree.

    python bench/generate.py             # the issue's setting; paste the table into bench/RESULTS.md
    python bench/generate.py --smoke     # a tiny model, to check the harness (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

FULL = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4, num_hidden_layers=12, vocab_size=16384)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=512)


def build(sizes: dict, max_len: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", max_position_embeddings=max_len, **sizes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


class Clock:
    """Wall time of a generation, split at its first new token (time to first token, then decode)."""

    def __init__(self):
        self.start = self.first = self.stop = 0.0

    def begin(self) -> None:
        self.start, self.first = time.perf_counter(), 0.0

    def token(self) -> None:
        if not self.first:
            self.first = time.perf_counter()

    def end(self) -> None:
        self.stop = time.perf_counter()


class HFStreamer:
    """A ``generate`` streamer that only marks when tokens arrive (its first ``put`` is the prompt)."""

    def __init__(self, clock: Clock):
        self.clock, self.calls = clock, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.clock.token()

    def end(self) -> None:
        pass


def run_hf(model, ids: torch.Tensor, new: int, clock: Clock | None) -> list[list[int]]:
    model.generation_config.eos_token_id = None
    streamer = HFStreamer(clock) if clock else None
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0, streamer=streamer)
    return out[:, ids.shape[1] :].tolist()


def run_lcc(compiled, ids: torch.Tensor, new: int, cache: str, clock: Clock | None) -> list[list[int]]:
    stream = (lambda _: clock.token()) if clock else None
    return compiled.generate(ids.tolist(), max_new_tokens=new, cache=cache, stream=stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (the median is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, short prompt: checks the harness only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.smoke:
        args.prompt, args.new = min(args.prompt, 24), min(args.new, 6)
    if args.threads:
        torch.set_num_threads(args.threads)
    import longctx_compile as lcc

    sizes = SMOKE if args.smoke else FULL
    max_len = args.prompt + args.new
    console = Console(width=110)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building and compiling", total=None)
        model = build(sizes, max_len)
        params = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        compiled = lcc.compile(model, max_len=max_len)
        compile_s = time.perf_counter() - start
        ids = torch.randint(0, sizes["vocab_size"], (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
        contenders = {
            "hf generate": lambda clock, ids=ids, new=args.new: run_hf(model, ids, new, clock),
            "lcc growing": lambda clock, ids=ids, new=args.new: run_lcc(compiled, ids, new, "growing", clock),
            "lcc static": lambda clock, ids=ids, new=args.new: run_lcc(compiled, ids, new, "static", clock),
        }
        progress.update(task, description="warm-up")
        for run in contenders.values():
            run(None, ids=ids[:, :16], new=min(4, args.new))
        runs: dict[str, list[Clock]] = {name: [] for name in contenders}
        tokens: dict[str, list] = {}
        progress.update(task, description="timed runs", total=args.repeats * len(contenders), completed=0)
        for _ in range(args.repeats):  # rounds interleave the contenders, so drifting machine load hits all alike
            for name, run in contenders.items():
                clock = Clock()
                clock.begin()
                tokens[name] = run(clock)
                clock.end()
                runs[name].append(clock)
                progress.advance(task)
    rows = []
    for name, clocks in runs.items():
        clock = sorted(clocks, key=lambda c: c.stop - c.start)[len(clocks) // 2]  # the median run
        total, decode = clock.stop - clock.start, clock.stop - clock.first
        rows.append(
            dict(
                name=name,
                seconds=total,
                all_seconds=[c.stop - c.start for c in clocks],
                first_token_s=clock.first - clock.start,
                tokens_per_s=args.batch * args.new / total,
                decode_tokens_per_s=args.batch * (args.new - 1) / decode if args.new > 1 else None,
                same_tokens=tokens[name] == tokens["hf generate"],
            )
        )
    base = rows[0]["tokens_per_s"]
    title = f"generate: {params / 1e6:.0f}M-param llama, fp32 CPU, prompt {args.prompt}, {args.new} new, batch {args.batch}"
    table = Table("", "total s", "first token s", "tokens/s", "decode tokens/s", "vs HF", "same tokens", title=title, title_justify="left")
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base
        decode = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        table.add_row(
            r["name"], f"{r['seconds']:.2f}", f"{r['first_token_s']:.2f}", f"{r['tokens_per_s']:.1f}", decode, f"{r['ratio']:.2f}×", str(r["same_tokens"])
        )
    console.print(table)
    best = max(rows[1:], key=lambda r: r["ratio"])
    console.print(
        f"lcc compile (capture, passes; the steps run from its graph, built at the warm-up): {compile_s:.1f} s; torch threads {torch.get_num_threads()}"
    )
    console.print(f"goal lcc/HF tokens per second ≥ 1.0: {'met' if best['ratio'] >= 1.0 else 'NOT met'} ({best['name']}, {best['ratio']:.2f}×)")
    if args.json:
        args.json.write_text(json.dumps({"params": params, "prompt": args.prompt, "new": args.new, "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
