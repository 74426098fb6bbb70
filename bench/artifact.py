"""Artifact cost on a SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9/3 heads, random weights), per form.

Baseline: ``torch.export`` of the same model with the same dynamic dims (``capture.export``) plus
``torch.export.save``. Measured, each in a fresh process so no cache carries over: convert + save
(``lcc.compile(...).save``), then load to first token (``lcc.load`` + ``generate`` of one token; msa
with ``--bank`` when asked), and the artifact's size against the weights' bytes.

    python bench/artifact.py [--forms dense,msa,hsa] [--layers 30] [--json]

Goals (issue 20): convert + save <= 1.5x the baseline, load to first token <= 10 s, size <= 1.1x weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
FORM_OPTIONS = {"dense": {}, "msa": {"pool": 64, "topk": 4}, "hsa": {"chunk": 64, "topk": 8, "window": 1}, "evict": {"budget": 0.25}}


def build_folder(folder: Path, layers: int) -> None:
    """Save the random-weight model as a Hugging Face folder (in a child: ``bench/kernels.py`` would shadow the
    ``kernels`` package transformers probes for, were it imported from this script's folder)."""
    _child(
        "import json, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers="
        f"{layers}, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, "
        "tie_word_embeddings=True, rope_theta=100000.0)\n"
        "torch.manual_seed(0)\n"
        f"LlamaForCausalLM(config).eval().save_pretrained({str(folder)!r})\n"
        "print(json.dumps({}))\n"
    )


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline(folder: Path, out: Path) -> dict:
    return _child(
        "import json, time, torch\n"
        "from longctx_compile.capture import CaptureConfig, export, load_model\n"
        f"model, _ = load_model({str(folder)!r}, CaptureConfig())\n"
        "t = time.perf_counter()\n"
        "ep, _ = export(model, CaptureConfig())\n"
        f"torch.export.save(ep, {str(out)!r})\n"
        "print(json.dumps({'seconds': time.perf_counter() - t}))\n"
    )


def convert(folder: Path, out: Path, form: str) -> dict:
    return _child(
        "import json, time, longctx_compile as lcc\n"
        "from longctx_compile.capture import CaptureConfig, load_model\n"
        f"load_model({str(folder)!r}, CaptureConfig())  # the baseline's loading is not timed either; this warms the file cache\n"
        "t = time.perf_counter()\n"
        f"lcc.compile({str(folder)!r}, to={form!r}, **{FORM_OPTIONS[form]!r}).save({str(out)!r})\n"
        "print(json.dumps({'seconds': time.perf_counter() - t}))\n"
    )


def first_token(out: Path, form: str) -> dict:
    bank = ""
    if form == "msa":  # route the prompt over a bank of 4 documents, encoded beforehand (not timed)
        bank = (
            "from longctx_compile.forms.msa.runtime import MsaModel\n"
            f"m = lcc.load({str(out)!r}); msa = MsaModel(m.program, m.signature)\n"
            f"msa.encode([list(range(10 + d, 200 + d)) for d in range(4)]).save({str(out) + '.bank'!r}, force=True)\n"
            "del m, msa\n"
        )
    call = f"bank={str(out) + '.bank'!r}" if form == "msa" else ""
    return _child(
        "import json, time, longctx_compile as lcc\n" + bank + "t = time.perf_counter()\n"
        f"m = lcc.load({str(out)!r})\n"
        "loaded = time.perf_counter() - t\n"
        f"m.generate([list(range(1, 65))], max_new_tokens=1, {call})\n"
        "print(json.dumps({'load': loaded, 'seconds': time.perf_counter() - t}))\n"
    )


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default="dense,msa,hsa")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=args.json)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "smollm2-shape"
        console.print(f"building a {args.layers}-layer hidden-576 Llama folder …")
        build_folder(folder, args.layers)
        weights = size(folder)
        console.print("baseline: torch.export + torch.export.save …")
        base = baseline(folder, tmp / "baseline.pt2")["seconds"]
        for form in args.forms.split(","):
            out = tmp / f"{form}.lcc"
            console.print(f"{form}: convert + save …")
            made = convert(folder, out, form)["seconds"]
            console.print(f"{form}: load to first token …")
            first = first_token(out, form)
            rows.append(
                {
                    "form": form,
                    "convert_s": made,
                    "baseline_s": base,
                    "convert_ratio": made / base,
                    "load_s": first["load"],
                    "first_token_s": first["seconds"],
                    "bytes": size(out),
                    "weights_bytes": weights,
                    "size_ratio": size(out) / weights,
                }
            )
    if args.json:
        print(json.dumps(rows))
        return
    table = Table(title=f"artifact cost, {args.layers}-layer hidden-576 Llama (SmolLM2-135M shape), fp32, this CPU", title_justify="left")
    for column in ("form", "convert+save s", "÷ export+save", "load s", "to 1st token s", "MB", "÷ weights"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["form"],
            f"{r['convert_s']:.1f}",
            f"{r['convert_ratio']:.2f}x",
            f"{r['load_s']:.1f}",
            f"{r['first_token_s']:.1f}",
            f"{r['bytes'] / 1e6:.0f}",
            f"{r['size_ratio']:.2f}x",
        )
    console.print(table)
    console.print(f"baseline torch.export + save: {base:.1f} s; weights (safetensors folder): {weights / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
