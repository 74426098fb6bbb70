"""What every ``lcc`` command shares, the forms' own commands included: the consoles, progress, id lists, reading an
artifact with its steps shown. Below the forms, so a form's commands need nothing from ``cli/``."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from . import artifact
from .errors import LccError


def _console(stderr: bool = False) -> Console:
    """A console that wraps at the terminal's width, and not at all into a file or a pipe (rich would cut at 80 columns)."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


PIPE_WIDTH = 10_000  # wide enough that no table cell or line is cut; tables still take only the width they need
out = _console()
err = _console(stderr=True)


def progress_bar() -> Progress:
    """A spinner with the step's name and elapsed time on stderr (off when stderr is not a terminal)."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


def parse_ids(text: str, what: str) -> list[int]:
    """Comma-separated token ids, or one clear error naming the option."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise LccError(f"invalid {what} '{text}': expected comma-separated integers") from None


def read_artifact(path: str):
    """(manifest, model program) of the artifact at ``path``, its steps shown (checksums and loading take seconds on a real model)."""
    with progress_bar() as progress:
        task = progress.add_task("reading the manifest", total=None)
        manifest = artifact.read_manifest(Path(path))
        return manifest, artifact.read_program(Path(path), manifest, "model", progress=lambda m: progress.update(task, description=m))
