"""``lower``: bind every longctx op to the implementation the target runs, with its tile configs, per site.

On ``cpu`` the reference op stays. On Triton targets each ``longctx::attention`` becomes a
``longctx::flash_attention`` whose arguments carry the forward and backward tile configs chosen for
that target and shape (heuristic, ``--opt`` overrides, or autotuned on a matching GPU).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import LccError
from ..pipeline import PassResult, Program, Stage, register
from ..targets import Target, get_target
from ..targets.configs import REPRESENTATIVE_LENGTH, AttentionConfigs, Shape, choose, override, unsupported
from .graph import fake_call, val

REFERENCE = "longctx.attention/reference"
TRITON = "longctx.flash_attention/triton"
# the forms' own attention ops, which run their plain-torch definition on every target for now
FORM_OPS = {
    torch.ops.longctx.ring_attention.default: "longctx.ring_attention/reference",
    torch.ops.longctx.hsa_attention.default: "longctx.hsa_attention/reference",
}
COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")


@dataclass
class LowerConfig:
    """Target plus optional tile overrides (``--opt fwd_block_m=64`` …), autotuning and fallback."""

    target: str = "cpu"
    fwd_block_m: int | None = None
    fwd_block_n: int | None = None
    fwd_warps: int | None = None
    fwd_stages: int | None = None
    bwd_block_m: int | None = None
    bwd_block_n: int | None = None
    bwd_warps: int | None = None
    bwd_stages: int | None = None
    autotune: bool = False
    fallback: Literal["none", "reference"] = "none"

    def overrides(self) -> dict[str, dict[str, int]]:
        names = {"block_m": "block_m", "block_n": "block_n", "warps": "num_warps", "stages": "num_stages"}
        return {
            kind: {field: getattr(self, f"{kind}_{opt}") for opt, field in names.items() if getattr(self, f"{kind}_{opt}") is not None}
            for kind in ("fwd", "bwd")
        }


@register("lower", Stage.LOWER, LowerConfig)
def lower(program: Program, cfg: LowerConfig) -> PassResult:
    """Bind each longctx op to the target's kernel and tile configs (cpu: the reference op) and record them per site."""
    target = get_target(cfg.target)
    program.target = target.name
    nodes = []
    for node in program.attention_nodes():
        if node.target in FORM_OPS:
            node.meta["lcc"].update(target=target.name, kernel=FORM_OPS[node.target])
        else:
            nodes.append(node)
    if target.kernels == "reference":
        for node in nodes:
            node.meta["lcc"].update(target=target.name, kernel=REFERENCE)
        return PassResult(matches=len(nodes), notes=[f"{len(nodes)} sites keep the reference op on {target.name}"])
    notes: list[str] = []
    chosen: dict[tuple, AttentionConfigs] = {}
    lowered = 0
    for node in nodes:
        facts = node.meta["lcc"]
        q, v = val(node.args[0]), val(node.args[2])
        length = min(int(program.signature["max_len"]), REPRESENTATIVE_LENGTH)
        shape = Shape(q.shape[-1], v.shape[-1], q.dtype, facts["hq"] // facts["hkv"], facts["hkv"], length)
        reason = unsupported(shape)
        if reason:
            if cfg.fallback != "reference":
                raise LccError(f"layer {facts['layer']} ({facts['module']}): {reason}; pass --opt fallback=reference to keep the reference op there")
            facts.update(target=target.name, kernel=REFERENCE, fallback=reason)
            notes.append(f"site {facts['site']} ({facts['module']}): reference op kept: {reason}")
            continue
        causal, window = node.args[7], node.args[8]
        key = (shape, causal, window, facts["mask"])
        if key not in chosen:
            chosen[key] = _configs(target, shape, cfg, causal, window, facts["mask"], notes)
        _bind(program.gm.graph, node, chosen[key])
        facts.update(target=target.name, kernel=TRITON, config=chosen[key].to_json(shape))
        lowered += 1
    notes.insert(0, f"{lowered} of {len(nodes)} sites bound to Triton kernels for {target.name}")
    return PassResult(matches=lowered, notes=notes)


def _configs(target: Target, shape: Shape, cfg: LowerConfig, causal: bool, window: int, mask: str, notes: list[str]) -> AttentionConfigs:
    """Heuristic configs, replaced by autotuned ones when asked and possible, then by the user's overrides."""
    configs = choose(target, shape)
    if cfg.autotune:
        from ..targets import autotune

        reason = autotune.unavailable(target)
        if reason:
            notes.append(reason)
        else:
            key = autotune.cache_key(target, shape, mask, torch.cuda.get_device_name())
            configs, hit = autotune.tune(target, shape, key, autotune.gpu_bench(shape, causal, window))
            notes.append(f"autotune {shape.key()}: fwd {configs.fwd}, bwd {configs.bwd} ({'cached' if hit else 'measured'})")
    return override(configs, target, shape, cfg.overrides())


def _bind(graph: torch.fx.Graph, node: torch.fx.Node, configs: AttentionConfigs) -> None:
    """Replace ``node`` by ``flash_attention(..., fwd, bwd)[0]``, keeping its metadata and facts."""
    args = (*node.args[:9], configs.fwd.as_list(), configs.bwd.as_list())
    with graph.inserting_before(node):
        flash = graph.call_function(torch.ops.longctx.flash_attention.default, args)
        out = graph.call_function(operator.getitem, (flash, 0))
    flash.meta["val"] = fake_call(torch.ops.longctx.flash_attention.default, *args)
    out.meta["val"] = flash.meta["val"][0]
    for key in COPIED_META:
        if key in node.meta:
            flash.meta[key] = out.meta[key] = node.meta[key]
    flash.meta["lcc"] = node.meta["lcc"]
    flash.meta["lcc_from"] = out.meta["lcc_from"] = [node.name]
    node.replace_all_uses_with(out)
    graph.erase_node(node)
