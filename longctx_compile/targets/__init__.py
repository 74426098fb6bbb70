"""Targets: what a program is lowered for. ``cpu`` keeps the plain-torch reference ops."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LccError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kernels: str  # "reference" | "triton"
    features: tuple[str, ...] = field(default_factory=tuple)


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "plain-torch reference ops on any device (the semantics every kernel is tested against)", "reference"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise LccError(f"unknown target '{name}'; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]
