"""``lcc`` run in the test process as its console script runs it (``cli.app.main``): exit code, stdout and stderr,
without a new interpreter per call (each would import torch and transformers again, seconds apiece)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys


def run(*args, cwd=None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``env``: variables set for this call only (``COLUMNS`` sets the width of rich's tables, as in a terminal)."""
    from longctx_compile import console
    from longctx_compile.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code, argv, here = 0, sys.argv, os.getcwd()
    saved = {name: os.environ.get(name) for name in env or {}}
    widths = [(c, c.width) for c in (console.out, console.err)] if env and "COLUMNS" in env else []
    for c, _ in widths:  # the consoles were made at import, under whatever COLUMNS the test runner had
        c.width = int(env["COLUMNS"])
    sys.argv = ["lcc", *map(str, args)]
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        os.chdir(here)
        for c, width in widths:
            c.width = width
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
