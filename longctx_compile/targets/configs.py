"""Tile configs for the attention kernels, derived from a target's shared memory and the shapes.

Every candidate must fit the target's shared memory per block by the kernels' own formula
(``kernels.tiles.smem_bytes``) and a per-thread register estimate. Among those, the ranking prefers
software pipelining (at least two stages where the GPU has room), then the largest tile, balanced
tiles, a grid of at least one full wave on the target's SMs (for tiles above 64 rows), and the warp count the tile needs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LccError
from . import Target, tiles
from .tiles import MAX_REGISTERS, TileConfig, padded_dim, registers_per_thread, smem_bytes

BLOCKS = (128, 64, 32, 16)
WARPS = (4, 8)
KINDS = ("fwd", "bwd")
REPRESENTATIVE_LENGTH = 4096  # the sequence length occupancy is judged at when the program allows it


@dataclass(frozen=True)
class Shape:
    """What the config depends on: head dims, dtype, query heads per KV head, KV heads, a length."""

    head_dim: int
    v_dim: int
    dtype: torch.dtype
    group: int = 1
    kv_heads: int = 1
    length: int = REPRESENTATIVE_LENGTH

    def key(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"d{self.head_dim}-dv{self.v_dim}-{dtype}-g{self.group}-hkv{self.kv_heads}-t{self.length}"


@dataclass(frozen=True)
class AttentionConfigs:
    """The forward and backward tile configs of one attention site, and how they were chosen."""

    fwd: TileConfig
    bwd: TileConfig
    source: str  # "heuristic", "override" or "autotune"

    def to_json(self, shape: Shape) -> dict[str, Any]:
        return {
            "fwd": self.fwd.as_list(),
            "bwd": self.bwd.as_list(),
            "smem": {k: smem_bytes(k, getattr(self, k), shape.head_dim, shape.v_dim, shape.dtype) for k in KINDS},
            "source": self.source,
        }


def unsupported(shape: Shape) -> str | None:
    """Why the Triton attention kernels cannot run ``shape``, or None when they can."""
    return tiles.unsupported(shape.head_dim, shape.v_dim, shape.dtype)


def max_stages(target: Target) -> int:
    """Pipelining depth worth having: none under the interpreter, 2 on 99 KB parts, 3 on the big ones."""
    if target.capability is None:
        return 1
    return 3 if target.smem_per_block > 128 * 1024 else 2


def fits(kind: str, cfg: TileConfig, target: Target, shape: Shape) -> bool:
    return smem_bytes(kind, cfg, shape.head_dim, shape.v_dim, shape.dtype) <= target.smem_per_block and (
        registers_per_thread(kind, cfg, shape.head_dim, shape.v_dim, shape.dtype) <= MAX_REGISTERS
    )


def candidates(kind: str, target: Target, shape: Shape) -> list[TileConfig]:
    """Every config that fits ``target`` for ``shape``, best first by the ranking above."""
    deepest = max_stages(target)
    d = max(padded_dim(shape.head_dim), padded_dim(shape.v_dim))
    heads = shape.kv_heads * (shape.group if kind == "fwd" else 1)

    def rank(cfg: TileConfig) -> tuple:
        wanted_warps = 8 if cfg.block_m * max(cfg.block_n, d) >= 128 * 128 else 4
        programs = heads * -(-shape.length // cfg.block_m)
        return (
            cfg.num_stages < min(2, deepest),
            programs < target.sms and cfg.block_m > 64,  # few heads: halve the tile once for a full wave
            -cfg.block_m * cfg.block_n,
            -min(cfg.block_m, cfg.block_n),
            -cfg.block_m,
            -cfg.num_stages,
            cfg.num_warps != wanted_warps,
        )

    grid = (TileConfig(m, n, w, s) for m, n, w, s in itertools.product(BLOCKS, BLOCKS, WARPS, range(1, deepest + 1)))
    return sorted((c for c in grid if fits(kind, c, target, shape)), key=rank)


def choose(target: Target, shape: Shape) -> AttentionConfigs:
    """The heuristic forward and backward configs for ``shape`` on ``target``."""
    picked = {}
    for kind in KINDS:
        ranked = candidates(kind, target, shape)
        if not ranked:
            raise LccError(f"no {kind} tile config of the attention kernels fits {target.name} for head dim {shape.head_dim} {shape.dtype}")
        picked[kind] = ranked[0]
    return AttentionConfigs(picked["fwd"], picked["bwd"], "heuristic")


def override(configs: AttentionConfigs, target: Target, shape: Shape, values: dict[str, dict[str, int]]) -> AttentionConfigs:
    """Replace the fields the user set (``{"fwd": {"block_m": 64}, ...}``), refusing configs that do not fit."""
    if not any(values.values()):
        return configs
    result = {}
    for kind in KINDS:
        base = getattr(configs, kind)
        cfg = TileConfig(**{**base.__dict__, **values.get(kind, {})})
        check(kind, cfg, target, shape)
        result[kind] = cfg
    return AttentionConfigs(result["fwd"], result["bwd"], "override")


def check(kind: str, cfg: TileConfig, target: Target, shape: Shape) -> None:
    """Refuse a config the kernels cannot launch on ``target``, saying the numbers."""
    for name in ("block_m", "block_n"):
        value = getattr(cfg, name)
        if value < 16 or value & (value - 1):
            raise LccError(f"{kind} {name}={value}: tile sizes must be powers of two, at least 16")
    if cfg.num_warps not in (1, 2, 4, 8, 16) or cfg.num_stages < 1:
        raise LccError(f"{kind} tile config {cfg}: num_warps must be 1, 2, 4, 8 or 16 and num_stages at least 1")
    need = smem_bytes(kind, cfg, shape.head_dim, shape.v_dim, shape.dtype)
    if need > target.smem_per_block:
        dtype = str(shape.dtype).removeprefix("torch.")
        raise LccError(
            f"{kind} tile config {cfg} needs {need} bytes of shared memory for head dim {shape.head_dim} {dtype}; "
            f"{target.name} allows {target.smem_per_block} per block"
        )
