"""Tile configs of the attention kernels and what they cost in shared memory and registers.

No Triton import here: the target's config chooser and the kernels' launchers share these formulas,
so a config chosen for a target is checked by exactly the arithmetic the launcher applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_HEAD_DIM = 256
ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
MAX_REGISTERS = 255  # per thread, every NVIDIA architecture since Kepler


@dataclass(frozen=True)
class TileConfig:
    """One kernel launch shape.

    ``block_m`` rows stay resident in the program (query rows in the forward and the dQ kernel, key
    rows in the dK/dV kernel); ``block_n`` rows stream through it, ``num_stages`` tiles in flight.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages]

    @classmethod
    def from_list(cls, values: list[int]) -> TileConfig:
        return cls(*map(int, values))

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


def padded_dim(d: int) -> int:
    """The tile width a head dim occupies: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def element_bytes(dtype: torch.dtype) -> int:
    return ELEMENT_BYTES[dtype]


def smem_bytes(kind: str, cfg: TileConfig, head_dim: int, v_dim: int, dtype: torch.dtype) -> int:
    """Shared memory one program needs: the resident tile, ``num_stages`` streamed tiles, the P/dS tile(s).

    forward: Q [M, D] resident; K [N, D] and V [N, Dv] streamed; P [M, N] staged for the second dot.
    backward: K,V (dK/dV kernel) or Q,dO (dQ kernel) [M, D+Dv] resident; the other pair streamed; P and dS.
    """
    e = element_bytes(dtype)
    d, dv = padded_dim(head_dim), padded_dim(v_dim)
    streamed = cfg.num_stages * cfg.block_n * (d + dv)
    if kind == "fwd":
        return e * (cfg.block_m * d + streamed + cfg.block_m * cfg.block_n)
    return e * (cfg.block_m * (d + dv) + streamed + 2 * cfg.block_m * cfg.block_n)


def registers_per_thread(kind: str, cfg: TileConfig, head_dim: int, v_dim: int, dtype: torch.dtype) -> int:
    """A 32-bit register estimate per thread: fp32 accumulators and score tiles plus the resident inputs."""
    words = element_bytes(dtype) / 4
    d, dv = padded_dim(head_dim), padded_dim(v_dim)
    if kind == "fwd":
        live = cfg.block_m * (dv + cfg.block_n) + cfg.block_m * d * words
    else:
        live = cfg.block_m * (d + dv) * (1 + words) + 2 * cfg.block_m * cfg.block_n
    return int(live // (32 * cfg.num_warps))


def unsupported(head_dim: int, v_dim: int, dtype: torch.dtype) -> str | None:
    """Why the Triton attention kernels cannot run this shape, or None when they can."""
    if dtype not in ELEMENT_BYTES:
        return f"dtype {str(dtype).removeprefix('torch.')} is not supported by the Triton attention kernels (float32, float16, bfloat16)"
    if max(head_dim, v_dim) > MAX_HEAD_DIM:
        return f"head dim {max(head_dim, v_dim)} is larger than the Triton attention kernels support ({MAX_HEAD_DIM})"
    return None


HSA_CHUNKS = (16, 32, 64, 128)  # chunk sizes the HSA kernels take: one chunk is one key tile


def hsa_rows(block_q: int, groups: int) -> int:
    """Rows of an HSA program: ``block_q`` queries × ``groups`` heads, padded to a power of two of at least 16."""
    return max(16, 1 << (block_q * groups - 1).bit_length())


def hsa_tiles(chunk: int, groups: int, select: str) -> list[int]:
    """[block_q, block_l, num_warps]: queries per forward/dQ program (1 under per-token selection), per dK/dV step, warps."""
    wide = max(1, min(chunk, 64 // groups))
    return [1 if select == "token" else wide, wide, 4]


def hsa_smem_bytes(tiles: list[int], chunk: int, groups: int, head_dim: int, v_dim: int, dtype: torch.dtype) -> int:
    """Shared memory of the larger HSA program: one chunk's K and V, the rows' Q and dO, and two [rows, chunk] tiles."""
    rows = max(hsa_rows(tiles[0], groups), hsa_rows(tiles[1], groups))
    d, dv = padded_dim(head_dim), padded_dim(v_dim)
    return element_bytes(dtype) * (chunk * (d + dv) + rows * (d + dv) + 2 * rows * chunk)


def hsa_unsupported(chunk: int, topk: int, mode: str, head_dim: int, v_dim: int, dtype: torch.dtype) -> str | None:
    """Why the HSA kernels cannot run this site, or None when they can."""
    if chunk not in HSA_CHUNKS:
        return f"chunk {chunk} is not supported by the HSA kernels (one of {', '.join(map(str, HSA_CHUNKS))})"
    if mode == "exact" and topk >= 0:
        return "exact scores with a finite topk select by every chunk's true LSE, which the HSA kernels do not compute (they take exact with topk=all)"
    return unsupported(head_dim, v_dim, dtype)
