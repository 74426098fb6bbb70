"""The process group the sequence-parallel ``longctx`` ops run their collectives on, the collectives, and what they sent.

State of this process, set by the user (``distributed.set_group``) or the rank launcher; the collective
ops (``ops/collectives.py``, ``ops/ring.py``) read it, so it lives here, below them. Every collective goes
through the functions here (:func:`all_to_all`, :func:`all_gather`, :func:`all_reduce`, :func:`shift`), which
run it on torch.distributed, or on a :class:`LocalWorld`: P ranks as threads of one process, which checks run
in place of P processes (no process start, no import, no artifact load per rank).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LccError
from .layout import Layout


class LocalWorld:
    """``size`` ranks, each a thread of this process: a collective is every member posting a value and reading all of them."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._barriers: dict[tuple[int, ...], threading.Barrier] = {}
        self._posts: dict[tuple[int, ...], dict[int, Any]] = {}

    def exchange(self, ranks: tuple[int, ...], me: int, value: Any) -> list[Any]:
        """The values the members of ``ranks`` post (this rank posts ``value``), in the order of ``ranks``."""
        with self._lock:
            barrier = self._barriers.setdefault(ranks, threading.Barrier(len(ranks)))
            self._posts.setdefault(ranks, {})[me] = value
        barrier.wait()
        values = [self._posts[ranks][r] for r in ranks]
        barrier.wait()  # every member has read before the next exchange in this group posts
        return values

    def abort(self) -> None:
        """Release every rank waiting in a collective (with ``threading.BrokenBarrierError``): one rank has failed."""
        with self._lock:
            for barrier in self._barriers.values():
                barrier.abort()


@dataclass(frozen=True)
class LocalGroup:
    """A group of a :class:`LocalWorld`: its global ranks, and the rank of the thread holding it."""

    world: LocalWorld
    ranks: tuple[int, ...]
    me: int

    def index(self) -> int:
        return self.ranks.index(self.me)

    def sub(self, ranks: list[int]) -> LocalGroup:
        """The subgroup of this group's members at positions ``ranks``."""
        return LocalGroup(self.world, tuple(self.ranks[i] for i in ranks), self.me)


_LOCAL = threading.local()  # a LocalWorld rank's group and subgroups, per thread


def bind_local(world: LocalWorld | None, rank: int = 0) -> None:
    """Make this thread rank ``rank`` of ``world`` (None: back to torch.distributed's group)."""
    _LOCAL.group = None if world is None else LocalGroup(world, tuple(range(world.size)), rank)
    _LOCAL.subgroups = {}


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


def subgroups(layout: Layout) -> tuple[Any, Any]:
    """(Ulysses group, ring group) of this rank for ``layout``; pure forms use the whole group for their part."""
    whole = group()
    check_degree(layout.degree)
    if layout.ring == 1 or layout.ulysses == 1:
        return whole, whole
    key = (layout.ulysses, layout.ring)
    U, W = layout.ulysses, layout.degree
    ulysses_groups = [list(range(j, j + U)) for j in range(0, W, U)]  # consecutive members
    ring_groups = [list(range(u, W, U)) for u in range(U)]  # every U-th member
    if isinstance(whole, LocalGroup):
        if key not in _LOCAL.subgroups:
            i = whole.index()
            _LOCAL.subgroups[key] = tuple(whole.sub(next(g for g in part if i in g)) for part in (ulysses_groups, ring_groups))
        return _LOCAL.subgroups[key]
    if key not in _SUBGROUPS:
        if whole is not dist.group.WORLD:
            raise LccError("a Ulysses × ring program in a custom group needs its subgroups: distributed.set_group(group, ulysses=..., ring=...)")
        _SUBGROUPS[key] = (dist.new_subgroups_by_enumeration(ulysses_groups)[0], dist.new_subgroups_by_enumeration(ring_groups)[0])
    return _SUBGROUPS[key]


def group() -> Any:
    """The sequence-parallel group (a :class:`LocalGroup` on a LocalWorld's thread); one clear error when torch.distributed is not initialised."""
    local = getattr(_LOCAL, "group", None)
    if local is not None:
        return local
    if not dist.is_available() or not dist.is_initialized():
        raise LccError("this program is sequence-parallel: start it on P ranks (torchrun, or lcc verify) and init torch.distributed first")
    return _GROUP if _GROUP is not None else dist.group.WORLD


def size_of(g: Any) -> int:
    return len(g.ranks) if isinstance(g, LocalGroup) else dist.get_world_size(g)


def rank_of(g: Any) -> int:
    return g.index() if isinstance(g, LocalGroup) else dist.get_rank(g)


def degree() -> int:
    return size_of(group())


def rank() -> int:
    return rank_of(group())


def all_to_all(received: torch.Tensor, send: torch.Tensor, g: Any) -> None:
    """``received[i]`` = member i's ``send[j]``, j this rank's place in ``g`` (``send``, ``received``: [size, ...])."""
    if isinstance(g, LocalGroup):
        for i, sent in enumerate(g.world.exchange(g.ranks, g.me, send)):
            received[i].copy_(sent[g.index()])
    else:
        dist.all_to_all_single(received, send, group=g)


def all_gather(parts: list[torch.Tensor], x: torch.Tensor, g: Any) -> None:
    """``parts[i]`` = member i's ``x``."""
    if isinstance(g, LocalGroup):
        for part, value in zip(parts, g.world.exchange(g.ranks, g.me, x), strict=True):
            part.copy_(value)
    else:
        dist.all_gather(parts, x, group=g)


def all_reduce(x: torch.Tensor, g: Any) -> None:
    """``x`` becomes the sum of every member's ``x``, in place."""
    if isinstance(g, LocalGroup):
        values = g.world.exchange(g.ranks, g.me, x.clone())
        x.copy_(torch.stack(values).sum(0))
    else:
        dist.all_reduce(x, group=g)


def shift(tensors: list[torch.Tensor], g: Any) -> tuple[list[torch.Tensor], list]:
    """Start sending ``tensors`` to the next member of ``g`` and receiving the previous member's: (received, works to wait on)."""
    received = [torch.empty_like(t) for t in tensors]
    if isinstance(g, LocalGroup):
        values = g.world.exchange(g.ranks, g.me, tensors)
        for r, t in zip(received, values[(g.index() - 1) % len(g.ranks)], strict=True):
            r.copy_(t)
        return received, []
    me, size = dist.get_rank(g), dist.get_world_size(g)
    following, previous = dist.get_global_rank(g, (me + 1) % size), dist.get_global_rank(g, (me - 1) % size)
    ops = [dist.P2POp(dist.isend, t, following, g, tag) for tag, t in enumerate(tensors)]
    ops += [dist.P2POp(dist.irecv, r, previous, g, tag) for tag, r in enumerate(received)]
    return received, dist.batch_isend_irecv(ops)


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
    all_gather(parts, x.contiguous(), group())
    full = torch.cat(parts, dim=dim)
    return full if layout is None else as_layout(layout).unshard(full, dim)
