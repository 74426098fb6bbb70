"""ONNX export of converted models: export time, file size and nodes, and onnxruntime against the PyTorch artifact.

A random-weight Llama (``--layers`` layers, hidden ``--hidden``, ``--heads``/``--kv-heads`` heads) is
converted to each form in ``--forms`` (hsa: chunk 64, top-4, window 1, landmark; evict: learned
indexers), each artifact's model program is exported once per opset in ``--opsets`` (18: attention
from MatMul and softmax; 23: ONNX's Attention operator), and at each of ``--lengths`` (one file,
dynamic sequence) one forward of batch ``--batch`` runs in onnxruntime (CPU, all cores) and in
PyTorch (the artifact's ``model.pt2``: the ops' reference implementations on the CPU). Times are the
median of ``--repeats`` interleaved runs; the table gives their ratio and the largest difference of the logits.

    python bench/onnx_export.py                 # a few minutes on 2 cores; paste into bench/RESULTS.md
    python bench/onnx_export.py --smoke         # seconds: checks the harness
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

FORM_OPTIONS = {"dense": {}, "hsa": {"chunk": 64, "topk": 4, "window": 1}, "evict": {}}


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
        max_position_embeddings=max(args.lengths) + 1,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def seconds(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default="dense,hsa,evict")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--opsets", default="18,23", help="ONNX opsets to export at (23: attention as ONNX's Attention operator)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    if args.smoke:
        args.lengths, args.layers, args.hidden, args.vocab, args.repeats = [96, 200], 2, 64, 256, 1
    import onnxruntime

    import longctx_compile as lcc
    from longctx_compile import artifact
    from longctx_compile.onnx import check

    console = Console(width=150)
    model = build(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for form, opset in ((f, int(o)) for f in args.forms.split(",") for o in args.opsets.split(",")):
            path = Path(tmp) / f"{form}.lcc"
            if not path.exists():
                lcc.compile(model, to=form, **FORM_OPTIONS[form]).save(path)
            out = Path(tmp) / f"{form}-{opset}.onnx"
            start = time.perf_counter()
            report = lcc.export_onnx(path, out, opset=opset)
            export_s = time.perf_counter() - start
            manifest = artifact.read_manifest(path)
            program = artifact.read_program(path, manifest).module()
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            for length in args.lengths:
                feed = check.inputs(manifest, args.batch, length, seed=0)
                numpy_feed = {k: v.numpy() for k, v in feed.items()}
                with torch.no_grad():
                    want = program(**feed)
                    want = want[0] if isinstance(want, (tuple, list)) else want
                got = torch.from_numpy(session.run(None, numpy_feed)[0])
                ort_s, torch_s = [], []
                for _ in range(args.repeats):  # interleaved, so drift hits both
                    ort_s.append(seconds(session.run, None, numpy_feed))
                    with torch.no_grad():
                        torch_s.append(seconds(program, **feed))
                row = dict(
                    form=form,
                    opset=opset,
                    length=length,
                    export_s=export_s,
                    mb=report.bytes / 1e6,
                    nodes=sum(report.onnx_ops.values()),
                    onnx_ms=1e3 * statistics.median(ort_s),
                    torch_ms=1e3 * statistics.median(torch_s),
                    max_abs_diff=(got - want).abs().max().item(),
                )
                rows.append(row)
                console.print(f"{form} opset {opset} T={length}: onnxruntime {row['onnx_ms']:.1f} ms, torch {row['torch_ms']:.1f} ms", highlight=False)
    table = Table(title=f"ONNX export: Llama {args.layers}x{args.hidden}, {args.heads}/{args.kv_heads} heads, batch {args.batch}, fp32 CPU")
    for name in ("form", "opset", "T", "export s", "file MB", "nodes", "onnxruntime ms", "torch ms", "ort / torch", "max |Δ logits|"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            r["form"],
            str(r["opset"]),
            str(r["length"]),
            f"{r['export_s']:.1f}",
            f"{r['mb']:.1f}",
            str(r["nodes"]),
            f"{r['onnx_ms']:.1f}",
            f"{r['torch_ms']:.1f}",
            f"{r['onnx_ms'] / r['torch_ms']:.2f}",
            f"{r['max_abs_diff']:.1e}",
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
