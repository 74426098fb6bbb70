"""``lcc`` run in the test process as its console script runs it (``cli.app.main``): exit code, stdout and stderr,
without a new interpreter per call (each would import torch and transformers again, seconds apiece)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    from longctx_compile.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code, argv, here = 0, sys.argv, os.getcwd()
    sys.argv = ["lcc", *map(str, args)]
    try:
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
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
