"""``lcc launch``: run a script on N local ranks (torch's elastic launcher, standalone rendezvous), and when ranks fail,
report the first failing rank's error once, in one line, with the ranks' failure status.

Each rank runs :func:`rank_main`, which runs the script as ``__main__`` and keeps an lcc error (a one-line
``LccError``, such as a group whose size is not the program's degree) for the launcher instead of printing a
traceback on every rank. Any other exception is the script's own and prints its traceback as usual.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
import tempfile
import uuid
from pathlib import Path

from ..errors import LccError

ERRORS = "LCC_LAUNCH_ERRORS"  # the folder where each failing rank leaves its one-line error


class LaunchFailed(LccError):
    """Ranks failed: the first one's error, and its exit status for lcc's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launch(script: Path, args: list[str], nproc: int) -> None:
    """Run ``script ARGS`` on ``nproc`` ranks of this machine; an LccError naming the first failing rank if any fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not script.is_file():
        raise LccError(f"no script at '{script}'")
    if nproc < 1:
        raise LccError(f"--nproc must be at least 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report is ours to give, in one line
    threads = {} if "OMP_NUM_THREADS" in os.environ or nproc == 1 else {"OMP_NUM_THREADS": "1"}  # as torchrun: cores are shared
    with tempfile.TemporaryDirectory(prefix="lcc-launch-") as errors:
        os.environ.update({ERRORS: errors, **threads})
        try:
            elastic_launch(config, sys.executable)("-m", __name__, str(script), *args)
        except ChildFailedError as e:
            rank, failure = min(e.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
            kept = Path(errors) / f"rank-{rank}"
            reason = kept.read_text().strip() if kept.is_file() else f"exit status {failure.exitcode}; its output is above"
            raise LaunchFailed(f"rank {rank} failed: {reason}", failure.exitcode if failure.exitcode > 0 else 1) from None
        finally:
            for name in (ERRORS, *threads):
                os.environ.pop(name, None)


def rank_main(argv: list[str]) -> None:
    """One rank: the script as ``__main__`` with its own arguments; an lcc error is left for the launcher, exit 1."""
    script, *args = argv
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except LccError as e:
        folder = os.environ.get(ERRORS)
        if not folder:
            raise
        (Path(folder) / f"rank-{os.environ.get('RANK', '0')}").write_text(str(e))
        sys.exit(1)


if __name__ == "__main__":
    rank_main(sys.argv[1:])
