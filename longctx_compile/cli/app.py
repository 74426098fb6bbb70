"""``lcc``: convert, inspect, diff, verify, generate, memory, train, train-indexers, export-onnx, launch, passes, targets."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..console import PIPE_WIDTH, err, out, parse_ids, progress_bar, read_artifact
from ..errors import LccError, LccWarning

app = typer.Typer(
    help="longctx_compile: capture a decoder with torch.export and rewrite its attention into long-context forms.\n\n"
    "Examples:\n\n"
    "  lcc convert tiny-llama --to dense -o tiny-llama.lcc\n\n"
    "  lcc inspect tiny-llama.lcc\n\n"
    "  lcc diff tiny-llama.lcc --from capture --to canonicalize --layer 0\n\n"
    "  lcc verify tiny-llama.lcc\n\n"
    "  lcc generate tiny-llama.lcc --prompt-ids 1,2,3 -n 16\n\n"
    "  lcc memory encode tiny-llama.msa.lcc --docs docs.jsonl -o bank\n\n"
    "  lcc train tiny-llama.hsa.lcc --data synthetic --steps 100 --seq-len 256 -o tiny-llama.hsa.trained.lcc\n\n"
    "  lcc train-indexers tiny-llama.evict.lcc --data synthetic --steps 200\n\n"
    "  lcc export-onnx tiny-llama.lcc -o tiny-llama.onnx --verify\n\n"
    "  lcc launch --nproc 2 examples/train_sp.py tiny-llama.sp.lcc",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"lcc {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = None,  # noqa: UP045
) -> None:
    """longctx_compile: capture a decoder with torch.export and rewrite its attention into long-context forms."""


def _usage(e: Exception) -> str:
    """A usage error (unknown command or option, a bad value) as one line that names the valid choices."""
    message = e.format_message().rstrip(".")
    ctx = getattr(e, "ctx", None)
    command = getattr(ctx, "command", None)
    if command is not None and type(e).__name__ == "NoSuchOption" and not getattr(e, "possibilities", None):
        options = sorted({o for param in command.params for o in getattr(param, "opts", ()) if o.startswith("--")})
        message += f"; the options of {ctx.command_path!r} are {', '.join(options)}"
    elif command is not None and "No such command" in message and "Did you mean" not in message and hasattr(command, "list_commands"):
        message += f"; the commands are {', '.join(command.list_commands(ctx))}"
    return " ".join(message.split())


def _add_form_commands() -> None:
    """Each form's own commands (msa: ``memory``; evict: ``train-indexers``)."""
    from ..forms import FORMS

    for form in FORMS.values():
        if form.cli is not None:
            form.cli(app)


_add_form_commands()


def _add_commands() -> None:
    """The commands kept in modules of their own: train, export-onnx, export-pt2."""
    from .export import export_onnx, export_pt2
    from .train import train

    app.command("train")(train)

    app.command("export-onnx")(export_onnx)
    app.command("export-pt2")(export_pt2)


_add_commands()

Opt = Annotated[
    Optional[list[str]], typer.Option("--opt", help="capture/form/lowering option key=value (repeatable), e.g. --opt attn=eager, --opt fwd_block_m=64")
]


Dtype = Annotated[Optional[str], typer.Option("--dtype", help="fp32, bf16 or fp16 (default: the checkpoint's own)")]


def _options(opt: list[str] | None, dtype: str | None = None) -> dict[str, str]:
    from ..options import parse_pairs

    options = parse_pairs(opt)
    if dtype is not None:
        if "dtype" in options:
            raise LccError("the dtype is given twice: use --dtype or --opt dtype=, not both")
        options["dtype"] = dtype
    return options


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="preset (tiny-llama …), Hugging Face folder, or file.py:factory")],
    to: Annotated[str, typer.Option("--to", help="form: dense")] = "dense",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="artifact folder (default: <model>.<form>.lcc)")] = None,
    target: Annotated[str, typer.Option("--target", help="target GPU or cpu (see lcc targets)")] = "cpu",
    opt: Opt = None,
    dtype: Dtype = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="check equivalence and record the report in lcc.json")] = False,
    onnx: Annotated[bool, typer.Option("--onnx", help="also write the model program as model.onnx in the artifact (see lcc export-onnx)")] = False,
) -> None:
    """Convert MODEL into a form and write a runnable artifact.

    Example: lcc convert tiny-llama --to dense -o tiny-llama.lcc --opt attn=eager
    """
    from .. import api, artifact

    options = _options(opt, dtype)
    output = output or Path(f"{Path(model).name.split(':')[0].removesuffix('.py')}.{to}.lcc")
    artifact.check_destination(output, force, [Path(model)] if Path(model).is_dir() else [])
    with progress_bar() as progress:
        task = progress.add_task("starting", total=None)
        compiled = api.compile_model(model, to=to, target=target, options=options, progress=lambda m: progress.update(task, description=m))
        report = None
        if verify:
            progress.update(task, description="verifying equivalence")
            report = api.verify(compiled.original, compiled)
        progress.update(task, description="writing artifact")
        compiled.save(output, force, report)
    sites = compiled.program.sites()
    kinds = sorted({s["mask"] for s in sites})
    out.print(f"wrote [bold]{output}[/bold]: {len(sites)} attention sites ({', '.join(kinds)}), form {to}, target {target}")
    if report is not None:
        _print_report(report)
    if onnx:
        _write_onnx(output)
    if report is not None and report.exact and not report.passed:
        raise typer.Exit(1)


