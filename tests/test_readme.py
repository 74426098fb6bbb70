"""The README runs as written: its ```bash blocks line by line, then its ```python blocks, in a fresh folder.

Plain ``` blocks are synopses (placeholders, the CI set-up lines) and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_runnable_blocks():
    assert len(blocks("bash")) >= 2 and len(blocks("python")) >= 1
    assert len(README.read_text().splitlines()) <= 200


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the virtual environment's `lcc` and `python`
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@pytest.mark.slow
def test_every_readme_command_runs(folder):
    for block in blocks("bash"):
        for line in block.strip().splitlines():
            result = subprocess.run(["bash", "-c", line], cwd=folder, env=_env(), capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
            assert "Traceback" not in result.stderr, line


@pytest.mark.slow
def test_every_readme_python_block_runs(folder):
    for block in blocks("python"):
        result = subprocess.run([sys.executable, "-c", block], cwd=folder, env=_env(), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
