"""Autotuning: time the best-ranked candidate configs on the GPU at hand and cache the winner.

The cache is one JSON file (``$LCC_CACHE_DIR/autotune.json``, default ``~/.cache/longctx_compile``)
keyed by target, device, Triton version, mask kind and shape, written atomically. Tuning runs only
when a CUDA GPU of the target's compute capability is present; otherwise the caller keeps the
heuristic configs and records why.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from . import Target
from .configs import KINDS, AttentionConfigs, Shape, candidates, choose
from .tiles import TileConfig

TOP_CANDIDATES = 8  # configs timed per pass, best-ranked first

Bench = Callable[[str, TileConfig, TileConfig], float]  # (kind, fwd config, config under test) -> ms


def cache_path() -> Path:
    root = os.environ.get("LCC_CACHE_DIR") or Path.home() / ".cache" / "longctx_compile"
    return Path(root) / "autotune.json"


def unavailable(target: Target) -> str | None:
    """Why autotuning cannot run for ``target`` here, or None when it can."""
    if target.capability is None:
        return f"autotune needs a GPU target, not {target.name}"
    if not torch.cuda.is_available():
        return "autotune skipped: no CUDA GPU here; heuristic configs kept"
    have = torch.cuda.get_device_capability()
    if tuple(have) != tuple(target.capability):
        name = torch.cuda.get_device_name()
        return f"autotune skipped: {name} is sm_{have[0]}{have[1]}, not {target.name}'s {target.arch}; heuristic configs kept"
    return None


def cache_key(target: Target, shape: Shape, mask: str, device: str) -> str:
    import triton

    return f"{target.name}|{device}|triton-{triton.__version__}|{mask}|{shape.key()}"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def tune(target: Target, shape: Shape, key: str, bench: Bench, path: Path | None = None) -> tuple[AttentionConfigs, bool]:
    """The fastest configs for ``shape`` (cached under ``key``); returns (configs, whether from cache)."""
    path = path or cache_path()
    cached = _read(path).get(key)
    if cached:
        return AttentionConfigs(TileConfig.from_list(cached["fwd"]), TileConfig.from_list(cached["bwd"]), "autotune"), True
    best: dict[str, TileConfig] = {}
    timings: dict[str, float] = {}
    fallback = choose(target, shape)
    for kind in KINDS:
        fwd = best.get("fwd", fallback.fwd)
        times = {cfg: bench(kind, fwd, cfg) for cfg in candidates(kind, target, shape)[:TOP_CANDIDATES]}
        winner = min(times, key=times.get)
        # if every candidate failed to launch, keep the heuristic rather than cache a failing config
        best[kind] = winner if times[winner] != float("inf") else getattr(fallback, kind)
        timings[kind] = times[winner]
    data = _read(path)
    data[key] = {"fwd": best["fwd"].as_list(), "bwd": best["bwd"].as_list(), "ms": timings}
    _write(path, data)
    return AttentionConfigs(best["fwd"], best["bwd"], "autotune"), False


def gpu_bench(shape: Shape, causal: bool, window: int, batch: int = 1) -> Bench:
    """Time the kernels on random inputs of ``shape`` on the current GPU (``triton.testing.do_bench``)."""
    import triton

    from ..kernels import attention as kernels

    device = torch.device("cuda")
    hq = shape.kv_heads * shape.group
    q = torch.randn(batch, hq, shape.length, shape.head_dim, device=device, dtype=shape.dtype)
    k = torch.randn(batch, shape.kv_heads, shape.length, shape.head_dim, device=device, dtype=shape.dtype)
    v = torch.randn(batch, shape.kv_heads, shape.length, shape.v_dim, device=device, dtype=shape.dtype)
    scale = shape.head_dim**-0.5

    def run(kind: str, fwd: TileConfig, cfg: TileConfig) -> float:
        try:
            if kind == "fwd":
                return triton.testing.do_bench(lambda: kernels.attention_fwd(q, k, v, None, None, None, scale, causal, window, cfg))
            out, lse = kernels.attention_fwd(q, k, v, None, None, None, scale, causal, window, fwd)
            grad = torch.randn_like(out)
            return triton.testing.do_bench(lambda: kernels.attention_bwd(grad, None, q, k, v, out, lse, None, None, None, scale, causal, window, cfg))
        except Exception:  # a candidate the compiler rejects (e.g. out of resources) simply loses
            return float("inf")

    return run