def _write_onnx(output: Path) -> None:
    """``convert --onnx``: model.onnx beside the programs, entered in the manifest; a failure leaves the artifact as written."""
    from .. import artifact
    from ..onnx.export import export_onnx

    try:
        with progress_bar() as progress:
            task = progress.add_task("exporting to ONNX", total=None)
            onnx_report = export_onnx(output, output / artifact.ONNX, force=True, progress=lambda m: progress.update(task, description=m))
    except LccError as e:
        raise LccError(f"the artifact is written, without {artifact.ONNX}: {e}") from None
    artifact.record_file(output, artifact.ONNX, "onnx", {"file": artifact.ONNX, "program": "model", "ops": onnx_report.ops, "inputs": onnx_report.inputs})
    out.print(f"wrote [bold]{output / artifact.ONNX}[/bold]: {sum(onnx_report.onnx_ops.values())} ONNX nodes, opset {onnx_report.opset}")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="artifact folder, or a model to compile in memory")],
    to: Annotated[str, typer.Option("--to", help="form, when PATH is a model")] = "dense",
    opt: Opt = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="sequence length for communication bytes (default: the program's maximum)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Summarise an artifact or a model: source, form, sites (layer, Hq, Hkv, D, mask, kernel), collectives, ops, history.

    Example: lcc inspect tiny-llama.lcc
    """
    from .. import api, artifact
    from ..inspect import summary

    if api.is_artifact(path):
        manifest = artifact.read_manifest(Path(path))
        with progress_bar() as bar:  # what inspect reports (the equivalence, the sites) is about these very files
            bar.add_task("checking the artifact's checksums", total=None)
            artifact.verify_files(Path(path), manifest)
        snapshots = artifact.read_graphs(Path(path))
    else:
        compiled = api.compile_model(path, to=to, options=_options(opt))
        manifest, snapshots = artifact.manifest_of(compiled), compiled.program.snapshots
    info = summary.summary(manifest, snapshots, seq_len)
    if as_json:
        out.print_json(json.dumps(info, default=str))
    else:
        summary.render(info, out)


@app.command()
def diff(
    path: Annotated[str, typer.Argument(help="artifact folder, or a model to compile in memory")],
    from_stage: Annotated[str, typer.Option("--from", help="stage: capture, canonicalize, form, lower")] = "capture",
    to_stage: Annotated[Optional[str], typer.Option("--to", help="stage (default: the last)")] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", help="only this layer")] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json, dot or html")] = "text",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="write to a file instead of stdout")] = None,
    form: Annotated[str, typer.Option("--form", help="form, when PATH is a model")] = "dense",
    opt: Opt = None,
) -> None:
    """Show what each pass changed between two stages: nodes added, removed and rewired, by layer.

    Example: lcc diff tiny-llama.lcc --from capture --to lower --layer 0 --format html -o diff.html
    """
    from .. import api
    from ..inspect import page, render

    if fmt not in ("text", "json", "dot", "html"):
        raise LccError(f"unknown --format '{fmt}'; choose text, json, dot or html")
    source = path if api.is_artifact(path) else api.compile_model(path, to=form, options=_options(opt))
    d = api.diff(source, from_stage, to_stage, layer)
    if fmt == "text" and output is None:
        render.render_text(d, out)
        return
    if fmt == "text":
        console = Console(record=True, width=PIPE_WIDTH, file=open(os.devnull, "w"))
        render.render_text(d, console)
        text = console.export_text()
    else:
        text = {"json": render.render_json, "dot": render.render_dot, "html": page.render_html}[fmt](d)
    if output is None:
        sys.stdout.write(text + "\n")
    else:
        output.write_text(text)
        out.print(f"wrote {output}")


@app.command()
def verify(
    path: Annotated[str, typer.Argument(help="artifact folder, or a model (then --to)")],
    to: Annotated[str, typer.Option("--to", help="form, when PATH is a model")] = "dense",
    target: Annotated[str, typer.Option("--target", help="target GPU, interpret or cpu (see lcc targets)")] = "cpu",
    opt: Opt = None,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Run original and converted on seeded batches; exit 0 only within tolerance (exact modes).

    Example: lcc verify tiny-mistral --to dense --opt attn=eager
    """
    from .. import api

    with progress_bar() as progress:
        progress.add_task("verifying", total=None)
        report = api.verify(path, to=to, target=target, **_options(opt, dtype))
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        _print_report(report)
    if report.exact and not report.passed:
        raise typer.Exit(1)


