"""``lcc export-onnx``: an artifact's program as an ONNX model, what each longctx op became, and (``--verify``) onnxruntime against PyTorch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..console import out, progress_bar


def export_onnx(
    path: Annotated[str, typer.Argument(help="artifact folder")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .onnx file to write")],
    program: Annotated[
        str,
        typer.Option(
            "--program", help="which program: model (default), kv_cache.prefill|decode|static, msa.encode|query|decode; a short name that is unique will do"
        ),
    ] = "model",
    custom_ops: Annotated[
        bool, typer.Option("--custom-ops", help="emit longctx ops as custom-domain nodes (domain 'longctx') for runtimes with fused kernels")
    ] = False,
    verify: Annotated[bool, typer.Option("--verify", help="run the model in onnxruntime against the PyTorch artifact at two lengths")] = False,
    lengths: Annotated[Optional[str], typer.Option("--lengths", help="sequence lengths for --verify, e.g. 7,19")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 18..23; from 23 attention becomes ONNX's Attention operator")] = 18,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output file")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
) -> None:
    """Export PROGRAM of an artifact to ONNX with dynamic batch and sequence dimensions.

    Example: lcc export-onnx tiny-llama.hsa.lcc -o tiny-llama.onnx --verify
    """
    from ..errors import LccError
    from ..onnx import check
    from ..onnx.export import export_onnx as run

    if verify and custom_ops:
        raise LccError("--verify runs the model program in onnxruntime, which has no kernels for custom-domain nodes; drop --custom-ops")
    if verify and program != "model":
        raise LccError(f"--verify checks the model program against PyTorch; drop it to export '{program}'")
    picked = None
    if lengths:
        try:
            picked = tuple(int(x) for x in lengths.split(","))
        except ValueError:
            raise LccError(f"--lengths takes comma-separated integers, not '{lengths}'") from None
    with progress_bar() as bar:
        task = bar.add_task("starting", total=None)
        report = run(Path(path), output, program=program, custom=custom_ops, force=force, progress=lambda m: bar.update(task, description=m), opset=opset)
        rows = None
        if verify:
            bar.update(task, description="running onnxruntime against PyTorch")
            rows = check.compare(Path(path), output, picked)
    if as_json:
        out.print_json(json.dumps({**dataclasses.asdict(report), "verify": rows}))
    else:
        print_report(report, rows)
    if rows is not None and not all(r["ok"] for r in rows):
        raise typer.Exit(1)


def print_report(report, rows) -> None:
    """The translations, the graph's inputs and outputs, its size, and the verify rows."""
    total = sum(report.onnx_ops.values())
    out.print(f"wrote [bold]{report.path}[/bold]: program {report.program}, opset {report.opset}, {total} ONNX nodes, {report.bytes / 1e6:.1f} MB")
    table = Table("longctx op", "count", "translated as", "how")
    for name, info in report.ops.items():
        table.add_row(name, str(info["count"]), info["as"], info["how"])
    out.print(table)
    signature = ", ".join(f"{k}[{', '.join(map(str, v))}]" for k, v in report.inputs.items())
    results = ", ".join(f"{k}[{', '.join(map(str, v))}]" for k, v in report.outputs.items())
    out.print(f"inputs: {signature}\noutputs: {results}", markup=False, highlight=False)
    if rows is not None:
        check = Table("length", "output", "shape", "max |onnx - torch|", "equal (fp32 tol)")
        for r in rows:
            check.add_row(str(r["length"]), r["output"], str(r["shape"]), f"{r['max_abs_diff']:.2e}", "yes" if r["ok"] else "[red]NO[/red]")
        out.print(check)


def export_pt2(
    path: Annotated[str, typer.Argument(help="artifact folder")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .pt2 file to write")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing output file")] = False,
) -> None:
    """Write the model program with every longctx op in its portable form (aten ops): torch.export.load runs it without lcc.

    Example: lcc export-pt2 tiny-llama.lcc -o tiny-llama.pt2
    """
    from ..onnx.portable_pt2 import export_portable

    with progress_bar() as bar:
        task = bar.add_task("starting", total=None)
        replaced = export_portable(Path(path), output, force=force, progress=lambda m: bar.update(task, description=m))
    ops = ", ".join(f"{name} ×{count}" for name, count in sorted(replaced.items())) or "none"
    out.print(f"wrote [bold]{output}[/bold]: the model program, longctx ops replaced by aten ops ({ops})", soft_wrap=True)
