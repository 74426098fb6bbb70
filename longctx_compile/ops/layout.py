"""How one sequence is split over the sequence-parallel ranks: Ulysses inside ring, optionally zigzag.

The W = U·R ranks form R ring positions of U Ulysses ranks each (world rank w = j·U + u). The ring
splits the sequence into R shards — contiguous, or zigzag: 2R chunks, ring position j holding chunks
j and 2R-1-j so every position has the same causal work — and each shard is split contiguously
over its U Ulysses ranks. Pure Ulysses is (P, 1), pure ring (1, P). Everything that shards inputs,
gathers outputs or slices masks derives from :meth:`Layout.order`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LccError


@dataclass(frozen=True)
class Layout:
    ulysses: int = 1
    ring: int = 1
    zigzag: bool = False

    @classmethod
    def of(cls, signature: dict[str, Any]) -> Layout:
        """The layout a sequence-parallel program's signature records."""
        sp = signature.get("sequence_parallel")
        if not sp:
            raise LccError("this program is not sequence-parallel")
        return cls(sp.get("ulysses", sp["degree"]), sp.get("ring", 1), sp.get("zigzag", False))

    @classmethod
    def from_list(cls, values: list[int]) -> Layout:
        return cls(values[0], values[1], bool(values[2]))

    def to_list(self) -> list[int]:
        """The op-argument form: [ulysses, ring, zigzag]."""
        return [self.ulysses, self.ring, int(self.zigzag)]

    @property
    def degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def chunks(self) -> int:
        """How many equal chunks the ring cuts a sequence into."""
        return self.ring * (2 if self.zigzag else 1)

    @property
    def multiple(self) -> int:
        """Sequence lengths must be multiples of this: every chunk splits evenly over its Ulysses ranks."""
        return self.chunks * self.ulysses

    def check(self, length: int) -> None:
        """Refuse a length the layout cannot split evenly, naming the numbers."""
        multiple = self.multiple
        if length % multiple:
            how = f"2 × ring degree {self.ring} × Ulysses degree {self.ulysses}" if self.zigzag else f"the sequence-parallel degree {self.degree}"
            raise LccError(f"sequence length {length} is not divisible by {multiple} ({how})")

    def ring_chunks(self, position: int) -> list[int]:
        """The global chunk indices ring position ``position`` holds, in its local order."""
        return [position, 2 * self.ring - 1 - position] if self.zigzag else [position]

    def order(self, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global token index at each place of the rank-order concatenation of all ranks' shards."""
        size = length // self.chunks
        return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for j in range(self.ring) for c in self.ring_chunks(j)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank ``rank``'s shard of a full-length ``x`` along ``dim``."""
        length = x.shape[dim]
        self.check(length)
        piece = length // self.degree
        if self.ring == 1 or not self.zigzag:
            return x.narrow(dim, rank * piece, piece)
        return x.index_select(dim, self.order(length, x.device)[rank * piece : (rank + 1) * piece])

    def unshard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Global token order from the rank-order concatenation of every rank's shard."""
        if self.ring == 1 or not self.zigzag:
            return x
        return x.index_select(dim, torch.argsort(self.order(x.shape[dim], x.device)))
