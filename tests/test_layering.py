"""Imports point down: what each layer may not import, read from every module's import statements (lazy ones too),
and importing the package or any subpackage changes no environment variable and loads no Triton kernel."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "longctx_compile"

# layer -> modules of ours it must never import (a module is its dotted path under longctx_compile)
FORBIDDEN = {
    "runtime": ("passes", "pipeline", "compiler", "api", "cli", "forms", "loaded"),
    "artifact": ("runtime", "passes", "compiler", "api", "cli", "forms", "loaded"),
    "passes": ("kernels", "runtime", "inspect", "api", "cli", "compiler", "forms", "loaded"),
    "pipeline": ("passes", "runtime", "inspect", "forms", "compiler", "api", "cli", "loaded"),
    "onnx": ("compiler", "api", "cli", "loaded"),
    "ops": ("passes", "runtime", "pipeline", "compiler", "api", "cli", "artifact", "forms", "loaded", "distributed"),
    "fx": ("ops", "passes", "runtime", "pipeline", "kernels", "forms"),
    "targets": ("ops", "passes", "runtime", "pipeline", "compiler", "api", "cli", "forms"),  # autotune launches kernels to time them
    "forms": ("api", "cli", "compiler", "loaded"),  # a form builds on the core (its commands on console.py), never on what calls it
}


def imports_of(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside a function, as a dotted path."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            stem = [*base, *(node.module.split(".") if node.module else [])]
            found |= {".".join(stem)} if node.module else {".".join([*stem, alias.name]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longctx_compile."):
            found.add(node.module.removeprefix("longctx_compile."))
    return found


def modules(layer: str) -> list[Path]:
    folder = PACKAGE / layer
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down(layer):
    bad = []
    for path in modules(layer):
        for target in imports_of(path):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The rule above can fail: imports inside functions and relative ones are both found."""
    found = imports_of(PACKAGE / "loaded.py")
    assert "artifact" in found and "runtime.tile_loss" in found  # `from . import artifact`; `from .runtime.tile_loss import` in a method


SUBPACKAGES = ["longctx_compile", *(f"longctx_compile.{p.name}" for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").is_file() and p.name != "kernels")]


def test_importing_changes_no_environment_variable_and_loads_no_kernel():
    script = (
        "import importlib, json, os, sys\n"
        "before = dict(os.environ)\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    importlib.import_module(name)\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "kernels = sorted(m for m in sys.modules if m.startswith('longctx_compile.kernels'))\n"
        "print(json.dumps({'changed': changed, 'kernels': kernels}))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"changed": [], "kernels": []}


def test_a_kernel_launched_on_cpu_tensors_is_interpreted_without_the_variable():
    """Triton imported first (as torch and onnx do), then a kernel launched on CPU tensors: it runs under the
    interpreter, equals the reference, and the environment is untouched."""
    script = (
        "import json, os, triton.language, torch\n"
        "from longctx_compile.kernels.msa import pool\n"
        "from longctx_compile.ops.msa import pool_ref\n"
        "x, real = torch.randn(2, 3, 8, 4), torch.ones(2, 8, dtype=torch.long)\n"
        "real[1, 5:] = 0\n"
        "got, want = pool(x, real, 4), pool_ref(x, real, 4)\n"
        "same = all(torch.allclose(a, b) for a, b in zip(got, want))\n"
        "print(json.dumps({'same': same, 'variable': os.environ.get('TRITON_INTERPRET')}))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"same": True, "variable": None}
