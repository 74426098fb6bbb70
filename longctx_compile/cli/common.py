"""What every ``lcc`` command shares, the forms' own commands included: the consoles, progress, id lists, loading."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..errors import LccError

out = Console()
err = Console(stderr=True)


def progress_bar() -> Progress:
    """A spinner with the step's name and elapsed time on stderr (off when stderr is not a terminal)."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


def parse_ids(text: str, what: str) -> list[int]:
    """Comma-separated token ids, or one clear error naming the option."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise LccError(f"invalid {what} '{text}': expected comma-separated integers") from None


def load_artifact(path: str):
    """``lcc.load`` with its steps shown (checksums and program loading take seconds on a real model)."""
    from ..loaded import load

    with progress_bar() as progress:
        task = progress.add_task("reading the manifest", total=None)
        return load(path, progress=lambda m: progress.update(task, description=m))
