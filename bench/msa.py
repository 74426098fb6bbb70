"""MSA memory and routing: bytes per memory token, encode throughput, and routing time against bank size.

1. Bytes per document token per routed layer of a bf16 bank in MSA-4B's shapes (8 KV heads, d=128,
   P=64) against 3·Hkv·d·2 / P, and how many tokens fit per GB (all three tensors, or the router
   keys alone: the accelerator tier).
2. Encode throughput of ``MsaModel.encode`` on a small Llama (CPU, fp32).
3. Routing time per query (one routed layer; 32 query heads on 8 KV heads, 32 query tokens, 256-token
   documents) over synthetic bf16 router keys for banks of 1M, 10M and 100M tokens: the reference op
   on the CPU, the Triton kernel on a GPU (then also against the HBM roofline of the detected target:
   the router keys read once per query).

    python bench/msa.py            # the figures in bench/RESULTS.md
    python bench/msa.py --smoke    # small sizes, to check the harness
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

MSA_4B = dict(kv_heads=8, head_dim=128, pool=64, routed_layers=18, q_heads=32)


def memory_bytes() -> dict:
    from longctx_compile.forms.msa.bank import MemoryBank

    s = MSA_4B
    bank = MemoryBank.empty(s["pool"], {}, [0], s["kv_heads"], s["head_dim"], s["head_dim"], dtype=torch.bfloat16)
    per_token = bank.bytes_per_token()
    formula = 3 * s["kv_heads"] * s["head_dim"] * 2 / s["pool"]
    return {
        "bytes_per_token_per_layer": per_token,
        "formula": formula,
        "tokens_per_gb_one_layer": 1e9 / per_token,
        "tokens_per_gb_all_routed_layers": 1e9 / (per_token * s["routed_layers"]),
        "router_key_tokens_per_gb_all_routed_layers": 1e9 / (per_token / 3 * s["routed_layers"]),
    }


def encode_throughput(smoke: bool) -> dict:
    import longctx_compile as lcc
    from longctx_compile.forms.msa.runtime import MsaModel

    if smoke:
        model, docs, length = "tiny-llama", 4, 64
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(
            "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024
        )
        torch.manual_seed(0)
        model, docs, length = AutoModelForCausalLM.from_config(config).eval(), 64, 512
    compiled = lcc.compile(model, to="msa", pool=64, max_len=length)
    msa = MsaModel(compiled.program.ep, compiled.program.signature)
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 256, (length,), generator=g).tolist() for _ in range(docs)]
    msa.encode(texts[:2], batch_size=2)  # warm-up
    start = time.perf_counter()
    bank = msa.encode(texts, batch_size=8)
    seconds = time.perf_counter() - start
    return {"docs": docs, "tokens": bank.tokens, "seconds": seconds, "tokens_per_s": bank.tokens / seconds, "routed_layers": len(bank.layers)}


def routing(tokens: int, device: str, repeats: int) -> dict:
    from longctx_compile.ops.msa import route_ref

    s = MSA_4B
    chunks = tokens // s["pool"]
    g = torch.Generator(device=device).manual_seed(0)
    keys = torch.randn(s["kv_heads"], chunks, s["head_dim"], generator=g, device=device, dtype=torch.bfloat16)
    chunk_doc = torch.arange(chunks, device=device) // 4  # 256-token documents
    n_docs = int(chunk_doc[-1]) + 1
    q = torch.randn(1, s["q_heads"], 32, s["head_dim"], generator=g, device=device, dtype=torch.bfloat16)
    mask = torch.ones(1, 32, dtype=torch.long, device=device)
    if device == "cuda":
        from longctx_compile.kernels.msa import route

        def run():
            return route(q, mask, keys, chunk_doc, n_docs, True)
    else:

        def run():
            return route_ref(q, mask, keys, chunk_doc, n_docs, True)

    run()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    row = {"tokens": tokens, "chunks": chunks, "docs": n_docs, "router_key_bytes": keys.numel() * 2, "seconds": seconds}
    if device == "cuda":
        from longctx_compile.targets import detect

        target = detect()
        if target is not None:
            row["roofline_s"] = keys.numel() * 2 / (target.bandwidth_gbs * 1e9)
            row["target"] = target.name
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--lengths", help="bank sizes in tokens (default 1M,10M,100M; smoke: 64K,256K)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    lengths = [int(float(x)) for x in (args.lengths or ("65536,262144" if args.smoke else "1e6,1e7,1e8")).split(",")]
    console = Console(width=140)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "memory": memory_bytes()}
    with Progress(transient=True, console=console) as progress:
        task = progress.add_task("encode", total=1 + len(lengths))
        result["encode"] = encode_throughput(args.smoke)
        progress.advance(task)
        result["routing"] = []
        for tokens in lengths:
            progress.update(task, description=f"routing over {tokens:,} tokens")
            result["routing"].append(routing(tokens, device, args.repeats))
            progress.advance(task)
    m = result["memory"]
    table = Table("", "", show_header=False, title="memory per token (bf16, 8 KV heads, d=128, P=64)", title_justify="left")
    table.add_row("bytes / token / routed layer", f"{m['bytes_per_token_per_layer']:.1f} (formula 3·Hkv·d·2/P = {m['formula']:.1f})")
    table.add_row("tokens per GB, one routed layer", f"{m['tokens_per_gb_one_layer']:,.0f}")
    table.add_row("tokens per GB, 18 routed layers", f"{m['tokens_per_gb_all_routed_layers']:,.0f}")
    table.add_row("tokens per GB of router keys, 18 layers", f"{m['router_key_tokens_per_gb_all_routed_layers']:,.0f}")
    console.print(table)
    e = result["encode"]
    console.print(
        f"encode: {e['tokens']:,} tokens in {e['seconds']:.2f} s = {e['tokens_per_s']:,.0f} tokens/s ({e['docs']} documents, {e['routed_layers']} routed layers)"
    )
    base = result["routing"][0]
    table = Table(
        "bank tokens",
        "chunks",
        "router keys",
        "route s",
        "s per 1M tokens",
        "time ratio / size ratio",
        title=f"routing one query ({result['device']})",
        title_justify="left",
    )
    if "roofline_s" in base:
        table.add_column("roofline s")
    for row in result["routing"]:
        cells = [
            f"{row['tokens']:,}",
            f"{row['chunks']:,}",
            f"{row['router_key_bytes'] / 2**20:,.0f} MiB",
            f"{row['seconds']:.4f}",
            f"{row['seconds'] / row['tokens'] * 1e6:.4f}",
        ]
        cells.append(f"{(row['seconds'] / base['seconds']) / (row['tokens'] / base['tokens']):.2f}")
        if "roofline_s" in row:
            cells.append(f"{row['roofline_s']:.4f} ({row['roofline_s'] / row['seconds']:.0%} of peak)")
        table.add_row(*cells)
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
