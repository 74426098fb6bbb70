"""The README and the docs run as written: each page's ```bash blocks line by line, then its ```python blocks, in a
fresh folder of its own.

Plain ``` blocks are synopses (placeholders, the CI set-up lines) and are not run. A plain ``lcc …`` line runs
through the console script's own entry point in this process (``lcc_cli``: no new interpreter importing torch
for each); a line with shell syntax runs in bash.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lcc_cli
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(), flags=re.S | re.M)


def test_the_readme_is_short_and_runnable():
    readme = ROOT / "README.md"
    assert len(blocks(readme, "bash")) >= 2 and len(blocks(readme, "python")) >= 1
    assert len(readme.read_text().splitlines()) <= 200


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the virtual environment's `lcc` and `python`
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "bash") or blocks(p, "python")], ids=lambda p: p.name)
def test_every_command_and_python_block_runs(page, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # pages may run the repository's examples
    for block in blocks(page, "bash"):
        for line in block.strip().splitlines():
            if line.startswith("lcc ") and not set(line) & set("|<>&;$`*"):
                result = lcc_cli.run(*shlex.split(line)[1:], cwd=tmp_path)
            else:
                result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{page.name}: {line}\n{result.stderr[-2000:]}"
            assert "Traceback" not in result.stderr, f"{page.name}: {line}"
    for block in blocks(page, "python"):
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{page.name}\n{result.stderr[-3000:]}"
