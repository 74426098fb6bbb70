"""The process group the sequence-parallel ``longctx`` ops run their collectives on, and what they sent.

State of this process, set by the user (``distributed.set_group``) or the rank launcher; the collective
ops (``ops/collectives.py``, ``ops/ring.py``) read it, so it lives here, below them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import LccError
from .layout import Layout

_GROUP: dist.ProcessGroup | None = None
# (ulysses, ring) subgroups of a hybrid layout: given with set_group, or made once per layout from the world
_SUBGROUPS: dict[tuple[int, int], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}
# what this process's collectives sent: calls and bytes per collective (for benchmarks and inspection)
TRAFFIC: dict[str, list[int]] = {}


def record(collective: str, sent_bytes: int) -> None:
    calls = TRAFFIC.setdefault(collective, [0, 0])
    calls[0] += 1
    calls[1] += sent_bytes


def set_group(group: dist.ProcessGroup | None, *, ulysses: dist.ProcessGroup | None = None, ring: dist.ProcessGroup | None = None) -> None:
    """Use ``group`` for sequence parallelism (None: the whole world).

    A hybrid (Ulysses × ring) program inside a custom group also needs this rank's Ulysses group
    (the U ranks j·U..j·U+U-1 of ``group``) and ring group (ranks u, u+U, … of ``group``).
    """
    global _GROUP
    _GROUP = group
    _SUBGROUPS.clear()
    if ulysses is not None and ring is not None:
        _SUBGROUPS[dist.get_world_size(ulysses), dist.get_world_size(ring)] = (ulysses, ring)


def subgroups(layout: Layout) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(Ulysses group, ring group) of this rank for ``layout``; pure forms use the whole group for their part."""
    whole = group()
    check_degree(layout.degree)
    if layout.ring == 1 or layout.ulysses == 1:
        return whole, whole
    key = (layout.ulysses, layout.ring)
    if key not in _SUBGROUPS:
        if whole is not dist.group.WORLD:
            raise LccError("a Ulysses × ring program in a custom group needs its subgroups: distributed.set_group(group, ulysses=..., ring=...)")
        U, W = layout.ulysses, layout.degree
        mine_u, _ = dist.new_subgroups_by_enumeration([list(range(j, j + U)) for j in range(0, W, U)])
        mine_r, _ = dist.new_subgroups_by_enumeration([list(range(u, W, U)) for u in range(U)])
        _SUBGROUPS[key] = (mine_u, mine_r)
    return _SUBGROUPS[key]


def group() -> dist.ProcessGroup:
    """The sequence-parallel group; one clear error when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise LccError("this program is sequence-parallel: start it on P ranks (torchrun, or lcc verify) and init torch.distributed first")
    return _GROUP if _GROUP is not None else dist.group.WORLD


def degree() -> int:
    return dist.get_world_size(group())


def rank() -> int:
    return dist.get_rank(group())


def check_degree(expected: int) -> None:
    """Refuse a group whose size differs from the degree the program was converted for."""
    size = degree()
    if size != expected:
        raise LccError(f"this program was converted for sequence-parallel degree {expected}, but the group has {size} ranks")


def as_layout(layout: Layout | int) -> Layout:
    """A degree alone means contiguous shards (Ulysses)."""
    return layout if isinstance(layout, Layout) else Layout(ulysses=layout)


def shard(x: torch.Tensor, layout: Layout | int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of the full-length ``x`` along ``dim`` under ``layout`` (a degree: contiguous)."""
    return as_layout(layout).shard(x, rank, dim)


def gather(x: torch.Tensor, dim: int = 1, layout: Layout | int | None = None) -> torch.Tensor:
    """The full tensor, in token order, from every rank's shard along ``dim`` (no gradient; for outputs and checks)."""
    parts = [torch.empty_like(x) for _ in range(degree())]
    dist.all_gather(parts, x.contiguous(), group=group())
    full = torch.cat(parts, dim=dim)
    return full if layout is None else as_layout(layout).unshard(full, dim)
