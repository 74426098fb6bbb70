"""``lower``: bind every longctx op to the implementation the target runs, recorded per site."""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline import PassResult, Program, Stage, register
from ..targets import get_target


@dataclass
class LowerConfig:
    target: str = "cpu"


@register("lower", Stage.LOWER, LowerConfig)
def lower(program: Program, cfg: LowerConfig) -> PassResult:
    """Bind each longctx op to the target's implementation (cpu: the reference op) and record it per site."""
    target = get_target(cfg.target)
    nodes = program.attention_nodes()
    for node in nodes:
        node.meta["lcc"]["target"] = target.name
        node.meta["lcc"]["kernel"] = "longctx.attention/reference" if target.kernels == "reference" else "longctx.attention/triton"
    program.target = target.name
    return PassResult(matches=len(nodes), notes=[f"{len(nodes)} sites bound for {target.name}"])