@app.command()
def generate(
    path: Annotated[str, typer.Argument(help="artifact folder")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="prompt text (repeatable; needs the source's tokenizer)")] = None,
    prompt_ids: Annotated[Optional[list[str]], typer.Option("--prompt-ids", help="prompt token ids, e.g. 1,2,3 (repeatable)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="tokens to generate per prompt")] = 32,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy")] = False,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0: off")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="1: off")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    stop_ids: Annotated[Optional[str], typer.Option("--stop-ids", help="ids that end a prompt's generation, e.g. 2,0")] = None,
    cache: Annotated[str, typer.Option("--cache", help="static (allocated once, written in place) or growing (appended per token)")] = "static",
    bank: Annotated[Optional[Path], typer.Option("--bank", help="msa: a memory bank folder each prompt is routed over (lcc memory encode)")] = None,
    positions: Annotated[
        Optional[str],
        typer.Option("--positions", help="msa with --bank: contiguous (documents before the prompt, as one dense prompt) or global; default: the artifact's"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Generate tokens from an artifact with its KV-cache programs (greedy unless --sample).

    With --bank (msa artifacts), each prompt is a query routed over the bank's documents, then decoded
    over the context it assembled.

    Example: lcc generate tiny-llama.lcc --prompt-ids 1,2,3 -n 16
    """
    from ..runtime.tokenizer import tokenizer_for

    if bool(prompt) == bool(prompt_ids):
        raise LccError("give the prompt as --prompt TEXT or --prompt-ids 1,2,3 (one of them)")
    for text in prompt or []:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates
            raise LccError("--prompt is not UTF-8 text; re-encode it, or give token ids with --prompt-ids") from None
    from ..loaded import LoadedModel

    model = LoadedModel(Path(path), *read_artifact(path))
    if bank is not None and model.manifest["form"] != "msa":
        raise LccError(f"--bank routes over a memory bank: '{path}' is a {model.manifest['form']} artifact, not msa")
    tokenizer = tokenizer_for(model.manifest)
    if prompt and tokenizer is None:
        raise LccError(f"no tokenizer for '{path}': its source has none saved; use --prompt-ids")
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompt] if prompt else [parse_ids(p, "--prompt-ids") for p in prompt_ids]
    sampling = dict(do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_ids=parse_ids(stop_ids or "", "--stop-ids"))
    live = len(prompts) == 1 and not as_json and out.is_terminal

    def show(step: list) -> None:
        if live and step[0] is not None:
            out.print(tokenizer.decode([step[0]]) if tokenizer else f"{step[0]} ", end="", highlight=False)

    tokens = model.generate(prompts, max_new_tokens=max_new_tokens, stream=show, cache=cache, bank=bank, positions=positions, **sampling)
    if as_json:
        out.print_json(
            json.dumps([{"prompt_ids": p, "new_ids": t, "text": tokenizer.decode(t) if tokenizer else None} for p, t in zip(prompts, tokens, strict=True)])
        )
        return
    if live:
        out.print()
        return
    for t in tokens:
        out.print(tokenizer.decode(t) if tokenizer else ",".join(map(str, t)), highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    script: Annotated[Path, typer.Argument(help="Python script every rank runs; the arguments after it are passed on")],
    nproc: Annotated[int, typer.Option("--nproc", help="processes (ranks) on this machine")] = 2,
) -> None:
    """Run SCRIPT on N local ranks (torch's elastic launcher, standalone rendezvous). When ranks fail, the first
    one's error is one line and lcc exits with its status.

    Example: lcc launch --nproc 2 examples/train_sp.py tiny-llama.sp.lcc --steps 20
    """
    from ..distributed.launch import launch as run

    run(script, list(ctx.args), nproc)


def _print_report(report) -> None:
    routed = any(c.hit is not None for c in report.cases)  # msa: how often the query's document was routed
    table = Table("batch", "length", "padded", "max abs", "max rel", "top-1", "KL", "ok", title="equivalence", title_justify="left")
    if routed:
        table.add_column("routed")
    for c in report.cases:
        cells = [
            str(c.batch),
            str(c.length),
            "yes" if c.padded else "",
            f"{c.max_abs:.3g}",
            f"{c.max_rel:.3g}",
            f"{c.top1:.3f}",
            f"{c.kl:.3g}",
            "✓" if c.ok else "✗",
        ]
        table.add_row(*cells, *([f"{c.hit:.2f}"] if routed else []))
    out.print(table)
    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    if not report.exact:  # an approximate form (sparse settings): its divergence is reported, not judged
        verdict = "[yellow]DIVERGES" if not report.passed else "[yellow]WITHIN TOLERANCE"
        verdict += " (approximate form, not an equivalence check)[/yellow]"
    out.print(
        f"{verdict} max abs {report.max_abs:.3g}, max rel {report.max_rel:.3g}, top-1 {report.top1:.3f}, KL {report.kl:.3g} (rtol {report.rtol}, atol {report.atol:.3g})"
    )
    q = report.quality
    if q is not None:
        out.print(
            f"on {q['tokens']:,} tokens of the built-in English sample: NLL {q['nll_original']:.3f} → {q['nll_converted']:.3f}"
            f" ({q['nll_change']:+.1%}), next-token agreement {q['top1_agreement']:.3f}"
        )
    if report.floor is None and report.floor_against:
        out.print(f"tolerance: the fixed atol, with no noise floor: {report.floor_against}")
    elif report.floor is not None:
        from ..runtime.verify import ATOL, FLOOR_FACTOR

        out.print(
            f"tolerance: atol {ATOL:g} + {FLOOR_FACTOR:g} × {report.floor:.3g}, where {report.floor:.3g} is how far the original in {report.dtype}"
            f" is from itself in {report.floor_against} on these batches (its own rounding); compared against the original in fp32"
        )


@app.command()
def passes() -> None:
    """List the registered passes with their stage, options and one-line docs.

    Example: lcc passes
    """
    import dataclasses

    from .. import compiler  # noqa: F401  (registers the passes)
    from ..pipeline import PASSES

    table = Table("pass", "stage", "options", "what it does")
    for spec in PASSES.values():
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(spec.config_cls))
        table.add_row(spec.name, spec.stage.value, fields, spec.doc)
    out.print(table)


@app.command()
def targets(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List the targets a program can be lowered for, with the figures their configs are derived from.

    Example: lcc targets
    """
    import dataclasses

    from ..targets import TARGETS

    if as_json:
        out.print_json(json.dumps({name: dataclasses.asdict(t) for name, t in TARGETS.items()}))
        return
    table = Table(caption="smem per block; dense tensor TFLOPS; cpu: reference ops, interpret: Triton interpreter", caption_justify="left")
    for name in ("target", "arch", "SMs", "smem KB", "L2 MB", "mem GB", "TB/s", "bf16 TF", "fp8 TF", "features"):
        table.add_column(name, no_wrap=name in ("target", "arch"))
    for t in TARGETS.values():
        if t.capability is None:
            table.add_row(t.name, "", "", f"{t.smem_per_block // 1024}" if t.smem_per_block else "", "", "", "", "", "", "")
            continue
        basic = {"cp.async", "bf16", "tf32"}
        table.add_row(
            t.name,
            t.arch,
            str(t.sms),
            str(t.smem_per_block // 1024),
            f"{t.l2_mb:g}",
            f"{t.memory_gb:g}",
            f"{t.bandwidth_gbs / 1000:g}",
            f"{t.tflops['bf16']:.0f}",
            f"{t.tflops['fp8']:.0f}" if "fp8" in t.tflops else "-",
            ",".join(f for f in t.features if f not in basic),
        )
    out.print(table)


INTERRUPTED = 130  # the shell's status for SIGINT (128 + 2); SIGTERM's is 143


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that the same unwinding as Ctrl-C removes half-written output."""


def _terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def _interrupts():
    """Ctrl-C and SIGTERM as exceptions while a command runs (even where the shell started lcc with SIGINT ignored,
    as it does for background jobs); the previous handlers come back after it (lcc may run inside another program)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    with _interrupts(), _one_line_warnings():
        _main()


@contextlib.contextmanager
def _one_line_warnings():
    """lcc's own warnings print as one ``warning:`` line each (not Python's file:line and source echo), once per text."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", LccWarning)
        plain = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, LccWarning):
                err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
            else:
                plain(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def _main() -> None:
    try:
        code = app(prog_name="lcc", standalone_mode=False)  # a command's typer.Exit(n) comes back as n here, not raised
        if code == INTERRUPTED:  # typer turns Ctrl-C into Exit(130)
            err.print("interrupted; nothing written")
        sys.exit(code if isinstance(code, int) else 0)
    except LccError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt, Terminated) as e:  # every write is atomic: what was there is intact
        err.print("interrupted; nothing written")
        sys.exit(143 if isinstance(e, Terminated) else INTERRUPTED)
    except Exception as e:  # usage errors (typer's click exceptions) and internal faults: still one line
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            err.print(f"[red]error:[/red] {_usage(e)}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if os.environ.get("LCC_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {first[:300]} (set LCC_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
